"""maps (t-SNE/UMAP projections and their files) and pairs, on real and synthetic vectors."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("sklearn")
from simsearch.errors import BadInputError  # noqa: E402
from vectors import clustered_labelled  # noqa: E402
from simsearch.views.maps import build_map  # noqa: E402
from simsearch.views.projection import MapConfig, project  # noqa: E402


def page_data(path: Path) -> dict:
    """The JSON map.html carries (between `const D = ` and the end of that line)."""
    import json

    text = path.read_text()
    start = text.index("const D = ") + len("const D = ")
    return json.loads(text[start:text.index(";\n", start)])


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_same_seed_same_coordinates_and_clusters_stay_apart(method: str):
    if method == "umap":
        pytest.importorskip("umap")
    x, labels = clustered_labelled(90, 64, clusters=3, separation=4.0)
    a = project(x, MapConfig(method=method, seed=3)).coords
    b = project(x, MapConfig(method=method, seed=3)).coords
    assert a.shape == (90, 2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, project(x, MapConfig(method=method, seed=4)).coords)
    # each point's nearest point on the map comes from its own cluster
    d = ((a[:, None] - a[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).mean() > 0.95


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_tiny_indexes_adjust_and_too_tiny_is_refused(method: str):
    if method == "umap":
        pytest.importorskip("umap")
    x, _ = clustered_labelled(5, 64, clusters=3, separation=4.0)
    result = project(x, MapConfig(method=method))
    assert result.coords.shape == (5, 2) and np.isfinite(result.coords).all()
    assert result.pca_dims == 5
    assert ("perplexity" if method == "tsne" else "n_neighbors") in result.adjusted
    with pytest.raises(BadInputError, match="at least 3"):
        project(x[:2], MapConfig(method=method))


def test_map_of_a_real_index(demo_index: Path, tmp_path: Path):
    from simsearch.storage.store import Store

    report = build_map(demo_index, tmp_path / "map", MapConfig(method="tsne", seed=0))
    with Store(demo_index) as store:
        ids = store.ids()
        gt_labels = set(store.summary()["labels"])
    with open(tmp_path / "map" / "coords.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["id"]) for r in rows) == ids and report.points == len(ids)
    assert set(rows[0]) == {"id", "path", "x", "y", "class"}
    assert {r["class"] for r in rows if r["class"]} <= gt_labels and any(r["class"] for r in rows)
    import pandas as pd

    parquet = pd.read_parquet(tmp_path / "map" / "coords.parquet")
    np.testing.assert_allclose(parquet["x"].to_numpy(), [float(r["x"]) for r in rows], rtol=1e-6)
    for name in ("scatter.png", "thumbs.png"):
        with Image.open(tmp_path / "map" / name) as im:
            assert im.width > 500 and len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # a real picture, not blank
    data = page_data(tmp_path / "map" / "map.html")
    assert data["ids"] == [int(r["id"]) for r in rows]  # the page's points are the index's records, in the same order
    assert len(data["nn"]) == len(ids) and all(len(nn) == 8 for nn in data["nn"])
    assert len(data["thumbs"]["rows"]) == len(ids) and all(u.startswith("data:image/jpeg") for u in data["thumbs"]["urls"])
    assert {"class", "folder", "tag"} <= set(data["fields"])
    assert "http" not in (tmp_path / "map" / "map.html").read_text().replace(data["serve"], "")  # nothing from a network
    again = build_map(demo_index, tmp_path / "again", MapConfig(method="tsne", seed=0))
    assert (tmp_path / "again" / "coords.csv").read_text() == (tmp_path / "map" / "coords.csv").read_text()
    assert again.points == report.points


def test_pairs_find_the_motorcycles(demo_index: Path, tmp_path: Path):
    from simsearch.cli import app

    run = CliRunner().invoke(app, ["pairs", "--index", str(demo_index), "--n", "4", "--out", str(tmp_path)])
    assert run.exit_code == 0, run.output
    import json

    pairs = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(pairs) == 4
    assert {Path(pairs[0]["a_path"]).name, Path(pairs[0]["b_path"]).name} == {"motorcycle_left.png", "motorcycle_right.png"}
    assert [p["score"] for p in pairs] == sorted((p["score"] for p in pairs), reverse=True)
    assert len({(p["a_id"], p["b_id"]) for p in pairs}) == 4
    with Image.open(tmp_path / "pairs.png") as im:
        assert im.height > 200


def test_pairs_keep_a_file_and_its_copy_marked_identical(tmp_path: Path, photos_dir: Path):
    import shutil

    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig
    from simsearch.views.pairs import most_similar_pairs

    data = tmp_path / "d"
    data.mkdir()
    for name in ("coffee.png", "chelsea.png", "rocket.jpg"):
        shutil.copy(photos_dir / name, data / name)
    shutil.copy(photos_dir / "coffee.png", data / "coffee-copy.png")
    build_index(BuildConfig(data, tmp_path / "idx", EmbedConfig("resnet50", weights="random", device="cpu", quiet=True)))
    pairs = most_similar_pairs(tmp_path / "idx", n=10)
    names = [{Path(p.a.path).name, Path(p.b.path).name} for p in pairs]
    assert names[0] == {"coffee.png", "coffee-copy.png"} and pairs[0].identical  # the closest pair of all
    assert all(-1.0 <= p.score <= 1.0 for p in pairs)  # a cosine, even where float32 rounding overshoots
    assert [p.identical for p in pairs].count(True) == 1
    assert len(pairs) == 6  # 4 files, 6 pairs, the identical one included


def test_map_cli_errors_are_one_line(tmp_path: Path):
    from simsearch.cli import app

    run = CliRunner().invoke(app, ["map", "--index", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")])
    assert run.exit_code == 1
    assert run.output.strip().startswith("error:") and len(run.output.strip().splitlines()) == 1


def test_map_page_caps_inlined_thumbnails_and_spreads_them(demo_index: Path, tmp_path: Path):
    from simsearch.views.map_page import PageConfig
    from simsearch.views.maps import load_points, map_html
    from simsearch.views.render import Renderer

    _, xb, records = load_points(demo_index)
    coords = np.random.default_rng(0).normal(size=(len(records), 2))
    path = map_html(records, xb, coords, Renderer(demo_index), tmp_path / "map.html", PageConfig(max_thumbs=5, serve_url=None))
    data = page_data(path)
    assert len(data["thumbs"]["rows"]) == 5 and data["thumbs"]["cap"] == 5
    assert data["nn"] is None and data["serve"] is None  # past the cap no neighbours are computed; no serve: no links
    assert len(data["ids"]) == len(records) and len(data["x"]) == len(records)


def test_spread_rows_reach_every_part_of_the_map():
    from simsearch.views.map_page import spread_rows

    rng = np.random.default_rng(0)
    clump = 0.01 * rng.normal(size=(5000, 2))  # most points in one clump ...
    rest = rng.uniform(-10, 10, size=(200, 2))  # ... and a few spread out
    rows = spread_rows(np.concatenate([clump, rest]), 100)
    assert len(rows) == len(set(rows)) == 100
    assert sum(r >= 5000 for r in rows) > 50  # a sample would put ~4 of 100 outside the clump
    assert spread_rows(rest, 500) == list(range(200)) and spread_rows(rest, 0) == []


def test_record_fields_name_folders_from_their_common_root():
    from simsearch.records import Record, Tag
    from simsearch.views.map_page import encode_field, record_fields

    records = [Record(1, "/data/a/x.jpg", "", 1, 1, tags=[Tag("espresso", 0.8), Tag("cup", 0.1)], dataset="a"),
               Record(2, "/data/b/c/y.jpg", "", 1, 1), Record(3, "/data/a/z.jpg", "", 1, 1)]
    fields = record_fields(records)
    assert fields["folder"] == ["a", "b/c", "a"]
    assert record_fields(records[:1] + [Record(4, "/data/a/w.jpg", "", 1, 1)])["folder"] == ["a", "a"]  # one folder: its name
    assert record_fields([Record(5, "/data/q.jpg", "", 1, 1), records[0]])["folder"] == ["data", "a"]  # images in the root
    assert fields["tag"] == ["espresso", "", ""] and fields["dataset"] == ["a", "", ""]
    tag = encode_field(fields["tag"], 20)
    assert tag["values"] == ["espresso", "(none)"] and tag["of"] == [0, 1, 1] and tag["counts"] == [1, 2]
    assert tag["colours"][0].startswith("#") and tag["colours"][1] is None  # none is grey


def test_umap_min_dist_above_spread_is_one_line(demo_index: Path, tmp_path: Path):
    from simsearch.cli import app

    run = CliRunner().invoke(app, ["map", "--index", str(demo_index), "--method", "umap", "--min-dist", "2",
                                   "--out", str(tmp_path / "m")])
    assert run.exit_code == 1 and "--min-dist 2.0 must be between 0 and --spread (1.0)" in run.output


def test_umap_default_spreads_a_clump_of_near_duplicates():
    """40 near-identical vectors beside 400 others: the default min_dist keeps them apart on the map (2.6x
    umap-learn's 0.1 here), so a run of near-identical photos is not one dot (README, Clumps)."""
    pytest.importorskip("umap")
    x, _ = clustered_labelled(400, 64, clusters=8, separation=4.0)
    clump = x[0] + 0.01 * np.random.default_rng(1).standard_normal((40, 64)).astype(np.float32)
    x = np.concatenate([x, clump / np.linalg.norm(clump, axis=1, keepdims=True)])

    def clump_spacing(config: MapConfig) -> float:
        c = project(x, config).coords
        u = (c - c.min(0)) / (c.max(0) - c.min(0)).max()
        d = np.sqrt(((u[400:, None] - u[None, 400:]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        return float(np.median(d.min(1)))

    assert MapConfig().min_dist == 0.5
    assert clump_spacing(MapConfig(method="umap")) > 1.8 * clump_spacing(MapConfig(method="umap", min_dist=0.1))


def test_twenty_classes_get_twenty_distinct_colours():
    from simsearch.views.map_page import class_colours

    values = [f"class{i:02d}" for i in range(25) for _ in range(25 - i)]  # 25 classes, the first 20 most frequent
    colours = class_colours(values)
    assert len(colours) == 20 and len(set(colours.values())) == 20
