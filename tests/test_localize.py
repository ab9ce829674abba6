"""The localizer on real efficientnet-lite0 features of real-pixel composites: it learns, saves, refuses, predicts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.errors import BadInputError, SpecMismatchError
from simsearch.records import GroundTruthObject


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data):
    """300 composites of 4 classes -> efficientnet-lite0 index -> a trained head (once per module)."""
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig
    from simsearch.localizer.train import TrainConfig, train
    from simsearch.datasets.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("composites")
    generate(SynthConfig(root / "data" / "VOCsynth", (shared_data,), n=300, seed=1, top_classes=4,
                         size_range=(224, 288)), progress=False)
    index = root / "index"
    build_index(BuildConfig(root / "data", index, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)))
    report = train(TrainConfig(index, epochs=30, quiet=True))
    return index, report


def test_head_learns_far_above_chance(trained):
    """Measured on held-out composites whose objects come from photos training never saw.

    Measured on this very set (twice, same head version): accuracy 0.80 against a
    majority-class share of 0.33, mean IoU 0.62, CorLoc 0.77; on 360 composites with
    seeds 0 and 1: accuracy 0.76 / 0.76, CorLoc 0.72 / 0.85. Thresholds leave a wide margin.
    """
    from simsearch.localizer.evaluate import evaluate
    from simsearch.localizer.train import examples
    from simsearch.localizer.metrics import box_iou, corloc
    from simsearch.storage.store import Store

    index, report = trained
    assert report.classes and len(report.classes) == 4
    result = evaluate(index, "val")
    assert result.n == report.val_images >= 50
    assert result.accuracy >= 0.55
    assert result.accuracy >= result.extra["chance_accuracy"] + 0.2
    # The box must beat the best constant guess: the training images' mean box.
    store = Store(index)
    try:
        every = examples(store)
        val_images = store.db.execute("SELECT count(*) FROM images WHERE split = 'val'").fetchone()[0]
        rows = store.images(every.ids)
    finally:
        store.close()
    is_val = np.array([rows[i]["split"] == "val" for i in every.ids])
    mean_box = every.boxes[~is_val].mean(0)
    baseline = corloc(box_iou(every.boxes[is_val], np.repeat(mean_box[None], is_val.sum(), 0)))
    assert result.corloc >= 0.5
    assert result.corloc >= baseline + 0.2
    assert result.mean_iou >= 0.45
    assert val_images == result.n  # the composites carry a val split, and evaluate used exactly it
    assert sum(c.n for c in result.per_class) == result.n
    assert int(np.sum(result.confusion)) == result.n


def test_saved_head_reloads_and_predicts_identically(trained, tmp_path):
    from simsearch.localizer.head import HEAD_FILE, Localizer, head_version
    from simsearch.localizer.predict import localize
    from simsearch.localizer.train import load_maps
    from simsearch.storage.store import Store

    index, report = trained
    localize(index)
    store = Store(index)
    try:
        stored = {r["image_id"]: r for r in store.db.query("SELECT * FROM predictions")}
        ids = sorted(stored)[:40]
        maps = load_maps(store, ids)
        rows = store.images(ids)
    finally:
        store.close()
    assert len(stored) == 300 and {r["head_version"] for r in stored.values()} == {report.head_version}
    # A copy of the head file elsewhere loads to the very same weights and answers.
    shutil.copy(index / HEAD_FILE, tmp_path / HEAD_FILE)
    again = Localizer.load(tmp_path)
    assert head_version(again.head) == report.head_version == again.spec.version
    out = again.predict(maps)
    labels, scores, boxes = out.classes, out.scores, out.boxes
    for k, i in enumerate(ids):
        w, h = rows[i]["width"], rows[i]["height"]
        assert again.label_of(labels[k], out.unknown[k]) == stored[i]["label"]
        assert scores[k] == pytest.approx(stored[i]["score"], abs=1e-6)
        assert boxes[k] * [w, h, w, h] == pytest.approx([stored[i][c] for c in ("xmin", "ymin", "xmax", "ymax")], abs=1e-3)


def test_query_results_carry_predictions(trained):
    from simsearch.localizer.predict import localize
    from simsearch.retrieval.searcher import Searcher

    index, _ = trained
    localize(index)
    searcher = Searcher(index, device="cpu")
    try:
        result = searcher.search(1, k=3)
    finally:
        searcher.close()
    for n in result.neighbours:
        assert n.record.prediction.label in {"book", "cabinetry", "chair", "cup", "diningtable", "door", "pillow",
                                         "pottedplant", "unknown"}
        p = n.record.prediction
        x1, y1, x2, y2 = p.xmin, p.ymin, p.xmax, p.ymax
        assert 0 <= x1 < x2 <= n.record.width and 0 <= y1 < y2 <= n.record.height


def test_build_index_predicts_new_images_when_a_head_exists(trained, tmp_path, photos_dir):
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig
    from simsearch.storage.store import Store

    index, report = trained
    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    photos = tmp_path / "photos"
    shutil.copytree(photos_dir, photos)
    build_index(BuildConfig(photos, copy, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)))
    store = Store(copy)
    try:
        new = [r["id"] for r in store.db.query("SELECT id FROM images WHERE dataset = 'photos'")]
        predicted = {r["image_id"]: r for r in store.db.query("SELECT * FROM predictions")}
    finally:
        store.close()
    assert len(new) == 13
    assert all(i in predicted and predicted[i]["head_version"] == report.head_version for i in new)


def _random_resnet_index(tmp_path: Path, photos_dir: Path) -> Path:
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    data = tmp_path / "few"
    data.mkdir()
    for name in ("coffee.png", "chelsea.png"):
        shutil.copy(photos_dir / name, data / name)
    index = tmp_path / "resnet-random"
    build_index(BuildConfig(data, index, EmbedConfig("resnet50", "random", device="cpu", precision="fp32", quiet=True)))
    return index


def test_head_for_another_backbone_is_refused(trained, tmp_path, photos_dir):
    from simsearch.localizer.head import HEAD_FILE
    from simsearch.localizer.predict import localize

    index, _ = trained
    other = _random_resnet_index(tmp_path, photos_dir)
    with pytest.raises(SpecMismatchError, match="efficientnet-lite0 features .* resnet50 features"):
        localize(other, head_dir=index)
    # A head copied into the other index is refused too, by the CLI in one line and exit code 1.
    shutil.copy(index / HEAD_FILE, other / HEAD_FILE)
    result = CliRunner().invoke(app, ["localize", "--index", str(other)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "train-localizer" in result.stderr
    assert "Traceback" not in result.output


def test_other_weights_of_the_same_backbone_are_refused(trained, tmp_path):
    from simsearch.localizer.head import HEAD_FILE, HeadSpec, Localizer
    from simsearch.localizer.predict import localize

    index, _ = trained
    head = Localizer.load(index)
    head.spec = HeadSpec.from_json(head.spec.to_json().replace(head.spec.weights_sha256, "0" * 64))
    head.save(tmp_path)
    assert json.loads(torch.load(tmp_path / HEAD_FILE, weights_only=True)["spec"])["weights_sha256"] == "0" * 64
    with pytest.raises(SpecMismatchError):
        localize(index, head_dir=tmp_path)


def test_damaged_or_mismatched_head_is_one_clear_error(trained, tmp_path):
    """A truncated head file, or weights that do not fit the spec (the old two-file layout after a kill)."""
    from simsearch.errors import IndexDamagedError
    from simsearch.localizer.head import HEAD_FILE, Localizer
    from simsearch.localizer.predict import localize

    index, _ = trained
    data = (index / HEAD_FILE).read_bytes()
    (tmp_path / HEAD_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexDamagedError, match="train-localizer"):
        localize(index, head_dir=tmp_path)
    saved = torch.load(index / HEAD_FILE, weights_only=True)
    saved["state"] = {k: v[..., :1] if v.ndim else v for k, v in saved["state"].items()}  # wrong shapes
    torch.save(saved, tmp_path / HEAD_FILE)
    with pytest.raises(IndexDamagedError, match="inconsistent"):
        Localizer.load(tmp_path)
    torch.save(saved["state"], tmp_path / HEAD_FILE)  # format 1: bare weights, spec in localizer.json
    result = CliRunner().invoke(app, ["localize", "--index", str(index), "--head", str(tmp_path)])
    assert result.exit_code == 1 and "older simsearch" in result.stderr and "Traceback" not in result.output


def test_index_without_boxes_cannot_train(tmp_path, photos_dir):
    from simsearch.localizer.train import TrainConfig, train

    with pytest.raises(BadInputError, match="no image has ground-truth boxes"):
        train(TrainConfig(_random_resnet_index(tmp_path, photos_dir), quiet=True))


def test_plot_boxes_draws_red_and_blue(trained, tmp_path):
    from simsearch.views.plots import ACTUAL, CAPTION_HEIGHT, PREDICTED, plot_boxes

    index, _ = trained
    report = plot_boxes(index, tmp_path, n=6, tile=128, columns=3)
    image = Image.open(report.path).convert("RGB")
    assert image.size == (3 * 128, 2 * (128 + CAPTION_HEIGHT)) == (report.width, report.height)
    pixels = np.asarray(image).reshape(-1, 3)
    tiles = np.asarray(image)[:128]  # the first row of tiles, captions excluded
    for colour in (ACTUAL, PREDICTED):
        assert (tiles.reshape(-1, 3) == colour).all(axis=1).sum() > 100, colour
    assert (pixels == ACTUAL).all(axis=1).any() and (pixels == PREDICTED).all(axis=1).any()


def test_cli_evaluate_table_and_json(trained):
    index, _ = trained
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--index", str(index)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"accuracy", "mean_iou", "corloc", "per_class", "confusion", "classes", "ece", "ece_uncalibrated",
            "unknown_rate", "accuracy_kept"} <= set(data)
    assert 0 <= data["ece"] <= 1 and 0 <= data["unknown_rate"] <= 1
    table = runner.invoke(app, ["evaluate", "--index", str(index), "--format", "table"])
    assert table.exit_code == 0 and "CorLoc" in table.stdout and "confusion" in table.stdout
    assert "ECE" in table.stdout and '"unknown"' in table.stdout
    # A class the index lacks is one line and exit 1, before any training.
    wrong = runner.invoke(app, ["evaluate", "--index", str(index), "--open-set", "--hold-out", "unicorn"])
    assert wrong.exit_code == 1 and "unicorn" in wrong.output


def test_target_is_the_largest_non_difficult_object():
    from simsearch.localizer.train import pick_target

    small = GroundTruthObject("cup", 0, 0, 10, 10)
    big_difficult = GroundTruthObject("table", 0, 0, 100, 100, difficult=True)
    medium = GroundTruthObject("chair", 0, 0, 30, 40)
    assert pick_target([small, big_difficult, medium]).label == "chair"
    assert pick_target([big_difficult]) is None
    with pytest.raises(BadInputError):
        pick_target([small], policy="all")


def test_training_whose_validation_loss_is_never_a_number_is_one_clear_error(demo_index, tmp_path, monkeypatch):
    """Every epoch NaN used to end in a traceback (no best epoch to restore)."""
    import simsearch.localizer.train as train_module

    index = tmp_path / "demo"
    shutil.copytree(demo_index, index)
    monkeypatch.setattr(train_module, "_validate", lambda *a, **k: {
        "val_ce": float("nan"), "val_box": float("nan"), "val_loss": float("nan"), "val_accuracy": 0.0,
        "val_mean_iou": 0.0, "val_corloc": 0.0})
    config = train_module.TrainConfig(index_dir=index, epochs=3, patience=5, val_fraction=0.4, quiet=True)
    with pytest.raises(BadInputError, match="not a number in all 3 epochs"):
        train_module.train(config)
    assert not (index / "localizer.pt").exists()


def test_localize_gives_every_predicted_box_a_vector_and_replaces_them_on_a_rerun(trained):
    """A head trained after the build adds its boxes to the objects index; a second localize replaces them."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_faults
    from simsearch.localizer.predict import localize
    from simsearch.retrieval.searcher import Searcher

    index, _ = trained
    for _ in range(2):
        report = localize(index)
        check = bench_faults.check_index(index, need_predictions=True)
        assert check["ok"], check["problems"]  # one vector per prediction and per ground-truth box, FAISS exact
        assert check["boxes"] == check["objects"] + check["predictions"] == check["objects"] + report.predicted
    with Searcher(index, device="cpu") as searcher:
        found = searcher.search_objects(1, 10)
        assert {p.source for p in found.parts} == {"truth", "predicted"}  # its own objects, both kinds
        assert {n.match.source for n in found.neighbours} <= {"truth", "predicted"}


def test_calibration_is_recorded_and_low_scores_are_stored_as_unknown(trained, tmp_path):
    """The fitted temperature lowers the validation NLL; a head whose threshold no score reaches names no class."""
    from dataclasses import replace

    from simsearch.localizer.head import Localizer
    from simsearch.localizer.predict import localize
    from simsearch.localizer.evaluate import evaluate
    from simsearch.records import UNKNOWN
    from simsearch.storage.store import Store

    index, report = trained
    cal = report.calibration
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9 and cal["temperature"] > 0
    assert 0 < cal["threshold"] < 1 and 0 <= cal["unknown_share"] <= 0.5
    head = Localizer.load(index)
    assert (head.spec.temperature, head.spec.threshold) == (cal["temperature"], cal["threshold"])
    # The training boxes' vectors travel in the head file, for the familiarity test on any index it is applied to.
    assert head.spec.familiarity_threshold == cal["familiarity_threshold"] > -1
    assert len(head.references) >= report.train_images  # every training box of a trained class, not only targets
    assert set(head.references.labels.tolist()) == set(range(len(report.classes)))
    assert cal["correct_kept"] >= 0.9
    result = evaluate(index, "val")
    assert result.ece == pytest.approx(cal["ece_after"], abs=1e-6)
    assert result.ece_uncalibrated == pytest.approx(cal["ece_before"], abs=1e-6)
    assert 0 <= result.accuracy_kept <= result.accuracy

    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    head.spec = replace(head.spec, threshold=1.01)  # no score reaches it
    head.save(copy)
    localize(copy)
    store = Store(copy)
    try:
        labels = {r["label"] for r in store.db.query("SELECT label FROM predictions")}
        assert labels == {UNKNOWN}
        assert store.predicted_labels() == {}  # "unknown" is never offered as a class to filter by
    finally:
        store.close()


@pytest.mark.slow
def test_open_set_held_out_classes_come_out_unknown(trained):
    """Two classes held out of a short run: a rate in [0, 1] for them, and what the threshold costs the others."""
    from simsearch.localizer.evaluate import open_set
    from simsearch.localizer.train import TrainConfig

    index, _ = trained
    report = open_set(TrainConfig(index, epochs=30, quiet=True))
    assert len(report.held_out) == 2 and len(report.classes) == 2
    assert not set(report.held_out) & set(report.classes)
    assert report.held_out_images > 0 and report.known_images > 0
    assert 0 <= report.held_out_unknown_rate <= 1 and 0 <= report.known_unknown_rate <= 1
    assert 0 <= report.known_accuracy_kept <= report.known_accuracy <= 1
    assert report.known_accuracy >= 0.6  # two classes left: well above chance
    assert report.seconds < 120
