"""Vectors and maps live in append-only shard files, not SQLite (issue 11, part 1).

Through the real store: what a killed writer leaves is never read, dead rows are
compacted away, an index made before the move is upgraded without re-embedding,
the default footprint stays under 16 KB an image, and float16 keeps top-10 lists.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from simsearch.records import GroundTruthObject, ImageRecord
from simsearch.spec import EmbedderSpec, IndexSpec
from simsearch.storage import layout
from simsearch.storage.store import NewImage, Store
from vectors import clustered_vectors

DIM = 1280  # EfficientNet-Lite0's
SPEC = EmbedderSpec("synthetic", "none", "0" * 64, DIM, (DIM, 7, 7))


def _items(xb: np.ndarray, start: int, boxed: bool = False) -> list[NewImage]:
    objects = [GroundTruthObject("cup", 1, 1, 5, 5)] if boxed else []
    return [NewImage(ImageRecord(Path(f"/synthetic/{start + i:07d}.jpg"), "folder", "synthetic", objects=objects),
                     f"{start + i:064x}", 1, 1, 8, 8, v,
                     np.full((DIM, 7, 7), i % 7, np.float16) if boxed else None)
            for i, v in enumerate(xb)]


def _store(folder: Path) -> Store:
    store = Store(folder, create=True)
    store.save_spec(IndexSpec(SPEC, index_type=None))
    return store


def test_vectors_round_trip_through_shards_as_float16(tmp_path: Path):
    xb = clustered_vectors(300, DIM, seed=0)
    with _store(tmp_path / "idx") as store:
        ids = store.add_images(_items(xb[:200], 0)) + store.add_images(_items(xb[200:], 200))
        got_ids, got = store.vectors()
        assert got_ids.tolist() == ids
        assert np.abs(got - xb).max() < 1e-3  # float16 of unit vectors
        assert store.vectors([ids[5], ids[250]])[1].tolist() == got[[5, 250]].tolist()
        assert not (tmp_path / "idx" / layout.DB).stat().st_size > 200 * 1024  # no vector blobs in SQLite
        assert sorted(os.listdir(tmp_path / "idx" / layout.SHARDS)) == ["vec-000000.f16"]


def test_a_write_killed_before_its_commit_is_never_read_and_is_overwritten(tmp_path: Path, monkeypatch):
    xb = clustered_vectors(60, DIM, seed=1)
    with _store(tmp_path / "idx") as store:
        store.add_images(_items(xb[:20], 0))
        shard = tmp_path / "idx" / layout.SHARDS / "vec-000000.f16"
        committed_size = shard.stat().st_size

        def killed(conn):
            raise KeyboardInterrupt  # the process dies after the rows hit the disk, before the commit

        monkeypatch.setattr(store, "_bump", killed)
        with pytest.raises(KeyboardInterrupt):
            store.add_images(_items(xb[20:40], 20))
        monkeypatch.undo()
        assert shard.stat().st_size > committed_size  # the orphan rows are there ...
        assert store.count("embeddings") == 20  # ... but nothing points at them
        orphan = tmp_path / "idx" / layout.SHARDS / "vec-000007.f16"
        orphan.write_bytes(b"\0" * 100)  # a whole shard a killed writer started
        assert store.clean_shards() == 1 and not orphan.exists()
        ids = store.add_images(_items(xb[40:], 40))  # takes the orphan rows' place
        assert shard.stat().st_size == committed_size * 2
        got_ids, got = store.vectors()
        assert len(got_ids) == 40 and got_ids[-20:].tolist() == ids
        assert np.abs(got[-20:] - xb[40:]).max() < 1e-3


def test_maps_are_kept_only_where_given_and_missing_ones_say_what_to_do(tmp_path: Path):
    from simsearch.errors import NotFoundError

    xb = clustered_vectors(10, DIM, seed=2)
    with _store(tmp_path / "idx") as store:
        boxed = store.add_images(_items(xb[:4], 0, boxed=True))
        plain = store.add_images(_items(xb[4:], 4))
        assert store.ids_with_feature_map(boxed + plain) == set(boxed)
        maps = store.feature_maps(boxed[::-1])
        assert maps.dtype == np.float16 and maps.shape == (4, DIM, 7, 7)
        assert [int(m[0, 0, 0]) for m in maps] == [3, 2, 1, 0]  # in the order asked
        with pytest.raises(NotFoundError, match="--keep-maps"):
            store.feature_maps([plain[0]])


def test_removed_records_rows_are_compacted_away(tmp_path: Path):
    xb = clustered_vectors(400, DIM, seed=3)
    index = tmp_path / "idx"
    with _store(index) as store:
        ids = store.add_images(_items(xb, 0))
        assert store.compact("vec") == 0  # nothing dead yet
        store.remove_images(ids[:300])
        before = store.vectors()
        assert store.compact("vec") == 100
        after = store.vectors()
        assert after[0].tolist() == before[0].tolist() and np.array_equal(after[1], before[1])
        assert store.clean_shards() == 1  # the retired shard goes at the next writer's start
        assert store.shard_files("vec").disk_bytes() == 100 * DIM * 2
        more = store.add_images(_items(clustered_vectors(5, DIM, seed=4), 400))
        assert store.vectors()[0].tolist() == before[0].tolist() + more


def test_default_footprint_is_under_16_kb_an_image(tmp_path: Path):
    """Records without boxes at Lite0's width, FAISS index included (thumbnails are apart)."""
    xb = clustered_vectors(3000, DIM, seed=5)
    index = tmp_path / "idx"
    with _store(index) as store:
        for start in range(0, len(xb), 500):
            store.add_images(_items(xb[start:start + 500], start))
        layout.sync_faiss(store, SPEC)
    total = sum(p.stat().st_size for p in index.rglob("*") if p.is_file())
    assert total / len(xb) <= 16 * 1024, total / len(xb)


def test_an_index_from_before_the_shards_is_read_then_upgraded_without_embedding(demo_index: Path, tmp_path: Path):
    import shutil

    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    index = tmp_path / "old"
    shutil.copytree(demo_index, index)
    with Store(index) as store:
        ids, xb = store.vectors()
    _make_legacy(index, ids, xb)
    with Store(index) as store:
        assert store.legacy
        assert np.array_equal(store.vectors()[1], xb)  # a reader reads the old layout as it is
    data = next(p for p in demo_index.parent.parent.rglob("demo-data"))
    report = build_index(BuildConfig(data, index, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)))
    assert report.added == 0 and report.replaced == 0
    with Store(index) as store:
        assert not store.legacy
        got_ids, got = store.vectors()
        assert got_ids.tolist() == ids.tolist() and np.abs(got - xb).max() < 1e-3
    assert (index / layout.SHARDS / "vec-000000.f16").exists()


def _make_legacy(index: Path, ids: np.ndarray, xb: np.ndarray) -> None:
    """Turn an index back into the layout that kept vectors and maps as SQLite blobs."""
    with sqlite3.connect(index / layout.DB) as conn:
        conn.execute("DROP TABLE embeddings")
        conn.execute("DROP TABLE feature_maps")
        conn.execute("DROP TABLE shards")
        conn.execute("CREATE TABLE embeddings (image_id INTEGER PRIMARY KEY, vector BLOB NOT NULL)")
        conn.execute("CREATE TABLE feature_maps (image_id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        conn.executemany("INSERT INTO embeddings VALUES (?, ?)",
                         [(int(i), v.astype(np.float32).tobytes()) for i, v in zip(ids, xb)])
        conn.executemany("INSERT INTO feature_maps VALUES (?, ?)",
                         [(int(i), np.zeros((1280, 7, 7), np.float16).tobytes()) for i in ids])
    import shutil

    shutil.rmtree(index / layout.SHARDS)


def test_float16_keeps_the_top_10_of_real_photos(lite0, photos_dir: Path, voc2007_dir: Path):
    """Real Lite0 vectors of the shared photos and VOC images, with flipped and cropped copies as near twins."""
    from PIL import ImageOps

    from simsearch.pipeline.read import open_image

    images = []
    for path in sorted(photos_dir.iterdir()) + sorted((voc2007_dir / "JPEGImages").iterdir()):
        im = open_image(path)
        w, h = im.size
        images += [im, ImageOps.mirror(im), im.crop((w // 10, h // 10, w - w // 10, h - h // 10))]
    xb = np.concatenate([lite0.embed_images(images[i:i + 16]).vectors for i in range(0, len(images), 16)])
    half = xb.astype(np.float16).astype(np.float32)
    top32 = np.argsort(-(xb @ xb.T), axis=1)[:, :10]
    top16 = np.argsort(-(half @ half.T), axis=1)[:, :10]
    same_lists = np.mean([a.tolist() == b.tolist() for a, b in zip(top32, top16)])
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top32, top16)])
    print(f"float16 vs float32 top-10 of {len(xb)} real vectors: overlap {overlap:.4f}, identical lists {same_lists:.3f}")
    assert overlap >= 0.99 and same_lists >= 0.9, (overlap, same_lists)
