"""Vectors shaped like real EfficientNet-Lite0 embeddings, at any count, for the scale benchmarks.

Isotropic noise is a needlessly hard and unrealistic case for approximate search:
real embeddings have a steep spectrum (a few directions carry most of the
variance) and a large common mean, and similar photos sit in groups. This module
embeds the real photos of ../shared/data and composites made from them
(`simsearch.datasets.synth`) with the real Lite0 weights on the CPU, fits the
mean, the principal axes and their variances, and how much of that variance lies
between groups of similar images, then samples a gaussian mixture with exactly
that spectrum:

    centre_c = mean + V (sqrt(between * lambda) * z_c)
    x        = centre_c + V (sqrt((1 - between) * lambda) * z),   then L2-normalised

Groups hold GROUP_SIZE images on average at any n, some far more than others
(group j is drawn with weight (j+1)^-0.5: at 1M the largest holds 0.3%). `between`
is chosen so that a sample the size of the real set has the real set's mean cosine
to the 10th nearest neighbour (0.73 for Lite0 here). Held-out queries are drawn the
same way from the same groups, as new photos of subjects the collection already
holds. The fitted model is cached in the temp folder
(`simsearch-bench/lite0-spectrum-v2.npz`): only the first run embeds.

    python benchmarks/real_vectors.py      # fit (or read the cache) and print what was fitted
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import SHARED_DATA, progress, source_photos

CACHE = Path(tempfile.gettempdir()) / "simsearch-bench" / "lite0-spectrum-v2.npz"
COMPOSITES = 2000  # composites embedded beside the real photos (about a minute on 2 cores)
GROUP_SIZE = 30  # mean images per group of similar ones, at any n
POPULARITY = 0.5  # group j is drawn with weight (j+1)^-POPULARITY: some subjects are far commoner


@dataclass
class Spectrum:
    """A fitted model of real embeddings: mean, principal axes, their variances, and the share between groups."""

    mean: np.ndarray  # (dim,) float32
    axes: np.ndarray  # (r, dim) float32, orthonormal rows, by decreasing variance
    variances: np.ndarray  # (r,) float32: variance of the real vectors along each axis
    between: float  # share of the variance that lies between groups of similar images (0..1)
    fitted_on: int  # how many real vectors

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def centres(self, groups: int, seed: int) -> np.ndarray:
        """(groups, dim) group centres, un-normalised."""
        rng = np.random.default_rng(seed)
        z = rng.standard_normal((groups, len(self.variances)), dtype=np.float32)
        return self.mean + (z * np.sqrt(self.between * self.variances)) @ self.axes

    def sample(self, n: int, centres: np.ndarray, seed: int, out: np.ndarray | None = None,
               chunk: int = 50_000) -> np.ndarray:
        """(n, dim) L2-normalised float32 vectors around `centres`, written into `out` (a memmap is fine)."""
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), dtype=np.float32) if out is None else out
        scale = np.sqrt((1.0 - self.between) * self.variances).astype(np.float32)
        weights = popularity(len(centres))
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            which = rng.choice(len(centres), m, p=weights)
            x = centres[which] + (rng.standard_normal((m, len(scale)), dtype=np.float32) * scale) @ self.axes
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[start:start + m] = x
        return out


def popularity(groups: int) -> np.ndarray:
    """How often each group is drawn (the same groups are common in a collection and in its queries)."""
    weights = (np.arange(groups) + 1.0) ** -POPULARITY
    return weights / weights.sum()


def groups_for(n: int) -> int:
    return max(1, n // GROUP_SIZE)


def real_lite0_vectors(n_composites: int = COMPOSITES) -> np.ndarray:
    """Lite0 vectors (real weights, CPU) of the real photos under ../shared/data and of composites made from them."""
    from simsearch.datasets.synth import SynthConfig, generate
    from simsearch.pipeline.embed import EmbedConfig, Embedder, iter_file_batches, load_backbone

    paths = source_photos()
    with tempfile.TemporaryDirectory(prefix="simsearch-spectrum-") as tmp:
        progress(f"spectrum: {n_composites} composites from {SHARED_DATA}")
        generate(SynthConfig(out=Path(tmp) / "synth", sources=(SHARED_DATA,), n=n_composites, seed=0,
                             objects_per_image=2), progress=False)
        paths += sorted((Path(tmp) / "synth" / "JPEGImages").glob("*.jpg"))
        progress(f"spectrum: embedding {len(paths)} images with EfficientNet-Lite0 (cpu)")
        config = EmbedConfig(model="efficientnet-lite0", device="cpu", quiet=True, workers=1)
        embedder = Embedder(load_backbone(config.model), config.device, config.precision)
        vectors = [b.embedded.vectors for b in iter_file_batches(paths, embedder, config) if b.embedded is not None]
    return np.concatenate(vectors).astype(np.float32)


def fit(x: np.ndarray, seed: int = 0) -> Spectrum:
    """Mean, principal axes and variances of real vectors, and the share of variance between groups.

    The share is found by bisection: the one at which a sample as large as `x` has the
    same mean cosine to its 10th nearest neighbour as `x` (how tight neighbourhoods are).
    """
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    variances = (s ** 2 / (len(x) - 1)).astype(np.float32)
    keep = variances > variances[0] * 1e-7
    model = Spectrum(mean.astype(np.float32), vt[keep].astype(np.float32), variances[keep], 0.5, len(x))
    wanted = _tenth_neighbour(x)
    low, high = 0.0, 0.95
    for _ in range(12):
        model.between = (low + high) / 2
        sample = model.sample(len(x), model.centres(groups_for(len(x)), seed), seed + 1)
        low, high = (model.between, high) if _tenth_neighbour(sample) < wanted else (low, model.between)
    model.between = (low + high) / 2
    return model


def _tenth_neighbour(x: np.ndarray) -> float:
    import faiss

    D, _ = faiss.knn(np.ascontiguousarray(x), np.ascontiguousarray(x), 11, faiss.METRIC_INNER_PRODUCT)
    return float(D[:, 10].mean())


def spectrum(cache: Path = CACHE) -> Spectrum:
    """The fitted model, from the cache when there is one (else embedding takes a minute or two)."""
    if cache.exists():
        data = np.load(cache)
        return Spectrum(data["mean"], data["axes"], data["variances"], float(data["between"]),
                        int(data["fitted_on"]))
    fitted = fit(real_lite0_vectors())
    save(fitted, cache)
    return fitted


def save(fitted: Spectrum, cache: Path = CACHE) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, mean=fitted.mean, axes=fitted.axes, variances=fitted.variances, between=fitted.between,
             fitted_on=fitted.fitted_on)
    tmp.replace(cache)


def realistic(n: int, n_queries: int, seed: int = 0, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(xb, xq): n database vectors and n_queries held-out queries from the same groups, unit length."""
    model = spectrum()
    centres = model.centres(groups_for(n), seed)
    xb = model.sample(n, centres, seed + 1, out)
    xq = model.sample(n_queries, centres, seed + 2)
    return xb, xq


if __name__ == "__main__":
    fitted = spectrum()
    share = np.cumsum(fitted.variances) / fitted.variances.sum()
    print(f"fitted on {fitted.fitted_on} real Lite0 vectors: dim {fitted.dim}, {len(fitted.variances)} axes; "
          f"variance in the top 10/50/200 axes {share[9]:.2f}/{share[49]:.2f}/{share[199]:.2f}; "
          f"between groups {fitted.between:.2f}; |mean| {np.linalg.norm(fitted.mean):.2f}")
    sample = fitted.sample(fitted.fitted_on, fitted.centres(groups_for(fitted.fitted_on), 0), 1)
    print(f"a sample of {fitted.fitted_on}: mean cosine to the 10th neighbour {_tenth_neighbour(sample):.3f}")
