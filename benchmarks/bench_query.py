"""Query speed and recall: the library against raw FAISS, and every index type against exact.

Part 1, library overhead: p50/p99 latency and QPS of `Searcher.search` by record id
and by image file, against the floor it is built on, measured on the same index
in the same run: raw `index.search` on an in-memory vector plus the one SQLite
lookup of the hits' rows (by id), plus decode and embed (by image). The index
holds synthetic clustered vectors in EfficientNet-Lite0's 1280-d space, so real
JPEG queries embedded with the real weights land among them.

Part 2, index types: build time, size, recall@10 against exact search, and
latency for exact (Flat), IVF-Flat, HNSW and IVF-PQ at 20k / 200k / 1M synthetic
2048-d vectors drawn from a gaussian mixture (clustered like real embeddings,
not uniform noise). Recall is measured on held-out queries from the same mixture,
at faiss's default breadth and at the breadth `simsearch.storage.faiss_index.tune_params`
picks for a 0.95 recall@10 target.

    python benchmarks/bench_query.py --quick
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from common import NOISE_NOTE, latencies, print_table, progress, replicated_jpegs, rss_mb, summarise_latency, write_result


def clustered(n: int, dim: int, seed: int, clusters: int = 1000, spread: float = 0.6,
              centres: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors from a gaussian mixture; returns (vectors, centres), built in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        # Cluster sizes vary (Zipf-like), as classes do in real collections.
        which = np.minimum(rng.zipf(1.3, m) - 1, len(centres) - 1) if len(centres) > 1 else np.zeros(m, int)
        which = rng.permutation(len(centres))[which % len(centres)]
        chunk = centres[which] + rng.standard_normal((m, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        out[start:start + m] = chunk
    return out, centres


# ---------------------------------------------------------------- part 1: the library against its floor

def side_by_side(query: str, raw_name: str, raw, lib, n: int, round_size: int, warmup: int) -> list[dict]:
    """Latency rows for the raw floor and the library, interleaved in rounds so a burst of load
    from other jobs hits both sides alike."""
    raw_t, lib_t = [], []
    for start in range(0, n, round_size):
        m = min(round_size, n - start)
        raw_t += latencies(lambda j: raw(start + j), m, warmup=warmup)
        lib_t += latencies(lambda j: lib(start + j), m, warmup=warmup)
    raw_s, lib_s = summarise_latency(raw_t), summarise_latency(lib_t)
    return [{"query": query, "path": raw_name, **raw_s},
            {"query": query, "path": "Searcher.search", **lib_s, "p50_vs_raw": lib_s["p50_ms"] / raw_s["p50_ms"]}]


def make_library_index(n: int, factory: str | None = None, seed: int = 0) -> Path:
    """An index folder with n synthetic records (Lite0's spec), committed the way build-index commits."""
    from simsearch.storage.layout import sync_faiss
    from simsearch.pipeline.embed import load_backbone
    from simsearch.records import GroundTruthObject, ImageRecord
    from simsearch.spec import IndexSpec
    from simsearch.storage.store import NewImage, Store

    spec = load_backbone("efficientnet-lite0").spec
    index_dir = Path(tempfile.mkdtemp(prefix="simsearch-bench-query-"))
    store = Store(index_dir, create=True)
    store.save_spec(IndexSpec(spec, index_type=None))
    xb, _ = clustered(n, spec.dim, seed, clusters=200)
    labels = ["person", "car", "dog", "chair", "cat"]
    for start in range(0, n, 2000):
        items = []
        for i in range(start, min(n, start + 2000)):
            record = ImageRecord(Path(f"/synthetic/{i:07d}.jpg"), "voc", "synthetic", "train",
                                 [GroundTruthObject(labels[i % 5], 10, 20, 110, 220)])
            items.append(NewImage(record, f"{i:064x}", 1000, 0, 500, 375, xb[i]))
        store.add_images(items)
    sync_faiss(store, spec, factory)
    store.close()
    return index_dir


def library_vs_raw(n: int, factory: str | None, queries: int, image_queries: int) -> list[dict]:
    from simsearch.storage import faiss_index
    from simsearch.pipeline.embed import preprocess
    from simsearch.retrieval.searcher import Searcher
    from simsearch.pipeline.read import open_image
    from simsearch.storage.store import Store

    progress(f"part 1: library index of {n} records")
    index_dir = make_library_index(n, factory)
    try:
        searcher = Searcher(index_dir, device="cpu")
        raw_store = Store(index_dir)
        ids, xb = raw_store.vectors()
        rng = np.random.default_rng(1)
        picks = rng.choice(ids, queries + 10, replace=False)
        k = 10

        def raw_by_id(i: int):
            row = int(np.searchsorted(ids, picks[i]))
            _, hit_ids = faiss_index.search(searcher.index, xb[row:row + 1], k + 1)
            return raw_store.images([int(h) for h in hit_ids[0] if h >= 0])

        def lib_by_id(i: int):
            return searcher.search(int(picks[i]), k)

        rows = side_by_side("by id", "raw faiss + SQLite rows", raw_by_id, lib_by_id, queries, 50, 2)

        jpegs = sorted(replicated_jpegs(max(image_queries, 60)).glob("*.jpg"))[:image_queries]
        embedder = searcher.embedder  # load the backbone once, outside the timings

        def raw_by_image(i: int):
            vec = embedder.embed_batch([preprocess(open_image(jpegs[i]), embedder.spec.preprocess)]).vectors
            _, hit_ids = faiss_index.search(searcher.index, vec, k)
            return raw_store.images([int(h) for h in hit_ids[0] if h >= 0])

        def lib_by_image(i: int):
            return searcher.search(jpegs[i], k)

        rows += side_by_side("by image", "raw decode+embed+faiss+SQLite", raw_by_image, lib_by_image,
                             image_queries, 10, 1)
        for r in rows:
            r.update(n=n, index_type=searcher.spec.index_type)
        searcher.close()
        raw_store.close()
        return rows
    finally:
        shutil.rmtree(index_dir, ignore_errors=True)


# ---------------------------------------------------------------- part 2: index types

def index_types(n: int, dim: int, hnsw: bool, pq: bool) -> list[str]:
    nlist = 1 << int(round(np.log2(4 * np.sqrt(n))))
    types = ["Flat", f"IVF{nlist},Flat"]
    if hnsw:
        types.append("HNSW32,Flat")
    types.append(f"IVF{nlist},SQ8")  # 4x smaller than Flat, trains in seconds
    if pq:  # 32x smaller, but PQ training at 2048-d takes minutes on 2 cores
        types.append(f"IVF{nlist},PQ{64 if dim % 64 == 0 else 32}")
    return types


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def compare_index_types(n: int, dim: int, n_queries: int, hnsw: bool, pq: bool, target: float) -> list[dict]:
    import faiss

    from simsearch.storage import faiss_index

    progress(f"part 2: {n} x {dim} clustered vectors")
    xb, centres = clustered(n, dim, seed=n, clusters=max(100, n // 100), spread=1.0)
    xq, _ = clustered(n_queries, dim, seed=n + 1, centres=centres)
    ids = np.arange(n, dtype=np.int64)
    k = 10
    rows = []
    truth = None
    for factory in index_types(n, dim, hnsw, pq):
        progress(f"  {factory}: build")
        before = rss_mb()
        started = time.perf_counter()
        index = faiss_index.build(xb, ids, factory)
        build_s = time.perf_counter() - started
        size_mb = len(faiss.serialize_index(index)) / 2**20
        row = {"n": n, "index": factory, "build_s": build_s, "size_mb": size_mb,
               "rss_delta_mb": rss_mb() - before}
        default = faiss_index.default_params(factory)
        faiss_index.apply_params(index, default)
        started = time.perf_counter()
        _, found = index.search(xq, k)
        batch_s = time.perf_counter() - started
        if truth is None:  # Flat comes first: it is the ground truth
            truth = found
        row["recall@10_default"] = recall_at(found, truth, k)
        row["default_params"] = _params_text(default)
        if factory != "Flat":
            progress(f"  {factory}: tune for recall@10 >= {target}")
            started = time.perf_counter()
            tuned, sample_recall = faiss_index.tune_params(index, xb, ids, target=target)
            row["tune_s"] = time.perf_counter() - started
            row["tuned_params"] = _params_text(tuned)
            row["recall_sample"] = sample_recall
            faiss_index.apply_params(index, tuned)
            started = time.perf_counter()
            _, found = index.search(xq, k)
            batch_s = time.perf_counter() - started
            row["recall@10"] = recall_at(found, truth, k)
        else:
            row["recall@10"] = 1.0
        single = summarise_latency(latencies(lambda i: index.search(xq[i % n_queries:i % n_queries + 1], k),
                                             min(200, n_queries)))
        row.update(p50_ms=single["p50_ms"], p99_ms=single["p99_ms"], batch_qps=n_queries / batch_s)
        rows.append(row)
        del index
    return rows


def _params_text(p) -> str:
    return ",".join(f"{k}={v}" for k, v in (("nprobe", p.nprobe), ("efSearch", p.efsearch)) if v) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k vectors only, fewer queries")
    parser.add_argument("--sizes", help="comma-separated database sizes (default 20000 quick, 20000,200000,1000000 full)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--library-n", type=int, default=20_000, help="records in the part-1 index")
    parser.add_argument("--hnsw-max", type=int, default=200_000,
                        help="largest size to build HNSW at (its build at 1M x 2048-d takes very long on 2 cores)")
    parser.add_argument("--pq", action="store_true", help="also IVF-PQ (default in full mode; slow to train)")
    parser.add_argument("--library-index", action="append",
                        help="faiss factory for a part-1 index, repeatable (default: chosen by size, then HNSW32,Flat)")
    parser.add_argument("--target", type=float, default=0.95, help="recall@10 the tuning aims for")
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sizes or ("20000" if args.quick else "20000,200000,1000000")).split(",")]
    n_queries = 200 if args.quick else 1000

    lib_rows = []
    for factory in args.library_index or [None, "HNSW32,Flat"]:
        lib_rows += library_vs_raw(args.library_n, factory, 200 if args.quick else 1000, 20 if args.quick else 100)
    print_table(f"query: library vs raw FAISS + SQLite ({args.library_n} records, k=10)", lib_rows,
                ["index_type", "query", "path", "p50_ms", "p99_ms", "qps", "p50_vs_raw"],
                [NOISE_NOTE, "by-id and by-image timings interleaved in rounds, same index, same process"])
    type_rows = []
    for n in sizes:
        type_rows += compare_index_types(n, args.dim, n_queries, n <= args.hnsw_max, args.pq or not args.quick,
                                         args.target)
    notes = [NOISE_NOTE, f"{n_queries} held-out queries from the same gaussian mixture, recall against Flat",
             "recall@10_default: faiss/simsearch default breadth; recall@10: held-out queries after tune_params",
             "recall_sample: what tune_params measured on indexed vectors, self excluded (= query-by-id recall)",
             "size_mb: serialized index (vectors + structure); rss_delta_mb: resident growth while building",
             f"HNSW built up to {args.hnsw_max} vectors only"]
    print_table(f"query: index types at {', '.join(map(str, sizes))} x {args.dim}-d", type_rows,
                ["n", "index", "build_s", "size_mb", "default_params", "recall@10_default", "tuned_params",
                 "recall@10", "recall_sample", "p50_ms", "p99_ms", "batch_qps"], notes)
    write_result("query", {"quick": args.quick, "library": lib_rows, "index_types": type_rows,
                           "target_recall": args.target})


if __name__ == "__main__":
    main()
