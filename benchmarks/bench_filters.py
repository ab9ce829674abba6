"""Filtered search: query latency at 50%, 5% and 0.5% selectivity against unfiltered, Flat and IVF-PQ.

Records go through the real store (1280-d vectors with the spectrum of real
EfficientNet-Lite0 embeddings, `real_vectors.py`; a gaussian mixture when neither
../shared/data nor the fitted spectrum's cache is there). Each record gets a
dataset name at random, nested so that a filter on one, two or three names keeps
0.5%, 5% or 50% of the records, uncorrelated with where its vector lies (the hard
case for an approximate index: the allowed records are spread over every list).
A class filter (ground-truth boxes) at 0.5% exercises the box join.

Each row is `Searcher.search_vector` one held-out query at a time (the store's id
lookup included), p50 against the unfiltered p50 of the same index in the same
run, on the exact index (Flat) and on IVF-PQ fast-scan with re-ranking (forced at
this size). Beside the path the search chooses, both ways it can take are timed:
scoring the allowed vectors exactly, and FAISS id selectors (which is where
`faiss_index.EXACT_ALLOWED` comes from). `results` is the fewest results any query
got (must be k); `old pool` the mean number the previous 500-neighbour post-filter
would have returned; recall@k is against exact search over the allowed records.

    python benchmarks/bench_filters.py --quick     # 20k records, 50 queries
    python benchmarks/bench_filters.py             # 50k records, 200 queries
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from common import NOISE_NOTE, SHARED_DATA, latencies, percentile, print_table, progress, write_result

K = 10
DIM = 1280
SHARES = {"50%": ("s0.5", "s5", "s50"), "5%": ("s0.5", "s5"), "0.5%": ("s0.5",)}
OLD_POOL = 500  # what search_vector fetched before filtering, before filters moved inside the search


def _vectors(n: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    from real_vectors import CACHE, realistic

    if CACHE.exists() or SHARED_DATA.exists():
        xb, xq = realistic(n, queries, seed)
        return xb, xq, "spectrum of real Lite0 vectors"
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 30), DIM), dtype=np.float32)
    def draw(m):
        x = centres[rng.integers(0, len(centres), m)] + 0.8 * rng.standard_normal((m, DIM), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    return draw(n), draw(queries), "gaussian mixture (no real vectors to fit)"


def _store(index_dir: Path, xb: np.ndarray, seed: int):
    from simsearch.pipeline.embed import load_backbone
    from simsearch.records import GroundTruthObject, ImageRecord
    from simsearch.spec import IndexSpec
    from simsearch.storage.store import NewImage, Store

    embedder = load_backbone("efficientnet-lite0").spec
    u = np.random.default_rng(seed).random(len(xb))
    names = np.where(u < 0.005, "s0.5", np.where(u < 0.05, "s5", np.where(u < 0.5, "s50", "rest")))
    rare = np.random.default_rng(seed + 1).random(len(xb)) < 0.005
    store = Store(index_dir, create=True)
    store.save_spec(IndexSpec(embedder, index_type=None))
    for start in range(0, len(xb), 5000):  # one transaction per 5k, as build-index commits batches
        store.add_images([
            NewImage(ImageRecord(Path(f"/bench/{i:08d}.jpg"), "folder", str(names[i]), None,
                                 [GroundTruthObject("rare" if rare[i] else "common", 10, 10, 200, 200)]),
                     f"{i:064x}", 1, 1, 640, 480, xb[i]) for i in range(start, min(start + 5000, len(xb)))])
    return store, embedder


def _rows(index_dir: Path, xq: np.ndarray, kind: str) -> list[dict]:
    from simsearch.retrieval.filters import Filters
    from simsearch.retrieval.searcher import Searcher
    from simsearch.storage import faiss_index

    cases = [("none", None)] + [(share, Filters(dataset=names)) for share, names in SHARES.items()]
    cases.append(("0.5% class", Filters(label="rare")))
    rows = []
    with Searcher(index_dir) as searcher:
        ids, xb = searcher.store.vectors()
        _, pool = searcher.knn(xq, OLD_POOL)
        base = None
        for what, filters in cases:
            allowed = searcher.store.ids_matching(filters) if filters else ids
            mask = np.isin(ids, allowed)
            truth = ids[mask][np.argsort(-(xq @ xb[mask].T), axis=1)[:, :K]]
            row = {"index": kind, "filter": what, "allowed": int(len(allowed))}

            def run(i, filters=filters):
                return searcher.search_vector(xq[i:i + 1], K, filters=filters)

            found = [run(i) for i in range(len(xq))]
            row["results"] = min(len(f) for f in found)
            row["recall"] = float(np.mean([len({n.id for n in f} & set(t.tolist())) / K for f, t in zip(found, truth)]))
            row["old_pool"] = float(np.mean(np.isin(pool, allowed).sum(axis=1).clip(max=K))) if filters else K
            row["p50_ms"] = percentile(latencies(run, len(xq)), 50) * 1e3
            if filters is not None:
                ids_ms = latencies(lambda i: searcher.store.ids_matching(filters), min(len(xq), 30))
                row["ids_ms"] = percentile(ids_ms, 50) * 1e3
                chosen = faiss_index.EXACT_ALLOWED
                for way, limit in (("exact_ms", 10**12), ("selector_ms", 0)):
                    faiss_index.EXACT_ALLOWED = limit
                    try:
                        row[way] = percentile(latencies(run, len(xq)), 50) * 1e3
                    finally:
                        faiss_index.EXACT_ALLOWED = chosen
                row["x_unfiltered"] = row["p50_ms"] / base
            else:
                base = row["p50_ms"]
                row["x_unfiltered"] = 1.0
            progress(f"  {kind} {what}: {row}")
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k records, 50 queries")
    parser.add_argument("--n", type=int, help="records (default 50k; 20k with --quick)")
    parser.add_argument("--queries", type=int, help="held-out queries (default 200; 50 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = args.n or (20_000 if args.quick else 50_000)
    queries = args.queries or (50 if args.quick else 200)

    from simsearch.storage import faiss_index, layout

    work = Path(tempfile.mkdtemp(prefix="simsearch-bench-filters-"))
    try:
        progress(f"{n:,} records x {DIM}-d, {queries} held-out queries")
        xb, xq, source = _vectors(n, queries, args.seed)
        store, embedder = _store(work / "index", xb, args.seed)
        del xb
        rows = []
        ivf = f"IVF{faiss_index.ivf_lists(n)},PQ{DIM // 4}x4fs"
        for kind, factory in (("Flat", "Flat"), ("IVF-PQ", ivf)):
            progress(f"  building {factory}")
            synced = layout.sync_faiss(store, embedder, factory)
            label = kind if kind == "Flat" else f"{factory} nprobe {synced.spec.nprobe}"
            rows += _rows(work / "index", xq, label)
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    columns = ["index", "filter", "allowed", "p50_ms", "x_unfiltered", "exact_ms", "selector_ms", "ids_ms", "results",
               "old_pool", "recall"]
    notes = [f"{n:,} records x {DIM}-d ({source}), k={K}, {queries} held-out queries one at a time, "
             f"Searcher.search_vector (store id lookup included); EXACT_ALLOWED={faiss_index.EXACT_ALLOWED}",
             "x_unfiltered: filtered p50 / unfiltered p50 of the same index, this run; exact_ms / selector_ms: "
             "the same search forced down each path; ids_ms: Store.ids_matching alone",
             "results: fewest results any query got; old_pool: mean results of the former 500-neighbour post-filter",
             NOISE_NOTE]
    print_table("Filtered search", rows, columns, notes)
    write_result("filters", {"n": n, "dim": DIM, "k": K, "queries": queries, "vectors": source,
                             "exact_allowed": faiss_index.EXACT_ALLOWED, "rows": rows})


if __name__ == "__main__":
    main()
