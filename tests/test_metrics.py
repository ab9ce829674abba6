"""IoU, CorLoc, accuracy and the confusion matrix against cases worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from simsearch.localizer.metrics import accuracy, box_iou, confusion_matrix, corloc, evaluate_predictions


def test_iou_hand_computed_cases():
    # Two 2x2 squares overlapping in a 1x1 square: 1 / (4 + 4 - 1).
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    # Identical boxes.
    assert box_iou([10, 20, 50, 80], [10, 20, 50, 80]) == pytest.approx(1.0)
    # One inside the other: 4x4 in 8x8 -> 16 / 64.
    assert box_iou([0, 0, 8, 8], [2, 2, 6, 6]) == pytest.approx(0.25)
    # Touching edges and disjoint boxes share no area.
    assert box_iou([0, 0, 1, 1], [1, 0, 2, 1]) == 0.0
    assert box_iou([0, 0, 1, 1], [5, 5, 6, 6]) == 0.0
    # Half-overlapping strips: 50 / (100 + 100 - 50).
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)


def test_iou_is_rowwise_and_survives_degenerate_boxes():
    a = np.array([[0, 0, 2, 2], [0, 0, 0, 0], [0, 0, 4, 2]])
    b = np.array([[1, 1, 3, 3], [0, 0, 0, 0], [0, 0, 2, 2]])
    assert box_iou(a, b) == pytest.approx([1 / 7, 0.0, 0.5])


def test_iou_unchanged_when_both_axes_are_scaled():
    # Scoring normalised boxes equals scoring pixels: why evaluate may work in [0, 1].
    a, b = np.array([12.0, 30, 200, 140]), np.array([40.0, 10, 260, 120])
    scale = np.array([1 / 320, 1 / 240, 1 / 320, 1 / 240])
    assert box_iou(a * scale, b * scale) == pytest.approx(box_iou(a, b))


def test_corloc_counts_iou_at_least_half():
    assert corloc([0.5, 0.49, 0.9, 0.1]) == pytest.approx(0.5)
    assert corloc([0.3, 0.7], threshold=0.25) == 1.0
    assert corloc([]) == 0.0


def test_accuracy_and_confusion_matrix():
    actual = ["cat", "cat", "dog", "dog", "dog"]
    predicted = ["cat", "dog", "dog", "dog", "cat"]
    assert accuracy(actual, predicted) == pytest.approx(3 / 5)
    classes, matrix = confusion_matrix(actual, predicted)
    assert classes == ["cat", "dog"]
    assert matrix.tolist() == [[1, 1], [1, 2]]


def test_evaluate_predictions_per_class():
    actual = ["a", "a", "b"]
    predicted = ["a", "b", "b"]
    truth = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 4, 4]], dtype=float)
    boxes = np.array([[1, 1, 3, 3], [0, 0, 1, 1], [0, 0, 4, 2]], dtype=float)
    result = evaluate_predictions(actual, predicted, truth, boxes)
    assert result.n == 3
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.mean_iou == pytest.approx((1 / 7 + 1 + 0.5) / 3)
    assert result.corloc == pytest.approx(2 / 3)
    by = {c.label: c for c in result.per_class}
    assert (by["a"].n, by["a"].accuracy, by["a"].corloc, by["a"].predicted) == (2, 0.5, 0.5, 1)
    assert (by["b"].n, by["b"].accuracy, by["b"].mean_iou, by["b"].predicted) == (1, 1.0, 0.5, 2)
    assert result.confusion == [[1, 1], [0, 1]]


def test_expected_calibration_error_hand_computed():
    from simsearch.localizer.metrics import expected_calibration_error

    # Perfectly calibrated: in the 0.8 bin 4 of 5 are right, in the 0.6 bin 3 of 5.
    conf = [0.8] * 5 + [0.6] * 5
    right = [1, 1, 1, 1, 0] + [1, 1, 1, 0, 0]
    assert expected_calibration_error(conf, right, bins=10) == pytest.approx(0.0)
    # Overconfident: says 0.95, right half the time -> |0.5 - 0.95| = 0.45.
    assert expected_calibration_error([0.95] * 4, [1, 0, 1, 0]) == pytest.approx(0.45)
    # Two bins weighted by their share: 3 at 0.9 all wrong (gap 0.9), 1 at 0.3 right (gap 0.7).
    assert expected_calibration_error([0.9, 0.9, 0.9, 0.3], [0, 0, 0, 1], bins=10) == pytest.approx(
        (3 * 0.9 + 1 * 0.7) / 4)
    # A confidence of exactly 0 or 1 is binned, not lost; nothing to score is 0.
    assert expected_calibration_error([0.0, 1.0], [0, 1]) == pytest.approx(0.0)
    assert expected_calibration_error([], []) == 0.0
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [1, 0])


# ---------------------------------------------------------------- VOC average precision


def test_average_precision_hand_computed():
    from simsearch.localizer.metrics import average_precision

    # Ranked TP, FP, TP of 2 boxes: precision 1 up to recall 0.5, then 2/3 up to recall 1 -> 0.5 + 0.5 * 2/3.
    assert average_precision([0.9, 0.8, 0.7], [True, False, True], 2) == pytest.approx(0.5 + 1 / 3)
    # Order comes from the scores, not the list: the same detections shuffled.
    assert average_precision([0.7, 0.9, 0.8], [True, True, False], 2) == pytest.approx(0.5 + 1 / 3)
    # FP first, then TP, of 3 boxes: the interpolated precision at recall 1/3 is 1/2 (the best at any higher recall).
    assert average_precision([0.9, 0.8], [False, True], 3) == pytest.approx(1 / 3 * 0.5)
    # All-point interpolation: TP, FP, FP, TP of 2 -> 0.5 * 1 + 0.5 * 0.5 (not the 11-point 0.545...).
    assert average_precision([4, 3, 2, 1], [True, False, False, True], 2) == pytest.approx(0.75)
    # A later, higher precision lifts the earlier points: FP, TP, TP of 2 -> precision 2/3 over all recall.
    assert average_precision([3, 2, 1], [False, True, True], 2) == pytest.approx(2 / 3)
    assert average_precision([1.0], [True], 1) == 1.0
    assert average_precision([], [], 4) == 0.0  # nothing found
    assert average_precision([0.5], [False], 0) == 0.0  # nothing to find


def test_match_detections_greedy_by_score_duplicates_and_difficult():
    from simsearch.localizer.metrics import match_detections

    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=float)
    boxes = np.array([[0, 0, 10, 10], [1, 0, 10, 10], [20, 20, 30, 31], [50, 50, 60, 60]], dtype=float)
    matched, counted = match_detections(boxes, np.array([0.5, 0.9, 0.3, 0.8]), truth)
    # The higher-scoring of the two on the first box takes it; the other is a duplicate (FP); the far one is FP.
    assert matched.tolist() == [False, True, True, False] and counted.all()
    # A detection of a difficult box is neither right nor wrong.
    matched, counted = match_detections(boxes[:1], np.array([0.5]), truth[:1], np.array([True]))
    assert matched.tolist() == [False] and counted.tolist() == [False]


def test_mean_average_precision_per_class_and_mean():
    from simsearch.localizer.metrics import DetectionTruth, mean_average_precision

    truths = [DetectionTruth(["cup", "book"], np.array([[0, 0, .2, .2], [.5, .5, 1, 1]]), np.array([False, False])),
              DetectionTruth(["cup"], np.array([[.1, .1, .3, .3]]), np.array([False]))]
    detections = [(["cup", "book", "cup"], np.array([0.9, 0.6, 0.4]), np.array([[0, 0, .2, .2], [0, 0, .5, .5],
                                                                               [.6, .6, .7, .7]])),
                  (["cup"], np.array([0.5]), np.array([[.1, .1, .3, .3]]))]
    mean, ap, boxes = mean_average_precision(detections, truths, ["cup", "book", "sofa"])
    # cup: TP 0.9, TP 0.5, FP 0.4 of 2 boxes -> AP 1; book: one FP of 1 box -> 0; sofa: no boxes, left out.
    assert ap == {"cup": pytest.approx(1.0), "book": 0.0} and boxes == {"cup": 2, "book": 1}
    assert mean == pytest.approx(0.5)
    # A detection under the wrong class never matches another class's box.
    mean, ap, _ = mean_average_precision([(["book"], np.array([1.0]), np.array([[0, 0, .2, .2]]))], truths[:1])
    assert ap == {"book": 0.0, "cup": 0.0} and mean == 0.0
