"""Search results as CSV: one row per neighbour, the same columns for `query --format csv` and the app's ZIP.

A spreadsheet or pandas wants flat cells, so each list (classes, drawn boxes, tags)
is one cell joined with "; " and the predicted box is four numeric columns. Rows
are built from a neighbour's JSON (`Neighbour.to_json()` on the command line, the
app's own shape in `serve`), which carry the same `objects`, `prediction`, `tags`,
`match` and `why` fields, so both outputs say the same thing.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Iterable

COLUMNS = ("rank", "id", "path", "score", "weak", "dataset", "width", "height", "classes", "boxes", "tags",
           "predicted_class", "predicted_score", "predicted_xmin", "predicted_ymin", "predicted_xmax",
           "predicted_ymax", "matched_class", "matched_score", "matched_box", "why", "learned")


def csv_row(neighbour: dict, path: str) -> dict:
    """One neighbour's cells; `path` is what the path column names (the file, or its copy in an archive)."""
    objects = neighbour.get("objects") or []
    prediction = neighbour.get("prediction") or {}
    box = prediction.get("box") or [None] * 4
    match = neighbour.get("match") or (neighbour.get("why") or {}).get("object") or {}
    why = neighbour.get("why") or {}
    return {
        "rank": neighbour["rank"], "id": neighbour["id"], "path": path, "score": _number(neighbour["score"], 4),
        "weak": neighbour.get("weak", False), "dataset": neighbour.get("dataset"),
        "width": neighbour.get("width"), "height": neighbour.get("height"),
        "classes": "; ".join(sorted({o["label"] for o in objects})),
        "boxes": "; ".join(f"{o['label']} {_box(o['box'])}" for o in objects),
        "tags": "; ".join(f"{t['label']} {t['score']:.2f}" for t in neighbour.get("tags") or []),
        "predicted_class": prediction.get("label"), "predicted_score": _number(prediction.get("score"), 4),
        "predicted_xmin": _number(box[0], 1), "predicted_ymin": _number(box[1], 1),
        "predicted_xmax": _number(box[2], 1), "predicted_ymax": _number(box[3], 1),
        "matched_class": match.get("label"), "matched_score": _number(match.get("score"), 4),
        "matched_box": _box(match["box"]) if match.get("box") else None,
        "why": why.get("text"),
        "learned": _number(neighbour.get("learned"), 4),  # last: readers by position keep their columns
    }


def write_csv(rows: Iterable[dict], out: io.TextIOBase) -> None:
    """A header line, then the rows; empty cells for what a neighbour lacks."""
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def csv_text(rows: Iterable[dict]) -> str:
    out = io.StringIO()
    write_csv(rows, out)
    return out.getvalue()


def _box(values) -> str:
    """'12,30,200,220' (pixels, rounded): one cell, as the table output writes a box."""
    return ",".join(f"{v:.0f}" for v in values)


def _number(value, digits: int):
    return None if value is None else round(float(value), digits)
