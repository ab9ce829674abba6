"""Options shared by several commands, defined once (as sqlite-utils does) so they read the same everywhere."""
from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class Format(str, Enum):
    """How a command prints its result on stdout."""

    json = "json"  # JSON (lines): for scripts
    table = "table"  # an aligned table: for people


class QueryFormat(str, Enum):
    """How `query` prints its neighbours: Format's choices and CSV, which only a list of results fits."""

    json = "json"  # JSON lines: the query first, then one line per neighbour
    table = "table"  # an aligned table under a `query:` line
    csv = "csv"  # one row per neighbour with a header: for spreadsheets and pandas


class RowsFormat(str, Enum):
    """How a command that lists groups of files prints them (`duplicates`): Format's choices and CSV."""

    json = "json"  # JSON lines: one line per group
    table = "table"  # an aligned table: one row per file
    csv = "csv"  # one row per file with a header: for spreadsheets and pandas


INDEX_OPTION = typer.Option(Path("indexes/default"), "--index", "-i", help="Index folder (created by build-index).")
HEAD_OPTION = typer.Option(None, "--head", help="Folder holding localizer.pt (a trained head); default: the index folder.")
FORMAT_OPTION = typer.Option(Format.json, "--format", "-f", help="json (for scripts) or table (for people).")
QUIET_OPTION = typer.Option(False, "--quiet", "-q", help="No progress bar.")
MAX_PIXELS_OPTION = typer.Option(
    64, "--max-pixels", min=1,
    help="Largest image to decode, in megapixels (JPEGs count their reduced decode); a larger one is skipped by "
         "build-index and refused by query and serve, so a decompression bomb cannot exhaust memory.")
