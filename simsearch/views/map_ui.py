"""The page template of map.html: plain canvas 2-D drawing and JavaScript, nothing fetched from a network.

Kept in a Python string (not a package data file), as serve_ui is, so every
install has it. `map_page` fills in __TITLE__ and __DATA__. Drawing is one pass
over the points in colour order, culled to the view, written straight into the
canvas's pixels; hover looks up a uniform grid of the points, so both stay fast
at 100k points. `window.MAP` exposes the view and the selection for the browser test.
"""
from __future__ import annotations

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="referrer" content="no-referrer">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; display: flex; height: 100vh; color: #222; }
  #wrap { flex: 1; position: relative; overflow: hidden; }
  canvas { width: 100%; height: 100%; display: block; background: #fff; cursor: crosshair; }
  canvas.dragging { cursor: grabbing; }
  #tip { position: absolute; pointer-events: none; background: #fff; border: 1px solid #bbb; padding: 4px;
         box-shadow: 0 2px 6px rgba(0,0,0,.2); display: none; font-size: 12px; max-width: 220px; z-index: 2; }
  #tip img { display: block; max-width: 120px; max-height: 120px; }
  #tools { position: absolute; top: 8px; left: 8px; display: flex; gap: 4px; align-items: center; z-index: 1;
           background: rgba(255,255,255,.85); padding: 4px 6px; border-radius: 4px; font-size: 12px; }
  #tools button { min-width: 28px; }
  aside { width: 320px; overflow: auto; border-left: 1px solid #ddd; padding: 12px; background: #fafafa; }
  aside h2 { font-size: 15px; margin: 0 0 8px; word-break: break-all; }
  aside label { display: block; font-weight: 600; margin: 10px 0 2px; }
  aside input, aside select { width: 100%; box-sizing: border-box; }
  .nn, .hit { display: flex; gap: 8px; align-items: center; margin: 4px 0; cursor: pointer; }
  .nn img { width: 64px; height: 64px; object-fit: contain; background: #fff; border: 1px solid #ddd; }
  .hit:hover, .nn:hover, #legend span:hover { background: #eef; }
  #legend span { display: inline-block; margin: 2px 6px 2px 0; font-size: 12px; cursor: pointer; padding: 0 2px; }
  #legend span.on { outline: 1px solid #333; }
  #legend i { display: inline-block; width: 10px; height: 10px; margin-right: 3px; border-radius: 50%; }
  .muted { color: #777; font-size: 12px; }
</style></head><body>
<div id="wrap"><canvas id="map"></canvas><div id="tip"></div>
<div id="tools"><button id="zoom-in" title="zoom in">+</button><button id="zoom-out" title="zoom out">&minus;</button>
<button id="fit" title="show the whole map">fit</button><span id="view-status"></span></div></div>
<aside><h2>__TITLE__</h2>
<label for="find">Find by name</label><input id="find" type="search" placeholder="part of a file name, Enter to go" autocomplete="off">
<div id="find-status" class="muted"></div><div id="hits"></div>
<label for="colour-by">Colour by</label><select id="colour-by"></select>
<div id="legend"></div>
<p class="muted" id="help">Scroll to zoom at the pointer, drag to pan, double-click to zoom into a clump.
Hover a point for its image; click it for details. Click a legend entry to pick out its points.</p>
<div id="side"></div></aside>
<script>
"use strict";
const D = __DATA__;
const N = D.ids.length, X = Float32Array.from(D.x), Y = Float32Array.from(D.y);
const LOWER = D.names.map(s => s.toLowerCase());
const THUMBS = new Map(D.thumbs.rows.map((r, k) => [r, D.thumbs.urls[k]]));
const canvas = document.getElementById("map"), ctx = canvas.getContext("2d"), tip = document.getElementById("tip");
const esc = (s) => String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;","'":"&#39;"}[c]));
const GREY = "#9a9a9a", PAD = 24, MAX_ZOOM = 50000;
const BASE_R = Math.max(1.2, Math.min(5, 250 / Math.sqrt(N)));  // point radius (CSS px) at zoom 1
let W = 0, H = 0, fitScale = 1, pending = false;
const view = {scale: 1, tx: 0, ty: 0};
const state = {field: Object.keys(D.fields)[0], selected: -1, mark: null, markCount: 0, markWhat: "", legendValue: -1};
let order = null;  // point indexes sorted by colour, rebuilt when the field changes

// ---- the grid for hit-testing: G x G cells over the unit square, each cell's points contiguous in CELLS
const G = Math.max(1, Math.ceil(Math.sqrt(N / 4)));
const cellOf = (i) => Math.min(G - 1, Math.max(0, Math.floor(X[i] * G))) * G + Math.min(G - 1, Math.max(0, Math.floor(Y[i] * G)));
const START = new Int32Array(G * G + 1), CELLS = new Int32Array(N);
for (let i = 0; i < N; i++) START[cellOf(i) + 1]++;
for (let c = 0; c < G * G; c++) START[c + 1] += START[c];
{ const fill = START.slice(0, G * G); for (let i = 0; i < N; i++) CELLS[fill[cellOf(i)]++] = i; }

const sx = (i) => X[i] * view.scale + view.tx, sy = (i) => (1 - Y[i]) * view.scale + view.ty;
const zoom = () => view.scale / fitScale;
function fieldColour(f, v) { return f.colours[v] || GREY; }
function packedColours(f, alpha) {  // each value's colour as one little-endian RGBA pixel
  return Uint32Array.from(f.values, (_, v) => { const c = fieldColour(f, v);
    return ((alpha << 24) | (parseInt(c.slice(5, 7), 16) << 16) | (parseInt(c.slice(3, 5), 16) << 8) | parseInt(c.slice(1, 3), 16)) >>> 0; });
}
function buildOrder() {
  const of = D.fields[state.field].of;
  order = Int32Array.from({length: N}, (_, i) => i).sort((a, b) => of[a] - of[b]);
}
function resize() {
  const dpr = devicePixelRatio || 1, b = canvas.getBoundingClientRect();
  const first = W === 0;
  const cx = first ? 0.5 : (W / 2 - view.tx) / view.scale, cy = first ? 0.5 : (H / 2 - view.ty) / view.scale, z = first ? 1 : zoom();
  W = b.width; H = b.height; canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  fitScale = Math.max(1, Math.min(W, H) - 2 * PAD);
  view.scale = fitScale * z; view.tx = W / 2 - cx * view.scale; view.ty = H / 2 - cy * view.scale;
  draw();
}
function fit() { view.scale = fitScale; view.tx = (W - fitScale) / 2; view.ty = (H - fitScale) / 2; redraw(); }
function zoomAt(mx, my, factor) {
  const scale = Math.min(fitScale * MAX_ZOOM, Math.max(fitScale * 0.5, view.scale * factor)), k = scale / view.scale;
  view.tx = mx - (mx - view.tx) * k; view.ty = my - (my - view.ty) * k; view.scale = scale; redraw();
}
function centreOn(i, z) {
  view.scale = Math.min(fitScale * MAX_ZOOM, Math.max(view.scale, fitScale * z));
  view.tx = W / 2 - X[i] * view.scale; view.ty = H / 2 - (1 - Y[i]) * view.scale; redraw();
}
function fitRows(rows) {  // zoom to the box around these points
  let x0 = 1, x1 = 0, y0 = 1, y1 = 0;
  for (const i of rows) { x0 = Math.min(x0, X[i]); x1 = Math.max(x1, X[i]); y0 = Math.min(y0, Y[i]); y1 = Math.max(y1, Y[i]); }
  const span = Math.max(x1 - x0, y1 - y0, 1 / MAX_ZOOM);
  view.scale = Math.min(fitScale * MAX_ZOOM, Math.max(fitScale, (Math.min(W, H) - 2 * PAD) / span));
  view.tx = W / 2 - (x0 + x1) / 2 * view.scale; view.ty = H / 2 - (1 - (y0 + y1) / 2) * view.scale; redraw();
}
function redraw() { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; draw(); }); } }
function radius() { return Math.min(3 * BASE_R + 4, BASE_R * Math.pow(zoom(), 0.35)); }
function draw() {
  if (!W || !H) return;  // not laid out (a hidden tab): nothing to draw into
  ctx.clearRect(0, 0, W, H);
  const f = D.fields[state.field], of = f.of, r = radius(), mark = state.mark;
  const dimmed = mark !== null || state.selected >= 0;
  // The points are written straight into the pixels (one Uint32 a pixel, no path per point): at 100k points
  // that is several times faster than a fillRect each. Later points overwrite earlier ones.
  const dpr = canvas.width / W, cw = canvas.width, ch = canvas.height, image = ctx.createImageData(cw, ch);
  const pixels = new Uint32Array(image.data.buffer), alpha = dimmed ? 77 : 217, packed = packedColours(f, alpha);
  const half = Math.max(0.5, r * dpr);
  let inView = 0;
  for (let k = 0; k < N; k++) {
    const i = order[k], x = sx(i) * dpr, y = sy(i) * dpr;
    if (x < -half || y < -half || x >= cw + half || y >= ch + half) continue;
    inView++;
    const value = packed[of[i]];
    const y0 = Math.max(0, Math.round(y - half)), y1 = Math.min(ch, Math.round(y + half));
    for (let py = y0; py < y1; py++) {  // a disc: each row as wide as the circle is there
      const dy = py + 0.5 - y, w = half < 2 ? half : Math.sqrt(Math.max(0, half * half - dy * dy));
      const x0 = Math.max(0, Math.round(x - w)), x1 = Math.min(cw, Math.round(x + w));
      if (x1 > x0) pixels.fill(value, py * cw + x0, py * cw + x1);
    }
  }
  ctx.putImageData(image, 0, 0);
  const near = state.selected >= 0 && D.nn ? D.nn[state.selected].map(n => n[0]) : [];
  const ring = (i, rr, colour, width) => { ctx.strokeStyle = colour; ctx.lineWidth = width; ctx.beginPath();
    ctx.arc(sx(i), sy(i), rr, 0, 2 * Math.PI); ctx.stroke(); };
  const dot = (i) => { ctx.fillStyle = fieldColour(f, of[i]); ctx.beginPath(); ctx.arc(sx(i), sy(i), r, 0, 2 * Math.PI); ctx.fill(); };
  if (mark !== null) for (let i = 0; i < N; i++) if (mark[i]) { dot(i); if (state.markCount <= 2000) ring(i, r + 2, "#222", 1); }
  for (const i of near) { dot(i); ring(i, r + 3, "#1565c0", 2); }
  if (state.selected >= 0) { const i = state.selected; dot(i); ring(i, r + 5, "#000", 3); ring(i, r + 9, "#ffeb3b", 3); }
  document.getElementById("view-status").textContent =
    `zoom ${zoom() < 10 ? zoom().toFixed(1) : Math.round(zoom()).toLocaleString()}x · ${inView.toLocaleString()} of ${N.toLocaleString()} points in view`;
}
function nearest(mx, my) {
  const u = (mx - view.tx) / view.scale, v = 1 - (my - view.ty) / view.scale, rad = Math.max(8, radius() + 2) / view.scale;
  const c0 = Math.max(0, Math.floor((u - rad) * G)), c1 = Math.min(G - 1, Math.floor((u + rad) * G));
  const r0 = Math.max(0, Math.floor((v - rad) * G)), r1 = Math.min(G - 1, Math.floor((v + rad) * G));
  let best = -1, bd = rad * rad;
  for (let c = c0; c <= c1; c++) for (let r = r0; r <= r1; r++) {
    const cell = c * G + r;
    for (let k = START[cell]; k < START[cell + 1]; k++) {
      const i = CELLS[k], dd = (X[i] - u) ** 2 + (Y[i] - v) ** 2;
      if (dd < bd) { bd = dd; best = i; }
    }
  }
  return best;
}
function thumbHtml(i, big) {
  const t = THUMBS.get(i), style = big ? ' style="max-width:100%"' : "";
  if (t) return `<img src="${t}"${style}>`;
  if (D.serve) return `<img src="${esc(D.serve)}/api/records/${D.ids[i]}/thumb"${style} onerror="this.remove()">`;
  return "";
}
function describe(i) {
  return Object.entries(D.fields).filter(([name]) => name !== "folder" || D.fields.folder.values.length > 1)
    .map(([name, f]) => `${name}: ${esc(f.values[f.of[i]])}`).join("<br>");
}
// ---- pointer: hover shows the image, drag pans, wheel and double-click zoom, click selects
let drag = null;
canvas.addEventListener("mousedown", (e) => { drag = {x: e.offsetX, y: e.offsetY, tx: view.tx, ty: view.ty, moved: false}; });
window.addEventListener("mouseup", () => { canvas.classList.remove("dragging"); setTimeout(() => drag = null, 0); });
canvas.addEventListener("mousemove", (e) => {
  if (drag && e.buttons === 1) {
    const dx = e.offsetX - drag.x, dy = e.offsetY - drag.y;
    if (drag.moved || Math.abs(dx) + Math.abs(dy) > 3) {
      drag.moved = true; canvas.classList.add("dragging"); tip.style.display = "none";
      view.tx = drag.tx + dx; view.ty = drag.ty + dy; redraw(); return;
    }
  }
  const i = nearest(e.offsetX, e.offsetY);
  if (i < 0) { tip.style.display = "none"; return; }
  const note = THUMBS.has(i) || D.serve ? "" : `<br><span class="muted">thumbnail not inlined (map.html inlines ${D.thumbs.cap.toLocaleString()})</span>`;
  tip.innerHTML = thumbHtml(i, false) + `<b>${esc(D.names[i])}</b><br>${describe(i)}<br>id ${D.ids[i]}${note}`;
  Object.assign(tip.style, {display: "block", left: Math.min(e.offsetX + 14, W - 230) + "px", top: Math.min(e.offsetY + 14, H - 200) + "px"});
});
canvas.addEventListener("mouseleave", () => tip.style.display = "none");
canvas.addEventListener("click", (e) => { if (drag && drag.moved) return; const i = nearest(e.offsetX, e.offsetY); if (i >= 0) select(i); });
canvas.addEventListener("dblclick", (e) => { e.preventDefault(); zoomAt(e.offsetX, e.offsetY, 4); });
canvas.addEventListener("wheel", (e) => { e.preventDefault(); zoomAt(e.offsetX, e.offsetY, Math.exp(-e.deltaY * (e.deltaMode === 1 ? 33 : 1) * 0.002)); }, {passive: false});
document.getElementById("zoom-in").onclick = () => zoomAt(W / 2, H / 2, 2);
document.getElementById("zoom-out").onclick = () => zoomAt(W / 2, H / 2, 0.5);
document.getElementById("fit").onclick = fit;

function select(i) {
  state.selected = i; redraw();
  let h = `<h2>${esc(D.names[i])}</h2>` + thumbHtml(i, true) + `<div>${describe(i)}<br>id ${D.ids[i]}</div>`;
  if (D.serve) h += `<p><a href="${esc(D.serve)}/#id=${D.ids[i]}" target="_blank">open in simsearch serve</a></p>`;
  if (D.nn) h += "<h2>Neighbours</h2>" + D.nn[i].map(([j, s]) =>
    `<div class="nn" data-j="${j}">${thumbHtml(j, false)}<div>${s.toFixed(3)}<br>${esc(D.names[j])}</div></div>`).join("");
  const side = document.getElementById("side"); side.innerHTML = h;
  side.querySelectorAll(".nn").forEach(el => el.onclick = () => { const j = Number(el.dataset.j); select(j); centreOn(j, 1); });
}
function setMark(rows, what) {
  if (rows === null) { state.mark = null; state.markCount = 0; state.markWhat = ""; redraw(); return; }
  const mark = new Uint8Array(N); for (const i of rows) mark[i] = 1;
  state.mark = mark; state.markCount = rows.length; state.markWhat = what; redraw();
}
// ---- find by name
const find = document.getElementById("find");
function matches(q) {
  const out = []; for (let i = 0; i < N; i++) if (LOWER[i].includes(q)) out.push(i); return out;
}
function runFind(go) {
  const q = find.value.trim().toLowerCase(), status = document.getElementById("find-status"), hits = document.getElementById("hits");
  state.legendValue = -1; legend();
  if (!q) { setMark(null); status.textContent = ""; hits.innerHTML = ""; return; }
  const rows = matches(q);
  setMark(rows, "name");
  status.textContent = rows.length ? `${rows.length.toLocaleString()} match${rows.length > 1 ? "es" : ""}` : "no image has that in its name";
  hits.innerHTML = rows.slice(0, 50).map(i => `<div class="hit" data-i="${i}">${esc(D.names[i])}</div>`).join("")
    + (rows.length > 50 ? `<div class="muted">and ${(rows.length - 50).toLocaleString()} more</div>` : "");
  hits.querySelectorAll(".hit").forEach(el => el.onclick = () => { const i = Number(el.dataset.i); select(i); centreOn(i, 8); });
  if (go && rows.length) {
    const exact = rows.find(i => LOWER[i] === q);
    const i = exact !== undefined ? exact : rows[0];
    select(i);
    if (rows.length === 1 || exact !== undefined) centreOn(i, 8); else fitRows(rows);
  }
}
let findTimer = 0;
find.addEventListener("input", () => { clearTimeout(findTimer); findTimer = setTimeout(() => runFind(false), N > 20000 ? 150 : 0); });
find.addEventListener("keydown", (e) => { if (e.key === "Enter") { clearTimeout(findTimer); runFind(true); } });
// ---- colour by
const colourBy = document.getElementById("colour-by");
colourBy.innerHTML = Object.entries(D.fields).map(([name, f]) => `<option value="${name}">${name} (${f.values.length})</option>`).join("");
colourBy.onchange = () => { state.field = colourBy.value; state.legendValue = -1; if (state.markWhat === "legend") setMark(null); buildOrder(); legend(); redraw(); };
function legend() {
  const f = D.fields[state.field], shown = [], other = [];
  f.values.forEach((v, k) => (f.colours[k] ? shown : other).push(k));
  const item = (k, label, colour, count) =>
    `<span data-k="${k}" class="${state.legendValue === k ? "on" : ""}"><i style="background:${colour}"></i>${esc(label)} (${count.toLocaleString()})</span>`;
  let h = shown.map(k => item(k, f.values[k], f.colours[k], f.counts[k])).join("");
  if (other.length) h += item(-2, other.length === 1 ? f.values[other[0]] : `${other.length.toLocaleString()} others`, GREY,
                              other.reduce((s, k) => s + f.counts[k], 0));
  const el = document.getElementById("legend"); el.innerHTML = h;
  el.querySelectorAll("span").forEach(s => s.onclick = () => {
    const k = Number(s.dataset.k);
    if (state.legendValue === k) { state.legendValue = -1; setMark(null); legend(); return; }
    state.legendValue = k; find.value = ""; document.getElementById("find-status").textContent = ""; document.getElementById("hits").innerHTML = "";
    const rows = []; for (let i = 0; i < N; i++) if (k === -2 ? !f.colours[f.of[i]] : f.of[i] === k) rows.push(i);
    setMark(rows, "legend"); legend();
  });
}
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") { state.selected = -1; find.value = ""; runFind(false); document.getElementById("side").innerHTML = ""; }
});
window.MAP = {view, state, D, sx, sy, zoom, nearest, draw, radius, indexOfId: (id) => D.ids.indexOf(id),
              colourOf: (i) => fieldColour(D.fields[state.field], D.fields[state.field].of[i])};
buildOrder(); legend();
new ResizeObserver(resize).observe(canvas);
resize();
</script></body></html>
"""
