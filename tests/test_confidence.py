"""Calibrated scores and "unknown": the temperature is fitted, saved and applied; low scores name no class; old heads predict as before."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from simsearch.localizer.calibrate import fit_temperature, nll, softmax, unknown_threshold
from simsearch.localizer.head import HEAD_FILE, HEAD_FORMAT, HeadSpec, Localizer, LocalizerHead
from simsearch.localizer.metrics import expected_calibration_error
from simsearch.localizer.predict import predictions_from_maps
from simsearch.records import UNKNOWN


def _overconfident(n=2000, k=5, seed=0):
    """Logits whose argmax is right ~70% of the time but whose softmax says ~99%: a head trained too long."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), labels] += 1.5
    return logits * 6, labels


def test_temperature_reduces_nll_and_ece_on_held_out_logits():
    fit_logits, fit_labels = _overconfident(seed=0)
    logits, labels = _overconfident(seed=1)  # scored on other draws than the fit: a validation/test split
    t = fit_temperature(fit_logits, fit_labels)
    assert t > 2  # the scores were far too sharp
    assert nll(logits, labels, t) < nll(logits, labels) - 0.5
    correct = logits.argmax(1) == labels
    before = expected_calibration_error(softmax(logits).max(1), correct)
    after = expected_calibration_error(softmax(logits, t).max(1), correct)
    assert before > 0.15 and after < 0.05
    # T never changes which class wins.
    assert (softmax(logits, t).argmax(1) == logits.argmax(1)).all()


def test_unknown_threshold_keeps_the_share_of_correct_predictions():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    correct = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], dtype=bool)  # 10 correct, from 0.2 up
    assert unknown_threshold(scores, correct, keep=0.9) == pytest.approx(0.3)  # keeps 9 of 10
    assert unknown_threshold(scores, correct, keep=1.0) == pytest.approx(0.2)
    assert unknown_threshold(scores, np.zeros(11, bool)) == 0.0


def _localizer(spec_changes=None, seed=0):
    torch.manual_seed(seed)
    head = LocalizerHead(8, 3, (7, 7), width=16, hidden=32)
    with torch.no_grad():
        head.classify.weight.mul_(20)  # sharp scores, so the temperature visibly matters
    spec = HeadSpec(("cat", "dog", "mug"), "tiny", "w", "sha", (8, 7, 7), "v1", 16, 32, **(spec_changes or {}))
    return Localizer(head, spec)


def test_temperature_and_threshold_are_saved_loaded_and_applied(tmp_path):
    maps = np.random.default_rng(0).normal(size=(20, 8, 7, 7)).astype(np.float32)
    plain = _localizer()
    calibrated = _localizer({"temperature": 3.0})
    threshold = float(np.median(calibrated.predict_maps(maps)[1]))  # half the maps fall below it
    calibrated.spec = replace(calibrated.spec, threshold=threshold)
    calibrated.save(tmp_path)
    again = Localizer.load(tmp_path)
    assert (again.spec.temperature, again.spec.threshold) == (3.0, threshold)
    logits = plain.logits(maps)
    labels, scores, boxes = again.predict_maps(maps)
    assert scores == pytest.approx(softmax(logits, 3.0).max(1), abs=1e-5)
    assert (labels == logits.argmax(1)).all()
    # Below the threshold: "unknown", with the score and the box kept.
    found = predictions_from_maps(again, maps, [(100, 50)] * len(maps))
    assert any(p.label == UNKNOWN for p in found) and any(p.label != UNKNOWN for p in found)
    for p, s, b in zip(found, scores, boxes):
        assert (p.label == UNKNOWN) == (s < threshold)
        assert p.score == pytest.approx(float(s))
        assert [p.xmin, p.ymin, p.xmax, p.ymax] == pytest.approx([b[0] * 100, b[1] * 50, b[2] * 100, b[3] * 50])


def test_a_head_saved_before_calibration_loads_and_predicts_as_before(tmp_path):
    maps = np.random.default_rng(1).normal(size=(10, 8, 7, 7)).astype(np.float32)
    old = _localizer()
    spec = json.loads(old.spec.to_json())
    del spec["temperature"], spec["threshold"]  # what a head trained before calibration has in its file
    torch.save({"format": HEAD_FORMAT, "spec": json.dumps(spec), "state": old.head.state_dict()}, tmp_path / HEAD_FILE)
    loaded = Localizer.load(tmp_path)
    assert (loaded.spec.temperature, loaded.spec.threshold) == (1.0, 0.0)
    labels, scores, _ = loaded.predict_maps(maps)
    assert scores == pytest.approx(softmax(old.logits(maps)).max(1), abs=1e-6)
    assert [p.label for p in predictions_from_maps(loaded, maps, [(10, 10)] * 10)] == \
        [old.spec.classes[k] for k in labels]


def test_a_validation_set_all_right_does_not_drive_the_temperature_to_zero():
    from simsearch.localizer.calibrate import T_RANGE

    logits = np.array([[5.0, 0.0], [0.0, 4.0], [3.0, 0.0]])
    t = fit_temperature(logits, np.array([0, 1, 0]))
    assert T_RANGE[0] <= t < 1  # sharper, as it should be, but bounded and finite
    assert np.isfinite(softmax(logits, t)).all()


# ---------------------------------------------------------------- familiarity: "none of these" from the box's own vector

def _unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_familiarity_is_the_kth_nearest_training_box_of_the_predicted_class():
    from simsearch.localizer.familiarity import NO_REFERENCES, References, familiarity

    refs = References(_unit([[1, 0, 0], [0.8, 0.6, 0], [0.6, 0.8, 0], [0, 0, 1]]).astype(np.float16),
                      np.array([0, 0, 0, 1]), k=2)
    query = _unit([[1, 0, 0], [1, 0, 0], [0, 1, 0]])
    got = familiarity(refs, query, np.array([0, 1, 2]))
    assert got[0] == pytest.approx(0.8, abs=1e-3)  # 2nd nearest class-0 box: cos = 0.8 (the nearest is 1.0)
    assert got[1] == pytest.approx(0.0, abs=1e-3)  # class 1 has one box: the farthest (only) one counts
    assert got[2] == -1.0  # no training box of class 2: nothing vouches for it
    assert (familiarity(None, query, np.array([0, 1, 2])) == NO_REFERENCES).all()


def test_references_keep_at_most_per_class_boxes_of_each_class():
    from simsearch.localizer.familiarity import choose

    labels = np.array([0] * 50 + [1] * 3)
    refs = choose(np.random.default_rng(0).normal(size=(53, 4)), labels, per_class=10)
    assert sorted(np.bincount(refs.labels).tolist()) == [3, 10]
    assert refs.vectors.dtype == np.float16 and refs.vectors.shape == (13, 4)


def _flat_maps(vectors):
    """Maps whose every cell holds the same vector: any box pools to that vector, normalised."""
    v = np.asarray(vectors, dtype=np.float32)
    return np.repeat(np.repeat(v[:, :, None, None], 7, axis=2), 7, axis=3)


def test_a_confident_box_unlike_its_classes_training_boxes_is_unknown(tmp_path):
    from simsearch.localizer.familiarity import References

    rng = np.random.default_rng(0)
    familiar = rng.normal(size=8).astype(np.float32)
    strange = -familiar  # cosine -1 with every training box
    refs = References(np.repeat(_unit(familiar)[None], 6, axis=0).astype(np.float16), np.array([0, 0, 1, 1, 2, 2]))
    localizer = _localizer({"familiarity_threshold": 0.5})
    localizer.references = refs
    localizer.save(tmp_path)
    again = Localizer.load(tmp_path)
    assert again.spec.familiarity_threshold == 0.5
    assert again.references.vectors.tolist() == refs.vectors.tolist()
    assert again.references.labels.tolist() == refs.labels.tolist()
    maps = _flat_maps([familiar, strange])
    out = again.predict(maps)
    assert out.scores.min() > again.spec.threshold  # the score test alone would name a class for both
    assert out.familiarity == pytest.approx([1.0, -1.0], abs=1e-3)
    assert out.unknown.tolist() == [False, True]
    found = predictions_from_maps(again, maps, [(10, 10)] * 2)
    assert found[0].label != UNKNOWN and found[1].label == UNKNOWN
    assert found[1].score == pytest.approx(float(out.scores[1]))  # the score is kept


def test_calibrate_sets_the_familiarity_threshold_on_the_correct_validation_predictions():
    from simsearch.localizer.train import calibrate

    logits, labels = _overconfident(n=400, seed=3)
    familiar = np.linspace(0, 1, 400)
    cal = calibrate(logits, labels, keep_correct=0.9, familiar=familiar)
    correct = logits.argmax(1) == labels
    assert np.mean(familiar[correct] >= cal["familiarity_threshold"]) >= 0.9
    assert np.mean(familiar[correct] >= cal["familiarity_threshold"]) < 0.93  # the highest such threshold
    assert cal["threshold"] <= cal["score_only_threshold"]  # the score test steps back when familiarity is on
    assert cal["correct_kept"] >= 0.88
    # Without familiarity the score threshold does the whole job, as before.
    plain = calibrate(logits, labels, keep_correct=0.9)
    assert plain["familiarity_threshold"] == -1.0 and plain["threshold"] == plain["score_only_threshold"]
