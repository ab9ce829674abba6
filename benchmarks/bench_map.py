"""Map time: simsearch's 2-D projection against a bare openTSNE / umap-learn call on the same data.

Both sides get the same 20k clustered vectors (5k with --quick), the same PCA to
50 dimensions (scikit-learn, seeded) and the same seed, in the same run, so the
ratio shows what the library adds on top of the projection it wraps.

    python benchmarks/bench_map.py --quick
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from common import NOISE_NOTE, print_table, progress, write_result
from bench_query import clustered


def bare(method: str, vectors: np.ndarray, pca: int, seed: int) -> np.ndarray:
    """The plain call a user would write: PCA, then the projection library's default settings."""
    from sklearn.decomposition import PCA

    x = PCA(n_components=pca, random_state=seed).fit_transform(vectors)
    if method == "tsne":
        from openTSNE import TSNE

        return np.asarray(TSNE(n_jobs=-1, random_state=seed).fit(x))
    import umap

    return umap.UMAP(random_state=seed).fit_transform(x)


def library_project():
    """simsearch.views.projection.project, or None with the reason it is missing."""
    try:
        from simsearch.views.projection import MapConfig, project
    except ImportError as e:
        return None, f"skipped: simsearch.views.projection not available ({e})"
    return (lambda x, method: project(x, MapConfig(method=method, pca=50, seed=0)).coords), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5k points instead of 20k")
    parser.add_argument("--n", type=int, help="points (default 5000 quick, 20000 full)")
    parser.add_argument("--dim", type=int, default=1280, help="vector length (EfficientNet-Lite0's)")
    parser.add_argument("--methods", default="tsne,umap")
    args = parser.parse_args()
    n = args.n or (5000 if args.quick else 20_000)
    vectors, _ = clustered(n, args.dim, seed=0, clusters=20, spread=1.5)
    project, why = library_project()
    rows = []
    for method in args.methods.split(","):
        progress(f"{method}: bare call on {n} points")
        started = time.perf_counter()
        ref = bare(method, vectors, 50, 0)
        bare_s = time.perf_counter() - started
        row = {"method": method, "n": n, "bare_s": bare_s, "bare_shape": list(ref.shape)}
        if project is None:
            row["status"] = why
        else:
            progress(f"{method}: simsearch.views.projection.project on {n} points")
            started = time.perf_counter()
            coords = np.asarray(project(vectors, method))
            row["simsearch_s"] = time.perf_counter() - started
            row["ratio"] = row["simsearch_s"] / bare_s
            row["status"] = "ok" if coords.shape == (n, 2) else f"unexpected shape {coords.shape}"
        rows.append(row)
    notes = [NOISE_NOTE, "both sides: PCA to 50 dims, seed 0; ratio = simsearch / bare (lower is better)",
             "umap-learn's first call in a process includes numba compilation; the bare call runs first and pays it"]
    print_table(f"map: {n} points x {args.dim}-d", rows, ["method", "n", "bare_s", "simsearch_s", "ratio", "status"],
                notes)
    write_result("map", {"quick": args.quick, "n": n, "rows": rows})


if __name__ == "__main__":
    main()
