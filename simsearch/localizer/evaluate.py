"""Scoring a trained head on the images it never trained on: accuracy, CorLoc, calibration, mAP, and the open set.

`evaluate` reads the head's recorded validation rule, so it scores exactly the
held-out images; `open_set` trains a throwaway head without some classes and
counts how often their images come out "unknown" (`simsearch evaluate --open-set`).
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from simsearch.errors import BadInputError
from simsearch.localizer.calibrate import softmax
from simsearch.localizer.head import HeadSpec
from simsearch.localizer.metrics import Evaluation, evaluate_predictions, expected_calibration_error
from simsearch.localizer.predict import open_localizer
from simsearch.localizer.train import TrainConfig, examples, held_out, load_maps, train
from simsearch.storage.store import Store


# ---------------------------------------------------------------- evaluating

def evaluation_ids(store: Store, spec: HeadSpec, split: str) -> list[int]:
    """Images with a target in `split`: val/train = the head's own held-out/training images, all, or a split name."""
    every = examples(store, policy=spec.target).ids
    if split == "all":
        return every
    if split in ("val", "train"):
        val = held_out(store, every, spec.validation)
        rows = store.images(every)
        if split == "val":
            return [i for i in every if i in val]
        return [i for i in every if i not in val and rows[i]["split"] != "test"]
    rows = store.images(every)
    chosen = [i for i in every if rows[i]["split"] == split]
    if not chosen:
        raise BadInputError(f"no image with ground truth has split {split!r}; use val, train, all or a split name")
    return chosen


def evaluate(index_dir: str | os.PathLike, split: str = "val", head_dir: str | os.PathLike | None = None) -> Evaluation:
    """Score the head on images with ground truth: top-1 accuracy, mean IoU, CorLoc, per class, confusion, and mAP@0.5
    over every box (a single-object head's one box being its only detection).

    A dense head's accuracy and CorLoc are those of its best detection against
    the largest object; its scores are not calibrated, so it has no ECE.
    """
    from simsearch.localizer.train_dense import detection_scores, truths

    with Store(index_dir) as store:
        localizer = open_localizer(store, head_dir)
        ids = evaluation_ids(store, localizer.spec, split)
        if not ids:
            raise BadInputError(f"no images with ground truth in split {split!r} of {index_dir}")
        truth = examples(store, ids, localizer.spec.target)
        every_box = truths(store, truth.ids)
        maps = load_maps(store, truth.ids)
    out = localizer.predict(maps)
    scores = out.scores
    predicted = [localizer.spec.classes[int(k)] for k in out.classes]
    result = evaluate_predictions(truth.labels, predicted, truth.boxes, out.boxes)
    known = set(localizer.spec.classes)
    correct = np.array([a == p for a, p in zip(truth.labels, predicted)])
    unknown = out.unknown
    seen = np.array([label in known for label in truth.labels])
    if not localizer.spec.dense:
        raw = softmax(localizer.logits(maps)).max(1) if len(maps) else np.zeros(0)
        result.ece = expected_calibration_error(scores[seen], correct[seen])
        result.ece_uncalibrated = expected_calibration_error(raw[seen], correct[seen])
    result.unknown_rate = float(unknown.mean())
    result.accuracy_kept = float((correct & ~unknown).mean())
    # Every detection, however low it scores: AP integrates over the whole ranking.
    result.map50, ap, n_boxes = detection_scores(localizer.detect_maps(maps, min_score=0.0), every_box,
                                                 localizer.spec.classes)
    result.detection = [{"label": c, "boxes": n_boxes[c], "ap": ap[c]} for c in sorted(ap)]
    result.extra = {"split": split, "head_version": localizer.spec.version, "target": localizer.spec.target,
                    "unseen_class_images": int((~seen).sum()),
                    "unseen_class_boxes": sum(int(not d and c not in known) for t in every_box
                                              for c, d in zip(t.labels, t.difficult)),
                    "chance_accuracy": _majority_share(truth.labels),
                    "temperature": localizer.spec.temperature, "threshold": localizer.spec.threshold,
                    "familiarity_threshold": localizer.spec.familiarity_threshold}
    return result


# ---------------------------------------------------------------- open set

@dataclass
class OpenSetReport:
    """How a head trained without some classes treats images of them, and what the threshold costs the rest."""

    held_out: list[str]  # classes the head never saw
    classes: list[str]  # classes it was trained on
    held_out_images: int  # images (any split) whose target is a held-out class
    held_out_unknown_rate: float  # share of those predicted UNKNOWN: the higher the better
    held_out_mean_score: float
    known_images: int  # validation images of the trained classes
    known_accuracy: float  # top-1 on those without the threshold
    known_accuracy_kept: float  # correct and not UNKNOWN, with the threshold
    known_unknown_rate: float  # share of those wrongly sent to UNKNOWN
    known_mean_score: float
    temperature: float
    threshold: float
    ece_before: float  # validation ECE of the trained classes, T = 1
    ece_after: float
    seconds: float
    familiarity_threshold: float = -1.0
    held_out_unknown_rate_score_only: float = 0.0  # the held-out share "unknown" by the score threshold alone
    known_unknown_rate_score_only: float = 0.0


def open_set(config: TrainConfig, hold_out: Sequence[str] = (), n_hold_out: int = 2) -> OpenSetReport:
    """Train a throwaway head without `hold_out` (default: the `n_hold_out` first classes by name), then measure.

    The index's own head is left alone: the throwaway one lives in a temporary
    folder. Every image of a held-out class counts (none was trained on); known
    classes are scored on the validation images.
    """
    import tempfile

    started = time.perf_counter()
    with Store(config.index_dir) as store:
        every = examples(store, policy=config.target)
    present = sorted(set(every.labels))
    hold_out = tuple(hold_out) or tuple(present[:n_hold_out])
    missing = [c for c in hold_out if c not in present]
    if missing:
        raise BadInputError(f"no image has class {', '.join(missing)}; hold out some of: {', '.join(present)}")
    if len(present) - len(hold_out) < 2:
        raise BadInputError(f"holding out {len(hold_out)} of {len(present)} classes leaves fewer than 2 to train on")
    with tempfile.TemporaryDirectory(prefix="simsearch-open-set-") as folder:
        report = train(replace(config, exclude_classes=hold_out, head_dir=Path(folder)))
        with Store(config.index_dir) as store:
            localizer = open_localizer(store, folder)
            spec = localizer.spec
            val = held_out(store, every.ids, spec.validation)
            unseen = [i for i, c in zip(every.ids, every.labels) if c in hold_out]
            known = [(i, c) for i, c in zip(every.ids, every.labels) if i in val and c in spec.classes]
            unseen_maps = load_maps(store, unseen)
            known_maps = load_maps(store, [i for i, _ in known])
    unseen_out, known_out = localizer.predict(unseen_maps), localizer.predict(known_maps)
    correct = np.array([spec.classes[int(k)] == c for k, (_, c) in zip(known_out.classes, known)], dtype=bool)
    kept = ~known_out.unknown
    mean = lambda a: float(np.mean(a)) if len(a) else 0.0  # noqa: E731
    # The same images under the score threshold alone (keeping `keep_correct` of correct validation predictions):
    # what the familiarity test adds.
    score_only = report.calibration["score_only_threshold"]
    return OpenSetReport(
        list(hold_out), list(spec.classes), len(unseen), mean(unseen_out.unknown), mean(unseen_out.scores),
        len(known), mean(correct), mean(correct & kept), mean(~kept), mean(known_out.scores), spec.temperature,
        spec.threshold, report.calibration["ece_before"], report.calibration["ece_after"],
        time.perf_counter() - started, spec.familiarity_threshold, mean(unseen_out.scores < score_only),
        mean(known_out.scores < score_only))


def _majority_share(labels: Sequence[str]) -> float:
    """Accuracy of always answering the most common class: the bar a head must clear."""
    from collections import Counter

    return Counter(labels).most_common(1)[0][1] / len(labels) if labels else 0.0
