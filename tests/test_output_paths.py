"""Where a command's files cannot go: one line naming the path, exit 1, and no temporary file left behind."""
from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from simsearch.cli import app

runner = CliRunner()


def _fails_in_one_line(args: list[str], said: str) -> None:
    run = runner.invoke(app, args)
    assert run.exit_code == 1, run.output
    assert "Traceback" not in run.output and run.exception is None or isinstance(run.exception, SystemExit)
    lines = [line for line in run.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and said in lines[0], run.output


def test_pages_and_reports_refuse_a_folder_and_a_path_below_a_file(demo_index: Path, demo_data: Path,
                                                                   tmp_path: Path):
    folder = tmp_path / "taken"
    folder.mkdir()
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    image = str(demo_data / "images" / "coffee.png")
    _fails_in_one_line(["query", image, "--index", str(demo_index), "--html", str(folder)], "it is a folder")
    _fails_in_one_line(["duplicates", "--index", str(demo_index), "--html", str(folder), "-q"], "it is a folder")
    _fails_in_one_line(["duplicates", "--index", str(demo_index), "--html", str(a_file / "r.html"), "-q"],
                       "it is a file")
    _fails_in_one_line(["pairs", "--index", str(demo_index), "--out", str(a_file)], "it is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "taken"]  # no temporary file left behind
    assert not any(folder.iterdir())


def test_an_unwritable_place_is_said_in_one_line(demo_index: Path, demo_data: Path):
    _fails_in_one_line(["duplicates", "--index", str(demo_index), "--html", "/proc/report.html", "-q"],
                       "cannot write /proc/report.html")
