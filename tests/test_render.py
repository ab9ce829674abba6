"""render (boxes, crops, cache, overlays) and the query page built from real photos."""
from __future__ import annotations

import base64
import io
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch.errors import NotFoundError
from simsearch.records import GroundTruthObject, Prediction, Record
from simsearch.views.render import Box, Renderer, crop, match_box, overlay, record_box, record_class


def _record(objects=(), prediction=None, width=100, height=100, **kw) -> Record:
    return Record(kw.get("id", 1), kw.get("path", "x.jpg"), kw.get("sha256", "a" * 64), width, height,
                  objects=list(objects), prediction=prediction)


def test_record_box_prefers_prediction_then_largest_truth_then_whole_image():
    small = GroundTruthObject("cup", 10, 10, 20, 20)
    large = GroundTruthObject("chair", 30, 30, 90, 80)
    pred = Prediction("dog", 0.9, 5, 6, 50, 60)
    assert record_box(_record([small, large], pred)) == Box(5, 6, 50, 60, "dog", "predicted")
    assert record_box(_record([small, large])) == Box(30, 30, 90, 80, "chair", "ground truth")
    assert record_box(_record([], None, 100, 80)) == Box(0, 0, 100, 80, "", "image")
    # boxes reaching outside the image are clipped to it
    assert record_box(_record([GroundTruthObject("x", -5, -5, 150, 50)])).xmax == 100
    assert record_class(_record([small, large])) == "chair"
    assert record_class(_record([small], pred)) == "dog"
    assert record_class(_record()) == ""


def test_crop_takes_the_box_with_a_margin():
    image = Image.new("RGB", (200, 100))
    assert crop(image, Box(50, 20, 150, 80), margin=0.0).size == (100, 60)
    assert crop(image, Box(50, 20, 150, 80), margin=0.1).size == (120, 72)
    assert crop(image, Box(0, 0, 200, 100), margin=0.1).size == (200, 100)  # never beyond the image


def test_overlay_draws_truth_red_and_prediction_blue():
    image = Image.new("RGB", (200, 200), "white")
    out = np.asarray(overlay(image, [GroundTruthObject("a", 10, 10, 100, 100)],
                             Prediction("b", 0.5, 120, 120, 190, 190), width=3))
    assert tuple(out[60, 11]) == (220, 30, 30)  # left edge of the red box, below its label
    assert tuple(out[170, 189]) == (30, 90, 230)  # right edge of the blue box


def test_renderer_caches_by_content(tmp_path: Path):
    picture = tmp_path / "p.png"
    Image.new("RGB", (600, 300), (10, 200, 30)).save(picture)
    record = _record(width=600, height=300, id=7, path=str(picture))
    renderer = Renderer(tmp_path / "index", size=128)
    thumb = renderer.thumb(record)
    assert Image.open(io.BytesIO(thumb)).size == (128, 64)
    cached = list((tmp_path / "index" / "thumbs").iterdir())
    assert len(cached) == 1
    picture.unlink()  # served from the cache now
    assert renderer.thumb(record) == thumb
    # Other file content is not served from the old entry: it must decode the file, which is gone.
    with pytest.raises(NotFoundError, match="record 7 .p.png.: no such image file"):
        renderer.thumb(replace(record, sha256="b" * 64))


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cards, self.links, self.crops = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("class") == "card":
            self.cards.append((int(a["data-rank"]), int(a["data-id"])))
        if tag == "img" and a.get("class") == "crop":
            self.crops.append(a["src"])
        if tag == "a":
            self.links.append(a["href"])


def test_query_page_from_real_photos_holds_the_neighbours_crops(demo_index: Path, demo_data: Path, tmp_path: Path):
    from simsearch.views.page import write_query_page
    from simsearch.retrieval.searcher import Searcher
    with Searcher(demo_index, device="cpu") as searcher:
        result = searcher.search(demo_data / "images" / "motorcycle_left.png", 5)
    page = write_query_page(demo_index, result, tmp_path / "out" / "page.html")
    parsed = _Images()
    parsed.feed(page.read_text())
    assert [c[1] for c in parsed.cards] == [n.id for n in result.neighbours]
    assert [c[0] for c in parsed.cards] == [1, 2, 3, 4, 5]
    assert Path(result.neighbours[0].path).name == "motorcycle_right.png"

    renderer = Renderer(demo_index)
    for n, src in zip(result.neighbours, parsed.crops):
        assert src.startswith("data:image/jpeg;base64,")
        embedded = base64.b64decode(src.split(",", 1)[1])
        named = n.why.match if n.why is not None else None  # the object the reason names, when it names one
        box = match_box(named, n.record) if named is not None else record_box(n.record)
        assert embedded == renderer.crop(n.record, box)  # the neighbour's own crop, not any picture
        if n.record.objects:  # a neighbour with boxes: the crop is its largest box, not the whole image
            assert box.source in ("ground truth", "predicted")
            w, h = Image.open(io.BytesIO(embedded)).size
            assert abs(w / h - (box.xmax - box.xmin) / (box.ymax - box.ymin)) < 0.15
    # links to the full images are relative to the page and reach the files
    for n in result.neighbours:
        assert any((page.parent / unquote(href)).resolve() == Path(n.path).resolve() for href in parsed.links)


def test_query_html_option_writes_the_page(demo_index: Path, tmp_path: Path):
    from simsearch.cli import app

    out = tmp_path / "q.html"
    run = CliRunner().invoke(app, ["query", "--id", "1", "--index", str(demo_index), "-k", "3", "--html", str(out)])
    assert run.exit_code == 0, run.output
    text = out.read_text()
    assert text.count('class="card"') == 3 and text.count('class="crop"') == 3


class _Cards(HTMLParser):
    """Each card's crop (src, matched box id) and why text; the query's part crops."""

    def __init__(self):
        super().__init__()
        self.crops, self.whys, self.parts, self._in_why = [], [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and a.get("class") == "crop":
            self.crops.append((a["src"], a.get("data-box-id")))
        if tag == "img" and a.get("class") == "part":
            self.parts.append(a["src"])
        self._in_why = tag == "div" and a.get("class") == "why"

    def handle_data(self, data):
        if self._in_why:
            self.whys.append(data.strip())
            self._in_why = False


def test_object_query_page_shows_the_matched_boxes_and_why(demo_index: Path, demo_data: Path, tmp_path: Path):
    """A box drawn on the astronaut's helmet: the astronaut comes first, and its card shows the helmet it matched,
    not the person `record_box` would pick; every card says why; the query's box is cropped at the top."""
    from simsearch.retrieval.searcher import Searcher
    from simsearch.views.page import write_query_page

    copy = tmp_path / "astronaut-copy.jpg"  # other bytes: not excluded as the query itself
    Image.open(demo_data / "images" / "astronaut.png").convert("RGB").save(copy, "JPEG", quality=90)
    with Searcher(demo_index, device="cpu") as searcher:
        result = searcher.search_objects(copy, 4, (275, 342, 512, 512))
    first = result.neighbours[0]
    assert Path(first.path).name == "astronaut.png" and first.match.label == "helmet"
    page = write_query_page(demo_index, result, tmp_path / "objects.html")
    parsed = _Cards()
    parsed.feed(page.read_text())
    renderer = Renderer(demo_index)
    assert len(parsed.crops) == len(result.neighbours) == 4
    for n, (src, box_id) in zip(result.neighbours, parsed.crops):
        embedded = base64.b64decode(src.split(",", 1)[1])
        assert int(box_id) == n.match.id and embedded == renderer.crop(n.record, match_box(n.match, n.record))
    helmet = base64.b64decode(parsed.crops[0][0].split(",", 1)[1])
    assert helmet != renderer.crop(first.record, record_box(first.record))  # the person: not what matched
    w, h = Image.open(io.BytesIO(helmet)).size
    assert abs(w / h - 237 / 170) < 0.1
    assert parsed.whys == [f"why: {n.why.text}" for n in result.neighbours] and "its helmet ~ your box" in parsed.whys[0]
    assert len(parsed.parts) == 1  # the drawn box, cropped beside the query
    w, h = Image.open(io.BytesIO(base64.b64decode(parsed.parts[0].split(",", 1)[1]))).size
    assert abs(w / h - 237 / 170) < 0.1
    assert "data:image/jpeg;base64," in page.read_text() and 'src="/' not in page.read_text()  # self-contained


def test_every_card_says_why_and_cli_pages_of_object_queries(demo_index: Path, demo_data: Path, tmp_path: Path):
    from simsearch.cli import app

    runner = CliRunner()
    camera = str(demo_data / "images" / "camera.png")
    whole = tmp_path / "whole.html"
    run = runner.invoke(app, ["query", camera, "--index", str(demo_index), "-k", "3", "--html", str(whole)])
    assert run.exit_code == 0, run.output
    parsed = _Cards()
    parsed.feed(whole.read_text())
    assert len(parsed.whys) == 3 and all(w.startswith("why: ") for w in parsed.whys)
    assert any("its person ~ your person" in w for w in parsed.whys)  # grace_hopper's person is named
    boxed = tmp_path / "boxed.html"
    run = runner.invoke(app, ["query", camera, "--index", str(demo_index), "-k", "3", "--box", "255,138,325,190",
                              "--html", str(boxed)])
    assert run.exit_code == 0, run.output
    parsed = _Cards()
    parsed.feed(boxed.read_text())
    assert len(parsed.crops) == 3 and all(box_id is not None for _, box_id in parsed.crops)
    assert len(parsed.parts) == 1 and all("~ your box" in w for w in parsed.whys)
    own = tmp_path / "own.html"
    run = runner.invoke(app, ["query", camera, "--index", str(demo_index), "-k", "3", "--objects", "--html", str(own)])
    assert run.exit_code == 0, run.output
    parsed = _Cards()
    parsed.feed(own.read_text())
    assert len(parsed.parts) == 2 and len(parsed.crops) == 3  # its person and its camera, each cropped
    assert all(box_id is not None for _, box_id in parsed.crops)
