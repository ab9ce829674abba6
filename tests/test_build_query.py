"""End to end on real photos and VOC files with real ImageNet weights (efficientnet-lite0)."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from simsearch.storage import faiss_index
from simsearch.storage import layout
from simsearch.pipeline.build import BuildConfig, build_index
from simsearch.pipeline.embed import EmbedConfig
from simsearch.errors import NotFoundError, SpecMismatchError
from simsearch.retrieval.searcher import Searcher, search
from simsearch.storage.store import Store

LITE0 = EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)


def neighbour_names(index_dir: Path, query, k: int) -> list[str]:
    return [Path(n.path).name for n in Searcher(index_dir).search(query, k).neighbours]


def test_motorcycle_views_are_each_others_nearest(demo_index: Path, demo_data: Path):
    photos = demo_data / "images"
    assert neighbour_names(demo_index, photos / "motorcycle_left.png", 1) == ["motorcycle_right.png"]
    assert neighbour_names(demo_index, photos / "motorcycle_right.png", 1) == ["motorcycle_left.png"]


def test_motorcycle_views_are_each_others_nearest_in_shared_photos(real_index: Path, shared_data: Path):
    photos = shared_data / "photos"
    assert neighbour_names(real_index, photos / "motorcycle_left.png", 1) == ["motorcycle_right.png"]


def test_aeroplanes_are_each_others_top_two(real_index: Path, voc2007_dir: Path):
    jpegs = voc2007_dir / "JPEGImages"
    assert "000033.jpg" in neighbour_names(real_index, jpegs / "000032.jpg", 2)
    assert "000032.jpg" in neighbour_names(real_index, jpegs / "000033.jpg", 2)


def test_query_by_id_matches_query_by_file_and_excludes_itself(demo_index: Path):
    with Store(demo_index) as store:
        (row_id, path), = [(i, p) for p, (i, *_rest) in store.known_files().items() if p.endswith("motorcycle_left.png")]
    row = {"id": row_id, "path": path}
    by_id = search(demo_index, row["id"], 3)
    by_file = search(demo_index, row["path"], 3)
    assert row["id"] not in [n.id for n in by_id.neighbours]
    assert [n.id for n in by_id.neighbours] == [n.id for n in by_file.neighbours]
    assert by_id.neighbours[0].score == pytest.approx(by_file.neighbours[0].score, abs=0.02)
    assert [n.rank for n in by_id.neighbours] == [1, 2, 3]


def test_the_result_says_what_is_in_the_query(demo_index: Path, demo_data: Path, tmp_path: Path):
    coffee = demo_data / "images" / "coffee.png"
    outside = tmp_path / "coffee.jpg"  # other bytes: seen by its own pass, not looked up
    Image.open(coffee).convert("RGB").save(outside, quality=92)
    with Searcher(demo_index, device="cpu") as searcher:
        stored = searcher.search(coffee, 2)
        record = stored.record
        assert record is not None and Path(record.path).name == "coffee.png"  # its bytes are indexed: that record
        assert stored.contents.seen == "stored" and stored.contents.tags == record.tags
        assert [o.label for o in stored.contents.objects] == record.classes == ["cup"]
        assert stored.contents.predictions == []  # the demo index has no localizer
        seen = searcher.search(outside, 2)
        assert seen.record is None and seen.contents.seen == "embedded" and not seen.contents.objects
        assert seen.contents.tags[0].label == "espresso" and abs(seen.contents.tags[0].score - record.tags[0].score) < 0.05
        assert seen.query_to_json()["tags"][0]["label"] == "espresso" and seen.query_to_json()["indexed"] is False
    # its bytes are indexed, so the line says so first (issue 15's duplicates)
    assert stored.contents.text() == f"already indexed as id {record.id}  objects: cup  tags: espresso {record.tags[0].score:.2f}"


def test_voc_objects_land_in_sqlite(real_index: Path):
    db = sqlite3.connect(real_index / layout.DB)
    rows = db.execute(
        "SELECT o.label, o.xmin, o.ymin, o.xmax, o.ymax, o.difficult FROM objects o JOIN images i ON i.id = o.image_id "
        "WHERE i.path LIKE '%VOC2007/JPEGImages/000001.jpg' ORDER BY o.id"
    ).fetchall()
    assert rows == [("dog", 48, 240, 195, 371, 0), ("person", 8, 12, 352, 498, 0)]
    (w, h, split, source) = db.execute(
        "SELECT width, height, split, source FROM images WHERE path LIKE '%000001.jpg'").fetchone()
    assert (w, h, split, source) == (353, 500, "trainval", "voc")
    n_images, n_vectors = db.execute("SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM embeddings)").fetchone()
    assert n_images == n_vectors == 29


def test_neighbours_carry_ground_truth(real_index: Path, voc2007_dir: Path):
    result = search(real_index, voc2007_dir / "JPEGImages" / "000032.jpg", 1)
    top = result.neighbours[0]
    assert top.record.classes == ["aeroplane"]
    assert all(o.xmin < o.xmax <= top.record.width and o.ymin < o.ymax <= top.record.height
               for o in top.record.objects)


def test_spec_json_is_written_and_checked(demo_index: Path):
    with Store(demo_index) as store:
        spec = store.spec
    assert spec.embedder.backbone == "efficientnet-lite0" and spec.embedder.dim == 1280
    assert spec.index_type == "Flat"
    on_disk = json.loads((demo_index / layout.SPEC).read_text())
    assert on_disk["embedder"]["backbone"] == "efficientnet-lite0"
    assert on_disk["embedder"]["dim"] == 1280


def _voc_copy(tmp_path: Path, voc2007_dir: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(voc2007_dir, data / "VOC2007")
    return data


def test_bad_files_are_skipped_and_reported(tmp_path: Path, voc2007_dir: Path):
    data = _voc_copy(tmp_path, voc2007_dir)
    good = (data / "VOC2007" / "JPEGImages" / "000001.jpg").read_bytes()
    (data / "VOC2007" / "JPEGImages" / "999999.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (data / "VOC2007" / "Annotations" / "000002.xml").write_text("<annotation><object>")  # malformed XML
    report = build_index(BuildConfig(data, tmp_path / "idx", LITE0))
    skipped = {Path(s["path"]).name: s["reason"] for s in report.skipped}
    assert set(skipped) == {"999999.jpg", "000002.xml"}
    assert report.ntotal == 13  # all 13 good images, 000002 without its boxes
    store = Store(tmp_path / "idx")
    assert {Path(s["path"]).name for s in store.skipped()} == {"999999.jpg", "000002.xml"}
    assert store.count("images") == 13


def test_incremental_rebuild_embeds_only_what_changed(tmp_path: Path, photos_dir: Path):
    data = tmp_path / "photos"
    data.mkdir()
    for name in ("coffee.png", "chelsea.png", "rocket.jpg"):
        shutil.copy(photos_dir / name, data / name)
    index_dir = tmp_path / "idx"
    first = build_index(BuildConfig(data, index_dir, LITE0))
    assert (first.added, first.unchanged) == (3, 0)

    again = build_index(BuildConfig(data, index_dir, LITE0))
    assert (again.added, again.replaced, again.unchanged) == (0, 0, 3)

    shutil.copy(photos_dir / "astronaut.png", data / "astronaut.png")
    Image.open(photos_dir / "coffee.png").rotate(90).save(data / "coffee.png")  # same path, new bytes
    os.utime(data / "rocket.jpg")  # new timestamp, same bytes: no need to embed again
    third = build_index(BuildConfig(data, index_dir, LITE0))
    assert (third.added, third.replaced, third.unchanged) == (1, 1, 2)

    (data / "chelsea.png").unlink()
    kept = build_index(BuildConfig(data, index_dir, LITE0))
    assert kept.ntotal == 4  # without --prune, records of deleted files stay
    pruned = build_index(BuildConfig(data, index_dir, LITE0, prune=True))
    assert pruned.pruned == 1 and pruned.ntotal == 3
    assert faiss_index.load(*layout.faiss_paths(index_dir)).ntotal == 3
    assert sorted(Path(n.path).name for n in Searcher(index_dir).search(data / "rocket.jpg", 10).neighbours) == [
        "astronaut.png", "coffee.png"]


def test_other_backbone_is_refused(tmp_path: Path, photos_dir: Path):
    data = tmp_path / "photos"
    data.mkdir()
    shutil.copy(photos_dir / "coffee.png", data / "coffee.png")
    build_index(BuildConfig(data, tmp_path / "idx", LITE0))
    other = EmbedConfig("resnet50", weights="random", device="cpu", quiet=True)
    with pytest.raises(SpecMismatchError, match="efficientnet-lite0"):
        build_index(BuildConfig(data, tmp_path / "idx", other))


def test_searching_a_missing_index_says_how_to_build_one(tmp_path: Path):
    with pytest.raises(NotFoundError, match="build-index"):
        Searcher(tmp_path / "nothing")


def test_stale_faiss_file_is_rebuilt_from_sqlite(tmp_path: Path, photos_dir: Path):
    data = tmp_path / "photos"
    data.mkdir()
    for name in ("coffee.png", "chelsea.png"):
        shutil.copy(photos_dir / name, data / name)
    index_dir = tmp_path / "idx"
    build_index(BuildConfig(data, index_dir, LITE0))
    with Store(index_dir) as store:
        ids, xb = store.vectors()
    # A FAISS file from an older generation that lacks the second image: it must not be trusted.
    faiss_index.save(faiss_index.build(xb[:1], ids[:1], "Flat"), *layout.faiss_paths(index_dir), generation=-5)
    with Searcher(index_dir) as searcher:
        import faiss

        assert sorted(faiss.vector_to_array(searcher.index.id_map).tolist()) == sorted(ids.tolist())
        assert layout.faiss_generation(index_dir) == searcher.store.generation  # and the rebuilt file was kept


def _jpeg_variants(source: Path, out: Path, n: int) -> None:
    """n distinct real JPEGs (different bytes) from one photo."""
    base = Image.open(source).convert("RGB")
    for i in range(n):
        buf = io.BytesIO()
        base.rotate(i * 7, expand=False).save(buf, "JPEG", quality=60 + i % 35)
        (out / f"img_{i:03d}.jpg").write_bytes(buf.getvalue())


def test_build_killed_midway_then_rerun_has_one_record_per_image(tmp_path: Path, photos_dir: Path):
    data = tmp_path / "many"
    data.mkdir()
    _jpeg_variants(photos_dir / "coffee.png", data, 40)
    index_dir = tmp_path / "idx"
    cmd = [sys.executable, "-m", "simsearch.cli", "build-index", str(data), "--index", str(index_dir),
           "--model", "efficientnet-lite0", "--device", "cpu", "--batch-size", "2", "--workers", "0", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db_path = index_dir / layout.DB
    deadline = time.time() + 120
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        if db_path.exists():
            try:
                committed = sqlite3.connect(db_path, timeout=1).execute("SELECT count(*) FROM images").fetchone()[0]
            except sqlite3.OperationalError:
                committed = 0
            if committed >= 4:
                break
        time.sleep(0.05)
    assert proc.poll() is None, f"build finished before it could be killed: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < committed < 40

    subprocess.run(cmd, check=True, capture_output=True)
    store = Store(index_dir)
    paths = [r[0] for r in store.db.execute("SELECT path FROM images")]
    assert len(paths) == len(set(paths)) == 40
    assert store.count("embeddings") == 40
    assert faiss_index.load(*layout.faiss_paths(index_dir)).ntotal == 40
    assert layout.faiss_generation(index_dir) == store.generation


def test_the_top_level_search_stays_a_function(demo_index: Path):
    """`simsearch.search` is the public one-call API; a subpackage of that name once shadowed it."""
    import simsearch

    first = simsearch.search(demo_index, 1, 2)
    again = simsearch.search(demo_index, 1, 2)  # the second call used to find a module there
    assert [n.id for n in first.neighbours] == [n.id for n in again.neighbours] and len(first.neighbours) == 2


def test_padding_a_shape_group_changes_no_vector(lite0):
    """CUDA runs each shape group padded to a power of two; the padding must not leak into vectors."""
    import torch

    from simsearch.pipeline.embed import Embedder

    torch.manual_seed(0)
    images = [torch.randn(3, 192, 256) for _ in range(3)] + [torch.randn(3, 224, 224) for _ in range(2)]
    ragged = lite0.embed_batch(images)
    padded_embedder = Embedder.__new__(Embedder)
    padded_embedder.__dict__.update(lite0.__dict__)
    padded_embedder._padded_size = lambda n: 8  # what CUDA does, forced here on the CPU
    padded = padded_embedder.embed_batch(images)
    assert padded.vectors.shape == ragged.vectors.shape and padded.maps.shape == ragged.maps.shape
    assert ((padded.vectors * ragged.vectors).sum(axis=1) > 0.9999).all()
    assert abs(padded.maps.astype("float32") - ragged.maps.astype("float32")).max() < 1e-2
