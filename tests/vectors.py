"""Synthetic vectors and recall for the index tests: one generator and one recall@k, shared."""
from __future__ import annotations

import numpy as np


def clustered_labelled(n: int, dim: int, seed: int = 0, clusters: int = 20, spread: float = 1.0,
                       separation: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, cluster of each): L2-normalised float32 around random centres, closer to real embeddings
    than uniform noise; `separation` scales the centres apart relative to the `spread` around each."""
    rng = np.random.default_rng(seed)
    centres = separation * rng.standard_normal((clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    x = centres[labels] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def clustered_vectors(n: int, dim: int, seed: int = 0, clusters: int = 20, spread: float = 1.0) -> np.ndarray:
    """(n, dim) vectors of `clustered_labelled`, without the labels."""
    return clustered_labelled(n, dim, seed, clusters, spread)[0]


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of each row's true top-k ids that the search found in its top k (-1 = no result)."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist()) - {-1}) for f, t in zip(found, truth)]
    return float(np.mean(hits)) / k


def add_synthetic(store, vectors: np.ndarray, start: int, spec) -> list[int]:
    """Records /synthetic/NNNNNN.jpg with these vectors, through the real store (as a build commits them)."""
    from pathlib import Path

    from simsearch.records import ImageRecord
    from simsearch.spec import IndexSpec
    from simsearch.storage.store import NewImage

    if store.spec is None:  # the store shapes its vector shards by the spec, as a build does
        store.save_spec(IndexSpec(spec, index_type=None))
    items = [NewImage(ImageRecord(Path(f"/synthetic/{start + i:06d}.jpg"), "folder", "synthetic"), f"{start + i:064x}",
                      1, 1, 8, 8, v) for i, v in enumerate(vectors)]
    return store.add_images(items)
