"""The benchmark scripts start, and the recall tuning they report on does what it says."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vectors import clustered_vectors, recall_at_k

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", ["bench_embed", "bench_gpu", "bench_compare", "bench_query", "bench_faiss_update",
                                    "bench_scale", "bench_map", "bench_faults", "bench_engines", "bench_objects", "bench_filters",
                                    "bench_open_set", "bench_detector", "bench_cold_query", "bench_duplicates", "bench_map_scale",
                                    "bench_backends", "bench_decode", "bench_descriptors", "run_all"])
def test_script_help(script):
    out = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW16,Flat"])
def test_tune_params_reaches_target_measured_against_exact(factory):
    faiss = pytest.importorskip("faiss")
    from simsearch.storage import faiss_index

    both = clustered_vectors(4100, 64, 0)
    xb, xq = both[:4000], both[4000:]  # held-out queries from the same mixture
    ids = np.arange(100, 4100, dtype=np.int64)
    index = faiss_index.build(xb, ids, factory)
    params, recall = faiss_index.tune_params(index, xb, ids, target=0.95)
    assert recall >= 0.95
    # Check independently on fresh queries: the tuned breadth holds up against exact search.
    _, truth = faiss.knn(xq, xb, 10, faiss.METRIC_INNER_PRODUCT)
    _, found = index.search(xq, 10)
    fresh = recall_at_k(found, ids[truth], 10)
    assert fresh >= 0.9
    # And it is the narrowest breadth on the ladder that reaches it, not simply the widest.
    if params.nprobe:
        assert params.nprobe < 64
    else:
        assert params.efsearch < faiss_index.EFSEARCH_LADDER[-1]


def test_tune_params_exact_index_needs_nothing():
    from simsearch.storage import faiss_index

    xb = clustered_vectors(500, 32, 0)
    index = faiss_index.build(xb, np.arange(500), "Flat")
    params, recall = faiss_index.tune_params(index, xb, np.arange(500))
    assert (params.nprobe, params.efsearch, recall) == (None, None, 1.0)


def test_draft_decode_keeps_full_size(tmp_path):
    from PIL import Image

    from simsearch.pipeline.read import open_image

    path = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1200), (200, 30, 30)).save(path, quality=90)
    im = open_image(path, draft=lambda w, h: (224, 168))
    assert im.size[0] < 1600 and im.size[0] >= 224  # decoded at a reduced scale, still covering the target
    assert im.info["full_size"] == (1600, 1200)
    assert open_image(path).info["full_size"] == (1600, 1200)
