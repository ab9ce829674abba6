"""Calibrate: the score below which a result is no good match, measured per index on its own vectors.

A cosine score means nothing on its own: 0.55 is a strong match among varied photos
and background noise among near-identical indoor scenes. So each index measures, at
build time, what its unrelated images score against each other (random pairs of its
stored vectors) and what true near-duplicates score (sample images cropped, flipped,
re-compressed and shrunk, embedded with the index's own embedder), and keeps

    cutoff = min(q99 of random-pair scores, q01 of near-duplicate scores)

Results scoring below it are "weak": no better than what unrelated images of this
collection score against each other. The near-duplicate cap keeps the cutoff from
ever hiding an edited copy of an indexed image. `benchmarks/bench_calibration.py`
measured the rule on the shared data (README, "No good match").
"""
from __future__ import annotations

import json
import math
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from simsearch.errors import SimsearchError
from simsearch.pipeline.edits import centre_crop, jpeg, rescaled

log = logging.getLogger(__name__)

META_KEY = "score_cutoff"  # the store's meta key holding Calibration.to_json()
RULE = "min(random q99, near-duplicate q01)"  # a stored calibration made by another rule is redone
RANDOM_Q = 0.99  # quantile of random-pair scores the cutoff sits at
NEAR_DUPLICATE_Q = 0.01  # quantile of near-duplicate scores the cutoff never exceeds
MIN_IMAGES = 8  # fewer stored vectors (28 pairs) give no cutoff: nothing is marked weak
MAX_PAIR_SAMPLE = 1500  # vectors whose all-pairs scores are measured (1.1M pairs, ~0.1 s)
MAX_NEAR_DUPLICATE_SAMPLE = 32  # images edited 4 ways and embedded: ~3 s on 2 idle CPU cores with Lite0
NEAR_DUPLICATE_BATCH = 8  # images decoded, edited and embedded at a time: memory stays bounded
EDIT_SIDE = 1024  # decoded images are shrunk to this longest side before editing (a 64 MP PNG would be 200 MB)
RECALIBRATE_CHANGE = 0.10  # redo the calibration when this fraction of the collection was added or removed
QUANTILES = (0.01, 0.05, 0.5, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class Calibration:
    """An index's score cutoff and the distributions it came from (stored as JSON in the meta table)."""

    cutoff: float | None  # scores below it are weak; None when the index is too small to tell
    random_q: dict[str, float] = field(default_factory=dict)  # quantile ("q99") -> random-pair score
    near_duplicate_q: dict[str, float] = field(default_factory=dict)  # quantile -> near-duplicate score
    sample: int = 0  # vectors whose pairs were scored
    near_duplicates: int = 0  # edited copies embedded and scored against their originals
    ntotal: int = 0  # records when it was computed: a build recalibrates when this drifts by 10%
    max_id: int = 0  # the largest record id then (ids are never reused, so later ids are additions)
    generation: int = 0  # the store generation it was computed at
    rule: str = RULE
    seconds: float = 0.0  # what it cost

    def is_weak(self, score: float) -> bool:
        return self.cutoff is not None and score < self.cutoff

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        return cls(**json.loads(text))


# ------------------------------------------------------------ pure functions over vectors


def random_pair_scores(xb: np.ndarray, max_sample: int = MAX_PAIR_SAMPLE, seed: int = 0,
                       groups: np.ndarray | None = None) -> np.ndarray:
    """Cosine scores of every pair among a seeded sample of at most `max_sample` rows of `xb` (L2-normalised).

    With `groups` (one label a row), pairs within a group are left out: two boxes of
    one image share their surroundings in the map, so they are no unrelated pair.
    """
    n = len(xb)
    if n < 2:
        return np.zeros(0, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, max_sample), replace=False))
    x = np.asarray(xb[rows], dtype=np.float32)
    gram = x @ x.T
    upper = np.triu_indices(len(x), k=1)
    if groups is None:
        return gram[upper]
    g = np.asarray(groups)[rows]
    apart = g[upper[0]] != g[upper[1]]
    return gram[upper[0][apart], upper[1][apart]]


def quantiles(scores: np.ndarray, qs: Sequence[float] = QUANTILES) -> dict[str, float]:
    """{"q01": ..., "q99": ...} of `scores` (empty when there are none)."""
    if len(scores) == 0:
        return {}
    values = np.quantile(np.asarray(scores, dtype=np.float64), qs)
    return {_qname(q): round(float(v), 4) for q, v in zip(qs, values)}


def _qname(q: float) -> str:
    return f"q{round(q * 100):02d}"


def cutoff_rule(random_scores: np.ndarray, near_duplicate_scores: np.ndarray | None = None,
                random_q: float = RANDOM_Q, near_duplicate_q: float = NEAR_DUPLICATE_Q,
                min_pairs: int = MIN_IMAGES * (MIN_IMAGES - 1) // 2) -> float | None:
    """The score below which a result is weak, or None when there are too few pairs to say.

    A high quantile of what unrelated images score against each other, kept below the
    low quantile of near-duplicate scores, so no edited copy of an image is ever weak.
    """
    if len(random_scores) < min_pairs:
        return None
    cutoff = float(np.quantile(random_scores, random_q))
    if near_duplicate_scores is not None and len(near_duplicate_scores):
        cutoff = min(cutoff, float(np.quantile(near_duplicate_scores, near_duplicate_q)))
    return math.floor(cutoff * 10_000) / 10_000  # rounded down: never above the quantiles it came from


# ------------------------------------------------------------ near-duplicates


# Fixed strengths (no randomness), drawn from the Copydays set that evaluate-retrieval uses (`pipeline/edits`).
EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "crop75": lambda im: centre_crop(im, 0.75),  # centre crop keeping 75% of each side
    "flip": ImageOps.mirror,
    "jpeg30": lambda im: jpeg(im, 30),
    "scale25": lambda im: rescaled(im, 0.25),  # down to 25% and back up
}


def near_duplicate_scores(originals: np.ndarray, images: Sequence[Image.Image],
                          embed: Callable[[list[Image.Image]], np.ndarray]) -> np.ndarray:
    """Scores of each image's edited copies (EDITS) against its stored vector (`originals`, one row each)."""
    if not images:
        return np.zeros(0, dtype=np.float32)
    edited = [edit(im) for im in images for edit in EDITS.values()]
    vectors = embed(edited).reshape(len(images), len(EDITS), -1)
    return np.einsum("ned,nd->ne", vectors, np.asarray(originals, dtype=np.float32)).ravel()


# ------------------------------------------------------------ an index's calibration


def calibrate(store, embedder, seed: int = 0, max_pair_sample: int = MAX_PAIR_SAMPLE,
              max_near_duplicates: int = MAX_NEAR_DUPLICATE_SAMPLE) -> Calibration:
    """Measure an index's score distributions and its cutoff (not saved: see `ensure_calibrated`).

    Reads only the sampled vectors (never the whole index), then costs one matrix
    product over at most `max_pair_sample` of them plus decoding and embedding 4 edits
    of at most `max_near_duplicates` images: 2.5-3 s for 32 indoor photos with
    EfficientNet-Lite0 on 2 idle CPU cores (more on a busy machine, or for large files,
    whose decode dominates). Files that cannot be read any more are left out of the
    near-duplicate sample, never fatal.
    """
    from simsearch.pipeline.read import open_image

    started = time.perf_counter()
    generation = store.generation
    every = np.asarray(store.ids(), dtype=np.int64)
    rng = np.random.default_rng(seed)
    sampled = np.sort(rng.choice(every, min(len(every), max_pair_sample), replace=False)) if len(every) else every
    ids, xb = store.vectors(sampled.tolist())
    pairs = random_pair_scores(xb, max_pair_sample, seed)
    dups: list[np.ndarray] = []
    if len(ids) >= MIN_IMAGES and max_near_duplicates > 0:
        chosen = np.sort(rng.permutation(len(ids))[:max_near_duplicates])
        records = store.records([int(ids[i]) for i in chosen])
        draft = embedder.spec.preprocess.input_size
        for start in range(0, len(chosen), NEAR_DUPLICATE_BATCH):
            images, rows = [], []
            for i in chosen[start:start + NEAR_DUPLICATE_BATCH]:
                record = records.get(int(ids[i]))
                if record is None:
                    continue
                try:
                    image = open_image(record.path, draft=draft)
                except (OSError, SimsearchError) as e:  # moved or damaged since it was embedded
                    log.debug("calibration leaves out %s: %s", record.path, e)
                    continue
                image.thumbnail((EDIT_SIDE, EDIT_SIDE))
                images.append(image)
                rows.append(i)
            dups.append(near_duplicate_scores(xb[rows], images, lambda ims: embedder.embed_images(ims).vectors))
    near = np.concatenate(dups) if dups else np.zeros(0, dtype=np.float32)
    return _measured("score cutoff", pairs, near, len(ids), every, generation, started)


def _measured(what: str, pairs: np.ndarray, near: np.ndarray, sample: int, every: np.ndarray, generation: int,
              started: float) -> Calibration:
    """The Calibration of these score distributions, over a set whose ids are `every`."""
    calibration = Calibration(
        cutoff=cutoff_rule(pairs, near), random_q=quantiles(pairs), near_duplicate_q=quantiles(near),
        sample=sample, near_duplicates=len(near), ntotal=len(every),
        max_id=int(every.max()) if len(every) else 0, generation=generation,
        seconds=round(time.perf_counter() - started, 2))
    log.info("%s %s from %d pairs and %d near-duplicates in %.2f s", what, calibration.cutoff, len(pairs),
             len(near), calibration.seconds)
    return calibration


def load(store) -> Calibration | None:
    """The index's stored calibration, if any."""
    text = store.get_meta(META_KEY)
    return Calibration.from_json(text) if text else None


def changed_fraction(calibration: Calibration, ids: Sequence[int]) -> float:
    """Records added or removed since `calibration`, over the count it was computed on."""
    ids = np.asarray(ids, dtype=np.int64)
    added = int((ids > calibration.max_id).sum())
    removed = calibration.ntotal - (len(ids) - added)
    return (added + removed) / max(calibration.ntotal, 1)


def ensure_calibrated(store, embedder) -> Calibration:
    """Calibrate the index if it never was, was by another rule, or changed by over 10% since; the one in force."""
    current = load(store)
    if current is not None and current.rule == RULE and changed_fraction(current, store.ids()) <= RECALIBRATE_CHANGE:
        return current
    calibration = calibrate(store, embedder)
    store.set_meta(META_KEY, calibration.to_json())
    return calibration


# ------------------------------------------------------------ the objects index's calibration

BOX_NEAR_DUPLICATE_SAMPLE = 64  # boxes re-pooled from their kept maps, framed 4 ways: no forward pass
BOX_JITTERS = ((0.1, 0.0, 1.0), (0.0, 0.1, 1.0), (0.0, 0.0, 0.9), (0.0, 0.0, 1.1))  # (dx, dy, scale) of the box


def calibrate_boxes(store, seed: int = 0, max_pair_sample: int = MAX_PAIR_SAMPLE,
                    max_near_duplicates: int = BOX_NEAR_DUPLICATE_SAMPLE) -> Calibration:
    """The objects index's cutoff, by the same rule over box vectors.

    Random pairs are pairs of stored boxes of different images. A box's near-duplicates are the same
    object framed a little differently (shifted by a tenth of its size, or 10%
    smaller or larger), pooled again from its image's kept map: what a hand-drawn
    box around a known object scores against the stored one. Costs a matrix product
    and a few hundred box poolings, well under a second.
    """
    from simsearch.pipeline.box_vectors import fractions, pool_boxes

    started = time.perf_counter()
    boxes_set = store.vector_set("boxes")
    generation, every = boxes_set.id_snapshot()
    rng = np.random.default_rng(seed)
    sampled = np.sort(rng.choice(every, min(len(every), max_pair_sample), replace=False)) if len(every) else every
    ids, xb = boxes_set.vectors(sampled.tolist())
    image_of = {i: b.image_id for i, b in store.boxes(ids.tolist()).items()}
    pairs = random_pair_scores(xb, max_pair_sample, seed, np.array([image_of.get(int(i), -1) for i in ids]))
    near = np.zeros(0, dtype=np.float32)
    if len(ids) >= MIN_IMAGES and max_near_duplicates > 0:
        chosen = [int(ids[i]) for i in np.sort(rng.permutation(len(ids))[:max_near_duplicates])]
        found = store.boxes(chosen)
        mapped = store.ids_with_feature_map(sorted({b.image_id for b in found.values()}))
        chosen = [i for i in chosen if i in found and found[i].image_id in mapped]
        if chosen:
            images = sorted({found[i].image_id for i in chosen})
            maps = dict(zip(images, store.feature_maps(images)))
            sizes = store.sizes(images)
            jittered = [fractions([_jittered(found[i].box, *j) for j in BOX_JITTERS], *sizes[found[i].image_id])
                        for i in chosen]
            pooled = pool_boxes(np.stack([maps[found[i].image_id] for i in chosen]), jittered)
            row = {int(b): r for r, b in enumerate(ids)}
            near = np.concatenate([p @ xb[row[i]] for p, i in zip(pooled, chosen)]).astype(np.float32)
    return _measured("objects score cutoff", pairs, near, len(ids), every, generation, started)


def _jittered(box: Sequence[float], dx: float, dy: float, scale: float) -> tuple[float, float, float, float]:
    xmin, ymin, xmax, ymax = box
    w, h = xmax - xmin, ymax - ymin
    cx, cy = (xmin + xmax) / 2 + dx * w, (ymin + ymax) / 2 + dy * h
    return cx - scale * w / 2, cy - scale * h / 2, cx + scale * w / 2, cy + scale * h / 2


def load_boxes(store) -> Calibration | None:
    """The objects index's stored calibration, if any."""
    text = store.vector_set("boxes").get_meta(META_KEY)
    return Calibration.from_json(text) if text else None


def ensure_boxes_calibrated(store) -> Calibration | None:
    """Calibrate the objects index when it never was or its boxes changed by over 10%; None when it has no boxes."""
    boxes_set = store.vector_set("boxes")
    _, ids = boxes_set.id_snapshot()
    if not len(ids):
        return None
    current = load_boxes(store)
    if current is not None and current.rule == RULE and changed_fraction(current, ids) <= RECALIBRATE_CHANGE:
        return current
    calibration = calibrate_boxes(store)
    boxes_set.set_meta(META_KEY, calibration.to_json())
    return calibration
