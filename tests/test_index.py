"""FAISS index helpers: choice by size, ids, approximate vs exact, saving with a generation stamp."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simsearch.errors import BadInputError
from simsearch.storage import faiss_index, layout
from vectors import clustered_vectors, recall_at_k


def test_choice_by_size():
    assert faiss_index.choose_factory(1_000, 2048) == "Flat"
    assert faiss_index.choose_factory(faiss_index.EXACT_MAX, 2048) == "Flat"
    assert faiss_index.choose_factory(200_000, 2048) == "IVF512,PQ512x4fs"
    assert faiss_index.choose_factory(5_000_000, 2048) == "IVF2048,PQ512x4fs"


def test_flat_returns_sqlite_ids_and_exact_scores():
    xb = clustered_vectors(500, 64, spread=0.5)
    ids = np.arange(1000, 1500, dtype=np.int64)
    index = faiss_index.build(xb, ids, "Flat")
    D, I = faiss_index.search(index, xb[7], 3)
    assert I[0, 0] == 1007
    assert D[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(D[0], np.sort(xb @ xb[7])[::-1][:3], atol=1e-5)


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW32,Flat"])
def test_approximate_recall_against_exact(factory: str):
    data = clustered_vectors(6100, 64, spread=0.5)
    xb, xq = data[:6000], data[6000:]  # queries from the same distribution, not in the index
    ids = np.arange(len(xb), dtype=np.int64)
    _, exact = faiss_index.search(faiss_index.build(xb, ids, "Flat"), xq, 10)
    _, approx = faiss_index.search(faiss_index.build(xb, ids, factory), xq, 10)
    recall = recall_at_k(approx, exact, 10)
    assert recall >= 0.9, f"{factory} recall@10 {recall:.3f}"


def test_too_few_vectors_to_train_is_a_clear_error():
    with pytest.raises(BadInputError, match="needs at least"):
        faiss_index.build(clustered_vectors(50, 32, spread=0.5), np.arange(50), "IVF256,Flat")


def test_bad_factory_string_is_a_clear_error():
    with pytest.raises(BadInputError, match="cannot make index type"):
        faiss_index.build(clustered_vectors(50, 32, spread=0.5), np.arange(50), "NoSuchIndex")


def test_save_load_round_trip_with_generation(tmp_path: Path):
    xb = clustered_vectors(300, 32, spread=0.5)
    ids = np.arange(10, 310, dtype=np.int64)
    index = faiss_index.build(xb, ids, "Flat")
    assert layout.faiss_generation(tmp_path) is None
    faiss_index.save(index, *layout.faiss_paths(tmp_path), generation=7)
    assert layout.faiss_generation(tmp_path) == 7
    loaded = faiss_index.load(*layout.faiss_paths(tmp_path))
    assert loaded.ntotal == 300
    assert np.array_equal(faiss_index.search(loaded, xb[:5], 4)[1], faiss_index.search(index, xb[:5], 4)[1])


def test_k_larger_than_index_is_capped():
    index = faiss_index.build(clustered_vectors(3, 16, spread=0.5), np.arange(3), "Flat")
    D, I = faiss_index.search(index, clustered_vectors(1, 16, spread=0.5), 10)
    assert I.shape == (1, 3)
