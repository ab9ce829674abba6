"""The typer application object and the error boundary shared by every command."""
from __future__ import annotations

import json
import logging
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import typer

from simsearch.errors import SimsearchError

app = typer.Typer(
    name="simsearch",
    help="Image-similarity search: index Pascal VOC or a folder of photos, then find images like this one.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _configure(verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                           help="Log stage timings to stderr; -vv also logs debug detail.")) -> None:
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    faiss_loader = logging.getLogger("faiss.loader")
    for old in [f for f in faiss_loader.filters if isinstance(f, FaissLoaderAttempts)]:
        faiss_loader.removeFilter(old)  # one filter, however many times the app runs in a process
    if level > logging.DEBUG:
        faiss_loader.addFilter(FaissLoaderAttempts())


class FaissLoaderAttempts(logging.Filter):
    """Drops faiss's loader trying AVX512/AVX2 builds that are not installed: INFO lines quoting a
    ModuleNotFoundError read like a failure on every -v run, yet the plain build then loads fine.
    Its 'Successfully loaded' line and anything at WARNING or above still pass; -vv shows them all.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.getMessage().startswith("Successfully loaded")


@contextmanager
def reported() -> Iterator[None]:
    """Turn library errors into one line on stderr and exit code 1."""
    try:
        yield
    except SimsearchError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except sqlite3.DatabaseError as e:  # damage found mid-read, past the store's own checks
        typer.echo(f"error: an index database is damaged ({e}); move the index folder away and run "
                   "simsearch build-index again", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: work committed so far is kept; run the same command again to finish", err=True)
        raise typer.Exit(130) from None


def echo_json(value) -> None:
    typer.echo(json.dumps(value, default=_json_default, ensure_ascii=False))


def _json_default(value):
    import numpy as np
    from pathlib import Path

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def echo_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """A plain aligned table: readable in a terminal, no extra dependency."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _click_errors() -> tuple[type, type]:
    """(UsageError, ClickException) of the click typer runs on: vendored in new typer, click itself in old."""
    bases = {c.__name__: c for c in typer.BadParameter.__mro__}
    return bases["UsageError"], bases["ClickException"]


def main() -> None:
    """Console entry: a usage mistake gets what a library error gets, one line and exit code 1."""
    usage_error, click_exception = _click_errors()
    try:
        code = app(standalone_mode=False)
    except usage_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `simsearch`: the overview, not an error
            typer.echo(e.ctx.get_help() if e.ctx else "")
            sys.exit(0)
        where = e.ctx.command_path if e.ctx else "simsearch"
        typer.echo(f"error: {e.format_message()} (see: {where} --help)", err=True)
        code = 1
    except click_exception as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        code = 1
    except typer.Abort:
        typer.echo("interrupted", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)
