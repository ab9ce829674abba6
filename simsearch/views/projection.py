"""2-D coordinates for embedding vectors: PCA, then t-SNE (openTSNE) or UMAP (umap-learn), seeded.

PCA to `pca` dimensions first denoises and makes the neighbour search inside
t-SNE/UMAP cheap; openTSNE is used over scikit-learn's t-SNE because it was
measured faster here (benchmarks/bench_map.py). The same vectors and config give
the same coordinates.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from simsearch.errors import BadInputError

log = logging.getLogger(__name__)

MIN_POINTS = 3  # below this there is no "shape" to show and t-SNE/UMAP are undefined
METHODS = ("tsne", "umap")


@dataclass(frozen=True)
class MapConfig:
    """How to project; every field is seeded or fixed so maps are reproducible."""

    method: str = "tsne"  # "tsne" or "umap"
    pca: int = 50  # PCA dimensions before projecting (capped by the number of records); 0 = no PCA
    seed: int = 0  # seeds PCA, t-SNE/UMAP initialisation and their optimisers
    perplexity: float = 30.0  # t-SNE; lowered to (n - 1) / 3 for small indexes
    n_neighbors: int = 15  # UMAP; lowered to n - 1 for small indexes
    # UMAP: how tightly points may pack. 0.5, not umap-learn's 0.1: at 0.1 the 85 indoor photos beside 1,000
    # composites packed to a median 0.65 px apart on an 800 px map (15x zoom to tell them apart), at 0.5 2.4 px
    min_dist: float = 0.5
    spread: float = 1.0  # UMAP: the scale of embedded points; min_dist must not exceed it
    tsne_backend: str = "opentsne"  # "opentsne" or "sklearn" (both kept: the benchmark compares them)
    n_jobs: int = 2  # threads for t-SNE (UMAP runs single-threaded when seeded, as umap-learn requires)


@dataclass
class Projection:
    coords: np.ndarray  # (n, 2) float32
    pca_dims: int  # 0 when PCA was skipped
    adjusted: dict = field(default_factory=dict)  # parameters lowered for a small index: name -> value used
    seconds: dict = field(default_factory=dict)  # stage -> seconds


def project(xb: np.ndarray, config: MapConfig = MapConfig()) -> Projection:
    """2-D coordinates for the rows of `xb`, reproducible for a given config."""
    if config.method not in METHODS:
        raise BadInputError(f"unknown method {config.method!r}; use tsne or umap")
    if config.method == "umap" and not 0 <= config.min_dist <= config.spread:
        raise BadInputError(f"--min-dist {config.min_dist} must be between 0 and --spread ({config.spread})")
    n = len(xb)
    if n < MIN_POINTS:
        raise BadInputError(f"a map needs at least {MIN_POINTS} images; this one has {n}. Index more images first.")
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    seconds: dict[str, float] = {}
    adjusted: dict = {}
    pca_dims = 0
    started = time.perf_counter()
    if config.pca and config.pca < xb.shape[1]:
        from sklearn.decomposition import PCA

        pca_dims = min(config.pca, n, xb.shape[1])
        if pca_dims != config.pca:
            adjusted["pca"] = pca_dims
        xb = PCA(pca_dims, random_state=config.seed).fit_transform(xb).astype(np.float32)
        seconds["pca"] = time.perf_counter() - started
    started = time.perf_counter()
    if config.method == "tsne":
        perplexity = min(config.perplexity, max(1.0, (n - 1) / 3))
        if perplexity != config.perplexity:
            adjusted["perplexity"] = perplexity
        coords = _tsne(xb, perplexity, config)
    else:
        n_neighbors = max(2, min(config.n_neighbors, n - 1))
        if n_neighbors != config.n_neighbors:
            adjusted["n_neighbors"] = n_neighbors
        coords = _umap(xb, n_neighbors, config)
    seconds[config.method] = time.perf_counter() - started
    if adjusted:
        log.info("map of %d points: adjusted %s for the small index", n, adjusted)
    return Projection(np.asarray(coords, dtype=np.float32), pca_dims, adjusted, seconds)


def _tsne(x: np.ndarray, perplexity: float, config: MapConfig) -> np.ndarray:
    if config.tsne_backend == "sklearn":
        from sklearn.manifold import TSNE

        return TSNE(2, perplexity=perplexity, init="pca", random_state=config.seed,
                    n_jobs=config.n_jobs).fit_transform(x)
    if config.tsne_backend != "opentsne":
        raise BadInputError(f"unknown t-SNE backend {config.tsne_backend!r}; use opentsne or sklearn")
    try:
        import openTSNE
    except ImportError as e:
        raise BadInputError("openTSNE is not installed: pip install 'simsearch[maps]'") from e
    # Exact neighbours below a few thousand points: the approximate search buys nothing there
    # and its randomness is one less thing to seed.
    neighbors = "exact" if len(x) < 2000 else "auto"
    return np.asarray(openTSNE.TSNE(perplexity=perplexity, random_state=config.seed, n_jobs=config.n_jobs,
                                    neighbors=neighbors, verbose=False).fit(x))


def _umap(x: np.ndarray, n_neighbors: int, config: MapConfig) -> np.ndarray:
    import warnings

    try:
        import umap
    except ImportError as e:
        raise BadInputError("umap-learn is not installed: pip install 'simsearch[maps]'") from e
    # Spectral initialisation needs a connected graph with more points than dimensions.
    init = "spectral" if len(x) > 2 * n_neighbors + 2 else "random"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*overridden.*")  # seeded => single thread
        reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=config.min_dist, spread=config.spread,
                            random_state=config.seed, init=init)
        return reducer.fit_transform(x)
