"""The reader: VOC (2007 and tolerant variants), box lists, plain folders, odd image formats."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from simsearch.errors import BadInputError, NotFoundError
from simsearch.pipeline.read import open_image, parse_voc_xml, scan


def test_voc2007_objects_and_split(voc2007_dir: Path):
    result = scan(voc2007_dir)
    assert len(result.records) == 13
    assert not result.skipped
    by_name = {r.path.stem: r for r in result.records}
    first = by_name["000001"]
    assert first.source == "voc" and first.dataset == "VOC2007" and first.split == "trainval"
    # The official annotation of VOC2007 000001: a dog and a person.
    assert [(o.label, o.xmin, o.ymin, o.xmax, o.ymax) for o in first.objects] == [
        ("dog", 48.0, 240.0, 195.0, 371.0),
        ("person", 8.0, 12.0, 352.0, 498.0),
    ]
    labels = {o.label for r in result.records for o in r.objects}
    assert {"aeroplane", "car", "chair", "dog", "horse", "person", "train"} <= labels


def test_voc_variant_with_empty_tags_and_float_coordinates(shared_data: Path):
    result = scan(shared_data / "voc-mini" / "VOCdevkit" / "VOC2011")
    assert len(result.records) == 3 and not result.skipped
    person = next(r for r in result.records if r.path.stem == "2011_000003").objects[0]
    assert person.label == "person"
    assert person.ymin == pytest.approx(107.369, abs=1e-3)
    assert person.truncated is False and person.difficult is False


def test_box_list_dataset(shared_data: Path):
    result = scan(shared_data / "indoor-boxes")
    assert len(result.records) == 85
    assert sum(len(r.objects) for r in result.records) == 686
    assert {r.source for r in result.records} == {"boxes"}


def test_mixed_folder_reads_voc_as_voc_and_the_rest_as_photos(shared_data: Path):
    result = scan(shared_data)
    sources = {}
    for r in result.records:
        sources.setdefault(r.source, 0)
        sources[r.source] += 1
    assert sources == {"voc": 16, "boxes": 85, "folder": 13}


def test_broken_xml_is_reported_and_its_image_still_indexed(tmp_path: Path, voc2007_dir: Path):
    year = tmp_path / "VOC2007"
    shutil.copytree(voc2007_dir, year)
    (year / "Annotations" / "000001.xml").write_text("<annotation><object><name>dog</name")
    result = scan(tmp_path)
    assert len(result.records) == 13
    assert [s.path.name for s in result.skipped] == ["000001.xml"]
    assert "broken VOC XML" in result.skipped[0].reason


def test_missing_imagesets_means_unknown_split(tmp_path: Path, voc2007_dir: Path):
    year = tmp_path / "VOC2007"
    shutil.copytree(voc2007_dir, year)
    shutil.rmtree(year / "ImageSets")
    assert {r.split for r in scan(tmp_path).records} == {None}


def test_specific_split_overrides_trainval(tmp_path: Path, voc2007_dir: Path):
    year = tmp_path / "VOC2007"
    shutil.copytree(voc2007_dir, year)
    (year / "ImageSets" / "Main" / "val.txt").write_text("000032\n")
    splits = {r.path.stem: r.split for r in scan(tmp_path).records}
    assert splits["000032"] == "val" and splits["000001"] == "trainval"


def test_empty_and_numeric_flags_parse(tmp_path: Path):
    xml = tmp_path / "a.xml"
    xml.write_text(
        "<annotation><object><name>cat</name><difficult>1</difficult><truncated/>"
        "<bndbox><xmin>1.5</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40.25</ymax></bndbox></object></annotation>"
    )
    (obj,) = parse_voc_xml(xml)
    assert obj.difficult and not obj.truncated and obj.xmin == 1.5 and obj.ymax == 40.25


def _save(image: Image.Image, path: Path, **kw) -> Path:
    image.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "mode,suffix",
    [("L", ".png"), ("CMYK", ".jpg"), ("RGBA", ".png"), ("P", ".gif"), ("RGB", ".webp"), ("RGB", ".bmp"), ("I;16", ".png")],
)
def test_open_image_gives_rgb_for_every_mode(tmp_path: Path, mode: str, suffix: str):
    im = Image.new(mode, (40, 30))
    path = _save(im, tmp_path / f"x{suffix}")
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_transparent_pixels_become_white(tmp_path: Path):
    path = _save(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), tmp_path / "clear.png")
    assert open_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path):
    im = Image.new("RGB", (60, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = _save(im, tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert open_image(path).size == (20, 60)


def test_truncated_jpeg_is_a_bad_input(tmp_path: Path):
    buf = io.BytesIO()
    Image.new("RGB", (200, 200), (120, 30, 60)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadInputError):
        open_image(path)


def test_missing_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(NotFoundError, match="no such folder"):
        scan(tmp_path / "nope")


def test_plain_folder_is_recursive_and_ignores_non_images(tmp_path: Path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    _save(Image.new("RGB", (10, 10)), tmp_path / "a" / "b" / "deep.PNG")
    _save(Image.new("RGB", (10, 10)), tmp_path / "top.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    names = sorted(r.path.name for r in scan(tmp_path).records)
    assert names == ["deep.PNG", "top.jpg"]
