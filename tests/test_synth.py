"""The composite generator: exact boxes, deterministic by seed, VOC layout the reader understands."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.errors import BadInputError
from simsearch.pipeline.read import parse_voc_xml, scan
from simsearch.datasets.synth import SynthConfig, generate

# Solid colours that survive JPEG: a pasted object is the only blue area on a grey photo.
OBJECT = {"blue": (20, 40, 230), "yellow": (240, 220, 20)}


def _fake_sources(root: Path) -> Path:
    """A box-list dataset with solid-colour objects, plus plain grey backgrounds."""
    data = root / "src"
    (data / "boxes" / "images").mkdir(parents=True)
    (data / "boxes" / "ground-truth").mkdir()
    for i in range(6):
        im = Image.new("RGB", (200, 160), (128, 128, 128))
        label = "blue" if i % 2 == 0 else "yellow"
        im.paste(Image.new("RGB", (80, 60), OBJECT[label]), (40, 50))
        im.save(data / "boxes" / "images" / f"p{i}.png")
        (data / "boxes" / "ground-truth" / f"p{i}.txt").write_text(f"{label} 40 50 120 110\n")
    (data / "plain").mkdir()
    for i in range(2):
        Image.new("RGB", (300, 240), (128 + i, 128, 128)).save(data / "plain" / f"bg{i}.png")
    return data


def test_boxes_are_exact_and_layout_is_voc(tmp_path):
    sources = _fake_sources(tmp_path)
    out = tmp_path / "VOCsynth"
    report = generate(SynthConfig(out, (sources,), n=20, seed=3, val_fraction=0.25), progress=False)
    assert (report.images, report.train, report.val) == (20, 15, 5)
    assert sorted(report.classes) == ["blue", "yellow"]
    result = scan(out)
    assert len(result.records) == 20 and not result.skipped
    assert {r.split for r in result.records} == {"train", "val"}
    for record in result.records:
        (obj,) = record.objects
        pixels = np.asarray(Image.open(record.path).convert("RGB")).astype(int)
        x1, y1, x2, y2 = (int(v) for v in (obj.xmin, obj.ymin, obj.xmax, obj.ymax))
        inside = pixels[y1 + 2:y2 - 2, x1 + 2:x2 - 2].reshape(-1, 3).mean(0)
        assert np.abs(inside - OBJECT[obj.label]).max() < 20, record.path
        outside = pixels.copy()
        outside[max(0, y1 - 2):y2 + 2, max(0, x1 - 2):x2 + 2] = 128
        assert np.abs(outside - 128).max() < 25  # nothing of the object leaks outside its box


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    sources = _fake_sources(tmp_path)
    runs = [generate(SynthConfig(tmp_path / name / "VOCsynth", (sources,), n=6, seed=seed), progress=False)
            for name, seed in (("a", 1), ("b", 1), ("c", 2))]
    read = lambda run: [p.read_bytes() for p in sorted(Path(run.out).rglob("*.*"))]  # noqa: E731
    assert read(runs[0]) == read(runs[1])
    assert read(runs[0]) != read(runs[2])


def test_val_crops_come_from_photos_train_never_uses(tmp_path):
    from simsearch.datasets.synth import find_crops, split_crops

    crops, backgrounds = find_crops((_fake_sources(tmp_path),), min_side=10)
    assert len(crops) == 6 and len(backgrounds) == 2
    for label, parts in split_crops(crops, 0.3, seed=0).items():
        assert parts["val"] and parts["train"], label
        assert not {c.source for c in parts["val"]} & {c.source for c in parts["train"]}


def test_real_crops_on_real_photos(shared_data, tmp_path):
    report = generate(SynthConfig(tmp_path / "VOCsynth", (shared_data,), n=12, seed=0, top_classes=4), progress=False)
    assert len(report.crops) == 4 and report.backgrounds >= 10
    for xml in sorted((tmp_path / "VOCsynth" / "Annotations").glob("*.xml")):
        (obj,) = parse_voc_xml(xml)
        assert obj.label in report.crops and obj.xmax > obj.xmin and obj.ymax > obj.ymin


def test_unknown_class_is_a_clear_error(tmp_path):
    with pytest.raises(BadInputError, match="no crops of class"):
        generate(SynthConfig(tmp_path / "x", (_fake_sources(tmp_path),), n=2, classes=("unicorn",)), progress=False)


def test_cli_writes_composites(tmp_path):
    sources = _fake_sources(tmp_path)
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "out"), "--n", "4", "--sources", str(sources), "-q"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out" / "JPEGImages").glob("*.jpg"))) == 4
