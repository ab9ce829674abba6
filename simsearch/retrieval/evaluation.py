"""Measure an index's retrieval quality: class retrieval, near-duplicate robustness, and what FAISS loses.

Three questions, each answered on the index's own data so that a change to the
descriptor (pooling, whitening, multi-scale, query expansion) can be judged by one
number before and after:

- *semantic* (the VOC image-retrieval protocol): every record with ground-truth
  boxes queries all other labelled records; a result is relevant when it shares a
  class with the query. Average precision over the full ranking and precision@1/5/10,
  beside the exact expectation of a random ranking. Ranked by exact inner product
  over the stored vectors, so it measures the descriptor, not the ANN index.
- *near-duplicates* (the Copydays protocol): a seeded sample of the index's own
  images is edited (crops, rotation, JPEG, rescaling, flip, colour, text;
  `pipeline/edits.COPYDAYS`), embedded with the index's own embedder and searched
  without being indexed; the original (or a byte-identical copy) is the one relevant
  result. Recall@1 and @5 per edit.
- *index*: recall@10 of the FAISS index as the Searcher uses it (breadth, re-ranking)
  against exact search, for held-out queries (the edited images) and for a seeded
  sample of stored vectors with the self-match removed.

Costs: the semantic part is O(n^2) in labelled vectors (one matrix product and a
sort per query, done in chunks); the near-duplicate part is one decode plus one
forward pass per edit (len(COPYDAYS) x --sample), which dominates up to ~10k records.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from simsearch.errors import BadInputError, SimsearchError
from simsearch.pipeline.edits import COPYDAYS, edit_rng
from simsearch.pipeline.read import open_image
from simsearch.retrieval.contents import NEAR_DUPLICATE
from simsearch.retrieval.ranking_metrics import average_precision, precision_at, random_average_precision, recall_at
from simsearch.retrieval.searcher import Searcher
from simsearch.storage import similarity
from simsearch.storage.similarity import LearnedSimilarity

log = logging.getLogger(__name__)

PARTS = ("semantic", "near-duplicates", "index")
PRECISION_KS = (1, 5, 10)  # precision@k reported by the semantic part
RECALL_KS = (1, 5)  # recall@k reported per edit by the near-duplicate part
INDEX_K = 10  # the index part's recall@k
EDIT_SIDE = 1024  # images are decoded no larger than this (longest side) before editing: memory stays bounded
HELD_OUT_FOLDS = 2  # a learned similarity is scored on each half with a fit on the other
QUERY_CHUNK = 512  # semantic queries ranked at a time: a (512, n) score matrix, not (n, n)


@dataclass(frozen=True)
class RetrievalEvalConfig:
    """What `evaluate_retrieval` measures and how much of it."""

    index_dir: Path  # the index folder (made by build-index)
    sample: int = 50  # images edited for the near-duplicate part (fewer when the index has fewer)
    seed: int = 0  # fixes the near-duplicate sample, every edit's strength and the index part's stored sample
    skip: tuple[str, ...] = ()  # parts not to run (names from PARTS)
    index_queries: int = 200  # stored vectors sampled as queries for the index part (self-match removed)
    batch: int = 8  # images decoded, edited and embedded at a time (x len(COPYDAYS) forward passes)
    device: str = "auto"  # where the edited images are embedded: auto, cpu or cuda
    quiet: bool = False  # no progress bars on stderr


@dataclass
class ClassScores:
    """Semantic scores of the queries holding one class (or of all queries: label "all")."""

    label: str
    queries: int  # queries holding the class that have at least one relevant record
    map: float  # mean average precision
    random_map: float  # its exact expectation for random rankings of the same collections
    precision: dict[str, float]  # "p@1" -> mean precision@1, ...
    random_precision: float  # expected precision@k of a random ranking (the mean share of relevant records)


@dataclass
class SemanticReport:
    """Class retrieval by the VOC protocol, over the labelled records."""

    labelled: int = 0  # records with ground-truth boxes: the queries and the ranked collection
    queries: int = 0  # labelled records that have at least one relevant record (the others have no AP)
    classes: int = 0
    overall: ClassScores | None = None
    per_class: list[ClassScores] = field(default_factory=list)
    # How it was ranked: "plain" (appearance), or "learned, held out" (the index's learned similarity,
    # each half of the labelled records searched with a fit on the other half; `plain` beside it).
    ranking: str = "plain"
    plain: ClassScores | None = None  # with a learned similarity: appearance alone on the same halves
    note: str | None = None  # why nothing was measured
    seconds: float = 0.0


@dataclass
class EditScores:
    """How one kind of edit fares: does the edited copy still find its original?"""

    edit: str
    queries: int
    recall: dict[str, float]  # "r@1" -> share of edited copies whose original ranks first, ...
    mean_score: float  # mean cosine of an edited copy to its original's stored vector
    median_rank: float  # 1 = the original first


@dataclass
class NearDuplicateReport:
    """Near-duplicate robustness by the Copydays protocol, on a seeded sample of the index's images."""

    images: int = 0  # sampled images that were edited
    unreadable: int = 0  # sampled images whose files could not be read any more (left out)
    edits: list[EditScores] = field(default_factory=list)  # one per edit, then "all edits" (the control excluded)
    note: str | None = None
    seconds: float = 0.0


@dataclass
class IndexRecall:
    """Recall@k of the FAISS index against exact search, for one set of queries."""

    queries: str  # which queries
    n: int
    k: int
    recall: float


@dataclass
class IndexReport:
    """What the approximate index keeps of exact search, as the Searcher uses it."""

    index_type: str | None = None
    rows: list[IndexRecall] = field(default_factory=list)
    note: str | None = None
    seconds: float = 0.0


@dataclass
class RetrievalReport:
    """Everything `evaluate-retrieval` measured on one index."""

    index: str
    records: int
    backbone: str
    index_type: str | None
    seed: int
    semantic: SemanticReport | None = None
    near_duplicates: NearDuplicateReport | None = None
    index_recall: IndexReport | None = None
    seconds: float = 0.0


# ------------------------------------------------------------ semantic: pure functions over vectors


def semantic_rankings(xb: np.ndarray, classes: Sequence[frozenset[str]], groups: Sequence[object] | None = None,
                      chunk: int = QUERY_CHUNK, progress: bool = False, learned: LearnedSimilarity | None = None,
                      cutoff: float | None = None) -> dict[str, np.ndarray]:
    """Per-query AP, precision@k, relevant count and collection size when every row queries all the others.

    `classes[i]` is row i's set of classes; a row is relevant to a query when the
    sets meet. The query and rows of its `groups` value (byte-identical copies) are
    left out of its ranking. Ranked by exact inner product, or as a search with the
    `learned` similarity ranks (its moved query's order, the nearest in appearance first when at or above `cutoff`). Returns arrays keyed
    "ap", "p@1", ..., "relevant", "ranked" (NaN AP where a query has no relevant row).
    """
    n = len(xb)
    labels = sorted(set().union(*classes)) if n else []
    column = {c: j for j, c in enumerate(labels)}
    onehot = np.zeros((n, len(labels)), dtype=np.float32)
    for i, held in enumerate(classes):
        onehot[i, [column[c] for c in held]] = 1.0
    group_codes = np.unique(np.asarray(groups if groups is not None else np.arange(n), dtype=object).astype(str),
                            return_inverse=True)[1]
    x = np.ascontiguousarray(xb, dtype=np.float32)
    out = {"ap": np.full(n, np.nan), "relevant": np.zeros(n, dtype=np.int64), "ranked": np.zeros(n, dtype=np.int64),
           **{f"p@{k}": np.zeros(n) for k in PRECISION_KS}}
    starts = range(0, n, chunk)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="semantic", unit="chunk", file=sys.stderr, dynamic_ncols=True)
    for start in starts:
        rows = np.arange(start, min(n, start + chunk))
        scores = x[rows] @ x.T
        excluded = group_codes[rows][:, None] == group_codes[None, :]  # the query itself and its copies
        relevant = ((onehot[rows] @ onehot.T) > 0) & ~excluded
        scores[excluded] = -np.inf  # ranked last, and never relevant
        if learned is not None:
            scores = _learned_order(learned, x[rows], x, scores, cutoff)
            scores[excluded] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")
        ranked_relevant = np.take_along_axis(relevant, order, axis=1)
        out["ap"][rows] = average_precision(ranked_relevant)
        for k in PRECISION_KS:
            out[f"p@{k}"][rows] = precision_at(ranked_relevant, k)
        out["relevant"][rows] = relevant.sum(axis=1)
        out["ranked"][rows] = n - excluded.sum(axis=1)
    return out


def _learned_order(learned: LearnedSimilarity, xq: np.ndarray, xb: np.ndarray, plain: np.ndarray,
                   cutoff: float | None = None) -> np.ndarray:
    """Scores that order `xb` as `Searcher.search_vector` does: the moved query's, the plain best pinned first
    when it is a good match (at or above `cutoff`; always when None)."""
    scores = learned.queries(xq) @ xb.T
    best = np.argmax(plain, axis=1)
    rows = np.arange(len(xq))
    good = plain[rows, best] >= (cutoff if cutoff is not None else -np.inf)
    scores[rows[good], best[good]] = np.inf
    return scores


def cross_fitted_rankings(xb: np.ndarray, classes: Sequence[frozenset[str]], groups: Sequence[object],
                          folds: int = HELD_OUT_FOLDS, seed: int = 0, plain: bool = False,
                          ridge: float = similarity.RIDGE, weight: float = similarity.WEIGHT,
                          cutoff: float | None = None) -> tuple[dict[str, np.ndarray], int]:
    """`semantic_rankings` with a similarity learned on the other folds, each fold's queries ranking its own rows;
    and how many folds had enough labels for a fit (the others rank by appearance).

    A similarity fitted on the very labels it is scored with would be measured on
    its own answers; so the labelled records are split into seeded folds, each fold
    searched with a fit on the rest. Copies stay in one fold: byte-identical files and
    near-duplicates (plain cosine >= NEAR_DUPLICATE, joined transitively), whose labels
    a fit on 1280 dimensions would otherwise carry across. `plain`: the same folds
    ranked by appearance, the baseline beside it.
    """
    keys = _linked(xb, np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1])
    fold_of = np.random.default_rng(seed).permutation(keys.max() + 1 if len(keys) else 0)[keys] % folds
    out: dict[str, np.ndarray] = {}
    fitted = 0
    for f in range(folds):
        inside, rest = np.flatnonzero(fold_of == f), np.flatnonzero(fold_of != f)
        learned = None if plain else similarity.fit(xb[rest], [classes[i] for i in rest], ridge, weight)
        fitted += learned is not None
        part = semantic_rankings(xb[inside], [classes[i] for i in inside], [groups[i] for i in inside],
                                 learned=learned, cutoff=cutoff)
        for key, values in part.items():
            out.setdefault(key, np.zeros(len(xb), dtype=values.dtype))[inside] = values
    return out, fitted


def _linked(xb: np.ndarray, codes: np.ndarray, threshold: float = NEAR_DUPLICATE, chunk: int = QUERY_CHUNK,
            max_pairs: int = 5_000_000) -> np.ndarray:
    """Group codes joined wherever two rows score >= threshold, transitively (label propagation over the pairs).

    Past `max_pairs` linked pairs (a collection of near-copies) the rest are not joined:
    memory stays bounded, and such a collection is one group long before that.
    """
    x = np.ascontiguousarray(xb, dtype=np.float32)
    pairs_i, pairs_j, found = [], [], 0
    for start in range(0, len(x), chunk):
        rows, cols = np.nonzero(np.triu(x[start:start + chunk] @ x.T >= threshold, k=start + 1))
        pairs_i.append(rows + start)
        pairs_j.append(cols)
        found += len(rows)
        if found > max_pairs:
            break
    i = np.concatenate(pairs_i) if pairs_i else np.zeros(0, dtype=np.int64)
    j = np.concatenate(pairs_j) if pairs_j else np.zeros(0, dtype=np.int64)
    label = codes.astype(np.int64).copy()
    while True:
        before = label.copy()
        np.minimum.at(label, i, label[j])
        np.minimum.at(label, j, label[i])
        per_code = np.full(codes.max() + 1 if len(codes) else 0, np.iinfo(np.int64).max)
        np.minimum.at(per_code, codes, label)
        label = per_code[codes]  # byte-identical copies share whatever one of them reached
        if np.array_equal(label, before):
            return label


def summarise(label: str, rankings: dict[str, np.ndarray], rows: np.ndarray) -> ClassScores:
    """Mean scores over the queries `rows` that have a relevant record, beside a random ranking's."""
    rows = rows[rankings["relevant"][rows] > 0]
    r, n = rankings["relevant"][rows], rankings["ranked"][rows]
    if not len(rows):
        return ClassScores(label, 0, float("nan"), float("nan"), {f"p@{k}": float("nan") for k in PRECISION_KS},
                           float("nan"))
    return ClassScores(
        label=label, queries=int(len(rows)),
        map=_mean(rankings["ap"][rows]), random_map=_mean(random_average_precision(r, n)),
        precision={f"p@{k}": _mean(rankings[f"p@{k}"][rows]) for k in PRECISION_KS},
        random_precision=_mean(r / n))


def _mean(values: np.ndarray) -> float:
    return round(float(np.mean(values)), 4) if len(values) else float("nan")


# ------------------------------------------------------------ near-duplicates: pure function


def ranks_of_originals(xq: np.ndarray, xb: np.ndarray, is_original: np.ndarray,
                       learned: LearnedSimilarity | None = None, cutoff: float | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(1-based rank of each query's best original, its plain score): rank 1 when nothing else ranks higher.

    `is_original` is (q, n) booleans: which stored rows are the query's original (the
    record and any byte-identical copy). Ties count in the query's favour. With a
    `learned` similarity, ranked as its searches rank (`_learned_order`).
    """
    plain = np.asarray(xq, dtype=np.float32) @ np.asarray(xb, dtype=np.float32).T
    best = np.where(is_original, plain, -np.inf).max(axis=1)
    scores = plain if learned is None else _learned_order(learned, xq, xb, plain, cutoff)
    mine = np.where(is_original, scores, -np.inf).max(axis=1)
    higher = ((scores > mine[:, None]) & ~is_original).sum(axis=1)
    return higher + 1, best


# ------------------------------------------------------------ the whole evaluation


def evaluate_retrieval(config: RetrievalEvalConfig) -> RetrievalReport:
    """Open the index, run the parts not skipped, and report (nothing is written to the index)."""
    unknown = [p for p in config.skip if p not in PARTS]
    if unknown:
        raise BadInputError(f"cannot skip {', '.join(unknown)}: the parts are {', '.join(PARTS)}")
    if config.sample < 0 or config.index_queries < 0:
        raise BadInputError("--sample and --index-queries must be 0 or more")
    started = time.perf_counter()
    with Searcher(config.index_dir, device=config.device) as searcher:
        store = searcher.store
        ids, xb = store.vectors()
        report = RetrievalReport(index=str(config.index_dir), records=int(len(ids)),
                                 backbone=searcher.spec.embedder.backbone, index_type=searcher.spec.index_type,
                                 seed=config.seed)
        sha = store.sha256_by_id()
        held_out = np.zeros((0, xb.shape[1] if xb.ndim == 2 else 0), dtype=np.float32)
        if "semantic" not in config.skip:
            report.semantic = _semantic(store, ids, xb, sha, config, searcher.similarity, searcher.cutoff)
        if "near-duplicates" not in config.skip:
            report.near_duplicates, held_out = _near_duplicates(searcher, ids, xb, sha, config)
        if "index" not in config.skip:
            report.index_recall = _index_recall(searcher, ids, xb, held_out, config)
    report.seconds = round(time.perf_counter() - started, 2)
    return report


def _semantic(store, ids: np.ndarray, xb: np.ndarray, sha: dict[int, str], config: RetrievalEvalConfig,
              learned: LearnedSimilarity | None = None, cutoff: float | None = None) -> SemanticReport:
    started = time.perf_counter()
    labelled = sorted(set(store.ids_with_objects()) & set(ids.tolist()))
    objects = store.objects(labelled)
    classes = [frozenset(o.label for o in objects[i]) for i in labelled]
    report = SemanticReport(labelled=len(labelled), classes=len(set().union(*classes)) if classes else 0)
    if len(labelled) < 2:
        report.note = ("no labelled records: the semantic part needs images with ground-truth boxes "
                       "(VOC, box lists)" if not labelled else "one labelled record: nothing to rank it against")
        return report
    rows = np.searchsorted(ids, labelled)
    groups = [sha.get(i, i) for i in labelled]
    if learned is None:
        rankings = semantic_rankings(xb[rows], classes, groups,
                                     progress=not config.quiet and len(labelled) > 4 * QUERY_CHUNK)
    else:
        settings = {"seed": config.seed, "ridge": learned.ridge, "weight": learned.weight, "cutoff": cutoff}
        rankings, fitted = cross_fitted_rankings(xb[rows], classes, groups, **settings)
        report.ranking = f"learned, held out ({HELD_OUT_FOLDS} folds)"
        if not fitted:  # nothing could be learned from half the labels: these are plain numbers, say so
            report.ranking = "plain"
            report.note = (f"the learned similarity could not be scored held out: half of these {len(labelled)} "
                           f"labelled records is under the {similarity.MIN_LABELLED} images (of 2 classes or more) "
                           f"a fit needs, so these are plain-appearance numbers")
        elif fitted < HELD_OUT_FOLDS:
            report.note = (f"{HELD_OUT_FOLDS - fitted} of {HELD_OUT_FOLDS} halves had too few labelled records "
                           f"(or classes) beside them to fit on (a fit needs {similarity.MIN_LABELLED} images of 2 "
                           f"classes or more): those rank by appearance")
        if fitted:
            plain, _ = cross_fitted_rankings(xb[rows], classes, groups, plain=True, **settings)
            report.plain = summarise("all", plain, np.arange(len(labelled)))
    everyone = np.arange(len(labelled))
    report.overall = summarise("all", rankings, everyone)
    report.queries = report.overall.queries
    if not report.queries:
        report.note = "no labelled record shares a class with another: nothing is relevant to any query"
    holding: dict[str, list[int]] = {}
    for row, held in enumerate(classes):
        for label in held:
            holding.setdefault(label, []).append(row)
    per_class = [summarise(label, rankings, np.asarray(rows_of)) for label, rows_of in holding.items()]
    report.per_class = sorted((c for c in per_class if c.queries), key=lambda c: (-c.queries, c.label))
    report.seconds = round(time.perf_counter() - started, 2)
    log.info("semantic: mAP %.4f over %d queries (random %.4f) in %.2f s", report.overall.map, report.queries,
             report.overall.random_map, report.seconds)
    return report


def _near_duplicates(searcher, ids: np.ndarray, xb: np.ndarray, sha: dict[int, str], config: RetrievalEvalConfig
                     ) -> tuple[NearDuplicateReport, np.ndarray]:
    """The Copydays part, and the edited vectors (held-out queries for the index part)."""
    started = time.perf_counter()
    report = NearDuplicateReport()
    empty = np.zeros((0, xb.shape[1] if xb.ndim == 2 else 0), dtype=np.float32)
    if config.sample == 0 or len(ids) < 2:
        report.note = "skipped: --sample 0" if config.sample == 0 else "fewer than 2 records: nothing to confuse"
        return report, empty
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.choice(ids, size=min(config.sample, len(ids)), replace=False))
    records = searcher.store.records(chosen.tolist())
    embedder = searcher.embedder
    names = list(COPYDAYS)
    vectors, originals = [], []
    bar = None
    if not config.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(chosen), desc=f"near-duplicates ({len(names)} edits each)", unit="img",
                   file=sys.stderr, dynamic_ncols=True)
    try:
        for start in range(0, len(chosen), config.batch):
            edited, batch_ids = [], []
            for image_id in chosen[start:start + config.batch].tolist():
                record = records.get(image_id)
                try:
                    if record is None:
                        raise BadInputError(f"record {image_id} was removed")
                    image = open_image(record.path, draft=_fit, max_pixels=searcher.max_pixels)
                except (OSError, SimsearchError) as e:  # moved or damaged since it was embedded
                    log.info("near-duplicates leave out %s: %s", image_id, e)
                    report.unreadable += 1
                    continue
                image.thumbnail((EDIT_SIDE, EDIT_SIDE))
                edited += [COPYDAYS[name](image, edit_rng(config.seed, image_id, name)) for name in names]
                batch_ids.append(image_id)
            if edited:
                vectors.append(embedder.embed_images(edited).vectors.reshape(len(batch_ids), len(names), -1))
                originals += batch_ids
            if bar is not None:
                bar.update(len(chosen[start:start + config.batch]))
    finally:
        if bar is not None:
            bar.close()
    report.images = len(originals)
    if not originals:
        report.note = "no sampled image could be read (files moved or deleted since the build)"
        return report, empty
    xq = np.concatenate(vectors)  # (images, edits, dim)
    digest = np.array([sha.get(int(i), str(i)) for i in ids], dtype=object)
    is_original = np.stack([digest == sha.get(i, str(i)) for i in originals])  # (images, n)
    all_ranks = []
    for e, name in enumerate(names):
        ranks, best = ranks_of_originals(xq[:, e], xb, is_original, searcher.similarity, searcher.cutoff)
        report.edits.append(_edit_scores(name, ranks, best))
        if name != "none":
            all_ranks.append((ranks, best))
    report.edits.append(_edit_scores("all edits", np.concatenate([r for r, _ in all_ranks]),
                                     np.concatenate([b for _, b in all_ranks])))
    report.seconds = round(time.perf_counter() - started, 2)
    edited_only = xq[:, [e for e, name in enumerate(names) if name != "none"]].reshape(-1, xq.shape[-1])
    return report, edited_only


def _fit(width: int, height: int) -> tuple[int, int]:
    """JPEG draft target: the decode no larger than EDIT_SIDE on its longest side."""
    scale = min(1.0, EDIT_SIDE / max(width, height, 1))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _edit_scores(name: str, ranks: np.ndarray, best: np.ndarray) -> EditScores:
    return EditScores(edit=name, queries=int(len(ranks)),
                      recall={f"r@{k}": round(float(np.mean(ranks <= k)), 4) for k in RECALL_KS},
                      mean_score=round(float(np.mean(best)), 4), median_rank=float(np.median(ranks)))


def _index_recall(searcher, ids: np.ndarray, xb: np.ndarray, held_out: np.ndarray, config: RetrievalEvalConfig
                  ) -> IndexReport:
    started = time.perf_counter()
    spec = searcher.spec
    breadth = ", ".join(f"{name} {value}" for name, value in
                        (("nprobe", spec.nprobe), ("efSearch", spec.efsearch), ("rerank", spec.rerank)) if value)
    report = IndexReport(index_type=f"{spec.index_type} ({breadth})" if breadth else spec.index_type)
    if len(ids) < 2:
        report.note = "fewer than 2 records"
        return report
    if len(held_out):
        k = min(INDEX_K, len(ids))
        truth = ids[np.argsort(-(held_out @ xb.T), axis=1, kind="stable")[:, :k]]
        _, found = searcher.knn(held_out, k)
        report.rows.append(IndexRecall("held out: the edited images", len(held_out), k, round(recall_at(found, truth, k), 4)))
    n = min(config.index_queries, len(ids))
    if n:
        k = min(INDEX_K, len(ids) - 1)
        rows = np.sort(np.random.default_rng(config.seed + 1).choice(len(ids), size=n, replace=False))
        scores = xb[rows] @ xb.T
        scores[np.arange(n), rows] = -np.inf  # the self-match is no answer
        truth = ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]
        _, found = searcher.knn(xb[rows], k + 1)
        found = np.stack([np.concatenate([f[f != ids[r]], np.full(1, -1)])[:k] for f, r in zip(found, rows)])
        report.rows.append(IndexRecall("stored vectors, self-match removed", n, k, round(recall_at(found, truth, k), 4)))
    report.seconds = round(time.perf_counter() - started, 2)
    return report


def to_dict(report: RetrievalReport) -> dict:
    """The report as plain JSON values: an undefined mean (no query had a relevant record) is null, not NaN."""
    return _no_nan(asdict(report))


def _no_nan(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value
