"""Learned similarity: what "like this one" means, taught by the collection's own labels.

An ImageNet backbone's pooled vector says mostly what a photo looks like (its
background, its light), so images that share a class rank far apart when their
scenes differ: composites of one class on 13 different backgrounds, indoor photos
with the same furniture in other rooms. No unsupervised change to the vector fixed
that on both collections (`benchmarks/bench_descriptors.py`: pooling, scales,
whitening, query expansion, diffusion, region matching all stayed under +3 points
of mAP on one of them). Ground-truth classes, which VOC and box-list collections
carry, do: a ridge regression from the stored vectors to the classes each image
holds gives a low-rank direction set B (dim x classes), and a query searches with

    q' = normalise(q + WEIGHT * B B^T (q - mean))

against the stored vectors, unchanged. The score is cos(q', x) = (q.x + WEIGHT *
(q - mean)^T B B^T x) / |q'|: appearance plus agreement on the labels' directions,
one inner product, so the FAISS index, the store and every consumer of plain
scores (duplicates, pairs, calibration) are untouched, and an index that grows
needs no rebuild. The search then puts the nearest image in appearance first when it
is a good match (`Searcher.search_vector`: at or above the calibrated cutoff), so an
edited copy still finds its original at rank 1.

Measured held out (fit on one half of the labelled images, queries and database the
other half, copies kept together; Lite0): semantic mAP 0.786 -> 0.865 on indoor-boxes
and 0.210 -> 0.307 on 300 composites (`bench_descriptors.py`), 0.794 -> 0.861 and
0.212 -> 0.302 (`evaluate-retrieval`), with near-duplicate recall@1 and @5 the same as a
plain index's. The settings came from a sweep over 4 random halvings (ridge 0.1-3,
weight 0.5-8): ridge 0.1 and weight 2 gain more on composites (+0.18) but move edited
copies out of the top 5 (recall@5 0.994); 0.3 and 1 are the largest that keep it.

The fit is kept in the store's meta table, refitted by a build whenever the
labelled records or their classes change (a 1280 x 1280 solve: well under a second).
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np

from simsearch.errors import BadInputError

log = logging.getLogger(__name__)

META_KEY = "learned_similarity"  # the store's meta key holding LearnedSimilarity.to_json(); "" when there is none
STAMP_KEY = "learned_similarity_stamp"  # a short key written with it: an open Searcher rereads the fit when it moves
MODE_KEY = "similarity_mode"  # what the index was last told (--similarity): kept until told otherwise
RULE = "ridge to ground-truth classes, query-side"  # a stored fit made by another rule is redone
RIDGE = 0.3  # ridge penalty on L2-normalised vectors (see the module's measurements)
WEIGHT = 1.0  # how much agreement on the labels' directions counts against appearance
MIN_LABELLED = 20  # fewer labelled images teach nothing that generalises: plain appearance search
MIN_CLASSES = 2  # one class has no directions that separate anything
MAX_FIT = 20_000  # labelled vectors a fit reads (a seeded sample beyond): the solve stays ~1 s
MODES = ("auto", "plain")  # auto: learned whenever the collection has enough labelled images
DEFAULT_MODE = "auto"


@dataclass(frozen=True)
class LearnedSimilarity:
    """The fitted directions and where they came from (stored as JSON in the meta table)."""

    mean: np.ndarray  # (dim,) mean of the vectors it was fitted on
    basis: np.ndarray  # (dim, classes) ridge coefficients: B in q + WEIGHT * B B^T (q - mean)
    classes: tuple[str, ...] = ()
    labelled: int = 0  # labelled records it was fitted on
    digest: str = ""  # of the labelled ids and their classes: a build refits when it changes
    generations: str = ""  # the store's "generation/boxes_generation" when fitted: unchanged, no label moved
    weight: float = WEIGHT
    ridge: float = RIDGE
    rule: str = RULE
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def queries(self, xq: np.ndarray) -> np.ndarray:
        """The vectors to search with for queries `xq` (n, dim): unit length, so scores stay cosines."""
        xq = np.asarray(xq, dtype=np.float32).reshape(-1, self.mean.shape[0])
        moved = xq + self.weight * ((xq - self.mean) @ self.basis) @ self.basis.T
        return (moved / np.maximum(np.linalg.norm(moved, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def summary(self) -> dict:
        """What `info` shows: no arrays."""
        shown = {k: v for k, v in asdict(self).items() if k not in ("mean", "basis", "extra")}
        shown["classes"] = len(self.classes)
        return shown

    def to_json(self) -> str:
        shown = {k: v for k, v in asdict(self).items() if k not in ("mean", "basis")}
        shown["mean"] = _encode(self.mean)
        shown["basis"] = _encode(self.basis)
        return json.dumps(shown, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LearnedSimilarity":
        data = json.loads(text)
        data["mean"], data["basis"] = _decode(data["mean"]), _decode(data["basis"])
        data["classes"] = tuple(data.get("classes", ()))
        return cls(**data)


def _encode(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return {"shape": list(array.shape), "float32": base64.b64encode(array.tobytes()).decode("ascii")}


def _decode(data: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data["float32"]), dtype=np.float32).reshape(data["shape"]).copy()


# ------------------------------------------------------------ pure functions over vectors


def fit(xb: np.ndarray, classes: Sequence[frozenset[str]], ridge: float = RIDGE, weight: float = WEIGHT
        ) -> LearnedSimilarity | None:
    """Ridge regression from L2-normalised vectors to multi-hot classes; None when there is too little to learn."""
    x = np.asarray(xb, dtype=np.float64)
    finite = np.isfinite(x).all(axis=1) if x.ndim == 2 else np.zeros(0, dtype=bool)
    if not finite.all():  # a damaged vector must not turn every moved query into NaN
        x, classes = x[finite], [c for c, ok in zip(classes, finite) if ok]
    labels = sorted(set().union(*classes)) if len(classes) else []
    if len(classes) < MIN_LABELLED or len(labels) < MIN_CLASSES:
        return None
    started = time.perf_counter()
    y = np.array([[label in held for label in labels] for held in classes], dtype=np.float64)
    mean = x.mean(0)
    xc, yc = x - mean, y - y.mean(0)
    basis = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ yc)
    if not np.isfinite(basis).all():
        return None
    return LearnedSimilarity(mean.astype(np.float32), basis.astype(np.float32), tuple(labels), len(classes),
                             weight=weight, ridge=ridge, seconds=round(time.perf_counter() - started, 3))


def pinned_first(learned: Sequence[int], nearest: int | None) -> list[int]:
    """Ids in the learned order with the appearance-nearest one moved to the front (added if absent)."""
    if nearest is None:
        return list(learned)
    return [nearest] + [i for i in learned if i != nearest]


def labels_digest(ids: Sequence[int], classes: Sequence[frozenset[str]]) -> str:
    """What a fit depends on besides the vectors: the labelled ids, their classes and the rule's settings."""
    h = hashlib.sha256(f"{RULE}|{RIDGE}|{WEIGHT}|".encode())
    for i, held in zip(ids, classes):
        h.update(f"{int(i)}:{','.join(sorted(held))};".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------ the store's copy


def load(store) -> LearnedSimilarity | None:
    """The index's learned similarity, or None (never fitted, too few labels, `--similarity plain`, another rule)."""
    text = store.get_meta(META_KEY)
    if not text:
        return None
    try:
        learned = LearnedSimilarity.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        log.warning("the learned similarity in %s is unreadable (%s): searching by appearance", store.dir, e)
        return None
    return learned if learned.rule == RULE else None


def labelled(store) -> tuple[list[int], list[frozenset[str]]]:
    """Records with ground-truth boxes and the classes each holds (predicted boxes never teach)."""
    ids = store.ids_with_objects()
    objects = store.objects(ids)
    return ids, [frozenset(o.label for o in objects[i]) for i in ids]


def stamp(store) -> str:
    """The short key that changes whenever the stored fit does (or is dropped)."""
    return store.get_meta(STAMP_KEY, "") or ""


def mode_of(store, mode: str | None = None) -> str:
    """`mode` when given, else what the index was last told, else the default."""
    chosen = mode or store.get_meta(MODE_KEY) or DEFAULT_MODE
    if chosen not in MODES:
        raise BadInputError(f"--similarity {chosen}: give one of {', '.join(MODES)}")
    return chosen


def ensure_learned(store, mode: str | None = None, seed: int = 0) -> LearnedSimilarity | None:
    """Fit (or keep, or drop) the learned similarity so that it matches the store's labels now.

    `mode` None keeps what the index was last told (`--similarity`), so a later build
    without the option never undoes a `plain`.
    """
    chosen = mode_of(store, mode)
    current = load(store)
    if mode is not None and store.get_meta(MODE_KEY) != chosen:
        store.set_meta(MODE_KEY, chosen)
    # Every write of ground-truth objects bumps one of the two generations: when neither moved since
    # the fit, no label did, and a build need not read every labelled record's objects to know it.
    generations = f"{store.generation}/{store.boxes_generation}"
    if chosen == "auto" and current is not None and current.generations == generations:
        return current
    ids, classes = labelled(store) if chosen == "auto" else ([], [])
    digest = labels_digest(ids, classes)
    if current is not None and current.digest == digest:
        if current.generations != generations:  # labels unchanged, the store moved: remember it, no refit
            current = replace(current, generations=generations)
            store.set_meta(META_KEY, current.to_json())
        return current
    if len(ids) > MAX_FIT:
        keep = np.sort(np.random.default_rng(seed).choice(len(ids), MAX_FIT, replace=False))
        ids, classes = [ids[i] for i in keep], [classes[i] for i in keep]
    learned = None
    if chosen == "auto" and len(ids) >= MIN_LABELLED:
        found, xb = store.vectors(ids)
        row = {int(i): r for r, i in enumerate(found)}
        kept = [n for n, i in enumerate(ids) if int(i) in row]
        learned = fit(xb[[row[int(ids[n])] for n in kept]], [classes[n] for n in kept])
    if learned is not None:
        learned = replace(learned, digest=digest, generations=generations)
        log.info("learned similarity: %d labelled images, %d classes, %.2f s", learned.labelled,
                 len(learned.classes), learned.seconds)
    if learned is not None or current is not None:
        store.set_metas({META_KEY: learned.to_json() if learned is not None else "",
                         STAMP_KEY: digest if learned is not None else ""})
    return learned
