"""The "no good match" cutoff: the rule on hand-made scores, and what a real build stores and search marks weak."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from simsearch.storage import calibration as cal
from simsearch.storage.calibration import Calibration, cutoff_rule, random_pair_scores

runner = CliRunner()


# ------------------------------------------------------------ the rule, on hand-made distributions


def test_cutoff_is_a_high_quantile_of_random_pairs_when_near_duplicates_score_above_it():
    rng = np.random.default_rng(0)
    unrelated = rng.uniform(0.2, 0.5, 10_000)
    near_dups = rng.uniform(0.85, 1.0, 400)
    cutoff = cutoff_rule(unrelated, near_dups)
    assert cutoff == pytest.approx(np.quantile(unrelated, cal.RANDOM_Q), abs=1e-4)
    assert 0.49 < cutoff < 0.5  # q99 of U(0.2, 0.5) is 0.497: above almost every unrelated pair
    assert (near_dups >= cutoff).all()


def test_cutoff_never_rises_above_the_low_quantile_of_near_duplicates():
    rng = np.random.default_rng(1)
    crowded = rng.uniform(0.6, 0.95, 10_000)  # a collection of near-identical scenes
    near_dups = rng.uniform(0.7, 1.0, 400)
    cutoff = cutoff_rule(crowded, near_dups)
    assert cutoff == pytest.approx(np.quantile(near_dups, cal.NEAR_DUPLICATE_Q), abs=1e-4)
    assert cutoff < np.quantile(crowded, cal.RANDOM_Q)
    assert (near_dups < cutoff).mean() <= cal.NEAR_DUPLICATE_Q + 1e-9


def test_too_few_pairs_give_no_cutoff():
    assert cutoff_rule(np.zeros(0), np.ones(4)) is None
    assert cutoff_rule(random_pair_scores(np.eye(3, 8, dtype=np.float32))) is None  # 3 images, 3 pairs
    assert cutoff_rule(random_pair_scores(np.eye(cal.MIN_IMAGES, 16, dtype=np.float32))) == 0.0


def test_random_pairs_are_every_distinct_pair_of_a_seeded_sample():
    rng = np.random.default_rng(2)
    xb = rng.normal(size=(50, 8)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    every = random_pair_scores(xb)
    assert len(every) == 50 * 49 // 2 and every.max() < 0.9999  # no image paired with itself
    expected = (xb @ xb.T)[np.triu_indices(50, 1)]
    assert np.allclose(np.sort(every), np.sort(expected), atol=1e-6)
    sampled = random_pair_scores(xb, max_sample=10, seed=3)
    assert len(sampled) == 45 and np.array_equal(sampled, random_pair_scores(xb, max_sample=10, seed=3))
    assert len(random_pair_scores(xb[:1])) == 0


def test_calibration_round_trips_and_measures_change():
    c = Calibration(0.5, {"q99": 0.5}, {"q01": 0.8}, sample=100, near_duplicates=48, ntotal=100, max_id=120)
    assert Calibration.from_json(c.to_json()) == c
    assert c.is_weak(0.49) and not c.is_weak(0.5) and not Calibration(None).is_weak(-1.0)
    kept = list(range(21, 121))  # ids 21..120: the same 100 records
    assert cal.changed_fraction(c, kept) == 0
    assert cal.changed_fraction(c, kept + list(range(121, 126))) == pytest.approx(0.05)
    assert cal.changed_fraction(c, kept[20:] + list(range(121, 126))) == pytest.approx(0.25)  # 20 gone, 5 new


def test_near_duplicates_are_scored_against_their_own_original():
    images = [Image.new("RGB", (40, 30), (10 * i, 0, 0)) for i in range(3)]
    originals = np.eye(3, 4, dtype=np.float32)

    def embed(ims):  # each edit lands on its image's own axis, a little off
        return np.array([[0.9 if j == k // len(cal.EDITS) else 0.0 for j in range(4)] for k in range(len(ims))])

    scores = cal.near_duplicate_scores(originals, images, embed)
    assert scores.shape == (3 * len(cal.EDITS),) and np.allclose(scores, 0.9)


# ------------------------------------------------------------ real builds


def _build(data: Path, index: Path):
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    return build_index(BuildConfig(data, index, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)))


def _stored(index: Path) -> Calibration | None:
    from simsearch.storage.store import Store

    with Store(index) as store:
        return cal.load(store)


@pytest.fixture(scope="module")
def indoor_index(tmp_path_factory, shared_data: Path) -> Path:
    """An index of indoor-boxes alone (85 real indoor photos): photos of coffee or rockets are out of its domain."""
    data = tmp_path_factory.mktemp("indoor-data")
    shutil.copytree(shared_data / "indoor-boxes", data / "indoor-boxes")
    index = tmp_path_factory.mktemp("indoor-index") / "indoor"
    _build(data, index)
    return index


def test_a_real_build_stores_its_cutoff(indoor_index: Path):
    c = _stored(indoor_index)
    assert c is not None and c.rule == cal.RULE
    assert c.ntotal == 85 and c.sample == 85 and c.near_duplicates == 4 * cal.MAX_NEAR_DUPLICATE_SAMPLE
    assert c.cutoff == pytest.approx(min(c.random_q["q99"], c.near_duplicate_q["q01"]), abs=2e-3)
    # Unrelated pairs mostly score under it, edited copies above it.
    assert c.random_q["q50"] < c.cutoff <= c.near_duplicate_q["q01"]
    info = runner.invoke(_app(), ["info", "--index", str(indoor_index), "--format", "table"])
    assert info.exit_code == 0 and re.search(rf"^cutoff +{c.cutoff} \(scores below are weak", info.output, re.M)
    shown = json.loads(runner.invoke(_app(), ["info", "--index", str(indoor_index)]).output)
    assert shown["score_cutoff"] == c.cutoff and shown["calibration"]["ntotal"] == 85


def _app():
    from simsearch.cli import app

    return app


def test_out_of_domain_query_is_weak_and_a_near_duplicate_is_not(indoor_index: Path, photos_dir: Path, tmp_path: Path):
    from simsearch.retrieval.searcher import Searcher

    with Searcher(indoor_index, device="cpu") as searcher:
        cutoff = searcher.cutoff
        assert cutoff is not None
        for name in ("coffee.png", "rocket.jpg", "astronaut.png"):
            result = searcher.search(_photo(photos_dir, name), k=5)
            assert result.no_good_match, (name, [n.score for n in result.neighbours], cutoff)
            assert all(n.weak and n.score < cutoff and n.to_json()["weak"] is True for n in result.neighbours)
        original = searcher.record(searcher.store.ids()[7])
        edited = tmp_path / "edited.jpg"
        with Image.open(original.path) as im:
            ImageOps.mirror(im.convert("RGB")).crop((40, 30, 600, 450)).save(edited, quality=40)
        result = searcher.search(edited, k=5)
    top = result.neighbours[0]
    assert top.id == original.id and not top.weak and top.score >= cutoff and not result.no_good_match
    assert [n.weak for n in result.neighbours] == [n.score < cutoff for n in result.neighbours]


def _photo(photos_dir: Path, name: str) -> Path:
    found = [p for p in photos_dir.iterdir() if p.name == name] or [p for p in photos_dir.iterdir() if p.stem == Path(name).stem]
    if not found:
        pytest.skip(f"{name} not among the shared photos")
    return found[0]


def test_cli_table_marks_weak_rows_and_says_when_nothing_matches(indoor_index: Path, photos_dir: Path):
    cutoff = _stored(indoor_index).cutoff
    out = runner.invoke(_app(), ["query", str(_photo(photos_dir, "coffee.png")), "--index", str(indoor_index),
                                 "-k", "3", "--format", "table", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    above, *lines = out.stdout.splitlines()
    assert above.startswith("query: ") and "tags: espresso 0." in above  # what the engine sees, then the table
    # indoor-boxes carries classes, so a learned similarity ranks and says its score beside the plain one
    assert lines[0].split()[:5] == ["rank", "id", "score", "learned", "match"]
    assert len(lines) == 4 and all(line.split()[4] == "weak" for line in lines[1:])
    assert f"no good match in this index (best score " in out.stderr and f"cutoff {cutoff:.2f})" in out.stderr
    query, *rows = [json.loads(line) for line in runner.invoke(
        _app(), ["query", "--id", "3", "--index", str(indoor_index), "-k", "85", "--device", "cpu"]).stdout.splitlines()]
    assert query["query"]["id"] == 3
    assert [r["weak"] for r in rows] == [r["score"] < cutoff for r in rows]
    # an indoor scene's best match is good, its worst is not (the order is the learned one: scores are not sorted)
    assert not max(rows, key=lambda r: r["score"])["weak"] and min(rows, key=lambda r: r["score"])["weak"]


def test_html_page_greys_weak_results(indoor_index: Path, photos_dir: Path, tmp_path: Path):
    from simsearch.retrieval.searcher import Searcher
    from simsearch.views.page import render_query_page

    with Searcher(indoor_index, device="cpu") as searcher:
        text = render_query_page(indoor_index, searcher.search(_photo(photos_dir, "coffee.png"), k=2), tmp_path / "q.html")
        good = render_query_page(indoor_index, searcher.search(searcher.store.ids()[0], k=1), tmp_path / "g.html")
    assert text.count('data-weak="true">') == 2 and text.count("weak match</span>") == 2 and 'id="no-good-match"' in text
    assert 'data-weak="true">' not in good and 'data-weak="false"' in good and 'id="no-good-match"' not in good


def test_recalibrated_when_the_collection_grows_by_more_than_a_tenth(demo_data: Path, tmp_path: Path):
    photos = sorted((demo_data / "images").iterdir())
    assert len(photos) >= 13
    data, index = tmp_path / "data", tmp_path / "index"
    data.mkdir()
    for p in photos[:10]:
        shutil.copy(p, data / p.name)
    _build(data, index)
    first = _stored(index)
    assert first.ntotal == 10 and first.cutoff is not None
    shutil.copy(photos[10], data / photos[10].name)  # +10%: the calibration stands
    _build(data, index)
    assert _stored(index) == first
    for p in photos[11:13]:  # now +30% since it was computed
        shutil.copy(p, data / p.name)
    _build(data, index)
    second = _stored(index)
    assert second.ntotal == 13 and second.generation > first.generation and second.random_q != first.random_q


def test_a_one_image_build_has_no_cutoff_and_marks_nothing_weak(demo_data: Path, tmp_path: Path):
    from simsearch.retrieval.searcher import Searcher

    data = tmp_path / "one"
    data.mkdir()
    photo = sorted((demo_data / "images").iterdir())[0]
    shutil.copy(photo, data / photo.name)
    report = _build(data, tmp_path / "index")
    assert report.ntotal == 1
    c = _stored(tmp_path / "index")
    assert c is not None and c.cutoff is None and c.ntotal == 1 and c.near_duplicates == 0
    with Searcher(tmp_path / "index", device="cpu") as searcher:
        result = searcher.search(searcher.store.ids()[0], k=3)
        assert searcher.cutoff is None and result.neighbours == []
        hits = searcher.search_vector(searcher.store.vectors()[1], k=1)
    assert len(hits) == 1 and not hits[0].weak
    out = runner.invoke(_app(), ["query", str(photo), "--index", str(tmp_path / "index"), "--format", "table",
                                 "--device", "cpu"])
    assert out.exit_code == 0 and "weak" not in out.stdout and "no good match" not in out.stderr
    info = runner.invoke(_app(), ["info", "--index", str(tmp_path / "index"), "--format", "table"])
    assert info.exit_code == 0 and re.search(r"^cutoff +none \(too few images", info.output, re.M)


def test_web_app_json_carries_weak_and_the_cutoff(demo_index: Path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from simsearch.views.serve import ServeConfig, create_app

    client = TestClient(create_app(demo_index, ServeConfig(device="cpu")))
    cutoff = client.get("/api/info").json()["score_cutoff"]
    assert cutoff == _stored(demo_index).cutoff and cutoff is not None
    ids = [r["id"] for r in client.get("/api/records").json()["records"]]
    result = client.get("/api/search", params={"id": ids[0], "k": len(ids)}).json()
    assert result["cutoff"] == cutoff
    assert [r["weak"] for r in result["neighbours"]] == [r["score"] < cutoff for r in result["neighbours"]]
    assert any(r["weak"] for r in result["neighbours"])
    page = client.get("/").text
    assert "weak match" in page and "no good match in this index" in page


def test_the_objects_index_has_its_own_cutoff(indoor_index: Path, tmp_path: Path):
    """Box vectors score on their own scale: the objects index calibrates by the same rule, its near-duplicates
    being the same boxes framed a little differently; a drawn box on a copy of an indexed photo is a good match."""
    from PIL import Image

    from simsearch.retrieval.searcher import Searcher
    from simsearch.storage.store import Store

    with Store(indoor_index) as store:
        c = cal.load_boxes(store)
        boxes = store.boxes_of_images([1])[1]
        path = store.records([1])[1].path
    assert c is not None and c.cutoff is not None and c.ntotal == 686
    assert c.near_duplicates == len(cal.BOX_JITTERS) * cal.BOX_NEAR_DUPLICATE_SAMPLE
    assert c.random_q["q50"] < c.cutoff <= c.near_duplicate_q["q01"]
    shown = json.loads(runner.invoke(_app(), ["info", "--index", str(indoor_index)]).output)
    assert shown["objects_score_cutoff"] == c.cutoff
    copy = tmp_path / "copy.jpg"
    Image.open(path).save(copy, "JPEG", quality=80)
    largest = max(boxes, key=lambda b: (b.xmax - b.xmin) * (b.ymax - b.ymin))
    with Searcher(indoor_index, device="cpu") as searcher:
        result = searcher.search_objects(copy, 10, tuple(largest.box))
        assert result.cutoff == c.cutoff
        assert result.neighbours[0].id == 1 and not result.neighbours[0].weak
        assert all(n.weak == (n.score < c.cutoff) for n in result.neighbours)


def test_pairs_within_a_group_are_not_counted_as_unrelated():
    """Boxes of one image share surroundings: the objects index's random pairs leave such pairs out."""
    e = np.eye(4, dtype=np.float32)
    xb = np.stack([e[0], e[0], e[1], e[2]])  # rows 0 and 1 identical, as two boxes of one image can nearly be
    assert sorted(random_pair_scores(xb)) == [0, 0, 0, 0, 0, 1]
    assert sorted(random_pair_scores(xb, groups=np.array([7, 7, 8, 9]))) == [0, 0, 0, 0, 0]
