"""Incremental builds: adding to (or pruning) the saved FAISS index in place, against rebuilding it.

Drives the real store and `layout.sync_faiss` (no backbone) with clustered vectors:
an index of N records is built, then 5% more are added (and, separately, 1%
removed) and synced again, side by side with a full build-and-tune of the result
in the same run. The ratio is what an incremental `build-index` saves on FAISS.

    python benchmarks/bench_faiss_update.py --quick     # 20k x 1280-d
    python benchmarks/bench_faiss_update.py             # 100k x 1280-d
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_query import clustered
from common import NOISE_NOTE, print_table, progress, write_result

DIM = 1280  # EfficientNet-Lite0's vector


def _add(store, xb: np.ndarray, start: int) -> list[int]:
    from simsearch.records import ImageRecord
    from simsearch.storage.store import NewImage

    ids: list[int] = []
    for chunk in range(0, len(xb), 5000):  # one transaction per 5k, as build-index commits batches
        part = xb[chunk:chunk + 5000]
        ids += store.add_images([
            NewImage(ImageRecord(Path(f"/bench/{start + chunk + i:08d}.jpg"), "folder", "bench"),
                     f"{start + chunk + i:064x}", 1, 1, 8, 8, v)
            for i, v in enumerate(part)])
    return ids


def measure(n: int, factory: str, seed: int = 0) -> list[dict]:
    from simsearch.spec import EmbedderSpec, IndexSpec
    from simsearch.storage import layout
    from simsearch.storage.store import Store

    spec = EmbedderSpec("synthetic", "none", "0" * 64, DIM, (1, 1, 1))
    grow = n // 20
    xb, _ = clustered(n + grow, DIM, seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "idx", create=True) as store:
        progress(f"{factory}: {n} records")
        store.save_spec(IndexSpec(spec, index_type=None))
        ids = _add(store, xb[:n], 0)
        started = time.perf_counter()
        layout.sync_faiss(store, spec, factory)
        first = time.perf_counter() - started
        _add(store, xb[n:], n)
        started = time.perf_counter()
        added = layout.sync_faiss(store, spec)
        add_s = time.perf_counter() - started
        (Path(tmp) / "idx" / layout.FAISS_STATE).unlink()  # force the full path on the same records
        started = time.perf_counter()
        full = layout.sync_faiss(store, spec)
        full_s = time.perf_counter() - started
        rows.append({"n": n, "index": factory, "change": f"+{grow} (5%)", "sync": added.action,
                     "sync_s": add_s, "rebuild_s": full_s, "ratio": add_s / full_s, "first_build_s": first})
        assert full.action == "rebuilt"
        store.remove_images(ids[: n // 100])
        started = time.perf_counter()
        removed = layout.sync_faiss(store, spec)
        remove_s = time.perf_counter() - started
        (Path(tmp) / "idx" / layout.FAISS_STATE).unlink()
        started = time.perf_counter()
        layout.sync_faiss(store, spec)
        full_s = time.perf_counter() - started
        rows.append({"n": n + grow, "index": factory, "change": f"-{n // 100} (1%)", "sync": removed.action,
                     "sync_s": remove_s, "rebuild_s": full_s, "ratio": remove_s / full_s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k records instead of 100k")
    args = parser.parse_args()
    n = 20_000 if args.quick else 100_000
    rows = []
    for factory in ("Flat", "HNSW32,Flat", "IVF256,Flat"):
        rows += measure(n, factory)
    notes = [NOISE_NOTE,
             "sync_s: layout.sync_faiss after the change (in place where it can); rebuild_s: a full build + recall "
             "tuning of the same records in the same run; ratio = sync_s / rebuild_s",
             "what remains of an in-place sync is reading and writing the whole FAISS file (and its sha256)",
             "HNSW cannot forget nodes: a removal rebuilds it"]
    print_table(f"FAISS after an incremental build: in place vs rebuilt ({DIM}-d)", rows,
                ["n", "index", "change", "sync", "sync_s", "rebuild_s", "ratio", "first_build_s"], notes)
    write_result("faiss_update", {"quick": args.quick, "dim": DIM, "rows": rows})


if __name__ == "__main__":
    main()
