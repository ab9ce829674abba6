"""Browse commands: serve (a local web app over an index) and pairs (the most similar pairs)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from simsearch.cli.app import app, echo_json, reported
from simsearch.cli.options import INDEX_OPTION, MAX_PIXELS_OPTION


@app.command("serve")
def serve_command(
    index: Path = INDEX_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; the default is reachable from this machine only. Any other address warns: pass --token with it."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    max_upload_mb: int = typer.Option(20, "--max-upload-mb", min=1, help="Larger uploads are refused (413)."),
    max_pixels: int = MAX_PIXELS_OPTION,
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (for embedding uploads and regions)."),
    token: Optional[str] = typer.Option(
        None, "--token", envvar="SIMSEARCH_TOKEN",
        help="Require this secret on every request: open the page as http://HOST:PORT/?token=TOKEN (a cookie then "
             "keeps it), or send 'Authorization: Bearer TOKEN'. Prefer the SIMSEARCH_TOKEN variable: a command "
             "line is visible to other users of this machine."),
) -> None:
    """Browse an index in the browser: upload or pick an image, see neighbours with crops, draw a box to search a region."""
    from simsearch.views.http_guards import bind, exposure_warning
    from simsearch.views.serve import ServeConfig, run

    token = token or None  # an empty SIMSEARCH_TOKEN means none
    with reported():
        sock = bind(host, port)  # a port in use is one line, before the index and model load
        warning = exposure_warning(host, token)
        if warning:
            typer.echo(warning, err=True)
        page = f"http://{host}:{port}/" + ("?token=TOKEN" if token else "")
        config = ServeConfig(max_upload_bytes=max_upload_mb * 1024 * 1024, device=device,
                             max_pixels=max_pixels * 1_000_000, token=token)
        run(index, host, port, config, sock=sock, announce=lambda: typer.echo(
            f"simsearch: serving {index} on {page} (API docs at /docs); Ctrl-C to stop", err=True))


@app.command("pairs")
def pairs_command(
    index: Path = INDEX_OPTION,
    n: int = typer.Option(10, "--n", min=1, help="Number of pairs."),
    out: Path = typer.Option(Path("pairs"), "--out", "-o", help="Folder for pairs.png."),
) -> None:
    """The most similar pairs of images (identical files included, marked "identical"): JSON lines and a PNG of whole photos."""
    from simsearch.views.pairs import most_similar_pairs, pairs_figure

    with reported():
        pairs = most_similar_pairs(index, n)
        png = pairs_figure(index, pairs, out / "pairs.png")
    for pair in pairs:
        echo_json(pair.to_json())
    typer.echo(f"{len(pairs)} pairs drawn in {png}", err=True)
