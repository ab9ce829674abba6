"""Ranking metrics: average precision, precision@k, recall@k, and what a random ranking scores on them.

Pure functions over relevance flags in ranked order (one row per query), so they
can be checked on rankings computed by hand and shared by every evaluation.
"""
from __future__ import annotations

import numpy as np


def average_precision(relevant: np.ndarray, n_relevant: np.ndarray | int | None = None) -> np.ndarray:
    """AP of each ranking: the mean, over its relevant items, of the precision at the rank of each.

    `relevant` is (q, n) or (n,) booleans in ranked order (best first). `n_relevant`
    is how many relevant items each query has in all (default: those in the row); a
    relevant item missing from a truncated ranking then counts as precision 0. A query
    with no relevant item gets NaN: its AP is undefined, not 0.
    """
    rel = np.atleast_2d(np.asarray(relevant, dtype=bool))
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    total = rel.sum(axis=1) if n_relevant is None else np.broadcast_to(np.asarray(n_relevant), (len(rel),))
    summed = np.where(rel, hits / ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(total > 0, summed / np.maximum(total, 1), np.nan)
    return ap


def precision_at(relevant: np.ndarray, k: int) -> np.ndarray:
    """Share of relevant items among each ranking's first k (a ranking shorter than k is divided by k)."""
    rel = np.atleast_2d(np.asarray(relevant, dtype=bool))
    return rel[:, :k].sum(axis=1) / float(k)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of each query's true k nearest (`truth`, ids; -1 = none) that `found`'s first k hold.

    What an approximate index keeps of exact search: "10-recall@10" at k = 10.
    """
    found, truth = np.atleast_2d(found)[:, :k], np.atleast_2d(truth)[:, :k]
    shares = []
    for f, t in zip(found, truth):
        t = t[t >= 0]
        if len(t):
            shares.append(len(np.intersect1d(f[f >= 0], t)) / len(t))
    return float(np.mean(shares)) if shares else float("nan")


def random_average_precision(n_relevant: np.ndarray | int, n_items: np.ndarray | int) -> np.ndarray:
    """Expected AP of a uniformly random ranking of `n_items` holding `n_relevant` relevant ones (exact).

    Each rank k holds a relevant item with probability R/N, and then the k-1 above it
    hold (k-1)(R-1)/(N-1) more on average, so
    E[AP] = (1/N) * (H_N + (R-1)/(N-1) * (N - H_N)), H_N the N-th harmonic number.
    It is close to R/N (the share of relevant items) once N is large, and above it for
    small N: on a 20-image collection the floor is not 1/20. NaN where R = 0.
    """
    r = np.asarray(n_relevant, dtype=np.float64)
    n = np.asarray(n_items, dtype=np.float64)
    table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(n.max(initial=0)) + 1))])
    harmonic = table[np.clip(n, 0, None).astype(np.int64)]
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
        expected = (harmonic + spread * (n - harmonic)) / np.maximum(n, 1)
    return np.where(r > 0, expected, np.nan)
