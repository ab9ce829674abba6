"""The dense head (train-localizer --every): it finds several objects an image, stores each with a vector, and is scored by mAP.

The real-data tests train on 40 real indoor photos (~8 boxes each) with real
efficientnet-lite0 maps and skip without ../shared; the unit tests of target
assignment, decoding and the store's detections need nothing outside the package.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from simsearch.cli import app

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _check(index: Path) -> dict:
    sys.path.insert(0, str(BENCH))
    import bench_faults

    return bench_faults.check_index(index, need_predictions=True)


@pytest.fixture(scope="module")
def dense(tmp_path_factory, shared_data):
    """40 indoor photos -> efficientnet-lite0 index -> a dense head trained for a few epochs (once per module)."""
    from simsearch.localizer.train import TrainConfig, train
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    source = shared_data / "indoor-boxes"
    root = tmp_path_factory.mktemp("indoor")
    data = root / "data" / "indoor-boxes"
    (data / "images").mkdir(parents=True)
    (data / "ground-truth").mkdir()
    for image in sorted((source / "images").iterdir())[:40]:
        shutil.copy(image, data / "images" / image.name)
        shutil.copy(source / "ground-truth" / f"{image.stem}.txt", data / "ground-truth" / f"{image.stem}.txt")
    index = root / "index"
    build_index(BuildConfig(root / "data", index, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)))
    report = train(TrainConfig(index, target="every", epochs=30, patience=30, val_fraction=0.25, quiet=True))
    return index, report


def test_dense_head_is_saved_as_the_index_head_and_reloads_as_dense(dense, tmp_path):
    from simsearch.localizer.dense import DenseHead
    from simsearch.localizer.head import Localizer
    from simsearch.localizer.train import load_maps
    from simsearch.storage.store import Store

    index, report = dense
    loaded = Localizer.load(index)
    assert isinstance(loaded.head, DenseHead) and loaded.spec.target == "every" and loaded.spec.dense
    assert len(loaded.spec.anchors) == 3 and loaded.spec.version == report.head_version
    assert report.val_map is not None and 0 <= report.val_map <= 1
    assert 0 < loaded.spec.threshold < 1  # the val-F1 threshold was chosen
    # Its training boxes travel with it, so a detection unlike them is "unknown", and searches know its training data.
    assert len(loaded.references) > report.train_images and loaded.spec.familiarity_threshold > -1
    assert loaded.spec.training["datasets"] == ["indoor-boxes"]
    with Store(index) as store:
        maps = load_maps(store, store.ids()[:4])
    first = loaded.detect_maps(maps)
    again = Localizer.load(index).detect_maps(maps)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.boxes, b.boxes)
    labels, scores, boxes = loaded.predict_maps(maps)  # the best detection of each
    assert [int(d.labels[0]) for d in first] == labels.tolist()
    np.testing.assert_allclose([d.scores[0] for d in first], scores, rtol=1e-6)


def test_localize_stores_several_boxes_an_image_each_with_a_vector_and_a_rerun_replaces_them(dense, tmp_path):
    from simsearch.localizer.head import Localizer
    from simsearch.localizer.predict import localize
    from simsearch.storage.store import Store

    index = tmp_path / "index"
    shutil.copytree(dense[0], index)
    report = localize(index)
    assert report.boxes > report.predicted  # more boxes than images
    check = _check(index)
    assert check["ok"], check["problems"]  # every stored detection has exactly one vector, FAISS exact
    assert check["predicted_boxes"] == report.boxes and check["boxes"] == check["objects"] + report.boxes
    with Store(index) as store:
        ids = store.ids()
        boxes = store.boxes_of_images(ids)
        records = store.records(ids)
        first_ids = {b.id for found in boxes.values() for b in found if b.source == "predicted"}
    several = [i for i in ids if sum(b.source == "predicted" for b in boxes[i]) > 1]
    assert len(several) >= len(ids) // 2, f"only {len(several)} of {len(ids)} images have more than one box"
    for i in ids:  # the predictions row (chips) is the image's best detection
        predicted = [b for b in boxes[i] if b.source == "predicted"]
        assert records[i].prediction.score == max(b.score for b in predicted)
        assert predicted[0].score == records[i].prediction.score  # stored best first
    # Class filters see every detection, not only the best: (image, class) pairs found only by a further detection.
    from simsearch.retrieval.filters import Filters

    further = {(i, b.label) for i in ids for b in boxes[i][1:] if b.source == "predicted"
               if b.label != records[i].prediction.label and b.label not in records[i].classes}
    assert further, "no image has a further detection of a class it has no other box of"
    with Store(index) as store:
        for i, label in sorted(further)[:10]:
            assert i in store.ids_matching(Filters(label=label)).tolist()

    # A second localize with a stricter copy of the head: old detections replaced, none left over.
    strict = tmp_path / "strict"
    strict.mkdir()
    head = Localizer.load(index)
    scores = sorted(b.score for found in boxes.values() for b in found if b.source == "predicted")
    Localizer(head.head, replace(head.spec, threshold=float(np.median(scores)))).save(strict)
    again = localize(index, strict)
    check = _check(index)
    assert check["ok"], check["problems"]
    assert again.predicted == report.predicted and again.boxes < report.boxes
    assert check["predicted_boxes"] == again.boxes
    with Store(index) as store:
        now = {b.id for found in store.boxes_of_images(ids).values() for b in found if b.source == "predicted"}
    assert not now & first_ids  # every old predicted box went, its vector with it


def test_build_with_a_dense_head_stores_every_detection_of_new_images(dense, tmp_path, shared_data):
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig
    from simsearch.storage.store import Store

    index = tmp_path / "index"
    shutil.copytree(dense[0], index)
    photos = tmp_path / "more" / "images"  # indoor photos the index lacks, as plain photos (no boxes)
    photos.mkdir(parents=True)
    for image in sorted((shared_data / "indoor-boxes" / "images").iterdir())[40:46]:
        shutil.copy(image, photos / image.name)
    build_index(BuildConfig(photos, index, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)))
    check = _check(index)
    assert check["ok"], check["problems"]
    with Store(index) as store:
        new = [i for i, r in store.images(store.ids()).items() if "/more/" in r["path"]]
        boxes = store.boxes_of_images(new)
        predictions = store.predictions(new)
    assert len(new) == 6 and set(predictions) == set(new)
    assert all(found and found[0].source == "predicted" for found in boxes.values())
    assert sum(len(found) for found in boxes.values()) > len(new)  # some photo got more than its best box


def test_cli_evaluate_prints_map_for_a_dense_head(dense):
    index, _ = dense
    runner = CliRunner()
    table = runner.invoke(app, ["evaluate", "--index", str(index), "--format", "table"])
    assert table.exit_code == 0, table.output
    assert "mAP@0.5" in table.stdout and " ap" in table.stdout and "ECE" not in table.stdout
    data = json.loads(runner.invoke(app, ["evaluate", "--index", str(index)]).stdout)
    assert 0 <= data["map50"] <= 1 and data["extra"]["target"] == "every"
    assert data["detection"] and all(0 <= row["ap"] <= 1 and row["boxes"] > 0 for row in data["detection"])
    helped = runner.invoke(app, ["train-localizer", "--help"])
    assert "--every" in helped.stdout


def test_cli_train_localizer_every(dense, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(dense[0], index)
    result = CliRunner().invoke(app, ["train-localizer", "--index", str(index), "--every", "--epochs", "2",
                                      "--val-fraction", "0.25", "--quiet", "--score-threshold", "0.3",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["target"] == "every" and data["calibration"]["threshold"] == 0.3
    assert "mAP@0.5" in result.stderr
    # By default stdout is the one summary line, for people.
    result = CliRunner().invoke(app, ["train-localizer", "--index", str(index), "--every", "--epochs", "2",
                                      "--val-fraction", "0.25", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1 and "mAP@0.5" in result.stdout


# ---------------------------------------------------------------- units: no ../shared


def test_assign_centre_cell_neighbours_and_the_smaller_box_keeps_a_shared_slot():
    from simsearch.localizer.dense import assign

    anchors = np.array([[0.1, 0.1], [0.5, 0.5]], dtype=np.float32)
    # A small box centred in cell (row 1, col 1) of a 4x4 grid, towards its top-left corner.
    small = np.array([[0.30, 0.30, 0.40, 0.40]], dtype=np.float32)
    classes, boxes = assign(small, np.array([2]), anchors, (4, 4))
    where = {tuple(x) for x in np.argwhere(classes >= 0)}
    # Only the small anchor fits (0.5 is 5x off); the centre cell and its left and upper neighbours.
    assert where == {(0, 1, 1), (0, 1, 0), (0, 0, 1)}
    np.testing.assert_allclose(boxes[0, 1, 1], small[0])
    assert set(classes[classes >= 0].tolist()) == {2}
    # Without neighbours only the centre cell; a big box on the same cell keeps other slots, the small one its own.
    big = np.array([[0.05, 0.05, 0.60, 0.60]], dtype=np.float32)
    classes, _ = assign(np.concatenate([big, small]), np.array([0, 2]), np.array([[0.3, 0.3]], np.float32), (4, 4),
                        neighbours=False)
    assert classes[0, 1, 1] == 2 and (classes == 0).sum() == 0  # same slot: the smaller box wins it
    classes, _ = assign(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), anchors, (4, 4))
    assert (classes == -1).all()


def test_decode_keeps_one_box_per_object_and_class_and_scores_it():
    from simsearch.localizer.dense import decode

    anchors = torch.tensor([[1.0, 1.0]])
    raw = torch.full((1, 1, 2, 2, 5 + 2), -10.0)  # 2x2 grid, one anchor, two classes: nothing anywhere
    raw[..., :4] = 0.0  # boxes centred on their cells, the anchor's size: cell (0, 0)'s is (0, 0, 0.75, 0.75) clamped
    raw[0, 0, 0, 0, 4] = raw[0, 0, 0, 1, 4] = 10.0  # two neighbouring cells see something
    raw[0, 0, 0, 0, 5] = raw[0, 0, 0, 1, 5] = 5.0  # both of class 0: their boxes overlap (IoU 0.5)
    found = decode(raw, anchors, min_score=0.5, nms_iou=0.3)[0]
    assert found.labels.tolist() == [0] and found.scores[0] > 0.99  # NMS kept one of the two
    assert len(decode(raw, anchors, min_score=0.5, nms_iou=0.6)[0].labels) == 2  # overlap under the limit: both
    raw[0, 0, 0, 1, 5], raw[0, 0, 0, 1, 6] = -5.0, 5.0  # the second is of class 1 now: per-class NMS keeps both
    found = decode(raw, anchors, min_score=0.5, nms_iou=0.3)[0]
    assert sorted(found.labels.tolist()) == [0, 1]
    x1, y1, x2, y2 = found.boxes[found.labels.tolist().index(0)]
    assert (x1, y1, x2, y2) == pytest.approx((0.0, 0.0, 0.75, 0.75))


def test_fit_anchors_finds_the_shapes_of_two_groups():
    from simsearch.localizer.dense import fit_anchors

    rng = np.random.default_rng(0)
    sizes = np.concatenate([rng.normal([0.05, 0.1], 0.005, (50, 2)), rng.normal([0.6, 0.4], 0.02, (50, 2))])
    anchors = fit_anchors(sizes, 2)
    np.testing.assert_allclose(anchors, [[0.05, 0.1], [0.6, 0.4]], atol=0.02)  # smallest first
    assert fit_anchors(sizes[:1], 3).shape == (3, 2)  # fewer boxes than anchors: shapes repeat


def test_store_writes_and_replaces_every_detection_in_one_go(demo_index, tmp_path):
    """Store level: further detections get box rows with vectors; a rewrite replaces all of an image's."""
    from simsearch.records import Prediction
    from simsearch.storage.store import Store

    index = tmp_path / "demo"
    shutil.copytree(demo_index, index)
    with Store(index) as store:
        ids = store.ids()[:2]
        dim = store.spec.embedder.dim
        generation = store.boxes_generation
        vec = lambda k: np.eye(dim, dtype=np.float32)[k]  # noqa: E731
        best = {i: Prediction("cup", 0.9, 1, 1, 20, 20, "v1") for i in ids}
        extras = {ids[0]: [(Prediction("book", 0.5, 2, 2, 30, 30, "v1"), vec(1)),
                           (Prediction("cup", 0.4, 5, 5, 9, 9, "v1"), vec(2))]}
        store.write_predictions(best, {i: vec(0) for i in ids}, extras)
        assert store.boxes_generation > generation
        boxes = store.boxes_of_images(ids)
        predicted = [b for b in boxes[ids[0]] if b.source == "predicted"]
        assert [(b.label, b.score) for b in predicted] == [("cup", 0.9), ("book", 0.5), ("cup", 0.4)]
        assert sum(b.source == "predicted" for b in boxes[ids[1]]) == 1
        vectors_ids, vectors = store.vectors([b.id for b in predicted], kind="boxes")
        assert len(vectors_ids) == 3
        store.write_predictions({ids[0]: Prediction("sofa", 0.7, 1, 1, 9, 9, "v2")}, {ids[0]: vec(3)})
        after = [b for b in store.boxes_of_images(ids)[ids[0]] if b.source == "predicted"]
        assert [(b.label, b.score) for b in after] == [("sofa", 0.7)]
        assert not {b.id for b in after} & {b.id for b in predicted}
        assert store.predictions([ids[0]])[ids[0]].label == "sofa"
