"""The rough edges a new user hit (issue 15, item 5): each message and output says what to do, in one line.

Runs over a tiny efficientnet-lite0 index of three generated pictures (no ../shared needed).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.records import Prediction, Record, Tag

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """An index of three pictures: ids 1..3."""
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    root = tmp_path_factory.mktemp("edges")
    data = root / "data"
    data.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        im = Image.new("RGB", (160, 120), (240, 240, 240))
        ImageDraw.Draw(im).ellipse((20 + 10 * i, 20, 140, 100), fill=colour)
        im.save(data / f"pic{i}.png")
    build_index(BuildConfig(data, root / "index", EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)))
    return root / "index"


def _cli(*args: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The installed entry point in a fresh interpreter, reporting at exit whether torch was ever imported."""
    script = ("import sys\nsys.argv = ['simsearch', *sys.argv[1:]]\nfrom simsearch.cli import main\n"
              "try:\n    main()\nfinally:\n    print('torch loaded' if 'torch' in sys.modules else 'no torch', "
              "file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *flags, "-c", script, *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


def test_query_by_id_imports_no_backbone_and_verbose_hides_faiss_loader_attempts(tiny):
    ran = _cli("-v", "query", "--id", "1", "--index", str(tiny), "-k", "2")
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.rstrip().endswith("no torch"), ran.stderr
    assert [json.loads(line)["id"] for line in ran.stdout.splitlines()[1:]] and "Traceback" not in ran.stderr
    assert "ModuleNotFoundError" not in ran.stderr and "Could not load library" not in ran.stderr, ran.stderr


def test_query_by_id_reads_no_head_when_nothing_could_be_left_out(tiny, tmp_path):
    """A head file (a torch checkpoint) is read for the datasets it trained on only when the index holds several."""
    import shutil

    from simsearch.storage.layout import HEAD

    copy = tmp_path / "index"
    shutil.copytree(tiny, copy)
    (copy / HEAD).write_bytes(b"a head this test never lets anyone read")
    ran = _cli("query", "--id", "1", "--index", str(copy), "-k", "2")
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.rstrip().endswith("no torch") and "head" not in ran.stderr, ran.stderr


def test_imagenet_names_are_read_without_importing_torchvision():
    code = ("import sys\nfrom simsearch.pipeline.embed import imagenet_labels\nnames = imagenet_labels()\n"
            "assert len(names) == 1000 and names[0] == 'tench' and names[-1] == 'toilet tissue', names[:3]\n"
            "assert 'torchvision' not in sys.modules\n")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert ran.returncode == 0, ran.stderr


def test_faiss_loader_attempts_show_only_at_debug():
    from simsearch.cli.app import FaissLoaderAttempts

    loader = logging.getLogger("faiss.loader")

    def shown(level: int, message: str) -> bool:
        return bool(loader.filter(logging.LogRecord("faiss.loader", level, "loader.py", 1, message, None, None)))

    missing = "Could not load library with AVX2 support due to:\nModuleNotFoundError(\"No module named 'x'\")"
    try:
        assert runner.invoke(app, ["-v", "info", "--help"]).exit_code == 0
        assert not shown(logging.INFO, missing) and not shown(logging.INFO, "Loading faiss with AVX2 support.")
        assert shown(logging.INFO, "Successfully loaded faiss.") and shown(logging.ERROR, "could not load faiss")
        runner.invoke(app, ["-v", "info", "--help"])  # configured twice in one process: still one filter
        assert sum(isinstance(f, FaissLoaderAttempts) for f in loader.filters) == 1
        assert runner.invoke(app, ["-vv", "info", "--help"]).exit_code == 0
        assert shown(logging.INFO, missing)
    finally:
        for f in [f for f in loader.filters if isinstance(f, FaissLoaderAttempts)]:
            loader.removeFilter(f)


def test_query_says_which_of_image_and_id_is_missing_or_doubled(tiny, tmp_path):
    neither = runner.invoke(app, ["query", "--index", str(tiny)])
    assert neither.exit_code == 1 and neither.stderr == "error: give an image file or --id ID\n"
    picture = tmp_path / "p.png"
    Image.new("RGB", (32, 32)).save(picture)
    both = runner.invoke(app, ["query", str(picture), "--id", "1", "--index", str(tiny)])
    assert both.exit_code == 1 and both.stderr == "error: give an image file or --id ID, not both\n"


def test_an_unknown_id_names_the_ids_the_index_has_and_info_shows_them(tiny):
    unknown = runner.invoke(app, ["query", "--id", "99", "--index", str(tiny)])
    assert unknown.exit_code == 1
    assert unknown.stderr == f"error: no record with id 99 in {tiny}: its ids run 1..3 (simsearch info shows the range)\n"
    assert json.loads(runner.invoke(app, ["info", "--index", str(tiny)]).stdout)["ids"] == "1..3"
    table = runner.invoke(app, ["info", "--index", str(tiny), "--format", "table"]).stdout
    assert "\nids            1..3\n" in table


def test_a_query_that_is_no_image_says_which_file_and_why(tiny, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    text = runner.invoke(app, ["query", str(notes), "--index", str(tiny)])
    assert text.exit_code == 1 and text.stderr == (
        f"error: {notes}: cannot decode image (not an image, or a format Pillow cannot read)\n")
    folder = runner.invoke(app, ["query", str(tmp_path), "--index", str(tiny)])
    assert folder.exit_code == 1
    assert folder.stderr == f"error: {tmp_path}: is a folder; give one image file (build-index indexes a folder)\n"


def test_an_upload_that_is_no_image_is_400_naming_the_file(tiny):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from simsearch.views.serve import ServeConfig, create_app

    client = TestClient(create_app(tiny, ServeConfig(device="cpu")))
    r = client.post("/api/search", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 400
    assert r.json()["detail"] == "notes.txt: cannot decode image (not an image, or a format Pillow cannot read)"
    r = client.get("/api/search", params={"id": 99})
    assert r.status_code == 404 and "its ids run 1..3" in r.json()["detail"]


def test_the_table_shows_each_prediction_with_its_score():
    from simsearch.cli.core import table_rows

    record = Record(7, "/p/chair.jpg", "0" * 64, 320, 240, prediction=Prediction("chair", 0.8123, 1, 2, 3, 4),
                    tags=[Tag("folding chair", 0.61)])
    neighbour = SimpleNamespace(record=record, match=None, why=None, weak=False,
                                to_json=lambda: {"rank": 1, "id": 7, "score": 0.9, "path": record.path})
    row, = table_rows(SimpleNamespace(neighbours=[neighbour], cutoff=0.5))
    assert row["predicted"] == "chair 0.81" and row["tags"] == "folding chair 0.61" and row["match"] == "good"


def _report(history: int):
    from simsearch.localizer.train import TrainReport

    return TrainReport(index_dir="idx", head_version="abc123", classes=["cat", "dog"], train_images=80, val_images=20,
                       epochs_run=history, best_epoch=history - 3, best_val_loss=0.41, val_accuracy=0.85,
                       val_corloc=0.7, seconds=12.5,
                       history=[{"epoch": e, "train_ce": 0.5, "val_ce": 0.4, "train_box": 0.3, "val_box": 0.2}
                                for e in range(history)],
                       calibration={"temperature": 1.3, "ece_before": 0.08, "ece_after": 0.03, "threshold": 0.4,
                                    "familiarity_threshold": 0.55})


def test_train_localizer_prints_one_line_and_the_full_report_only_as_json(monkeypatch, tmp_path):
    import simsearch.localizer.train as train_module

    monkeypatch.setattr(train_module, "train", lambda config: _report(40))
    short = runner.invoke(app, ["train-localizer", "--index", str(tmp_path)])
    assert short.exit_code == 0, short.output
    assert short.stdout.count("\n") == 1 and short.stdout.startswith("head abc123: 2 classes, 80 train / 20 val")
    assert f"Next: simsearch localize --index {tmp_path}" in short.stdout and "{" not in short.stdout
    full = runner.invoke(app, ["train-localizer", "--index", str(tmp_path), "--format", "json"])
    assert full.exit_code == 0, full.output
    report = json.loads(full.stdout)
    assert len(report["history"]) == 40 and report["head_version"] == "abc123"
    assert full.stderr.startswith("head abc123: ")  # the people's line moves to stderr
