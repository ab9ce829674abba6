"""map.html: one self-contained, offline page to explore a map (zoom, pan, find by name, colour by a field).

Points are drawn on a 2-D canvas and hit-tested through a uniform grid, so a map
of 100k points stays responsive without WebGL or anything fetched from a CDN. The
data travels in columns (coordinates, names, and each colour-by field as indexes
into its list of values) to keep a 100k-point page a few MB. Thumbnails cannot all
be inlined at that size: up to `PageConfig.max_thumbs` small JPEGs are, spread over
the map; hovering any other point asks `simsearch serve` for its thumbnail when a
serve URL is given, and otherwise shows its name only.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from simsearch.records import Record
from simsearch.views.map_ui import PAGE
from simsearch.views.render import record_class

log = logging.getLogger(__name__)

FIELDS = ("class", "folder", "tag", "dataset")  # what points can be coloured by, in the page's menu order
NONE_LABEL = "(none)"


@dataclass(frozen=True)
class PageConfig:
    """What goes into map.html beyond the points themselves."""

    title: str = "map"  # page title and heading
    serve_url: str | None = "http://127.0.0.1:8000"  # `simsearch serve` for links and thumbnails past the cap; None: none
    max_thumbs: int = 3000  # thumbnails inlined (spread over the map); ~3 KB each, so the default adds ~9 MB
    thumb_size: int = 80  # longest side of an inlined thumbnail, pixels
    colours: int = 20  # values of a field with their own colour (the most frequent); the rest share grey


def class_colours(values: Sequence[str], limit: int = 20) -> dict[str, tuple]:
    """A colour per value (the most frequent `limit`, ties by name); the rest and '' share grey."""
    import matplotlib

    counts: dict[str, int] = {}
    for c in values:
        if c:
            counts[c] = counts.get(c, 0) + 1
    named = sorted(counts, key=lambda c: (-counts[c], c))[:limit]
    cmap = matplotlib.colormaps["tab20" if len(named) > 9 else "tab10"]
    grey = {7} if cmap.N == 10 else {14, 15}  # grey is kept for "no value"
    palette = [cmap(i) for i in range(cmap.N) if i not in grey]
    if cmap.N == 20:  # tab20 less its greys is 18: two darker tones of tab20b make `limit` distinct colours
        palette += [matplotlib.colormaps["tab20b"](i) for i in (0, 4)]
    return {c: palette[i % len(palette)] for i, c in enumerate(named)}


def record_fields(records: Sequence[Record]) -> dict[str, list[str]]:
    """Each colour-by field's value for every record ('' when it has none).

    folder is the image's folder relative to the folder all images share, so that
    sibling folders read apart; tag is the most probable ImageNet tag.
    """
    parents = [os.path.dirname(r.path) for r in records]
    try:
        root = os.path.commonpath(parents) if parents else ""
    except ValueError:  # relative and absolute paths mixed: show them whole
        root = ""
    folders = [os.path.relpath(p, root) if root else p for p in parents]
    return {
        "class": [record_class(r) for r in records],
        "folder": [os.path.basename(root) or root if f == "." else f for f in folders],  # the root by its name
        "tag": [r.tags[0].label if r.tags else "" for r in records],
        "dataset": [r.dataset or "" for r in records],
    }


def encode_field(values: Sequence[str], limit: int) -> dict:
    """One field as the page reads it: distinct values by count, each point's index into them, colours."""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    order = sorted(counts, key=lambda v: (v == "", -counts[v], v))  # '' (none) last
    position = {v: i for i, v in enumerate(order)}
    colours = class_colours(values, limit)
    return {
        "values": [v or NONE_LABEL for v in order],
        "counts": [counts[v] for v in order],
        "colours": ["#%02x%02x%02x" % tuple(int(255 * c) for c in colours[v][:3]) if v in colours else None
                    for v in order],
        "of": [position[v] for v in values],
    }


def page_coords(coords: np.ndarray) -> np.ndarray:
    """Coordinates in [0, 1], one scale for both axes (distances keep their meaning), centred."""
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = float((hi - lo).max()) or 1.0
    return (coords - (lo + hi) / 2) / span + 0.5


def spread_rows(coords: np.ndarray, limit: int) -> list[int]:
    """Up to `limit` rows spread over the map: the first row of each cell of a grid, over ever finer grids.

    The inlined thumbnails are those rows, so that hovering anywhere on a large
    map finds some close by, rather than all of them in its densest clump.
    """
    n = len(coords)
    if limit >= n:
        return list(range(n))
    if limit <= 0:
        return []
    unit = page_coords(coords)
    chosen: list[int] = []
    taken = np.zeros(n, dtype=bool)
    side = max(1, int(np.sqrt(limit)) // 2)
    while len(chosen) < limit:
        cells = np.minimum((unit * side).astype(np.int64), side - 1)
        key = cells[:, 0] * side + cells[:, 1]
        free = np.flatnonzero(~taken)
        _, first = np.unique(key[free], return_index=True)
        new = sorted(free[first].tolist())[: limit - len(chosen)]
        chosen += new
        taken[new] = True
        side *= 2
    return sorted(chosen)


def inline_thumbs(records: Sequence[Record], rows: Sequence[int], thumb: Callable[[Record], bytes],
                  size: int) -> dict[int, str]:
    """row -> a data: URL of a small JPEG thumbnail; a record whose image is gone has none (logged)."""
    from PIL import Image

    out: dict[int, str] = {}
    for row in rows:
        try:
            im = Image.open(io.BytesIO(thumb(records[row])))
            im.thumbnail((size, size))
            buffer = io.BytesIO()
            im.convert("RGB").save(buffer, "JPEG", quality=70)
        except Exception as e:  # a file moved since the build: no thumbnail, the point stays
            log.warning("no thumbnail for %s: %s", records[row].path, e)
            continue
        out[row] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return out


def write_map_page(path: Path, ids: Sequence[int], names: Sequence[str], coords: np.ndarray,
                   fields: dict[str, list[str]], thumbs: dict[int, str],
                   neighbours: list[list[tuple[int, float]]] | None, config: PageConfig = PageConfig()) -> Path:
    """Write the page. `neighbours[row]` lists (row, score) of its nearest images; None leaves them out."""
    unit = page_coords(np.asarray(coords, dtype=np.float64))
    rows = sorted(thumbs)
    data = {
        "ids": [int(i) for i in ids],
        "names": list(names),
        # 6 decimals: a clump 1/1000 of the map wide still spreads over ~1000 steps when zoomed into
        "x": np.round(unit[:, 0], 6).tolist(),
        "y": np.round(unit[:, 1], 6).tolist(),
        "fields": {name: encode_field(values, config.colours) for name, values in fields.items()
                   if any(values) or name == "class"},
        "thumbs": {"rows": rows, "urls": [thumbs[r] for r in rows], "cap": config.max_thumbs},
        "nn": [[[int(j), round(float(s), 4)] for j, s in row] for row in neighbours] if neighbours else None,
        "serve": config.serve_url,
    }
    page = (PAGE.replace("__TITLE__", html.escape(config.title))
            .replace("__DATA__", json.dumps(data, separators=(",", ":")).replace("</", "<\\/")))
    path.write_text(page, encoding="utf-8")
    return path

