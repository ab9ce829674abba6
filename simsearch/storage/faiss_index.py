"""FAISS over the stored vectors, exact when small, approximate when large.

faiss's own words at the boundary: `xb` (database vectors), `xq` (queries), `k`,
and searches return `D, I` (scores, ids). Ids are the SQLite record ids, so a hit
needs no translation table: an IVF keeps them in its inverted lists, any other
type is wrapped in `IndexIDMap2`.

Large collections get an IVF over 4-bit product-quantized codes scanned with
faiss's fast-scan kernels (`IVF{nlist},PQ{dim/4}x4fs`, 176 bytes a 1280-d vector),
whose top RERANK candidates are re-scored exactly with the float32 vectors the
store holds (`search(..., rerank, vectors_of)`). Measured at 1M x 1280-d on 2 cores
(vectors with the spectrum of real Lite0 embeddings, held-out queries, one at a
time): IVF1024,PQ320x4fs + re-ranking 100 reached recall@10 0.96 at nprobe 192 in
2.5 ms of search, against 180 ms for exact search; IVF1024,SQ8 (1.3 KB a vector)
needed nprobe 224 and 46 ms for the same recall (its 8-bit codes scan slower than
exact search reads float32, byte for byte); PQ64x4fs and PQ128x4fs lost too much
to re-ranking (0.61 and 0.86 with 200 re-scored); HNSW32,Flat needs over 5 GB of
RAM there. IVF2048 and IVF4096 were no faster at equal recall than IVF1024 and
1.6x and 9x slower to train, hence about sqrt(n) lists.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.errors import BadInputError, IndexDamagedError

log = logging.getLogger(__name__)

VERIFY_MAX_BYTES = 512 * 1024 * 1024  # checksum read on open up to here (sha256 runs at ~1.8 GB/s)
EXACT_MAX = 50_000  # below this, exact search is fast enough (a few ms a query) and perfect
# Above EXACT_MAX, IVF-PQ fast-scan with re-ranking. HNSW (`--index-type HNSW32,Flat`) answers
# fast too, but measured at 100k-300k x 1280-d it built 45x slower than an IVF (64 s against
# 1.4 s at 100k; 225 s at 300k), held 4x the memory of SQ8 codes (30x that of PQ), must be
# rebuilt whenever a record is removed, and recall tuned on indexed records overstated its
# recall on new images (0.98 against 0.94): an index that grows and shrinks in place is IVF.
RERANK = 100  # candidates re-scored exactly per query (at least k): 0.959 at 100, 0.964 at 200, 1M
RECALL_TARGET = 0.95  # recall@10 against exact search that tuning aims for


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the install
        raise BadInputError("faiss is not installed: pip install 'simsearch[cpu]' (or [gpu])") from e
    return faiss


def choose_factory(n: int, dim: int) -> str:
    """An index type by size: exact, then IVF over 4-bit PQ codes (fast-scan) re-ranked with the stored vectors."""
    if n <= EXACT_MAX:
        return "Flat"
    m = next(m for m in range(dim // 4, 0, -1) if dim % m == 0 and m % 2 == 0)  # 4 dimensions a code
    return f"IVF{ivf_lists(n)},PQ{m}x4fs"


def rerank_depth(factory: str) -> int | None:
    """How many candidates to re-score exactly for an index type: product-quantized codes need it."""
    return RERANK if "PQ" in factory.split(",", 1)[-1] else None


def ivf_lists(n: int) -> int:
    """Inverted lists for n vectors: about sqrt(n), a power of two (1024 at 1M).

    Measured at 1M x 1280-d: 1024, 2048 and 4096 lists reach recall@10 0.95 at about the
    same query time (more lists, fewer vectors per list, more lists to probe), while
    k-means and assignment cost grow with the list count (1, 1.6 and 9 minutes).
    """
    return max(16, 1 << int(round(math.log2(math.sqrt(max(n, 1))))))


def same_family(saved: str | None, wanted: str) -> bool:
    """Whether an index of type `saved` can keep serving where `wanted` would be chosen now.

    IVF indexes differ in their list count as the collection grows; one of the same
    encoding keeps its lists until it has outgrown its training (layout.RETRAIN_GROWTH),
    instead of being rebuilt each time the size crosses a power of two.
    """
    if saved is None:
        return False
    if saved == wanted:
        return True
    def encoding(factory: str) -> str | None:
        head, _, rest = factory.partition(",")
        return rest if head.startswith("IVF") and rest else None
    return encoding(saved) is not None and encoding(saved) == encoding(wanted)


@dataclass
class SearchParams:
    """Search-time breadth of approximate indexes; recorded in the spec."""

    nprobe: int | None = None
    efsearch: int | None = None


def empty(factory: str, dim: int):
    """An untrained, empty inner-product index of this type that holds SQLite ids."""
    faiss = _faiss()
    try:
        inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise BadInputError(f"faiss cannot make index type {factory!r}: {e}") from e
    if faiss.try_extract_index_ivf(inner) is not None:
        # An IVF stores ids in its lists. Wrapped in IndexIDMap2 it would not: its removals leave
        # the wrapper's positions out of step with the lists, and hits come back as other records.
        return inner
    return faiss.IndexIDMap2(inner)


def training_size(index, n: int) -> int:
    """How many of n vectors to train `index` on (0: it needs no training); BadInputError when n is too few."""
    if index.is_trained:
        return 0
    faiss = _faiss()
    ivf = faiss.try_extract_index_ivf(index)
    needed = int(ivf.nlist) if ivf is not None else 256  # PQ codebooks and the like
    if n < needed:
        raise BadInputError(
            f"index type {_factory_name(index)} needs at least {needed} vectors to train, the index has {n}. "
            "Use a smaller IVF list count or leave --index-type unset."
        )
    return min(n, 50 * needed)


def _factory_name(index) -> str:
    faiss = _faiss()
    inner = _inner(index)
    ivf = faiss.try_extract_index_ivf(inner)
    return f"IVF{ivf.nlist} ({type(inner).__name__})" if ivf is not None else type(inner).__name__


def train(index, sample: np.ndarray) -> None:
    faiss = _faiss()
    inner = _inner(index)
    started = time.perf_counter()
    inner.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.is_trained = inner.is_trained
    log.info("trained %s on %d vectors in %.2fs", _factory_name(index), len(sample), time.perf_counter() - started)


def add(index, xb: np.ndarray, ids: np.ndarray) -> None:
    """Add vectors with their SQLite ids."""
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(xb, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))


def remove(index, ids: np.ndarray) -> int:
    """Remove vectors by SQLite id (where `can_remove`); how many went."""
    return int(index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))) if len(ids) else 0


def build(xb: np.ndarray, ids: np.ndarray, factory: str, params: SearchParams | None = None):
    """A trained, filled inner-product index with SQLite ids (built on the CPU; `load` moves it to a GPU)."""
    n, dim = xb.shape
    started = time.perf_counter()
    index = empty(factory, dim)
    wanted = training_size(index, n)
    if wanted:
        train(index, xb if wanted >= n else xb[np.sort(np.random.default_rng(0).choice(n, wanted, replace=False))])
    add(index, xb, ids)
    apply_params(index, params or default_params(factory))
    log.info("built %s over %d vectors in %.2fs", factory, n, time.perf_counter() - started)
    return index


def default_params(factory: str) -> SearchParams:
    if factory.startswith("IVF"):
        nlist = int(factory[3:].split(",")[0].split("_")[0])
        return SearchParams(nprobe=max(8, nlist // 16))
    if factory.startswith("HNSW"):
        return SearchParams(efsearch=128)
    return SearchParams()


NPROBE_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512,
                 640, 768, 896, 1024)
EFSEARCH_LADDER = (16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 768, 1024)
PROBE_QUERIES = 200  # records whose exact neighbours tuning measures recall against


@dataclass
class RecallProbe:
    """Exact neighbours of a sample of indexed records: what tuning measures recall against.

    Kept up to date as vectors come and go, so the recall target can be re-checked
    after every incremental build without an exact pass over the whole collection:
    new vectors are compared with the queries only (`add`), and removed ones are
    struck out of the lists (`remove`). A list holds `depth` > k neighbours, so a few
    removals still leave the true k nearest of what remains; a query that lost too
    many, or was itself removed, stops counting. The query vectors stay in the store:
    callers pass them as `xq`, in the order of `queries`.

    Each query's recall at the breadth it was last searched with is kept too, and
    only queries whose k nearest changed are searched again (`probe_recall`): a query
    whose exact neighbours did not change gets the same answer from the index, but
    for a new vector whose quantized score overtakes a true neighbour's at the edge
    of the k found or of the candidates re-ranked (rare after a small update; growth
    by RETUNE_GROWTH measures every query again).
    """

    queries: np.ndarray  # (q,) int64, sorted: ids of the query records
    truth: np.ndarray  # (q, depth) int64: each query's nearest other records, best first; -1: none known
    scores: np.ndarray  # (q, depth) float32: their inner products; -inf where truth is -1
    recall: np.ndarray | None = None  # (q,) float32: recall@k measured at `breadth`; nan: to measure again
    breadth: int = 0  # the nprobe / efSearch `recall` was measured at (0: never)
    k: int = 10

    def __post_init__(self) -> None:
        if self.recall is None or len(self.recall) != len(self.queries):
            self.recall = np.full(len(self.queries), np.nan, dtype=np.float32)

    @classmethod
    def start(cls, queries: np.ndarray, depth: int = 20, k: int = 10) -> "RecallProbe":
        """Queries with no neighbours yet: `add` every indexed vector to fill them."""
        queries = np.unique(np.asarray(queries, dtype=np.int64))
        return cls(queries, np.full((len(queries), depth), -1, dtype=np.int64),
                   np.full((len(queries), depth), -np.inf, dtype=np.float32), k=k)

    @classmethod
    def sample(cls, ids: np.ndarray, n: int = PROBE_QUERIES, seed: int = 0, depth: int = 20,
               k: int = 10) -> "RecallProbe":
        rng = np.random.default_rng(seed)
        return cls.start(rng.choice(ids, min(n, len(ids)), replace=False), depth, k)

    def add(self, xq: np.ndarray, xb: np.ndarray, ids: np.ndarray) -> None:
        """Merge vectors `xb` (with their ids) into each query's neighbours (`xq`: the queries' vectors)."""
        faiss = _faiss()
        if not len(ids) or not len(self.queries):
            return
        depth = self.truth.shape[1]
        D, I = faiss.knn(np.ascontiguousarray(xq, dtype=np.float32), np.ascontiguousarray(xb, dtype=np.float32),
                         min(depth + 1, len(ids)), faiss.METRIC_INNER_PRODUCT)
        found = np.where(I >= 0, np.asarray(ids, dtype=np.int64)[np.maximum(I, 0)], -1)
        own = (found == self.queries[:, None]) | (found < 0)  # a query is not its own neighbour
        self._merge(np.concatenate([self.truth, np.where(own, -1, found)], axis=1),
                    np.concatenate([self.scores, np.where(own, -np.inf, D).astype(np.float32)], axis=1))

    def remove(self, ids: np.ndarray) -> None:
        """Strike removed records out of the lists, and drop the queries among them."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        keep = ~np.isin(self.queries, ids)
        self.queries, self.recall = self.queries[keep], self.recall[keep]
        self.truth, self.scores = self.truth[keep], self.scores[keep]
        gone = np.isin(self.truth, ids)
        self._merge(np.where(gone, -1, self.truth), np.where(gone, -np.inf, self.scores).astype(np.float32))

    def _merge(self, truth: np.ndarray, scores: np.ndarray) -> None:
        depth = self.truth.shape[1]
        order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
        truth = np.take_along_axis(truth, order, axis=1)
        changed = (truth[:, :self.k] != self.truth[:, :self.k]).any(axis=1)
        self.recall[changed] = np.nan  # their k nearest changed: search them again
        self.truth, self.scores = truth, np.take_along_axis(scores, order, axis=1)

    def usable(self, k: int, ntotal: int) -> np.ndarray:
        """Which queries still know their k nearest (all others, in a collection of k or fewer)."""
        return (self.truth >= 0).sum(axis=1) >= min(k, max(ntotal - 1, 0))

    def to_json(self) -> str:
        def pack(a: np.ndarray) -> str:
            return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()
        return json.dumps({"depth": self.truth.shape[1], "k": self.k, "breadth": self.breadth,
                           "queries": pack(self.queries), "truth": pack(self.truth), "scores": pack(self.scores),
                           "recall": pack(self.recall)})

    @classmethod
    def from_json(cls, text: str) -> "RecallProbe":
        data = json.loads(text)
        def unpack(key: str, dtype) -> np.ndarray:
            return np.frombuffer(base64.b64decode(data[key]), dtype=dtype).copy()
        queries = unpack("queries", np.int64)
        shape = (len(queries), int(data["depth"]))
        return cls(queries, unpack("truth", np.int64).reshape(shape), unpack("scores", np.float32).reshape(shape),
                   unpack("recall", np.float32), int(data["breadth"]), int(data["k"]))


def _ladder(index, k: int) -> list[SearchParams]:
    faiss = _faiss()
    inner = _inner(index)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        return [SearchParams(nprobe=p) for p in NPROBE_LADDER if p <= ivf.nlist] or [SearchParams(nprobe=ivf.nlist)]
    if hasattr(inner, "hnsw"):
        return [SearchParams(efsearch=e) for e in EFSEARCH_LADDER if e >= k]
    return []  # exact: nothing to tune


def is_tunable(index) -> bool:
    """Whether the index has a search breadth to tune (IVF, HNSW), i.e. is not exact."""
    return bool(_ladder(index, 10))


def _breadth(index) -> int:
    faiss = _faiss()
    inner = _inner(index)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        return int(ivf.nprobe)
    return int(inner.hnsw.efSearch) if hasattr(inner, "hnsw") else 0


def probe_recall(index, probe: RecallProbe, xq: np.ndarray, k: int = 10, rerank: int | None = None,
                 vectors_of: Callable | None = None) -> float:
    """recall@k of `index` at its current breadth against the probe's exact neighbours (self excluded).

    Searches only the queries not yet measured at this breadth (all of them after
    the breadth changed; after an update, those whose k nearest changed).
    """
    rows = probe.usable(k, index.ntotal)
    if not rows.any():
        return float("nan")
    breadth = _breadth(index)
    if breadth != probe.breadth or k != probe.k:
        probe.recall[:], probe.breadth, probe.k = np.nan, breadth, k
    todo = np.flatnonzero(rows & np.isnan(probe.recall))
    if len(todo):
        _, found = search(index, xq[todo], k + 1, rerank, vectors_of)
        for row, hits in zip(todo, found):
            want = {int(i) for i in probe.truth[row, :k] if i >= 0}
            got = [int(f) for f in hits if f >= 0 and f != probe.queries[row]][:k]
            probe.recall[row] = len(want & set(got)) / max(1, len(want))
    return float(np.mean(probe.recall[rows]))


def tune(index, probe: RecallProbe, xq: np.ndarray, target: float = RECALL_TARGET, k: int = 10,
         above: SearchParams | None = None, rerank: int | None = None,
         vectors_of: Callable | None = None) -> tuple[SearchParams, float]:
    """The narrowest breadth on the ladder (wider than `above`) whose recall@k on the probe reaches `target`.

    Applies it to `index`. The ladder is walked in doubling steps until one reaches the
    target, then bisected between it and the step below (recall grows with breadth),
    so a fine ladder costs a few extra searches, not one per rung. When no step
    reaches the target (lossy codes such as PQ), the narrowest step within 0.01 of the
    best recall seen, since searching wider past the plateau costs time and buys nothing.
    """
    ladder = _ladder(index, k)
    if not ladder:
        return SearchParams(), 1.0
    if above is not None:
        floor = above.nprobe or above.efsearch or 0
        ladder = [p for p in ladder if (p.nprobe or p.efsearch or 0) > floor] or ladder[-1:]
    started = time.perf_counter()
    measured: dict[int, float] = {}

    def recall_at(i: int) -> float:
        if i not in measured:
            apply_params(index, ladder[i])
            measured[i] = probe_recall(index, probe, xq, k, rerank, vectors_of)
        return measured[i]

    coarse = _doubling([p.nprobe or p.efsearch or 0 for p in ladder])
    below, reached = -1, None
    for i in coarse:
        recall = recall_at(i)
        if math.isnan(recall):
            return ladder[-1], 1.0  # nothing to measure against (a collection of one)
        if recall >= target:
            reached = i
            break
        below = i
    if reached is None:
        best = max(measured.values())
        chosen = min(i for i, r in measured.items() if r >= best - 0.01)
        log.warning("recall@%d target %.2f not reached by %s; best %.3f", k, target, _factory_name(index), best)
    else:
        low, chosen = below + 1, reached  # the answer lies in (below, reached]
        while low < chosen:
            middle = (low + chosen) // 2
            if recall_at(middle) >= target:
                chosen = middle
            else:
                low = middle + 1
    params, recall = ladder[chosen], recall_at(chosen)
    apply_params(index, params)
    log.info("tuned %s to recall@%d %.3f in %.2fs (%d steps measured)", params, k, recall,
             time.perf_counter() - started, len(measured))
    return params, recall


def _doubling(width: list[int]) -> list[int]:
    """Indexes of ladder steps at least twice as wide as the one before them, and the widest step."""
    picked = [0]
    for i, w in enumerate(width):
        if w >= 2 * width[picked[-1]]:
            picked.append(i)
    if picked[-1] != len(width) - 1:
        picked.append(len(width) - 1)
    return picked


def tune_params(index, xb: np.ndarray, ids: np.ndarray, target: float = RECALL_TARGET, k: int = 10,
                sample: int = PROBE_QUERIES, seed: int = 0, rerank: int | None = None) -> tuple[SearchParams, float]:
    """The narrowest search breadth whose recall@k, measured on a sample, reaches `target`.

    Recall is verified, not assumed: `sample` database vectors are searched exactly
    and with the index, at each step of a ladder of nprobe (IVF) or efSearch (HNSW)
    values, and the first step at or above the target wins (the widest step when
    none reaches it, which happens with lossy codes such as PQ). Each query's own
    record is dropped from both lists, so the measured neighbours are the other
    images a user would see. Returns the params (applied to `index`) and the recall.
    (`RecallProbe` + `tune` do the same over vectors read in chunks, and keep the
    exact neighbours for re-checking after incremental updates.)

    That is exactly the recall of query-by-id. New images can see less where the
    data has no low-dimensional structure: on benchmarks/bench_query.py's isotropic
    2048-d mixture, held-out recall at the tuned breadth was 0.89 (HNSW, 20k) and
    0.87 (IVF, 200k). Tuning on copies nudged off the data instead was tried and
    dropped: it misjudged IVF-PQ badly (sample recall 0.14 against 0.47 held out).
    """
    if not _ladder(index, k):
        return SearchParams(), 1.0
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return _ladder(index, k)[-1], 1.0
    probe = RecallProbe.sample(ids, sample, seed, depth=k, k=k)
    order = np.argsort(ids, kind="stable")
    rows = order[np.searchsorted(ids[order], probe.queries)]
    xq = np.ascontiguousarray(xb[rows], dtype=np.float32)
    probe.add(xq, xb, ids)
    def vectors_of(wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        wanted = np.sort(wanted)
        return wanted, xb[order[np.searchsorted(ids[order], wanted)]]
    return tune(index, probe, xq, target, k, rerank=rerank, vectors_of=vectors_of)


def _layers(index) -> list:
    """The indexes searched together: a saved IVF and its delta (`IndexShards`), else the index itself."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexShards):
        return [faiss.downcast_index(index.at(i)) for i in range(index.count())]
    return [index]


def _inner(index):
    """The (first layer's) index under an IndexIDMap2 wrapper, or the index itself."""
    faiss = _faiss()
    index = _layers(index)[0]
    return faiss.downcast_index(index.index) if hasattr(index, "id_map") else index


def apply_params(index, params: SearchParams) -> None:
    faiss = _faiss()
    for layer in _layers(index):
        inner = _inner(layer)
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None and params.nprobe:
            ivf.nprobe = params.nprobe
        if hasattr(inner, "hnsw") and params.efsearch:
            inner.hnsw.efSearch = params.efsearch


def search(index, xq: np.ndarray, k: int, rerank: int | None = None,
           vectors_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
           allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """D, I for each query row; I is -1 where fewer than k vectors exist.

    With `rerank`, the index's best max(k, rerank) candidates are re-scored with their
    float32 vectors (`vectors_of(ids) -> (ids, xb)`, e.g. `Store.vectors`) and the k
    best by exact inner product are returned: compressed codes find the neighbourhood,
    the stored vectors order it.

    With `allowed` (sorted ids), only those are searched (`search_allowed`).
    """
    xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
    k = max(1, min(int(k), max(1, index.ntotal)))
    if allowed is not None:
        return search_allowed(index, xq, k, np.asarray(allowed, dtype=np.int64), rerank, vectors_of)
    if not rerank or vectors_of is None:
        return index.search(xq, k)
    _, found = index.search(xq, max(k, min(int(rerank), index.ntotal)))
    return _reranked(xq, found, k, vectors_of)


def _reranked(xq: np.ndarray, found: np.ndarray, k: int, vectors_of: Callable) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row's candidates `found`, re-scored exactly with their stored vectors."""
    held, xb = vectors_of(np.unique(found[found >= 0]))
    row_of = {int(i): r for r, i in enumerate(held)}
    D, I = _missing(len(xq), k)
    for q, candidates in enumerate(found):
        candidates = [int(c) for c in candidates if int(c) in row_of]  # a record removed since: no answer
        if not candidates:
            continue
        scores = xb[[row_of[c] for c in candidates]] @ xq[q]
        best = np.argsort(-scores, kind="stable")[:k]
        D[q, :len(best)], I[q, :len(best)] = scores[best], np.asarray(candidates, dtype=np.int64)[best]
    return D, I


def _missing(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


# Up to this many allowed ids, a filtered search reads their stored vectors and scores them
# exactly (one matrix product) instead of running the index with an id selector. Measured at
# 20k x 1280-d through the real store (benchmarks/bench_filters.py, p50 of one query): about
# 100 ids, exact 0.7-5 ms against 1-12 ms with a selector; 1,000 ids, exact 24-28 ms against
# 5 ms (IVF-PQ) to 24 ms (Flat); 10,000 ids, exact 112 ms against 8-11 ms. Reading the
# vectors (SQLite positions, then shard rows) is the cost, hence a crossover of a few hundred.
EXACT_ALLOWED = 500
# Exact scoring reads the allowed vectors this many at a time, so a fallback over a large
# allowed set holds a bounded amount of memory; above EXACT_FALLBACK_MAX allowed ids an IVF
# that came back short is searched again over all its lists instead.
EXACT_CHUNK = 8_192
EXACT_FALLBACK_MAX = 100_000


def search_allowed(index, xq: np.ndarray, k: int, allowed: np.ndarray, rerank: int | None = None,
                   vectors_of: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """D, I searching only the ids in `allowed` (sorted); each row has min(k, len(allowed)) results.

    Few allowed ids are scored exactly from their stored vectors. Otherwise each layer
    of the index (an IVF and its delta) is searched with a FAISS id selector at its tuned
    breadth, re-ranked as `search` does, and merged. A selective filter can leave an
    IVF's probed lists with fewer than k allowed vectors: such rows are answered again
    exactly over the allowed ids (or, above EXACT_FALLBACK_MAX of them, over every
    list), so k results come back whenever k allowed vectors exist.
    """
    D, I = _missing(len(xq), k)
    if not len(allowed):
        return D, I
    if len(allowed) <= EXACT_ALLOWED and vectors_of is not None:
        return _exact(xq, k, allowed, vectors_of)
    depth = max(k, min(int(rerank), index.ntotal)) if rerank and vectors_of is not None else k
    try:
        D, I = _selected(index, xq, depth, allowed)
    except RuntimeError as e:  # an index type (a GPU one) without selectors: exact over the allowed ids
        if vectors_of is None:
            raise
        log.info("id selector not supported here (%s); scoring the allowed vectors exactly", str(e).splitlines()[0])
        return _exact(xq, k, allowed, vectors_of)
    if depth > k:
        D, I = _reranked(xq, I, k, vectors_of)
    want = min(k, len(allowed))
    short = np.flatnonzero((I >= 0).sum(axis=1) < want)
    if len(short):
        if vectors_of is not None and len(allowed) <= EXACT_FALLBACK_MAX:
            D[short], I[short] = _exact(xq[short], k, allowed, vectors_of)
        else:
            Dw, Iw = _selected(index, xq[short], depth, allowed, widest=True)
            D[short], I[short] = _reranked(xq[short], Iw, k, vectors_of) if depth > k else (Dw, Iw)
    return D, I


def _exact(xq: np.ndarray, k: int, allowed: np.ndarray, vectors_of: Callable) -> tuple[np.ndarray, np.ndarray]:
    """The k best of the allowed ids by exact inner product with their stored vectors, read in chunks."""
    D, I = _missing(len(xq), k)
    for start in range(0, len(allowed), EXACT_CHUNK):
        held, xb = vectors_of(allowed[start:start + EXACT_CHUNK])
        if not len(held):
            continue
        scores = xq @ xb.T
        D = np.concatenate([D, scores.astype(np.float32)], axis=1)
        I = np.concatenate([I, np.broadcast_to(held.astype(np.int64), scores.shape)], axis=1)
        D, I = _top(D, I, k)
    return D, I


def _top(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of each row, best first (missing ones, -1, last)."""
    D = np.where(I >= 0, D, -np.inf)
    if D.shape[1] > k:
        part = np.argpartition(-D, k - 1, axis=1)[:, :k]
        D, I = np.take_along_axis(D, part, 1), np.take_along_axis(I, part, 1)
    order = np.argsort(-D, axis=1, kind="stable")
    return np.take_along_axis(D, order, 1).astype(np.float32), np.take_along_axis(I, order, 1)


def _selected(index, xq: np.ndarray, k: int, allowed: np.ndarray, widest: bool = False):
    """D, I of each layer searched with an id selector over `allowed`, merged by score.

    The layers (an IVF and its delta) are searched one by one rather than through
    IndexShards, which not every faiss version hands search parameters down. Each IVF
    layer keeps its tuned nprobe (search parameters replace the index's own), or probes
    every list with `widest`.
    """
    faiss = _faiss()
    selector, keep = _selector(allowed)
    D, I = _missing(len(xq), 0)
    for layer in _layers(index):
        inner = _inner(layer)
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=int(ivf.nlist if widest else ivf.nprobe))
        elif hasattr(inner, "hnsw"):
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=int(inner.hnsw.efSearch))
        else:
            params = faiss.SearchParameters(sel=selector)
        Dl, Il = layer.search(xq, min(k, max(1, layer.ntotal)), params=params)
        D, I = np.concatenate([D, Dl], axis=1), np.concatenate([I, Il], axis=1)
    del keep
    return _top(D, I, k) if D.shape[1] >= k else _padded(*_top(D, I, D.shape[1]), k)


def _padded(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    Dk, Ik = _missing(len(D), k)
    Dk[:, :D.shape[1]], Ik[:, :I.shape[1]] = D, I
    return Dk, Ik


def _selector(allowed: np.ndarray):
    """(FAISS id selector over `allowed`, what must stay alive while it is used).

    A bitmap (one bit per id up to the largest) tests an id in constant time and costs
    max_id/8 bytes: used while ids are dense enough; a hashed batch otherwise.
    """
    faiss = _faiss()
    top = int(allowed[-1]) if len(allowed) else 0
    if top < 64 * len(allowed) + (1 << 20):
        bits = np.zeros(top + 1, dtype=bool)
        bits[allowed] = True
        bitmap = np.packbits(bits, bitorder="little")
        return faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), bitmap
    return faiss.IDSelectorBatch(allowed), None


def save(index, path: Path, state_path: Path, generation: int) -> None:
    """Write atomically, then stamp with the store generation it reflects and the file's checksum.

    The stamp names the file by size and sha256, so a FAISS file that is truncated,
    damaged, or written by another process after the stamp is never trusted. The
    checksum is taken of the bytes as they are written (one pass over a large file,
    not two), and a reader that has the old file open or mapped keeps reading the
    old file whole: the new one replaces it only once complete. A delta the old
    stamp named is no longer part of the index (the caller deletes its file).
    """
    stamp = _write(index, path)
    _write_state(state_path, {"generation": generation, **stamp})


def save_delta(delta, path: Path, state_path: Path, delta_path: Path, generation: int) -> None:
    """Stamp `path` (unchanged) + `delta` (written to its own new file) as the index of `generation`.

    An IVF grows by a delta instead of a rewrite: a small IVF with the same centroids
    and codec holding the vectors added since `path` was written. `delta_path` must be
    a new name: readers that still follow the previous stamp keep finding its delta.
    The stamp is the commit point: it is replaced last, atomically.
    """
    state = _state(state_path)
    if state is None:
        raise IndexDamagedError(f"{state_path} is missing: a delta needs the stamp of the index it extends")
    stamp = _write(delta, delta_path)
    base = {key: state[key] for key in ("ntotal", "size", "sha256")}
    _write_state(state_path, {"generation": generation, **base, "delta": {"file": delta_path.name, **stamp}})


def _write(index, path: Path) -> dict:
    """Write `index` to `path` atomically; its ntotal, size and sha256 (taken as the bytes are written)."""
    faiss = _faiss()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    size = 0
    with open(tmp, "wb") as f:
        def write(chunk: bytes) -> None:
            nonlocal size
            digest.update(chunk)
            f.write(chunk)
            size += len(chunk)
        faiss.write_index(_to_cpu(index), faiss.PyCallbackIOWriter(write, 1 << 22))
    os.replace(tmp, path)
    return {"ntotal": int(index.ntotal), "size": size, "sha256": digest.hexdigest()}


def _write_state(state_path: Path, state: dict) -> None:
    tmp = state_path.with_name(f"{state_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _state(state_path: Path) -> dict | None:
    try:
        state = json.loads(state_path.read_text())
        found = {"generation": int(state["generation"]), "ntotal": int(state["ntotal"]),
                 "size": int(state["size"]), "sha256": str(state["sha256"])}
        if state.get("delta") is not None:
            delta = state["delta"]
            name = str(delta["file"])
            if Path(name).name != name:
                return None  # the delta lives beside the index, by name only
            found["delta"] = {"file": name, "ntotal": int(delta["ntotal"]), "size": int(delta["size"]),
                              "sha256": str(delta["sha256"])}
        return found
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, damaged, or written before the checksum existed: not trusted


def delta_file(path: Path, state_path: Path) -> Path | None:
    """The delta file the stamp names beside `path`, if any."""
    state = _state(state_path)
    return path.with_name(state["delta"]["file"]) if state and "delta" in state else None


def saved_generation(path: Path, state_path: Path, verify: bool | None = None) -> int | None:
    """The store generation the saved FAISS file reflects, or None when there is no file to trust.

    The file (and the delta the stamp names) must have the stamped size and, with
    `verify`, the stamped sha256 (build-index always verifies: it vouches for the file
    it leaves). By default the checksum is read for files up to VERIFY_MAX_BYTES (a
    quarter second at most); larger ones are trusted on size, and `load` checks their
    vector count, so opening a million-image index for a query does not read
    gigabytes first.
    """
    state = _state(state_path)
    if state is None:
        return None
    parts = [(path, state)] + ([(path.with_name(state["delta"]["file"]), state["delta"])] if "delta" in state else [])
    for part, stamp in parts:
        try:
            size = part.stat().st_size
        except OSError:
            return None
        check = size <= VERIFY_MAX_BYTES if verify is None else verify
        if size != stamp["size"] or (check and _sha256(part) != stamp["sha256"]):
            log.warning("%s does not match its stamp (damaged or replaced): it will be rebuilt", part)
            return None
    return state["generation"]


def load(path: Path, state_path: Path, use_gpu: bool = True, writable: bool = False):
    """Memory-mapped where the index type allows it, so opening a large index is instant.

    An IVF's inverted lists stay in the file, mapped (faiss reads them as
    OnDiskInvertedLists): a query process holds only the pages its probes touch. A
    delta the stamp names is read into memory and searched beside the file
    (`IndexShards`, which merges their top k).
    `writable`: one index in memory instead, the delta folded in, so vectors can be
    added and removed; the bytes are checked against the stamp's sha256 as they are
    read. Raises IndexDamagedError when faiss cannot read a file, a checksum differs,
    a file holds another count of vectors than stamped, or an IVF's ids are out of
    step with its lists: the caller rebuilds it from SQLite.
    """
    state = _state(state_path)
    if state is None:
        raise IndexDamagedError(f"{path} has no stamp to check it against")
    if writable:
        index = _read(path, state, verified=True)
        delta = _read_delta(path, state)
        if delta is not None:
            index.merge_from(delta, 0)
        return index
    index = stacked(*load_layers(path, state_path))
    return _to_gpu(index) if use_gpu else index


def stacked(base, delta):
    """`base` and its `delta` searched as one index (`base` alone when there is no delta)."""
    faiss = _faiss()
    if delta is None:
        return base
    index = faiss.IndexShards(base.d, False, False)  # ids as the layers hold them; top k merged by score
    index.add_shard(base)
    index.add_shard(delta)
    return index


def load_layers(path: Path, state_path: Path):
    """(file, delta or None): the saved index memory-mapped (not checksummed here) and its delta in memory."""
    state = _state(state_path)
    if state is None:
        raise IndexDamagedError(f"{path} has no stamp to check it against")
    return _read(path, state, verified=False), _read_delta(path, state)


def _read_delta(path: Path, state: dict):
    if "delta" not in state:
        return None
    return _read(path.with_name(state["delta"]["file"]), state["delta"], verified=True)


def _read(path: Path, stamp: dict, verified: bool):
    faiss = _faiss()
    try:
        index = _read_verified(faiss, path, stamp) if verified else _read_mapped(faiss, path)
    except RuntimeError as e:
        raise IndexDamagedError(f"{path} cannot be read ({str(e).splitlines()[0]})") from e
    if index.ntotal != stamp["ntotal"]:
        raise IndexDamagedError(f"{path} holds {index.ntotal} vectors, not the {stamp['ntotal']} stamped")
    if not _ids_in_step(index):
        raise IndexDamagedError(f"{path} is an IVF whose id map was put out of step by an in-place removal "
                                "(older simsearch wrapped IVF indexes in IndexIDMap2)")
    return index


def _read_verified(faiss, path: Path, stamp: dict):
    """Read into memory, checking the bytes against the stamped sha256 on the way."""
    digest = hashlib.sha256()
    try:
        f = open(path, "rb")
    except OSError as e:
        raise IndexDamagedError(f"{path} cannot be opened ({e.strerror or e})") from e
    with f:
        def read(n: int) -> bytes:
            chunk = f.read(n)
            digest.update(chunk)
            return chunk
        index = faiss.read_index(faiss.PyCallbackIOReader(read, 1 << 22))
        rest = f.read(1)
    if rest or digest.hexdigest() != stamp["sha256"]:
        raise IndexDamagedError(f"{path} does not match its stamp's checksum (damaged or replaced)")
    return index


def _read_mapped(faiss, path: Path):
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:  # index types that cannot be mapped are read into memory
        return faiss.read_index(str(path))


def empty_delta(path: Path):
    """An empty IVF with the centroids and codec of the IVF saved at `path`, to hold what is added next."""
    faiss = _faiss()
    twin = _read_mapped(faiss, path)
    ivf = faiss.extract_index_ivf(twin)
    if type(faiss.downcast_InvertedLists(ivf.invlists)).__name__ != "OnDiskInvertedLists":
        twin.reset()  # lists read into memory (fast-scan blocks; a small file): emptied
        return twin
    lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)  # mapped lists are replaced, never read
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns it now
    ivf.ntotal = 0
    twin.ntotal = 0
    return twin


def can_layer(index) -> bool:
    """Whether additions can go to a delta beside the file (an IVF holding its own ids) instead of a rewrite."""
    faiss = _faiss()
    return not hasattr(index, "id_map") and faiss.try_extract_index_ivf(index) is not None


def _ivf_ids(ivf) -> np.ndarray:
    """Every id stored in an IVF's inverted lists (in list order)."""
    faiss = _faiss()
    invlists = ivf.invlists
    parts = []
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size:
            parts.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _ids_in_step(index) -> bool:
    """False for an IndexIDMap2 over an IVF whose list positions no longer match the map.

    Such a wrapper (what simsearch built before IVFs held their own ids) misnumbers
    every hit after an in-place removal: the lists keep the old positions while the
    map closes up. In step means the lists hold each position below ntotal once.
    """
    faiss = _faiss()
    if not hasattr(index, "id_map"):
        return True
    ivf = faiss.try_extract_index_ivf(_inner(index))
    if ivf is None:
        return True
    positions = _ivf_ids(ivf)
    return len(positions) == index.ntotal and (not len(positions) or (
        positions.max() < index.ntotal and len(np.unique(positions)) == len(positions)))


def ids_of(index) -> np.ndarray:
    """The SQLite ids the index holds, sorted."""
    faiss = _faiss()
    found = []
    for layer in _layers(index):
        if hasattr(layer, "id_map"):
            found.append(faiss.vector_to_array(layer.id_map))
            continue
        ivf = faiss.try_extract_index_ivf(layer)
        if ivf is None:
            raise BadInputError(f"{type(layer).__name__} does not hold SQLite ids")
        found.append(_ivf_ids(ivf))
    return np.sort(np.concatenate(found))


def can_remove(index) -> bool:
    """Whether vectors can be removed in place: IVF (ids in its lists) and flat; not HNSW graphs."""
    faiss = _faiss()
    inner = _inner(index)
    if hasattr(inner, "hnsw"):
        return False
    # An IVF under an id map (older files) would misnumber its hits after a removal.
    return not (hasattr(_layers(index)[0], "id_map") and faiss.try_extract_index_ivf(inner) is not None)


def is_trained_on_data(index) -> bool:
    """Whether the index learnt from its vectors (IVF centroids, PQ codebooks): those age as data grows."""
    faiss = _faiss()
    inner = _inner(index)
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
