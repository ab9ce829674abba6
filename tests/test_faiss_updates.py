"""An incremental build updates index.faiss in place instead of rebuilding it (issue 11, part 2).

Driven through the real store and sync rule with synthetic vectors (no backbone):
the in-place result must answer exactly like a full rebuild.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simsearch.spec import EmbedderSpec
from simsearch.storage import faiss_index, layout
from simsearch.storage.store import Store
from vectors import add_synthetic, clustered_vectors

DIM = 32
SPEC = EmbedderSpec("synthetic", "none", "0" * 64, DIM, (1, 1, 1))


def _add(store: Store, vectors: np.ndarray, start: int) -> list[int]:
    return add_synthetic(store, vectors, start, SPEC)


def _ids(index_dir: Path) -> set[int]:
    return set(faiss_index.ids_of(faiss_index.load(*layout.faiss_paths(index_dir), use_gpu=False)).tolist())


@pytest.mark.parametrize("factory", ["Flat", "HNSW16,Flat", "IVF16,Flat"])
def test_adding_updates_in_place_and_answers_like_a_rebuild(tmp_path: Path, factory: str):
    xb = clustered_vectors(1500, DIM, seed=1)
    with Store(tmp_path / "idx", create=True) as store:
        _add(store, xb[:1000], 0)
        assert layout.sync_faiss(store, SPEC, factory).action == "rebuilt"
        assert layout.sync_faiss(store, SPEC).action == "kept"
        new = _add(store, xb[1000:], 1000)
        synced = layout.sync_faiss(store, SPEC)
        assert (synced.action, synced.added, synced.removed) == ("updated", 500, 0)
        ids, all_xb = store.vectors()
        assert _ids(tmp_path / "idx") == set(ids.tolist()) and set(new) <= set(ids.tolist())
        assert layout.faiss_generation(tmp_path / "idx", verify=True) == store.generation
    updated = faiss_index.load(*layout.faiss_paths(tmp_path / "idx"), use_gpu=False)
    rebuilt = faiss_index.build(all_xb, ids, factory)
    if factory == "Flat":  # exact: the same neighbours, not merely similar ones
        assert np.array_equal(faiss_index.search(updated, all_xb[-50:], 10)[1],
                              faiss_index.search(rebuilt, all_xb[-50:], 10)[1])


def test_removing_updates_in_place_where_the_index_can_remove(tmp_path: Path):
    xb = clustered_vectors(600, DIM, seed=2)
    with Store(tmp_path / "flat", create=True) as store:
        ids = _add(store, xb, 0)
        layout.sync_faiss(store, SPEC, "Flat")
        store.remove_images(ids[:60])
        synced = layout.sync_faiss(store, SPEC)
        assert (synced.action, synced.removed) == ("updated", 60)
        assert _ids(tmp_path / "flat") == set(ids[60:])
    with Store(tmp_path / "hnsw", create=True) as store:  # a graph cannot forget a node: rebuilt
        ids = _add(store, xb, 0)
        layout.sync_faiss(store, SPEC, "HNSW16,Flat")
        store.remove_images(ids[:60])
        assert layout.sync_faiss(store, SPEC).action == "rebuilt"
        assert _ids(tmp_path / "hnsw") == set(ids[60:])


def test_an_ivf_that_outgrew_its_training_is_retrained(tmp_path: Path):
    xb = clustered_vectors(2600, DIM, seed=3)
    with Store(tmp_path / "idx", create=True) as store:
        _add(store, xb[:500], 0)
        layout.sync_faiss(store, SPEC, "IVF16,Flat")
        _add(store, xb[500:1500], 500)  # 3x: still served by the old centroids
        assert layout.sync_faiss(store, SPEC).action == "updated"
        _add(store, xb[1500:], 1500)  # past 4x the 500 it was trained on
        assert layout.sync_faiss(store, SPEC).action == "rebuilt"
        assert store.get_meta("faiss_trained_count") == "2600"


def test_a_damaged_file_is_rebuilt_not_updated(tmp_path: Path):
    xb = clustered_vectors(300, DIM, seed=4)
    with Store(tmp_path / "idx", create=True) as store:
        _add(store, xb[:200], 0)
        layout.sync_faiss(store, SPEC, "Flat")
        path = layout.faiss_paths(tmp_path / "idx")[0]
        path.write_bytes(path.read_bytes()[:-16] + bytes(16))  # same size, other bytes
        _add(store, xb[200:], 200)
        assert layout.sync_faiss(store, SPEC).action == "rebuilt"
        assert len(_ids(tmp_path / "idx")) == 300
