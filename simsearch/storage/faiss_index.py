"""FAISS over the stored vectors, exact when small, approximate when large.

faiss's own words at the boundary: `xb` (database vectors), `xq` (queries), `k`,
and searches return `D, I` (scores, ids). Ids are the SQLite record ids
(`IndexIDMap2`), so a hit needs no translation table.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.errors import BadInputError, IndexDamagedError

log = logging.getLogger(__name__)

VERIFY_MAX_BYTES = 512 * 1024 * 1024  # checksum read on open up to here (sha256 runs at ~1.8 GB/s)
EXACT_MAX = 50_000  # below this, exact search is fast enough (a few ms a query) and perfect
HNSW_MAX = 1_000_000  # up to here HNSW's memory (vectors + graph) is affordable; above, IVF-PQ


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the install
        raise BadInputError("faiss is not installed: pip install 'simsearch[cpu]' (or [gpu])") from e
    return faiss


def choose_factory(n: int, dim: int) -> str:
    """An index type by size, the way autofaiss does: exact, then HNSW, then IVF-PQ."""
    if n <= EXACT_MAX:
        return "Flat"
    if n <= HNSW_MAX:
        return "HNSW32,Flat"
    nlist = 1 << int(round(math.log2(4 * math.sqrt(n))))
    m = next(m for m in (64, 48, 32, 16, 8) if dim % m == 0)
    return f"IVF{nlist},PQ{m}"


@dataclass
class SearchParams:
    """Search-time breadth of approximate indexes; recorded in the spec."""

    nprobe: int | None = None
    efsearch: int | None = None


def build(xb: np.ndarray, ids: np.ndarray, factory: str, params: SearchParams | None = None):
    """A trained, filled inner-product index with SQLite ids (built on the CPU; `load` moves it to a GPU)."""
    faiss = _faiss()
    n, dim = xb.shape
    started = time.perf_counter()
    try:
        inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise BadInputError(f"faiss cannot make index type {factory!r}: {e}") from e
    index = faiss.IndexIDMap2(inner)
    if not inner.is_trained:
        needed = _training_size(inner)
        if n < needed:
            raise BadInputError(
                f"index type {factory!r} needs at least {needed} vectors to train, the index has {n}. "
                "Use a smaller IVF list count or leave --index-type unset."
            )
        sample = xb if n <= 50 * needed else xb[np.random.default_rng(0).choice(n, 50 * needed, replace=False)]
        inner.train(np.ascontiguousarray(sample, dtype=np.float32))
    if n:
        index.add_with_ids(np.ascontiguousarray(xb, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    apply_params(index, params or default_params(factory))
    log.info("built %s over %d vectors in %.2fs", factory, n, time.perf_counter() - started)
    return index


def _training_size(inner) -> int:
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        return int(ivf.nlist)
    return 256  # PQ codebooks and the like


def default_params(factory: str) -> SearchParams:
    if factory.startswith("IVF"):
        nlist = int(factory[3:].split(",")[0].split("_")[0])
        return SearchParams(nprobe=max(8, nlist // 16))
    if factory.startswith("HNSW"):
        return SearchParams(efsearch=128)
    return SearchParams()


NPROBE_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
EFSEARCH_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def tune_params(index, xb: np.ndarray, ids: np.ndarray, target: float = 0.95, k: int = 10,
                sample: int = 200, seed: int = 0) -> tuple[SearchParams, float]:
    """The narrowest search breadth whose recall@k, measured on a sample, reaches `target`.

    Recall is verified, not assumed: `sample` database vectors are searched exactly
    and with the index, at each step of a ladder of nprobe (IVF) or efSearch (HNSW)
    values, and the first step at or above the target wins (the widest step when
    none reaches it, which happens with lossy codes such as PQ). Each query's own
    record is dropped from both lists, so the measured neighbours are the other
    images a user would see. Returns the params (applied to `index`) and the recall.

    That is exactly the recall of query-by-id. New images can see less where the
    data has no low-dimensional structure: on benchmarks/bench_query.py's isotropic
    2048-d mixture, held-out recall at the tuned breadth was 0.89 (HNSW, 20k) and
    0.87 (IVF, 200k). Tuning on copies nudged off the data instead was tried and
    dropped: it misjudged IVF-PQ badly (sample recall 0.14 against 0.47 held out).
    """
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ladder = [SearchParams(nprobe=p) for p in NPROBE_LADDER if p <= ivf.nlist] or [SearchParams(nprobe=ivf.nlist)]
    elif hasattr(inner, "hnsw"):
        ladder = [SearchParams(efsearch=e) for e in EFSEARCH_LADDER if e >= k]
    else:
        return SearchParams(), 1.0  # exact: nothing to tune
    n = len(xb)
    if n == 0:
        return ladder[-1], 1.0
    rows = np.random.default_rng(seed).choice(n, min(sample, n), replace=False)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    xq = xb[rows]
    started = time.perf_counter()
    _, exact = faiss.knn(xq, xb, min(k + 1, n), faiss.METRIC_INNER_PRODUCT)
    truth = [set(ids[j] for j in row if j >= 0 and ids[j] != ids[q]) for q, row in zip(rows, exact)]
    measured: list[tuple[SearchParams, float]] = []
    for params in ladder:
        apply_params(index, params)
        _, found = index.search(xq, min(k + 1, n))
        recall = float(np.mean([
            len(t & {int(f) for f in row if f != ids[q]}) / max(1, len(t)) for q, row, t in zip(rows, found, truth)
        ]))
        measured.append((params, recall))
        if recall >= target:
            break
    else:
        # Target out of reach (lossy codes): the narrowest breadth within 0.01 of the best recall seen,
        # since searching wider past the plateau costs time and buys nothing.
        best = max(r for _, r in measured)
        params, recall = next((p, r) for p, r in measured if r >= best - 0.01)
        apply_params(index, params)
        log.warning("recall@%d target %.2f not reached by %s; best %.3f", k, target, type(inner).__name__, best)
    log.info("tuned %s to recall@%d %.3f in %.2fs", params, k, recall, time.perf_counter() - started)
    return params, recall


def apply_params(index, params: SearchParams) -> None:
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None and params.nprobe:
        ivf.nprobe = params.nprobe
    if hasattr(inner, "hnsw") and params.efsearch:
        inner.hnsw.efSearch = params.efsearch


def search(index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """D, I for each query row; I is -1 where fewer than k vectors exist."""
    xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
    k = max(1, min(int(k), max(1, index.ntotal)))
    return index.search(xq, k)


def save(index, path: Path, state_path: Path, generation: int) -> None:
    """Write atomically, then stamp with the store generation it reflects and the file's checksum.

    The stamp names the file by size and sha256, so a FAISS file that is truncated,
    damaged, or written by another process after the stamp is never trusted.
    """
    faiss = _faiss()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    faiss.write_index(_to_cpu(index), str(tmp))
    state = {"generation": generation, "ntotal": int(index.ntotal), "size": tmp.stat().st_size,
             "sha256": _sha256(tmp)}
    os.replace(tmp, path)
    state_tmp = state_path.with_name(f"{state_path.name}.{os.getpid()}.tmp")
    state_tmp.write_text(json.dumps(state))
    os.replace(state_tmp, state_path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _state(state_path: Path) -> dict | None:
    try:
        state = json.loads(state_path.read_text())
        return {"generation": int(state["generation"]), "ntotal": int(state["ntotal"]),
                "size": int(state["size"]), "sha256": str(state["sha256"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, damaged, or written before the checksum existed: not trusted


def saved_generation(path: Path, state_path: Path, verify: bool | None = None) -> int | None:
    """The store generation the saved FAISS file reflects, or None when there is no file to trust.

    The file must have the stamped size and, with `verify`, the stamped sha256
    (build-index always verifies: it vouches for the file it leaves). By default the
    checksum is read for files up to VERIFY_MAX_BYTES (a quarter second at most);
    larger ones are trusted on size, and `load` checks their vector count, so opening
    a million-image index for a query does not read gigabytes first.
    """
    state = _state(state_path)
    if state is None:
        return None
    try:
        size = path.stat().st_size
    except OSError:
        return None
    if verify is None:
        verify = size <= VERIFY_MAX_BYTES
    if size != state["size"] or (verify and _sha256(path) != state["sha256"]):
        log.warning("%s does not match its stamp (damaged or replaced): it will be rebuilt", path)
        return None
    return state["generation"]


def load(path: Path, state_path: Path, use_gpu: bool = True, writable: bool = False):
    """Memory-mapped where the index type allows it, so opening a large index is instant.

    `writable`: read into memory instead, so vectors can be added and removed. Raises
    IndexDamagedError when faiss cannot read the file or it holds another count of
    vectors than stamped: the caller rebuilds it from SQLite.
    """
    faiss = _faiss()
    state = _state(state_path)
    try:
        index = faiss.read_index(str(path)) if writable else _read_mapped(faiss, path)
    except RuntimeError as e:
        raise IndexDamagedError(f"{path} cannot be read ({str(e).splitlines()[0]})") from e
    if state is None or index.ntotal != state["ntotal"]:
        raise IndexDamagedError(f"{path} holds {index.ntotal} vectors, not the {state and state['ntotal']} stamped")
    return _to_gpu(index) if use_gpu else index


def _read_mapped(faiss, path: Path):
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:  # index types that cannot be mapped are read into memory
        return faiss.read_index(str(path))


def ids_of(index) -> set[int]:
    """The ids an IndexIDMap holds (the SQLite record ids)."""
    faiss = _faiss()
    return set(faiss.vector_to_array(index.id_map).tolist())


def can_remove(index) -> bool:
    """Whether vectors can be removed in place (HNSW graphs cannot)."""
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    return not hasattr(inner, "hnsw")


def is_trained_on_data(index) -> bool:
    """Whether the index learnt from its vectors (IVF centroids, PQ codebooks): those age as data grows."""
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    return faiss.try_extract_index_ivf(inner) is not None or "PQ" in type(inner).__name__


def gpu_count() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _to_gpu(index):
    faiss = _faiss()
    if gpu_count() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as e:  # HNSW and some others have no GPU version: search on the CPU
        log.info("index stays on the CPU (%s)", e)
        return index


def _to_cpu(index):
    faiss = _faiss()
    if gpu_count() and hasattr(faiss, "index_gpu_to_cpu"):
        try:
            return faiss.index_gpu_to_cpu(index)
        except RuntimeError:
            return index
    return index
