"""Duplicates: exact and near copies grouped with the copy to keep, queries that say they are indexed, pairs of copies.

Real photos (the offline demo photos) and real weights where the scores matter; a
synthetic IVF index for how the search scales (a file with more copies than the first
neighbour list holds keeps them all).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.retrieval.contents import NEAR_DUPLICATE, Copies
from simsearch.retrieval.duplicates import Copy, DuplicatesConfig, find_duplicates, group_by_keeper, keep_order
from simsearch.records import Record

runner = CliRunner()
OLD = 1_500_000_000  # a modification time (s) well before the copies were made


# ------------------------------------------------------------ pure rules


def _copy(i: int, w: int, h: int, mtime: int, size: int = 100) -> Copy:
    return Copy(Record(i, f"/p/{i}.jpg", f"{i:064x}", w, h), size, mtime, "near", 1.0)


def test_the_copy_kept_is_the_largest_resolution_then_the_oldest_then_the_largest_file():
    copies = [_copy(1, 100, 100, 5), _copy(2, 200, 100, 9), _copy(3, 200, 100, 7), _copy(4, 200, 100, 7, size=900)]
    assert [c.record.id for c in keep_order(copies)] == [4, 3, 2, 1]


def test_groups_form_around_the_copy_kept_and_never_chain_look_alikes():
    # 1 ~ 2 ~ 3 but 1 and 3 are apart: 3 must not ride into 1's group through 2.
    edges = {1: {2: 0.95}, 2: {1: 0.95, 3: 0.93}, 3: {2: 0.93}, 4: {5: 0.91}, 5: {4: 0.91}}
    assert group_by_keeper([1, 2, 3, 4, 5], edges) == [[1, 2], [4, 5]]
    # Order decides the leader: with 2 first it takes both of its neighbours.
    assert group_by_keeper([2, 1, 3], edges) == [[2, 1, 3]]
    # Identical bytes group whatever their edges, closest first.
    assert group_by_keeper([7, 1, 2, 8], edges, {7: [7, 8], 8: [7, 8]}) == [[7, 8], [1, 2]]


def test_copies_say_what_the_index_holds():
    assert not Copies()
    assert Copies([12]).text() == "already indexed as id 12"
    assert Copies([12, 15], [(40, 0.9712)]).text() == "already indexed as ids 12, 15; near-duplicate of id 40 (0.97)"
    assert Copies([15], by_id=True).text() == "same file as id 15"
    assert Copies([], [(3, 0.93)]).to_json() == {"exact": [], "near": [{"id": 3, "score": 0.93}],
                                                 "threshold": NEAR_DUPLICATE}


# ------------------------------------------------------------ real photos, real weights


@pytest.fixture(scope="module")
def dup_data(tmp_path_factory, demo_data: Path) -> Path:
    """Six demo photos' files: coffee twice (the copy younger), chelsea mirrored at half size, three others."""
    images = demo_data / "images"
    if not (images / "coffee.png").exists() or not (images / "chelsea.png").exists():
        pytest.skip("scikit-image's sample photos are not installed")
    data = tmp_path_factory.mktemp("dups") / "photos"
    data.mkdir()
    for name in ("coffee.png", "chelsea.png", "rocket.jpg", "camera.png"):
        if (images / name).exists():
            shutil.copy(images / name, data / name)
    shutil.copy(images / "coffee.png", data / "coffee-copy.png")
    with Image.open(images / "chelsea.png") as im:
        small = ImageOps.mirror(im.convert("RGB")).resize((im.width // 2, im.height // 2))
    small.save(data / "chelsea-mirrored-small.jpg", quality=90)
    os.utime(data / "coffee.png", (OLD, OLD))  # the original is the older of the two identical files
    return data


@pytest.fixture(scope="module")
def dup_index(tmp_path_factory, dup_data: Path) -> Path:
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    index_dir = tmp_path_factory.mktemp("dupidx") / "idx"
    build_index(BuildConfig(dup_data, index_dir, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)))
    return index_dir


def _by_name(group) -> dict[str, object]:
    return {Path(c.record.path).name: c for c in group.copies}


def test_exact_and_near_copies_are_grouped_with_the_copy_to_keep_first(dup_index: Path):
    report = find_duplicates(dup_index)
    assert len(report.groups) == 2, [[c.record.path for c in g.copies] for g in report.groups]
    groups = {g.kind: _by_name(g) for g in report.groups}
    exact, near = groups["exact"], groups["near"]
    assert set(exact) == {"coffee.png", "coffee-copy.png"}
    assert exact["coffee.png"].role == "keep" and exact["coffee-copy.png"].role == "exact"  # same size: the older
    assert set(near) == {"chelsea.png", "chelsea-mirrored-small.jpg"}
    assert near["chelsea.png"].role == "keep"  # the larger resolution, although the other file is younger
    assert NEAR_DUPLICATE <= near["chelsea-mirrored-small.jpg"].score < 1.0
    for g in report.groups:
        assert g.copies[0].role == "keep" and g.reclaimable == sum(c.bytes for c in g.copies[1:])
    assert report.redundant == 2
    # Exact only: no vector search, the identical files alone.
    only = find_duplicates(dup_index, DuplicatesConfig(exact_only=True))
    assert [set(_by_name(g)) for g in only.groups] == [{"coffee.png", "coffee-copy.png"}]
    assert only.threshold is None and only.searched_depth == 0
    # A threshold above every near score leaves only the identical files.
    strict = find_duplicates(dup_index, DuplicatesConfig(threshold=0.999))
    assert [g.kind for g in strict.groups] == ["exact"]


def test_duplicates_cli_prints_json_lines_table_csv_and_writes_a_self_contained_report(dup_index: Path,
                                                                                       tmp_path: Path):
    page = tmp_path / "out" / "dups.html"
    run = runner.invoke(app, ["duplicates", "--index", str(dup_index), "--html", str(page), "-q"])
    assert run.exit_code == 0, run.output
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert sorted(g["kind"] for g in lines) == ["exact", "near"]
    for g in lines:
        assert g["copies"][0]["role"] == "keep" and g["keep"] == g["copies"][0]["id"]
        assert {"path", "width", "height", "bytes", "modified", "score", "sha256"} <= set(g["copies"][0])
    assert "2 duplicate groups (1 exact, 1 near) among 6 records: 2 files could go" in run.stderr
    text = page.read_text()
    assert text.count('class="group"') == 2 and text.count("data:image/jpeg;base64,") == 4
    assert "src=\"http" not in text and "src=\"/" not in text  # nothing fetched: it can be mailed
    assert text.count('class="copy" data-role="keep"') == 2 and "chelsea-mirrored-small.jpg" in text and "&times;" in text
    # The thumbnails are the whole photos: the same as the index's whole-image thumbnail, not a box crop.
    from simsearch.retrieval.searcher import Searcher
    from simsearch.views.page import data_uri
    from simsearch.views.render import Renderer

    with Searcher(dup_index) as searcher:
        keep = searcher.record(lines[0]["keep"])
    assert data_uri(Renderer(dup_index).thumb(keep)) in text

    as_csv = runner.invoke(app, ["duplicates", "--index", str(dup_index), "--format", "csv", "-q"])
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert len(rows) == 4 and [r["role"] for r in rows].count("keep") == 2
    assert {r["group"] for r in rows} == {"1", "2"} and all(int(r["width"]) > 0 for r in rows)
    table = runner.invoke(app, ["duplicates", "--index", str(dup_index), "--format", "table", "-q"])
    assert table.stdout.splitlines()[0].split()[:4] == ["group", "kind", "role", "id"]
    assert len(table.stdout.splitlines()) == 5


def test_duplicates_mistakes_are_one_line(tmp_path: Path, dup_index: Path):
    missing = runner.invoke(app, ["duplicates", "--index", str(tmp_path / "none")])
    assert missing.exit_code == 1 and missing.output.strip().startswith("error:")
    zero = runner.invoke(app, ["duplicates", "--index", str(dup_index), "--threshold", "0"])
    assert zero.exit_code == 1 and "give a cosine score in (0, 1]" in zero.output
    assert "Traceback" not in zero.output and len(zero.output.strip().splitlines()) == 1


def test_a_query_already_indexed_says_so_instead_of_dropping_it(dup_index: Path, dup_data: Path, tmp_path: Path):
    from simsearch.retrieval.searcher import Searcher

    with Searcher(dup_index, device="cpu") as searcher:
        ids = {Path(r.path).name: r.id for r in searcher.store.records(searcher.store.ids()).values()}
        coffees = sorted([ids["coffee.png"], ids["coffee-copy.png"]])
        result = searcher.search(str(dup_data / "coffee.png"), k=3)
        assert result.contents.copies.exact == coffees
        assert not {n.id for n in result.neighbours} & set(coffees)  # still no answer to itself
        by_id = searcher.search(ids["coffee.png"], k=3)
        assert by_id.contents.copies.exact == [ids["coffee-copy.png"]] and by_id.contents.copies.by_id
        # A file the index never saw, edited from an indexed photo: named as a near-duplicate, with its score.
        with Image.open(dup_data / "chelsea.png") as im:
            ImageOps.mirror(im.convert("RGB")).save(tmp_path / "cat.jpg", quality=85)
        outside = searcher.search(str(tmp_path / "cat.jpg"), k=3)
        copies = outside.contents.copies
        assert copies.exact == [] and copies.near[0][0] == ids["chelsea.png"] and copies.near[0][1] >= NEAR_DUPLICATE
        assert ids["chelsea-mirrored-small.jpg"] in [i for i, _ in copies.near]
        assert all(s >= NEAR_DUPLICATE for _, s in copies.near)
        unrelated = searcher.search(str(dup_data / "rocket.jpg"), k=3).contents.copies
        assert unrelated.exact == [ids["rocket.jpg"]] and unrelated.near == []

    table = runner.invoke(app, ["query", str(dup_data / "coffee.png"), "--index", str(dup_index), "-k", "2",
                                "--format", "table", "--html", str(tmp_path / "q.html")])
    assert table.exit_code == 0, table.output
    first = table.stdout.splitlines()[0]
    assert first.startswith("query:") and f"already indexed as ids {coffees[0]}, {coffees[1]}" in first
    assert 'id="query-copies"' in (tmp_path / "q.html").read_text()
    lines = runner.invoke(app, ["query", str(tmp_path / "cat.jpg"), "--index", str(dup_index), "-k", "2"]).stdout
    query = json.loads(lines.splitlines()[0])["query"]
    assert query["duplicates"]["exact"] == [] and query["duplicates"]["near"][0]["id"] == ids["chelsea.png"]


def test_pairs_keep_identical_files_and_draw_whole_photos(dup_index: Path, demo_index: Path, tmp_path: Path):
    from simsearch.retrieval.searcher import Searcher
    from simsearch.views.pairs import Pair, most_similar_pairs, pairs_figure
    from simsearch.views.render import Renderer

    pairs = most_similar_pairs(dup_index, n=3)
    first = {Path(pairs[0].a.path).name, Path(pairs[0].b.path).name}
    assert first == {"coffee.png", "coffee-copy.png"} and pairs[0].identical and pairs[0].to_json()["identical"]
    assert not pairs[1].identical
    # The figure shows the whole photo: the rocket's tile is its thumbnail, not its thin box.
    with Searcher(demo_index) as searcher:
        records = {Path(r.path).name: r for r in searcher.store.records(searcher.store.ids()).values()}
    if "rocket.jpg" not in records:
        pytest.skip("scikit-image's sample photos are not installed")
    rocket, coffee = records["rocket.jpg"], records["coffee.png"]
    png = pairs_figure(demo_index, [Pair(1, 0.5, rocket, coffee)], tmp_path / "pairs.png", cell=220)
    renderer = Renderer(demo_index, size=220)
    with Image.open(io.BytesIO(renderer.thumb(rocket))) as whole, Image.open(io.BytesIO(renderer.crop(rocket))) as box:
        assert whole.size != box.size
        pad = 10
        x, y = pad + (220 - whole.width) // 2, pad + (220 - whole.height) // 2
        with Image.open(png) as sheet:
            tile = np.asarray(sheet.convert("RGB").crop((x, y, x + whole.width, y + whole.height)), dtype=np.float32)
        assert np.abs(tile - np.asarray(whole.convert("RGB"), dtype=np.float32)).mean() < 2.0


# ------------------------------------------------------------ how it scales


def test_a_file_with_more_copies_than_the_first_neighbour_list_keeps_them_all(tmp_path: Path, monkeypatch):
    """IVF-PQ with re-ranking (a large collection's index): the search goes deeper only where it must."""
    pytest.importorskip("faiss")
    from simsearch.spec import EmbedderSpec
    from simsearch.storage import faiss_index, layout
    from simsearch.storage.store import Store
    from vectors import add_synthetic, clustered_vectors

    monkeypatch.setattr(faiss_index, "EXACT_MAX", 100)  # 2,000 vectors count as large: IVF-PQ fast-scan
    dim = 32
    spec = EmbedderSpec("synthetic", "none", "0" * 64, dim, (1, 1, 1))
    rng = np.random.default_rng(0)
    xb = clustered_vectors(2000, dim, seed=3)
    # Record 0 has 40 near copies (more than k=16), records 100 and 101 are one pair.
    planted = xb[0] + 0.04 * rng.standard_normal((40, dim)).astype(np.float32)
    xb[1:41] = planted / np.linalg.norm(planted, axis=1, keepdims=True)
    xb[101] = xb[100] + 0.04 * rng.standard_normal(dim).astype(np.float32)
    xb[101] /= np.linalg.norm(xb[101])
    with Store(tmp_path / "idx", create=True) as store:
        add_synthetic(store, xb, 0, spec)
        assert "IVF" in layout.sync_faiss(store, spec).spec.index_type
        ids, stored = store.vectors()
    reads = []
    real_vectors = Store.vectors
    monkeypatch.setattr(Store, "vectors", lambda self, wanted=None, kind="images":
                        reads.append(wanted) or real_vectors(self, wanted, kind))
    report = find_duplicates(tmp_path / "idx", DuplicatesConfig(threshold=0.9, k=16, batch=256))
    assert reads and all(r is not None for r in reads)  # never every vector at once: batches, and re-ranking's
    # Against exact all-pairs scores of the stored vectors:
    gram = stored @ stored.T
    np.fill_diagonal(gram, 0)
    truth_pairs = int((np.triu(gram) >= 0.9).sum())
    assert truth_pairs >= 40 * 41 // 2 * 0.9  # the planted copies are near-duplicates of each other
    groups = sorted((sorted(c.record.id for c in g.copies) for g in report.groups), key=len, reverse=True)
    assert groups[0] == list(ids[:41]) and report.searched_depth >= 64  # 40 copies: searched past k=16 twice
    assert sorted(ids[[100, 101]].tolist()) in groups
    row = {int(i): r for r, i in enumerate(ids)}
    for g in report.groups:  # every member is a near-duplicate of the copy kept, by the exact scores too
        keep = row[g.keep.record.id]
        assert all(c.score >= 0.9 and gram[keep, row[c.record.id]] >= 0.9 - 1e-4 for c in g.copies[1:])
