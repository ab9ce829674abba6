"""`simsearch map` at 100k points, its two halves timed apart: the projection, then everything drawn from it.

The projection (PCA to 50 dims, then openTSNE or UMAP, `views.projection.project`)
runs on clustered 1280-d vectors (bench_map's generator). The drawing half
(`views.maps.draw_map`: coords.csv/.parquet, scatter.png, thumbs.png, map.html
with its thumbnails inlined up to the cap) runs on a real store of n records whose
files are links to the real photos of ../shared/data, spread over 20 folders, so
thumbnails are decoded from real images. The drawing half uses the coordinates of
the projection when `--methods` ran one, else gaussian points.

    nice -n 10 python benchmarks/bench_map_scale.py --n 100000               # both halves, both methods (long)
    python benchmarks/bench_map_scale.py --n 100000 --methods ''             # the drawing half only
    python benchmarks/bench_map_scale.py --quick                             # 5k points, UMAP: a minute or two
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_query import clustered
from common import NOISE_NOTE, print_table, progress, source_photos, write_result

DIM = 1280


def linked_store(index_dir: Path, files_dir: Path, vectors: np.ndarray) -> None:
    """A store of len(vectors) records, each file a link to one of the real photos, in 20 folders."""
    from simsearch.records import ImageRecord
    from simsearch.spec import EmbedderSpec, IndexSpec
    from simsearch.storage.store import NewImage, Store

    photos = source_photos()
    with Store(index_dir, create=True) as store:
        store.save_spec(IndexSpec(EmbedderSpec("synthetic", "none", "0" * 64, DIM, (1, 1, 1)), index_type=None))
        for start in range(0, len(vectors), 10_000):
            items = []
            for i in range(start, min(start + 10_000, len(vectors))):
                folder = files_dir / f"folder{i % 20:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                source = photos[i % len(photos)]
                path = folder / f"{i:06d}{source.suffix}"
                os.symlink(source, path)
                items.append(NewImage(ImageRecord(path, "folder", f"set{i % 3}"), f"{i:064x}", 1, 1, 8, 8, vectors[i]))
            store.add_images(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5,000 points, UMAP only, 500 thumbnails (a minute or two)")
    parser.add_argument("--n", type=int, help="points (default 100,000; 5,000 with --quick)")
    parser.add_argument("--methods", help="projections to time, comma-separated ('' for the drawing half only; "
                                          "default umap,tsne; umap with --quick)")
    parser.add_argument("--max-thumbs", type=int, help="thumbnails inlined in map.html (default 3,000; 500 with --quick)")
    args = parser.parse_args()
    args.n = args.n or (5000 if args.quick else 100_000)
    args.methods = args.methods if args.methods is not None else ("umap" if args.quick else "umap,tsne")
    args.max_thumbs = args.max_thumbs if args.max_thumbs is not None else (500 if args.quick else 3000)
    from simsearch.views.map_page import PageConfig
    from simsearch.views.maps import draw_map, load_points
    from simsearch.views.projection import MapConfig, project

    vectors, _ = clustered(args.n, DIM, seed=0, clusters=20, spread=1.5)
    rows = []
    coords = None
    for method in [m for m in args.methods.split(",") if m]:
        progress(f"{method}: projecting {args.n} points")
        started = time.perf_counter()
        projection = project(vectors, MapConfig(method=method, seed=0))
        rows.append({"half": "projection", "what": method, "n": args.n, "seconds": time.perf_counter() - started,
                     "stages": {k: round(v, 1) for k, v in projection.seconds.items()}})
        coords = projection.coords if coords is None else coords
    if coords is None:
        coords = np.random.default_rng(0).normal(size=(args.n, 2)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="simsearch-map-scale-") as tmp:
        progress(f"drawing: a store of {args.n} records linked to the real photos")
        linked_store(Path(tmp) / "idx", Path(tmp) / "files", vectors)
        started = time.perf_counter()
        _, xb, records = load_points(Path(tmp) / "idx")
        load_s = time.perf_counter() - started
        progress("drawing: coords, scatter.png, thumbs.png, map.html")
        started = time.perf_counter()
        files, seconds = draw_map(Path(tmp) / "idx", records, xb, coords, Path(tmp) / "map",
                                  PageConfig(max_thumbs=args.max_thumbs), f"{args.n} points")
        rows.append({"half": "drawing", "what": f"load + draw, {min(args.n, args.max_thumbs)} thumbnails inlined", "n": args.n,
                     "seconds": load_s + time.perf_counter() - started,
                     "stages": {"load": round(load_s, 1), **{k: round(v, 1) for k, v in seconds.items()}},
                     "map_html_mb": round(Path(files["html"]).stat().st_size / 1e6, 1)})
    print_table(f"map at {args.n} points x {DIM}-d", rows, ["half", "what", "n", "seconds", "stages"],
                [NOISE_NOTE, "projection: PCA 50 + the method, seeded (umap single-threaded, as seeding requires)",
                 "drawing: thumbnails decoded from links to the real photos; map.html "
                 f"{rows[-1]['map_html_mb']} MB"])
    # a quick run keeps its own file: map_scale.json holds the 100k run the README quotes
    write_result("map_scale_quick" if args.quick else "map_scale", {"n": args.n, "rows": rows})


if __name__ == "__main__":
    main()
