"""Localizer metrics: box IoU, CorLoc, top-1 accuracy, calibration error, per-class scores and a confusion matrix.

Plain numpy over (x1, y1, x2, y2) boxes, so the same code scores pixels or
normalised coordinates: IoU does not change when both axes are scaled.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

CORLOC_IOU = 0.5  # the localisation literature's threshold for "the box found the object"


def box_iou(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> np.ndarray:
    """IoU of matching rows of two (n, 4) arrays of x1, y1, x2, y2 boxes (or of two single boxes).

    Degenerate boxes (zero area) have IoU 0 with everything rather than NaN.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    single = a.ndim == 1
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a + area_b - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou[0] if single else iou


def corloc(ious: np.ndarray | Sequence[float], threshold: float = CORLOC_IOU) -> float:
    """Share of images whose predicted box overlaps the target with IoU >= threshold."""
    ious = np.asarray(ious, dtype=np.float64)
    return float((ious >= threshold).mean()) if ious.size else 0.0


def accuracy(actual: Sequence[str], predicted: Sequence[str]) -> float:
    """Top-1 classification accuracy."""
    if len(actual) != len(predicted):
        raise ValueError("actual and predicted differ in length")
    return float(np.mean([a == p for a, p in zip(actual, predicted)])) if len(actual) else 0.0


def confusion_matrix(actual: Sequence[str], predicted: Sequence[str],
                     classes: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(classes, matrix) with matrix[i, j] = images of actual class i predicted as class j."""
    if classes is None:
        classes = sorted(set(actual) | set(predicted))
    classes = list(classes)
    where = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for a, p in zip(actual, predicted):
        if a in where and p in where:
            matrix[where[a], where[p]] += 1
    return classes, matrix


ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. (2017)


def expected_calibration_error(confidences: np.ndarray | Sequence[float], correct: np.ndarray | Sequence[bool],
                               bins: int = ECE_BINS) -> float:
    """ECE: the |accuracy - mean confidence| of each equal-width confidence bin, weighted by its share of predictions.

    0 means every score is the probability of being right; a head that says 0.95
    and is right half the time has ECE 0.45.
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidences.shape != correct.shape:
        raise ValueError("confidences and correct differ in shape")
    if confidences.size == 0:
        return 0.0
    # Bins are (lo, hi]; a confidence of exactly 0 goes in the first one.
    which = np.clip(np.ceil(confidences * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(correct[mask].mean() - confidences[mask].mean())
    return float(total / confidences.size)


@dataclass
class ClassScore:
    label: str
    n: int  # images whose target has this class
    accuracy: float  # share of those predicted as this class (recall)
    mean_iou: float
    corloc: float
    predicted: int  # images predicted as this class (any actual class)


@dataclass
class Evaluation:
    """What `simsearch evaluate` prints."""

    n: int
    accuracy: float
    mean_iou: float
    corloc: float
    per_class: list[ClassScore] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)  # rows: actual, columns: predicted
    extra: dict = field(default_factory=dict)  # who was evaluated: split, head version, unseen classes
    ece: float | None = None  # expected calibration error of the scores as stored (temperature applied)
    ece_uncalibrated: float | None = None  # the same with T = 1: what calibration gained
    unknown_rate: float | None = None  # share predicted "unknown" (score below the head's threshold)
    accuracy_kept: float | None = None  # share right and not "unknown": accuracy once the threshold applies
    map50: float | None = None  # VOC mAP at IoU 0.5 over every box of the head's classes
    detection: list[dict] = field(default_factory=list)  # per class with boxes: label, boxes, ap

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_predictions(actual: Sequence[str], predicted: Sequence[str],
                         actual_boxes: np.ndarray, predicted_boxes: np.ndarray) -> Evaluation:
    """Score one prediction per image against one target per image."""
    actual, predicted = list(actual), list(predicted)
    ious = box_iou(np.asarray(actual_boxes).reshape(-1, 4), np.asarray(predicted_boxes).reshape(-1, 4))
    classes, matrix = confusion_matrix(actual, predicted)
    per_class = []
    for c in sorted(set(actual)):
        mask = np.array([a == c for a in actual])
        per_class.append(ClassScore(
            c, int(mask.sum()), accuracy([a for a, m in zip(actual, mask) if m], [p for p, m in zip(predicted, mask) if m]),
            float(ious[mask].mean()), corloc(ious[mask]), sum(p == c for p in predicted)))
    return Evaluation(
        n=len(actual),
        accuracy=accuracy(actual, predicted),
        mean_iou=float(ious.mean()) if ious.size else 0.0,
        corloc=corloc(ious),
        per_class=per_class,
        classes=classes,
        confusion=matrix.tolist(),
    )


# ---------------------------------------------------------------- detection: VOC average precision

MAP_IOU = 0.5  # PASCAL VOC's threshold for a detection to count as finding its object


def average_precision(scores: np.ndarray | Sequence[float], matched: np.ndarray | Sequence[bool],
                      n_truth: int) -> float:
    """All-point interpolated AP (VOC 2010+) of one class: detections ranked by score, `matched` = true positive.

    Precision is made monotone (each point takes the best precision at any higher
    recall), then integrated over recall wherever recall changes. No ground truth:
    0.0 (the caller leaves such a class out of the mean).
    """
    scores = np.asarray(scores, dtype=np.float64)
    matched = np.asarray(matched, dtype=bool)
    if scores.shape != matched.shape:
        raise ValueError("scores and matched differ in shape")
    if n_truth <= 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(matched[order])
    fp = np.cumsum(~matched[order])
    recall = np.concatenate([[0.0], tp / n_truth, [1.0]])
    precision = np.concatenate([[0.0], tp / np.maximum(tp + fp, 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def match_detections(boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray, difficult: np.ndarray | None = None,
                     iou: float = MAP_IOU) -> tuple[np.ndarray, np.ndarray]:
    """One image, one class: (matched, counted) per detection, greedily by score as VOC does.

    A detection is a true positive when its best-overlapping ground-truth box
    reaches `iou` and was not taken by a higher-scoring detection; one whose best
    box is `difficult` is neither right nor wrong (counted False).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
    difficult = np.zeros(len(truth), bool) if difficult is None else np.asarray(difficult, dtype=bool)
    matched = np.zeros(len(boxes), bool)
    counted = np.ones(len(boxes), bool)
    if not len(truth):
        return matched, counted
    taken = np.zeros(len(truth), bool)
    for d in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"):
        overlaps = box_iou(np.repeat(boxes[d:d + 1], len(truth), axis=0), truth)
        best = int(overlaps.argmax())
        if overlaps[best] < iou:
            continue
        if difficult[best]:
            counted[d] = False
        elif not taken[best]:
            matched[d] = taken[best] = True
    return matched, counted


@dataclass
class DetectionTruth:
    """One image's ground truth for detection scoring: labels, (n, 4) boxes, difficult flags."""

    labels: list[str]
    boxes: np.ndarray
    difficult: np.ndarray


def mean_average_precision(detections: Sequence[tuple[Sequence[str], np.ndarray, np.ndarray]],
                           truths: Sequence[DetectionTruth], classes: Sequence[str] | None = None,
                           iou: float = MAP_IOU) -> tuple[float, dict[str, float], dict[str, int]]:
    """(mAP, AP per class, non-difficult boxes per class) over images; detections per image: (labels, scores, boxes).

    The mean is over `classes` (default: every class with ground truth) that
    have at least one non-difficult box: a class nobody drew has no recall to measure.
    """
    if len(detections) != len(truths):
        raise ValueError("detections and truths differ in length")
    if classes is None:
        classes = sorted({label for t in truths for label in t.labels})
    n_truth = {c: 0 for c in classes}
    hits: dict[str, list[tuple[float, bool]]] = {c: [] for c in classes}
    for (labels, scores, boxes), truth in zip(detections, truths):
        labels, scores = list(labels), np.asarray(scores, dtype=np.float64)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        truth_boxes = np.asarray(truth.boxes, dtype=np.float64).reshape(-1, 4)
        for c in classes:
            mine = np.array([label == c for label in labels], dtype=bool)
            theirs = np.array([label == c for label in truth.labels], dtype=bool)
            difficult = np.asarray(truth.difficult, dtype=bool)[theirs] if theirs.any() else np.zeros(0, bool)
            n_truth[c] += int((~difficult).sum())
            if not mine.any():
                continue
            matched, counted = match_detections(boxes[mine], scores[mine], truth_boxes[theirs], difficult, iou)
            hits[c] += [(s, m) for s, m, k in zip(scores[mine], matched, counted) if k]
    ap = {}
    for c in classes:
        if n_truth[c] == 0:
            continue
        scored = np.array([s for s, _ in hits[c]], dtype=np.float64)
        ap[c] = average_precision(scored, np.array([m for _, m in hits[c]], dtype=bool), n_truth[c])
    return (float(np.mean(list(ap.values()))) if ap else 0.0), ap, {c: n for c, n in n_truth.items() if n}
