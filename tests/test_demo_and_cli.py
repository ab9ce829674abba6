"""The offline demo data and the command line as a new user meets them."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.datasets.demo import SAMPLE_BOXES, copy_sample_photos
from simsearch.pipeline.read import scan

runner = CliRunner()


def test_sample_photos_read_back_with_their_boxes(tmp_path: Path):
    pytest.importorskip("skimage", reason="scikit-image ships the demo photos")
    copied = copy_sample_photos(tmp_path / "demo")
    assert len(copied) >= 10
    records = {r.path.name: r for r in scan(tmp_path / "demo").records}
    assert set(records) == {p.name for p in copied}
    bike = records["motorcycle_left.png"]
    assert [o.label for o in bike.objects] == ["motorbike"]
    for name, boxes in SAMPLE_BOXES.items():
        if name not in records:
            continue  # its package is not installed here
        width, height = Image.open(records[name].path).size
        assert len(records[name].objects) == len(boxes)
        for o in records[name].objects:
            assert 0 <= o.xmin < o.xmax <= width and 0 <= o.ymin < o.ymax <= height, (name, o)
    assert not records["brick.png"].objects  # textures carry no boxes


def test_sample_photos_twice_keeps_one_copy_each(tmp_path: Path):
    pytest.importorskip("skimage", reason="scikit-image ships the demo photos")
    first = copy_sample_photos(tmp_path)
    second = copy_sample_photos(tmp_path)
    assert first == second
    assert len(list((tmp_path / "images").iterdir())) == len(first)


def _commands():
    return [c.name or c.callback.__name__ for c in app.registered_commands]


@pytest.mark.parametrize("command", _commands())
def test_every_command_explains_itself(command: str):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    doc = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == command).callback.__doc__
    assert doc and doc.strip(), f"{command} has no help text"


def test_bad_input_is_one_line_and_exit_1(tmp_path: Path):
    missing = runner.invoke(app, ["build-index", str(tmp_path / "nowhere"), "--index", str(tmp_path / "idx")])
    assert missing.exit_code == 1
    assert "Traceback" not in missing.output and "no such folder" in missing.output
    assert not (tmp_path / "idx").exists()  # nothing half-made left behind
    no_index = runner.invoke(app, ["info", "--index", str(tmp_path / "absent")])
    assert no_index.exit_code == 1 and "Traceback" not in no_index.output


@pytest.mark.parametrize("args, says", [
    (["query", "x.png", "--bogus"], "No such option: --bogus"),
    (["frobnicate"], "No such command"),
    (["query", "--id", "abc"], "Invalid value for '--id'"),
    (["build-index"], "Missing argument"),
])
def test_usage_mistakes_are_one_line_and_exit_1(args: list[str], says: str):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "simsearch.cli", *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], run.stderr
    assert "Traceback" not in run.stderr


def test_bare_command_prints_the_overview():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "simsearch.cli"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "build-index" in run.stdout
