"""The duplicates report as one self-contained HTML page, and as CSV rows.

Each group is a row of whole-photo thumbnails side by side (never box crops: a copy
is judged by the whole picture), the copy to keep first, each captioned with what the
choice looks at: resolution, file size, modification time and path. Thumbnails are
inline data URIs, as on the query page, so the report can be mailed or moved.
"""
from __future__ import annotations

import csv
import html
import io
import os
from pathlib import Path

from simsearch.views.output import output_file, write_text
from simsearch.retrieval.duplicates import DuplicatesReport, human_bytes
from simsearch.views.page import data_uri, relative_link
from simsearch.views.render import Renderer

CSV_COLUMNS = ["group", "kind", "role", "id", "score", "width", "height", "bytes", "modified", "path", "sha256"]

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; }
.muted { color: #666; }
.group { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; margin: 14px 0; }
.group h2 { font-size: 15px; margin: 0 0 8px; }
.copies { display: flex; gap: 12px; flex-wrap: wrap; align-items: flex-start; }
.copy { width: 220px; border: 2px solid transparent; border-radius: 4px; padding: 4px; }
.copy[data-role="keep"] { border-color: #2a8a2a; }
.copy img { max-width: 210px; max-height: 210px; display: block; margin: 0 auto; border: 1px solid #eee; }
.role { font-weight: 600; }
.copy[data-role="keep"] .role { color: #2a8a2a; }
.copy[data-role="exact"] .role { color: #a33; }
.copy[data-role="near"] .role { color: #a60; }
.path { font-size: 12px; word-break: break-all; }
"""


def render_duplicates_page(report: DuplicatesReport, page_path: str | os.PathLike) -> str:
    """The HTML text of the report that will live at `page_path`."""
    page = Path(page_path)
    renderer = Renderer(report.index)
    e = html.escape
    sections = []
    for g in report.groups:
        cards = []
        for c in g.copies:
            r = c.record
            role = {"keep": "keep", "exact": "identical file", "near": f"near-duplicate {c.score:.3f}"}[c.role]
            cards.append(f"""
    <div class="copy" data-role="{c.role}" data-id="{r.id}">
      <img alt="{e(Path(r.path).name)}" src="{data_uri(renderer.thumb(r))}">
      <div class="role">{e(role)}</div>
      <div>{r.width}&times;{r.height} &middot; {human_bytes(c.bytes)}</div>
      <div class="muted">modified {e(c.modified())} UTC &middot; id {r.id}</div>
      <div class="path"><a href="{relative_link(r.path, page)}">{e(r.path)}</a></div>
    </div>""")
        sections.append(f"""
<div class="group" data-group="{g.number}" data-kind="{g.kind}">
  <h2>group {g.number}: {len(g.copies)} files, {e(g.kind)} &middot; keep id {g.keep.record.id}, {human_bytes(g.reclaimable)} could go</h2>
  <div class="copies">{''.join(cards)}
  </div>
</div>""")
    rule = ("identical files (sha256) only" if report.threshold is None
            else f"identical files (sha256), and cosine &ge; {report.threshold:.2f}")
    body = "".join(sections) or '<p id="none">No duplicates found.</p>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Duplicates in {e(report.index)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>Duplicates in {e(report.index)}</h1>
<div class="muted" id="summary">{e(report.text())} &middot; {rule} &middot; kept: the largest resolution, then the oldest file</div>
{body}
</body></html>
"""


def write_duplicates_page(report: DuplicatesReport, out: str | os.PathLike) -> Path:
    """Write the report page to `out` (its folder is created, the file replaced whole); returns the path."""
    out = output_file(out)
    return write_text(out, render_duplicates_page(report, out))


def csv_rows(report: DuplicatesReport) -> list[dict]:
    """One row per file of every group (CSV_COLUMNS), the copy to keep first in each group."""
    return [{"group": g.number, "kind": g.kind, **{k: v for k, v in c.to_json().items() if k in CSV_COLUMNS}}
            for g in report.groups for c in g.copies]


def to_csv(report: DuplicatesReport) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(report))
    return buffer.getvalue()
