"""Scale: the store and FAISS sides of an index at 10k, 100k and 1M records (no backbone).

Drives the real APIs an incremental `build-index` uses: `Store.add_images`,
`Store.remove_images` and `layout.sync_faiss` (first build, +10k images, -1%, full
rebuild of the same records), with vectors that have the spectrum of real
EfficientNet-Lite0 embeddings (`real_vectors.py`: fitted on the photos of
../shared/data and composites of them; isotropic noise would be a needlessly hard
case). Queries are held out: drawn from the same groups, never added. A separate
process opens the index with `Searcher` (memory-mapped, as `simsearch query` and
`serve` do) and answers them one at a time, so its RSS is that of a query process.
Per size, one table:

- bytes per image on disk: the whole index folder / records (SQLite + FAISS + spec)
- time to add 10k images to the existing index vs a full rebuild of the same records
- time to delete 1% of the records
- query p50/p99 through `Searcher.search_vector` and the RSS of that process
- recall@10 of those queries against exact search over the same vectors, and the
  QPS of `Searcher.knn` against exact search (both one query at a time, each at the
  faster of one or two OpenMP threads: faiss answers one query faster on one here)

    python benchmarks/bench_scale.py --quick             # 10k and 100k (a few minutes)
    python benchmarks/bench_scale.py                     # 10k, 100k and 1M (about ten minutes here)
    python benchmarks/bench_scale.py --sizes 300000      # any sizes
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import NOISE_NOTE, percentile, print_table, progress, write_result

ADD = 10_000  # images added to an existing index
DELETE_SHARE = 0.01  # share of the records then deleted
QUERIES = 200  # held-out queries for latency and recall
EXACT_QUERIES = 20  # of those, timed against exact search one at a time (0.5 s each at 1M)
K = 10
BARS_1M = {"rss_mb": 4096, "add_share": 0.05, "recall": 0.95, "qps_x": 10.0}  # issue #11, at 1M records


# ---------------------------------------------------------------- the store side

def _feature_map_optional() -> bool:
    """Whether this store's NewImage takes feature_map=None (no map stored)."""
    from simsearch.storage.store import NewImage

    for f in dataclasses.fields(NewImage):
        if f.name == "feature_map":
            return f.default is None or "None" in str(f.type)
    return True


def _add(store, xb: np.ndarray, start: int, tiny_map) -> list[int]:
    from simsearch.records import ImageRecord
    from simsearch.storage.store import NewImage

    ids: list[int] = []
    for chunk in range(0, len(xb), 5000):  # one transaction per 5k, as build-index commits batches
        part = np.asarray(xb[chunk:chunk + 5000])
        ids += store.add_images([
            NewImage(ImageRecord(Path(f"/bench/{start + chunk + i:08d}.jpg"), "folder", "bench"),
                     f"{start + chunk + i:064x}", 1, 1, 640, 480, v, tiny_map)
            for i, v in enumerate(part)])
    return ids


class AnonPeak:
    """Peak anonymous RSS of this process while a block runs (mapped vector files excluded), in MiB."""

    def __enter__(self) -> "AnonPeak":
        self.peak, self._stop = _rss_anon_mb(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, _rss_anon_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon_mb())


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _timed_sync(store, spec, label: str):
    from simsearch.storage import layout

    progress(f"  sync_faiss: {label}")
    with AnonPeak() as memory:
        started = time.perf_counter()
        synced = layout.sync_faiss(store, spec.embedder, None)
        seconds = time.perf_counter() - started
    progress(f"  ... {synced.action} in {seconds:.1f}s ({synced.spec.index_type}, nprobe {synced.spec.nprobe}, "
             f"efSearch {synced.spec.efsearch}, probe recall {synced.recall}; writer anon peak {memory.peak:.0f} MiB)")
    return synced, seconds, memory.peak


def _folder_bytes(folder: Path) -> dict:
    sizes = {p.name: p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    faiss_bytes = sum(v for k, v in sizes.items() if k.startswith("index.") and k.endswith(".faiss"))
    sqlite_bytes = sum(v for k, v in sizes.items() if k.startswith("simsearch.sqlite"))
    return {"total": sum(sizes.values()), "faiss": faiss_bytes, "sqlite": sqlite_bytes}


# ---------------------------------------------------------------- exact search over the vectors file

def _exact(xq: np.ndarray, xb: np.ndarray, row_ids: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """(nq, K) ids of the exact top K among the alive rows, read in chunks."""
    import faiss

    heap = faiss.ResultHeap(len(xq), K, keep_max=True)
    for start in range(0, len(xb), 100_000):
        rows = np.flatnonzero(alive[start:start + 100_000]) + start
        if len(rows):
            D, I = faiss.knn(xq, np.ascontiguousarray(xb[rows]), min(K, len(rows)), faiss.METRIC_INNER_PRODUCT)
            heap.add_result(D, np.where(I >= 0, row_ids[rows][np.maximum(I, 0)], -1))
    heap.finalize()
    return heap.I


def _exact_qps(xq: np.ndarray, xb: np.ndarray) -> tuple[float, int]:
    """(QPS, threads) of exact search one query at a time over every vector (faiss.knn, what IndexFlatIP does).

    The baseline at its best: faiss searches a single query faster on one OpenMP thread
    than on two here (180 against 300 ms at 1M), so both are timed and the faster kept.
    """
    import faiss

    xb = np.ascontiguousarray(xb) if len(xb) <= 200_000 else xb  # small: in memory; large: mapped pages
    faiss.knn(xq[:1], xb, K, faiss.METRIC_INNER_PRODUCT)  # warm the pages
    best = (0.0, 0)
    default = faiss.omp_get_max_threads()
    for threads in sorted({1, default}):
        faiss.omp_set_num_threads(threads)
        times = []
        for q in xq[:EXACT_QUERIES]:
            started = time.perf_counter()
            faiss.knn(q[None], xb, K, faiss.METRIC_INNER_PRODUCT)
            times.append(time.perf_counter() - started)
        best = max(best, (len(times) / sum(times), threads))
    faiss.omp_set_num_threads(default)
    return best


# ---------------------------------------------------------------- the query process

def query_worker(index_dir: str, queries: str, out: str) -> None:
    """Open the index as `simsearch query` does and answer held-out queries one at a time."""
    from simsearch.retrieval.searcher import Searcher

    xq = np.load(queries)
    started = time.perf_counter()
    searcher = Searcher(index_dir, device="cpu")
    open_s = time.perf_counter() - started
    found = np.full((len(xq), K), -1, dtype=np.int64)
    full = []
    for i in range(len(xq)):
        started = time.perf_counter()
        hits = searcher.search_vector(xq[i:i + 1], K)
        full.append(time.perf_counter() - started)
        found[i, :len(hits)] = [h.id for h in hits]
    import faiss

    default = faiss.omp_get_max_threads()
    timed = {}
    for threads in sorted({1, default}):
        faiss.omp_set_num_threads(threads)
        timed[threads] = []
        for i in range(len(xq)):
            started = time.perf_counter()
            searcher.knn(xq[i:i + 1], K)
            timed[threads].append(time.perf_counter() - started)
    faiss.omp_set_num_threads(default)
    threads = min(timed, key=lambda t: sum(timed[t]))
    raw = timed[threads]
    status = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in
              Path("/proc/self/status").read_text().splitlines() if line.startswith(("VmRSS", "VmHWM"))}
    np.save(out, found)
    print(json.dumps({"open_s": open_s, "full": full, "raw": raw, "raw_threads": threads, "rss_mb": status["VmRSS"],
                      "peak_rss_mb": status["VmHWM"], "index_type": searcher.spec.index_type}))


def _query_process(index_dir: Path, xq: np.ndarray, work: Path) -> tuple[dict, np.ndarray]:
    np.save(work / "xq.npy", xq)
    out = subprocess.run([sys.executable, __file__, "--query-worker", str(index_dir), str(work / "xq.npy"),
                          str(work / "found.npy")], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"query process failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1]), np.load(work / "found.npy")


# ---------------------------------------------------------------- one size

def measure(n: int, work: Path, seed: int = 0) -> dict:
    from real_vectors import realistic
    from simsearch.pipeline.embed import load_backbone
    from simsearch.spec import IndexSpec
    from simsearch.storage.store import Store

    embedder = load_backbone("efficientnet-lite0").spec
    dim = embedder.dim
    progress(f"{n:,} records: vectors with the Lite0 spectrum")
    xb = np.lib.format.open_memmap(work / "xb.npy", mode="w+", dtype=np.float32, shape=(n + ADD, dim))
    _, xq = realistic(n + ADD, QUERIES, seed, out=xb)
    tiny_map = None if _feature_map_optional() else np.zeros((1, 1, 1), np.float16)
    index_dir = work / "index"
    row = {"n": n, "dim": dim, "feature_map": "none" if tiny_map is None else "1x1x1 placeholder"}
    with Store(index_dir, create=True) as store:
        store.save_spec(IndexSpec(embedder, index_type=None))
        progress(f"  store: adding {n:,} records")
        started = time.perf_counter()
        row_ids = np.asarray(_add(store, xb[:n], 0, tiny_map), dtype=np.int64)
        row["store_add_s"] = time.perf_counter() - started
        spec = store.spec
        synced, row["build_s"], row["build_anon_peak_mb"] = _timed_sync(store, spec, f"first build of {n:,}")
        row["first_type"] = synced.spec.index_type

        row_ids = np.concatenate([row_ids, _add(store, xb[n:], n, tiny_map)])
        synced, row["add_s"], row["add_anon_peak_mb"] = _timed_sync(store, spec, f"+{ADD:,} images")
        row.update(add_action=synced.action, index_type=synced.spec.index_type, nprobe=synced.spec.nprobe,
                   efsearch=synced.spec.efsearch, probe_recall=synced.recall)

        progress(f"  query process: {QUERIES} held-out queries")
        stats, found = _query_process(index_dir, xq, work)
        alive = np.ones(n + ADD, dtype=bool)
        truth = _exact(xq, xb, row_ids, alive)
        row["recall"] = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))
        row.update(p50_ms=percentile(stats["full"], 50) * 1e3, p99_ms=percentile(stats["full"], 99) * 1e3,
                   raw_p50_ms=percentile(stats["raw"], 50) * 1e3, qps=len(stats["raw"]) / sum(stats["raw"]),
                   knn_threads=stats["raw_threads"],
                   rss_mb=stats["rss_mb"], peak_rss_mb=stats["peak_rss_mb"], open_s=stats["open_s"])
        progress("  exact search, one query at a time")
        row["exact_qps"], row["exact_threads"] = _exact_qps(xq, xb)
        row["qps_x"] = row["qps"] / row["exact_qps"]

        gone = np.sort(np.random.default_rng(seed).choice(row_ids[:n], int(n * DELETE_SHARE), replace=False))
        store.remove_images(gone.tolist())
        synced, row["delete_s"], row["delete_anon_peak_mb"] = _timed_sync(store, spec,
                                                                          f"-{len(gone):,} ({DELETE_SHARE:.0%})")
        row["delete_action"] = synced.action

        from simsearch.storage import layout

        layout.faiss_paths(index_dir)[1].unlink()  # force the full path on the same records
        synced, row["rebuild_s"], row["rebuild_anon_peak_mb"] = _timed_sync(store, spec, "full rebuild")
        row["rebuild_recall_probe"] = synced.recall
        row["records"] = store.count("images")
    row["add_share"] = row["add_s"] / row["rebuild_s"]
    row["delete_share"] = row["delete_s"] / row["rebuild_s"]
    disk = _folder_bytes(index_dir)
    row.update(bytes_per_image=disk["total"] / row["records"], faiss_bytes_per_image=disk["faiss"] / row["records"],
               sqlite_bytes_per_image=disk["sqlite"] / row["records"])
    return row


def _table(row: dict) -> None:
    bars = row["n"] >= 1_000_000
    other = row["bytes_per_image"] - row["sqlite_bytes_per_image"] - row["faiss_bytes_per_image"]
    def bar(text: str) -> str:
        return text if bars else ""
    lines = [
        {"what": "bytes per image on disk", "measured": f"{row['bytes_per_image']:,.0f} B",
         "against": f"SQLite {row['sqlite_bytes_per_image']:,.0f} + FAISS {row['faiss_bytes_per_image']:,.0f} + other "
                    f"(vector shards) {other:,.0f}",
         "bar (1M)": bar("<= 16 KB with the vector shards")},
        {"what": f"add {ADD:,} images (sync_faiss)", "measured": f"{row['add_s']:.2f} s ({row['add_action']})",
         "against": f"full rebuild {row['rebuild_s']:.1f} s: {row['add_share']:.1%}", "bar (1M)": bar("<= 5%")},
        {"what": f"delete {DELETE_SHARE:.0%} (sync_faiss)", "measured": f"{row['delete_s']:.2f} s ({row['delete_action']})",
         "against": f"full rebuild: {row['delete_share']:.1%}", "bar (1M)": ""},
        {"what": "query p50 / p99 (Searcher.search_vector)", "measured": f"{row['p50_ms']:.2f} / {row['p99_ms']:.2f} ms",
         "against": f"knn alone p50 {row['raw_p50_ms']:.2f} ms", "bar (1M)": ""},
        {"what": "query process RSS (peak)", "measured": f"{row['rss_mb']:,.0f} MiB ({row['peak_rss_mb']:,.0f})",
         "against": f"opened in {row['open_s']:.2f} s", "bar (1M)": bar("<= 4 GB")},
        {"what": "recall@10, held-out queries", "measured": f"{row['recall']:.3f}",
         "against": f"exact; tuning's probe said {row['probe_recall']:.3f}" if row["probe_recall"] is not None
         else "exact", "bar (1M)": bar(">= 0.95")},
        {"what": "QPS, one query at a time (Searcher.knn)", "measured": f"{row['qps']:,.0f} ({row['knn_threads']} thread)",
         "against": f"exact {row['exact_qps']:,.1f} ({row['exact_threads']} thread): {row['qps_x']:.1f}x",
         "bar (1M)": bar(">= 10x")},
        {"what": "first build / full rebuild", "measured": f"{row['build_s']:.1f} / {row['rebuild_s']:.1f} s",
         "against": f"writer anon RSS peak {max(row['build_anon_peak_mb'], row['rebuild_anon_peak_mb']):,.0f} MiB",
         "bar (1M)": ""},
    ]
    breadth = f"nprobe {row['nprobe']}" if row["nprobe"] else (f"efSearch {row['efsearch']}" if row["efsearch"] else "exact")
    print_table(f"Scale: {row['n']:,} records x {row['dim']}-d, {row['index_type']} ({breadth})", lines,
                ["what", "measured", "against", "bar (1M)"] if bars else ["what", "measured", "against"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10k and 100k records (a few minutes)")
    parser.add_argument("--sizes", help="comma-separated record counts, e.g. 10000,300000")
    parser.add_argument("--query-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.query_worker:
        query_worker(*args.query_worker)
        return
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
             else [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    rows = []
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"simsearch-bench-scale-{n}-"))
        try:
            rows.append(measure(n, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _table(rows[-1])
        write_result("scale", {"quick": args.quick, "sizes": sizes, "bars_1m": BARS_1M, "rows": rows})  # so far
    print(f"note: {NOISE_NOTE}")
    print(f"note: vectors: a gaussian mixture with the spectrum of real EfficientNet-Lite0 embeddings "
          f"(real_vectors.py); {QUERIES} held-out queries from the same groups; k={K}")
    print("note: add/delete: layout.sync_faiss after Store.add_images/remove_images (an IVF takes additions into a "
          "delta file; removals from its file rewrite it); full rebuild: sync_faiss of the same records with the "
          "stamp removed (train on a sample, add in chunks, tune recall on a probe)")
    print("note: QPS: Searcher.knn (FAISS, plus re-scoring the candidates with their stored vectors where the index "
          "holds compressed codes) one query at a time in the query process, against faiss.knn over the same vectors "
          f"one at a time ({EXACT_QUERIES} queries, its faster thread count); search_vector p50/p99 add the records' "
          "rows from SQLite")


if __name__ == "__main__":
    main()
