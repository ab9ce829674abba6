"""The map command: a 2-D picture of the embedding space (t-SNE or UMAP)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from simsearch.cli.app import app, echo_json, reported
from simsearch.cli.options import INDEX_OPTION


@app.command("map")
def map_command(
    index: Path = INDEX_OPTION,
    method: str = typer.Option("tsne", "--method", help="tsne or umap."),
    pca: int = typer.Option(50, "--pca", min=0, help="PCA dimensions before projecting (0: none)."),
    out: Path = typer.Option(Path("map"), "--out", "-o", help="Folder for coords.csv/.parquet, scatter.png, thumbs.png, map.html."),
    seed: int = typer.Option(0, "--seed", help="Same index and seed, same coordinates."),
    min_dist: float = typer.Option(0.5, "--min-dist", help="UMAP: how tightly points may pack (higher spreads clumps)."),
    spread: float = typer.Option(1.0, "--spread", help="UMAP: scale of the embedded points (at least --min-dist)."),
    serve_url: str = typer.Option("http://127.0.0.1:8000", "--serve-url",
                                  help="Where `simsearch serve` runs: links, and thumbnails past --max-thumbs, in map.html ('' for none)."),
    max_thumbs: int = typer.Option(3000, "--max-thumbs", min=0,
                                   help="Thumbnails inlined in map.html, spread over the map (~3 KB each)."),
) -> None:
    """Project every record to 2-D and draw it: scatter coloured by class, thumbnails, map.html to zoom, find and colour by."""
    from simsearch.views.map_page import PageConfig
    from simsearch.views.maps import MapConfig, build_map

    page = PageConfig(title=f"{method} map of {index}", serve_url=serve_url or None, max_thumbs=max_thumbs)
    with reported():
        report = build_map(index, out, MapConfig(method=method, pca=pca, seed=seed, min_dist=min_dist, spread=spread), page)
    echo_json(asdict(report))
    typer.echo(f"{method} map of {report.points} images in {out} "
               f"({sum(report.seconds.values()):.1f}s; adjusted {report.adjusted or 'nothing'})", err=True)
