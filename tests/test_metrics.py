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
