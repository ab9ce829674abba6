"""The duplicates command: groups of exact and near-duplicate files in an index, and which copy to keep."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from simsearch.cli.app import app, echo_json, echo_table, reported
from simsearch.cli.options import INDEX_OPTION, QUIET_OPTION, RowsFormat
from simsearch.retrieval.contents import NEAR_DUPLICATE


@app.command("duplicates")
def duplicates_command(
    index: Path = INDEX_OPTION,
    threshold: float = typer.Option(NEAR_DUPLICATE, "--threshold", "-t", min=0.0, max=1.0,
                                    help="Cosine at or above which two different files are near-duplicates "
                                         f"(default {NEAR_DUPLICATE}: finds mirrored, recoloured, mildly cropped and "
                                         "re-compressed copies; 0.85 finds more edits and more look-alike shots)."),
    exact_only: bool = typer.Option(False, "--exact-only", help="Only identical files (same sha256): no vector search."),
    fmt: RowsFormat = typer.Option(RowsFormat.json, "--format", "-f",
                               help="json (one line per group, for scripts), table (one row per file) or csv."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML report (whole-photo thumbnails side by side) to this file."),
    quiet: bool = QUIET_OPTION,
) -> None:
    """Groups of exact (same sha256) and near-duplicate (cosine >= --threshold) files, the copy to keep first.

    The copy to keep is the largest resolution, then the oldest file (modification time), then the
    largest file. Every other member of a group scores at least --threshold against it. JSON: one
    line per group {group, kind, keep, reclaimable_bytes, copies: [{role, id, path, score, width,
    height, bytes, modified, sha256}]}; table and csv: one row per file. A summary goes to stderr.
    Found with FAISS: each stored vector's nearest neighbours, searched deeper only where they
    still clear the threshold (no all-pairs loop). The index is only read (--html caches thumbnails in it).
    """
    from simsearch.retrieval.duplicates import DuplicatesConfig, find_duplicates
    from simsearch.views.duplicates import CSV_COLUMNS, csv_rows, to_csv

    with reported():
        report = find_duplicates(index, DuplicatesConfig(threshold=threshold, exact_only=exact_only, quiet=quiet))
        if html is not None:
            from simsearch.views.duplicates import write_duplicates_page

            typer.echo(f"report: {write_duplicates_page(report, html)}", err=True)
    typer.echo(report.text(), err=True)
    if fmt is RowsFormat.csv:
        typer.echo(to_csv(report), nl=False)
    elif fmt is RowsFormat.table:
        echo_table(csv_rows(report), [c for c in CSV_COLUMNS if c != "sha256"])
    else:
        for group in report.groups:
            echo_json(group.to_json())
