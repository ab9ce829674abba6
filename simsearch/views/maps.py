"""Pictures of the embedding space: every record of an index projected to 2-D and drawn (the seed's Figure 4).

The projection is `views.projection`; this module runs it on an index and writes
coords.csv and coords.parquet, scatter.png coloured by class, thumbs.png with
thumbnails at their coordinates, and map.html (`views.map_page`: zoom, pan, find
by name, colour by class, folder, tag or dataset; hover: thumbnail; click:
neighbours).
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from simsearch.views.output import output_folder
from simsearch.records import Record
from simsearch.storage.store import Store
from simsearch.views.map_page import PageConfig, class_colours, inline_thumbs, record_fields, spread_rows, write_map_page
from simsearch.views.projection import MapConfig, project
from simsearch.views.render import Renderer, record_class

log = logging.getLogger(__name__)


@dataclass
class MapReport:
    out_dir: str
    method: str
    points: int
    pca_dims: int
    adjusted: dict
    seconds: dict
    files: dict  # kind -> path


# ---------------------------------------------------------------- from an index


def load_points(index_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[Record]]:
    """(ids, xb, records) for every record, in id order."""
    with Store(index_dir) as store:
        ids, xb = store.vectors()
        found = store.records([int(i) for i in ids])
    return ids, xb, [found[int(i)] for i in ids]


def build_map(index_dir: str | os.PathLike, out_dir: str | os.PathLike, config: MapConfig = MapConfig(),
              page: PageConfig | None = None) -> MapReport:
    """Project every record of an index and write the CSV, Parquet, PNGs and HTML map into `out_dir`."""
    out = Path(out_dir)
    ids, xb, records = load_points(index_dir)
    projection = project(xb, config)
    page = page or PageConfig(title=f"{config.method} map of {index_dir}")
    files, drawn = draw_map(index_dir, records, xb, projection.coords, out, page, f"{config.method} of {len(records)} images")
    seconds = {**projection.seconds, **drawn}
    report = MapReport(str(out), config.method, len(records), projection.pca_dims, projection.adjusted,
                       {k: round(v, 3) for k, v in seconds.items()}, files)
    (out / "map.json").write_text(json.dumps({**asdict(report), "config": asdict(config), "page": asdict(page)},
                                            indent=2) + "\n")
    return report


def draw_map(index_dir: str | os.PathLike, records: list[Record], xb: np.ndarray, coords: np.ndarray, out: Path,
             page: PageConfig, caption: str) -> tuple[dict, dict]:
    """Everything after the projection: (files written, seconds per stage). Apart so it can be timed apart."""
    output_folder(out)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    files = write_coords(records, coords, out)
    seconds["tables"] = time.perf_counter() - started
    started = time.perf_counter()
    files["scatter"] = str(scatter_png(records, coords, out / "scatter.png", caption))
    seconds["scatter"] = time.perf_counter() - started
    started = time.perf_counter()
    renderer = Renderer(index_dir)
    files["thumbs"] = str(thumbs_png(records, coords, renderer, out / "thumbs.png"))
    seconds["thumbs"] = time.perf_counter() - started
    started = time.perf_counter()
    files["html"] = str(map_html(records, xb, coords, renderer, out / "map.html", page))
    seconds["html"] = time.perf_counter() - started
    return files, seconds


def write_coords(records: list[Record], coords: np.ndarray, out: Path) -> dict:
    import pandas as pd

    frame = pd.DataFrame({
        "id": [r.id for r in records],
        "path": [r.path for r in records],
        "x": coords[:, 0].astype(np.float64),
        "y": coords[:, 1].astype(np.float64),
        "class": [record_class(r) for r in records],
    })
    frame.to_csv(out / "coords.csv", index=False)
    frame.to_parquet(out / "coords.parquet", index=False)
    return {"csv": str(out / "coords.csv"), "parquet": str(out / "coords.parquet")}


def scatter_png(records: list[Record], coords: np.ndarray, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    classes = [record_class(r) for r in records]
    colours = class_colours(classes)
    grey = (0.6, 0.6, 0.6, 0.6)
    size = max(2.0, min(40.0, 4000 / max(1, len(records))))
    fig, ax = plt.subplots(figsize=(9, 8), dpi=120)
    other = np.array([c not in colours for c in classes])
    if other.any():
        ax.scatter(coords[other, 0], coords[other, 1], s=size, color=grey, linewidths=0,
                   label="other / no class" if colours else "no class")
    for c, colour in colours.items():
        mask = np.array([k == c for k in classes])
        ax.scatter(coords[mask, 0], coords[mask, 1], s=size, color=colour, linewidths=0, label=f"{c} ({mask.sum()})")
    ax.set_title(title)
    ax.set_xticks([]), ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False, markerscale=max(1, 6 / size))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _unit(coords: np.ndarray) -> np.ndarray:
    """Coordinates scaled into [0, 1] on both axes (a constant axis maps to 0.5)."""
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    unit = (coords - lo) / span
    unit[:, hi - lo <= 0] = 0.5
    return unit


def thumbs_png(records: list[Record], coords: np.ndarray, renderer: Renderer, path: Path,
               canvas: int = 2000, thumb: int | None = None) -> Path:
    """Thumbnails at their map positions; in crowded places one per grid cell, so none hides another."""
    from PIL import Image

    if thumb is None:  # big enough to recognise on a small map, small enough to show many on a big one
        thumb = int(min(160, max(48, canvas / (1.5 * np.sqrt(len(records))))))

    unit = _unit(coords)
    sheet = Image.new("RGB", (canvas + thumb, canvas + thumb), "white")
    taken: set[tuple[int, int]] = set()
    placed = 0
    for r, (u, v) in zip(records, unit):
        x, y = int(u * canvas), int((1 - v) * canvas)  # y up, as in the scatter
        cell = (x // thumb, y // thumb)
        if cell in taken:
            continue
        try:
            im = Image.open(io.BytesIO(renderer.thumb(r)))
        except Exception as e:  # a file moved since the build: leave a gap, say so once per file
            log.warning("no thumbnail for %s: %s", r.path, e)
            continue
        im.thumbnail((thumb, thumb))
        sheet.paste(im, (x, y))
        taken.add(cell)
        placed += 1
    log.info("thumbs.png: %d of %d thumbnails placed", placed, len(records))
    sheet.save(path)
    return path


def map_html(records: list[Record], xb: np.ndarray, coords: np.ndarray, renderer: Renderer, path: Path,
             config: PageConfig, k: int = 8) -> Path:
    """map.html for these records: thumbnails for up to `config.max_thumbs` (spread over the map), and each
    point's k nearest images when all of them have thumbnails (beyond that, exact neighbours of every point
    cost more than the map; `serve` finds them on demand)."""
    rows = spread_rows(coords, config.max_thumbs)
    thumbs = inline_thumbs(records, rows, renderer.thumb, config.thumb_size)
    neighbours = None
    if len(records) <= config.max_thumbs:
        hits, scores = _neighbours(xb, k)
        neighbours = [list(zip(h, s)) for h, s in zip(hits, scores)]
    if len(rows) < len(records):
        log.info("map.html: %d of %d thumbnails inlined (max_thumbs); the others come from serve when it runs",
                 len(rows), len(records))
    return write_map_page(path, [r.id for r in records], [Path(r.path).name for r in records], coords,
                          record_fields(records), thumbs, neighbours, config)


def _neighbours(xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions and scores of each row's k nearest other rows (exact inner product)."""
    from simsearch.storage import faiss_index

    k = min(k, len(xb) - 1)
    positions = np.arange(len(xb), dtype=np.int64)
    flat = faiss_index.build(np.ascontiguousarray(xb, dtype=np.float32), positions, "Flat")
    scores, hits = faiss_index.search(flat, xb, k + 1)
    out_hits, out_scores = [], []
    for i in range(len(xb)):
        keep = [(h, s) for h, s in zip(hits[i], scores[i]) if h != i and h >= 0][:k]
        out_hits.append([h for h, _ in keep])
        out_scores.append([s for _, s in keep])
    return out_hits, out_scores


_MAP_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; display: flex; height: 100vh; color: #222; }
  #wrap { flex: 1; position: relative; }
  canvas { width: 100%; height: 100%; display: block; background: #fff; }
  #tip { position: absolute; pointer-events: none; background: #fff; border: 1px solid #bbb; padding: 4px;
         box-shadow: 0 2px 6px rgba(0,0,0,.2); display: none; font-size: 12px; max-width: 200px; }
  #tip img { display: block; max-width: 96px; max-height: 96px; }
  aside { width: 300px; overflow: auto; border-left: 1px solid #ddd; padding: 12px; background: #fafafa; }
  aside h2 { font-size: 15px; margin: 0 0 8px; }
  .nn { display: flex; gap: 8px; align-items: center; margin: 6px 0; cursor: pointer; }
  .nn img { width: 64px; height: 64px; object-fit: contain; background: #fff; border: 1px solid #ddd; }
  .legend span { display: inline-block; margin: 2px 6px 2px 0; font-size: 12px; }
  .legend i { display: inline-block; width: 10px; height: 10px; margin-right: 3px; border-radius: 50%; }
</style></head><body>
<div id="wrap"><canvas id="map"></canvas><div id="tip"></div></div>
<aside><h2>__TITLE__</h2><div class="legend" id="legend"></div>
<p id="help">Hover a point to see its image; click it to list its neighbours.</p><div id="side"></div></aside>
<script>
"use strict";
const DATA = __DATA__;
const P = DATA.points; P.forEach((p, i) => p.i = i);
const canvas = document.getElementById("map"), ctx = canvas.getContext("2d"), tip = document.getElementById("tip");
let selected = null, pad = 20;
const colour = (p) => DATA.palette[p.c] || "#999";
const esc = (s) => String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;","'":"&#39;"}[c]));
function xy(p) { return [pad + p.x * (canvas.width - 2 * pad), pad + (1 - p.y) * (canvas.height - 2 * pad)]; }
function draw() {
  canvas.width = canvas.clientWidth * devicePixelRatio; canvas.height = canvas.clientHeight * devicePixelRatio;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const r = Math.max(2, Math.min(7, 300 / Math.sqrt(P.length))) * devicePixelRatio;
  const near = selected && selected.nn ? new Set(selected.nn.map(n => n[0])) : new Set();
  for (const p of P) { const [x, y] = xy(p); ctx.globalAlpha = selected ? (p === selected || near.has(p.i) ? 1 : .25) : .85;
    ctx.fillStyle = colour(p); ctx.beginPath(); ctx.arc(x, y, r, 0, 7); ctx.fill(); }
  ctx.globalAlpha = 1;
  if (selected) { const [x, y] = xy(selected); ctx.strokeStyle = "#000"; ctx.lineWidth = 2; ctx.beginPath(); ctx.arc(x, y, r + 4, 0, 7); ctx.stroke(); }
}
function nearest(e) {
  const b = canvas.getBoundingClientRect(), mx = (e.clientX - b.left) * devicePixelRatio, my = (e.clientY - b.top) * devicePixelRatio;
  let best = null, bd = (12 * devicePixelRatio) ** 2;
  for (const p of P) { const [x, y] = xy(p), d = (x - mx) ** 2 + (y - my) ** 2; if (d < bd) { bd = d; best = p; } }
  return best;
}
canvas.addEventListener("mousemove", (e) => {
  const p = nearest(e);
  if (!p) { tip.style.display = "none"; return; }
  tip.innerHTML = (p.t ? `<img src="${p.t}">` : "") + `<b>${esc(p.name)}</b><br>${esc(p.c || "no class")} · id ${p.id}`;
  Object.assign(tip.style, {display: "block", left: (e.offsetX + 14) + "px", top: (e.offsetY + 14) + "px"});
});
canvas.addEventListener("mouseleave", () => tip.style.display = "none");
canvas.addEventListener("click", (e) => { const p = nearest(e); if (p) select(p); });
function select(p) {
  selected = p; draw();
  let h = `<h2>${esc(p.name)}</h2>` + (p.t ? `<img src="${p.t}" style="max-width:100%">` : "") + `<div>${esc(p.c || "no class")} · id ${p.id}</div>`;
  if (DATA.serve) h += `<p><a href="${esc(DATA.serve)}/#id=${p.id}" target="_blank">open in simsearch serve</a></p>`;
  if (p.nn) h += "<h2>Neighbours</h2>" + p.nn.map(([j, s]) => { const q = P[j];
    return `<div class="nn" data-j="${j}">${q.t ? `<img src="${q.t}">` : ""}<div>${s.toFixed(3)}<br>${esc(q.name)}<br><small>${esc(q.c)}</small></div></div>`; }).join("");
  const side = document.getElementById("side"); side.innerHTML = h;
  side.querySelectorAll(".nn").forEach(el => el.onclick = () => select(P[Number(el.dataset.j)]));
}
document.getElementById("legend").innerHTML = Object.entries(DATA.palette).map(([c, col]) => `<span><i style="background:${col}"></i>${esc(c)}</span>`).join("");
window.addEventListener("resize", draw); draw();
</script></body></html>
"""
