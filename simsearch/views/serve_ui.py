"""The page `simsearch serve` shows at `/`: plain HTML and JavaScript over the /api endpoints.

Kept in a Python string (not a package data file) so an editable or wheel
install always has it, with no build step and no front-end toolchain.
"""
from __future__ import annotations

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>simsearch</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #f6f6f6; }
  header { background: #223; color: #fff; padding: 10px 20px; display: flex; gap: 16px; align-items: baseline; }
  header h1 { font-size: 18px; margin: 0; }
  header .muted { color: #aab; }
  main { display: grid; grid-template-columns: 360px 1fr; gap: 20px; padding: 16px 20px; }
  .panel { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 12px; }
  .controls label { display: block; margin: 8px 0 2px; font-weight: 600; }
  .controls input, .controls select { width: 100%; box-sizing: border-box; }
  .row { display: flex; gap: 6px; }
  #stage { position: relative; display: inline-block; margin-top: 10px; cursor: crosshair; user-select: none; }
  #stage img { display: block; max-width: 334px; max-height: 334px; }
  #sel { position: absolute; border: 2px solid #1e5ae6; background: rgba(30,90,230,.15); display: none; pointer-events: none; }
  .hint { color: #777; font-size: 12px; }
  #status { margin: 6px 0; color: #555; min-height: 1.4em; }
  #status.error { color: #b00; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 12px; }
  .card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; cursor: pointer; }
  .card:hover { border-color: #1e5ae6; box-shadow: 0 1px 4px rgba(0,0,0,.15); }
  .pics { display: flex; gap: 6px; height: 112px; align-items: center; }
  .pics img { max-width: 112px; max-height: 112px; border: 1px solid #eee; }
  .score { font-weight: 600; }
  .card[data-weak="true"] { opacity: .55; filter: grayscale(.8); }
  .weak-label { color: #a33; font-size: 12px; font-weight: 600; }
  .tag { display: inline-block; background: #eef; border-radius: 3px; padding: 0 5px; margin: 1px; font-size: 12px; }
  .tag.pred { background: #dde8ff; }
  .tag.imagenet { background: #eee; color: #555; border: 1px dashed #bbb; }
  .name { font-size: 12px; word-break: break-all; color: #555; }
  .why { font-size: 12px; color: #333; }
  .match { font-size: 11px; color: #777; }
  .controls label.check { font-weight: normal; display: flex; gap: 6px; align-items: center; }
  .controls label.check input { width: auto; }
  [hidden] { display: none !important; }  /* a hidden row stays hidden whatever its display rule */
  #picker { display: grid; grid-template-columns: repeat(auto-fill, 64px); gap: 4px; max-height: 280px; overflow: auto; margin-top: 6px; }
  #picker img { width: 64px; height: 64px; object-fit: cover; cursor: pointer; border: 1px solid #ddd; }
  .pager { display: flex; gap: 6px; align-items: center; margin-top: 6px; }
  .pager span { flex: 1; text-align: center; color: #555; font-size: 12px; }
  #resultbar { display: flex; gap: 12px; align-items: baseline; }
  #resultbar #status { flex: 1; }
  h2 { font-size: 15px; margin: 0 0 8px; }
  #qcontents { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; margin-bottom: 8px; }
  #qcontents .label { font-weight: 600; margin-right: 6px; }
</style></head>
<body>
<header><h1>simsearch</h1><span id="info" class="muted"></span><a class="muted" href="/docs">API</a></header>
<main>
  <section class="panel controls">
    <h2>Query</h2>
    <label for="file">Upload an image</label>
    <input type="file" id="file" accept="image/*">
    <label for="rid">or a record id</label>
    <div class="row"><input type="number" id="rid" min="1" placeholder="id"><button id="go">Search</button></div>
    <div class="row">
      <div style="flex:2"><label for="label">Class filter</label><select id="label"><option value="">all classes</option></select></div>
      <div style="flex:1"><label for="k">Neighbours</label><input type="number" id="k" value="12" min="1" max="200"></div>
    </div>
    <div class="row">
      <div style="flex:2"><label for="dataset">Dataset</label><select id="dataset"><option value="">all datasets</option></select></div>
      <div style="flex:1"><label for="minscore">Min score</label><input type="number" id="minscore" min="0" max="1" step="0.05" placeholder="0..1"></div>
    </div>
    <label for="tag">ImageNet tag</label>
    <input type="search" id="tag" list="tags" placeholder="e.g. espresso" title="only images holding this ImageNet tag (the backbone's whole-image classes)">
    <datalist id="tags"></datalist>
    <label for="under">Under folder</label>
    <input type="text" id="under" placeholder="a folder, as the Folder menu lists it" title="only files under this folder: a name from the picker's Folder menu, or a full path on the server">
    <label class="check" id="objects-row" hidden><input type="checkbox" id="objects"> search with its objects (each box, not the whole image)</label>
    <label class="check" id="training-row" hidden title="the images the localizer learned from are left out of the results by default"><input type="checkbox" id="training"> <span>include the localizer's training images (<span id="training-sets"></span>)</span></label>
    <div id="stage"><img id="qimg" alt="" hidden><div id="sel"></div></div>
    <div class="hint">Drag on the query image to search with just that region
      <span id="boxhint">(matched against every object in the index)</span>.
      <button id="clearbox" hidden>Whole image</button></div>
    <h2 style="margin-top:14px">Pick from the index <span id="pickcount" class="hint"></span></h2>
    <input type="search" id="pickname" placeholder="file name contains…" title="only files whose name contains this text (any case)">
    <div class="row">
      <div style="flex:2"><label for="pickfolder">Folder</label><select id="pickfolder"><option value="">all folders</option></select></div>
      <div style="flex:1"><label for="pickorient">Orientation</label><select id="pickorient"><option value="">any</option></select></div>
    </div>
    <div id="picker"></div>
    <div class="pager"><button id="pickprev" disabled>‹ Prev</button><span id="pickpage"></span><button id="picknext" disabled>Next ›</button></div>
  </section>
  <section>
    <div id="qcontents" hidden></div>
    <div id="resultbar"><div id="status">Upload an image or pick one from the index.</div>
      <a id="export" href="#" hidden title="the neighbours' original image files and results.csv (scores, classes, tags, boxes)">Download results (ZIP)</a></div>
    <div id="results" class="grid"></div>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
// Opened as /?token=...: the server has set a cookie for this page's requests, so the token
// leaves the address bar (and the history) rather than sitting where it can be copied along.
if (new URLSearchParams(location.search).has("token")) history.replaceState(null, "", location.pathname + location.hash);
let query = null;   // {file: File} or {id: number}
let box = null;     // [xmin, ymin, xmax, ymax] in the query image's pixels
let pickOffset = 0; // the picker's page: records from this offset, pickLimit at a time
let pickLimit = 60;
let pickSeq = 0;    // the picker's latest request: answers to older ones are dropped
let lastSearch = null;  // how the shown results were asked for: {url} (a record) or {form} (an upload), for the ZIP

function esc(s) { return String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;","'":"&#39;"}[c])); }
function status(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }

async function api(url, options) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({detail: r.statusText}));
  if (!r.ok) throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
  return body;
}

async function loadInfo() {
  const info = await api("/api/info");
  $("info").textContent = `${info.images} images · ${info.backbone} · ${info.index_type}`;
  $("objects-row").hidden = $("boxhint").hidden = !info.object_search;
  $("training-row").hidden = !(info.training_datasets || []).length;
  $("training-sets").textContent = (info.training_datasets || []).join(", ");
  for (const l of info.labels) { const o = document.createElement("option"); o.value = o.textContent = l; $("label").append(o); }
  for (const d of info.datasets || []) { const o = document.createElement("option"); o.value = o.textContent = d; $("dataset").append(o); }
  for (const t of info.tags || []) { const o = document.createElement("option"); o.value = t; $("tags").append(o); }
  for (const f of info.folders || []) { const o = document.createElement("option"); o.value = f.folder; o.textContent = `${f.folder} (${f.images})`; $("pickfolder").append(o); }
  $("pickfolder").disabled = !(info.folders || []).length;  // every image in one folder: nothing to choose
  for (const w of info.orientations || []) { const o = document.createElement("option"); o.value = o.textContent = w; $("pickorient").append(o); }
  pickLimit = info.picker_page || pickLimit;
  await loadPicker();
}

// The filters as [name, value] pairs: the same names for the search (GET or form) and the picker.
function filters() {
  const pairs = [["label", $("label").value], ["dataset", $("dataset").value],
                 ["min_score", $("minscore").value], ["under", $("under").value.trim()], ["tag", $("tag").value.trim()]];
  return pairs.filter(([, v]) => v !== "");
}

// The picker pages through the whole library on the server: the search's filters, and its own
// (file name, folder, orientation), select; offset and limit choose the page.
async function loadPicker() {
  const own = [["name", $("pickname").value.trim()], ["folder", $("pickfolder").value], ["orientation", $("pickorient").value]];
  const params = new URLSearchParams([["offset", pickOffset], ["limit", pickLimit], ...filters(), ...own.filter(([, v]) => v !== "")]);
  const seq = ++pickSeq;
  const page = await api("/api/records?" + params);
  if (seq !== pickSeq) return;  // a later request (the next keystroke) has the say
  if (page.total && pickOffset >= page.total) { pickOffset = Math.floor((page.total - 1) / pickLimit) * pickLimit; return loadPicker(); }
  const tag = $("tag").value.trim();
  $("pickcount").textContent = `${page.total} image${page.total === 1 ? "" : "s"}` + (tag ? ` tagged ${tag}` : "");
  $("pickpage").textContent = page.total ? `${pickOffset + 1}–${pickOffset + page.records.length} of ${page.total}` : "none match";
  $("pickprev").disabled = pickOffset === 0;
  $("picknext").disabled = pickOffset + page.records.length >= page.total;
  $("picker").replaceChildren(...page.records.map(r => {
    const img = document.createElement("img");
    img.src = r.thumb_url; img.title = `${r.id}: ${r.name}`; img.loading = "lazy";
    img.onclick = () => searchId(r.id);
    return img;
  }));
}

function showQuery(src) {
  const img = $("qimg"); img.hidden = false; img.src = src;
  setBox(null);
}

function setBox(b) {
  box = b; $("clearbox").hidden = !b;
  if (!b) $("sel").style.display = "none";
}

function searchId(id) {
  query = {id: Number(id)}; $("rid").value = id; $("file").value = "";
  showQuery(`/api/records/${id}/image`);
  location.hash = "id=" + id;
  return run();
}

async function run() {
  if (!query) return;
  const k = $("k").value || 12;
  status("Searching…");
  $("export").hidden = true; lastSearch = null;
  try {
    let result;
    if (query.file) {
      const form = new FormData();
      form.append("file", query.file); form.append("k", k);
      for (const [name, value] of filters()) form.append(name, value);
      if (box) form.append("box", box.join(","));
      else if ($("objects").checked) form.append("objects", "true");
      if ($("training").checked) form.append("include_training", "true");
      result = await api("/api/search", {method: "POST", body: form});
      lastSearch = {form};
      $("export").href = "#"; $("export").removeAttribute("download");
    } else {
      const params = new URLSearchParams({id: query.id, k});
      for (const [name, value] of filters()) params.append(name, value);
      if (box) params.set("box", box.join(","));
      else if ($("objects").checked) params.set("objects", "true");
      if ($("training").checked) params.set("include_training", "true");
      result = await api("/api/search?" + params);
      lastSearch = {url: "/api/export?" + params};
      // the same parameters as the search: the server searches again and streams the ZIP straight to disk
      $("export").href = lastSearch.url; $("export").download = `simsearch-id${query.id}.zip`;
    }
    render(result);
    $("export").hidden = !result.neighbours.length;
  } catch (e) { status(e.message, true); $("results").replaceChildren(); $("qcontents").hidden = true; }
}

// An upload's ZIP: the same form posted again (a link cannot carry a file), saved from the response.
async function exportUpload(e) {
  if (!lastSearch || !lastSearch.form) return;
  e.preventDefault();
  const r = await fetch("/api/export", {method: "POST", body: lastSearch.form});
  if (!r.ok) { const body = await r.json().catch(() => ({detail: r.statusText})); status(body.detail, true); return; }
  const a = document.createElement("a");
  a.href = URL.createObjectURL(await r.blob()); a.download = "simsearch-results.zip";
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 60000);
}

function render(result) {
  const n = result.neighbours.length;
  const what = result.query.box ? "region " + result.query.box.join(",")
    : result.mode === "objects" ? `its ${result.query.parts.length} object${result.query.parts.length === 1 ? "" : "s"}` : "whole image";
  const how = {objects: " · objects index", crop: " · region cropped and embedded (no objects in this index)"}[result.mode] || "";
  const shown = filters().map(([name, value]) => `${name === "label" ? "class" : name.replace("_", " ")} ${value}`);
  let text = `${n} neighbour${n === 1 ? "" : "s"} (${what})${how}` + (shown.length ? "; " + shown.join(", ") : "");
  if (n && result.neighbours.every(r => r.weak))
    text += ` · no good match in this index (best score ${result.neighbours[0].score.toFixed(2)}, cutoff ${Number(result.cutoff).toFixed(2)})`;
  const left = result.query.left_out;
  if (result.ranked_by === "learned")
    text += " · ranked by the similarity learned from the index's labels, the nearest in appearance first when a good match (score: how alike they look)";
  if (left) text += ` · left out ${left.images} training images of ${left.datasets.join(", ")} (tick "include the localizer's training images" to see them)`;
  status(text);
  showContents(result.query);
  $("results").replaceChildren(...result.neighbours.map(card));
}

function predictionChip(p) {
  // "unknown": the head's best class scored below its threshold; the chip shows the score, names no class.
  const title = p.label === "unknown" ? "predicted: no class scored above the localizer's threshold" : "predicted";
  return `<span class="tag pred" title="${title}">${esc(p.label)} ${Number(p.score).toFixed(2)}</span>`;
}

function tagChips(tags) {
  return (tags || []).map(t => `<span class="tag imagenet" title="ImageNet tag">${esc(t.label)} ${Number(t.score).toFixed(2)}</span>`).join("");
}

// What the index already holds of the query (as `simsearch query` says it): exact copies by sha256, near ones by score.
function copiesNote(d) {
  if (!d) return "";
  const shown = [];
  if (d.exact && d.exact.length) shown.push(`already indexed as id${d.exact.length > 1 ? "s" : ""} ${d.exact.join(", ")}`);
  if (d.near && d.near.length) shown.push("near-duplicate of " + d.near.map(n => `id ${n.id} (${n.score.toFixed(2)})`).join(", "));
  return shown.length ? `<span class="name copies">${esc(shown.join("; "))}</span> ` : "";
}

// What the engine sees in the query itself, above its neighbours: drawn classes, the localizer's prediction(s), ImageNet tags.
function showContents(q) {
  const classes = [...new Set((q.objects || []).map(o => o.label))].sort().map(c => `<span class="tag">${esc(c)}</span>`).join("");
  const predicted = (q.predictions || []).map(predictionChip).join("");
  const where = q.seen === "stored" ? "stored in the index" : "seen in this image";
  $("qcontents").innerHTML = `<span class="label" title="${where}">In the query:</span>${copiesNote(q.duplicates)}${classes}${predicted || '<span class="name">no localizer prediction</span>'} ${tagChips(q.tags) || '<span class="name">no ImageNet tags</span>'}`;
  $("qcontents").hidden = false;
}

function card(r) {
  const div = document.createElement("div");
  div.className = "card"; div.dataset.id = r.id; div.dataset.weak = r.weak;
  div.title = r.weak ? "Weak match: scores no better than unrelated images of this index. Search from this image"
                     : "Search from this image";
  let tags = r.classes.map(c => `<span class="tag">${esc(c)}</span>`).join("");
  if (r.prediction) tags += predictionChip(r.prediction);
  // ImageNet tags: the backbone's guess at the whole image, shown apart from box classes.
  const imagenet = tagChips(r.tags);
  // The object that matched (object search) or that the reason names: its crop, class and score.
  const m = r.match || (r.why && r.why.object);
  const crop = m ? `<img class="crop matched" src="${r.match_crop_url}" alt="matched object" data-box-id="${m.object_id}">`
    : `<img class="crop" src="${r.crop_url}" alt="crop" title="${esc(r.box.source)}${r.box.label ? ": " + esc(r.box.label) : ""}">`;
  const matched = m ? `<div class="match">matched ${esc(m.label || "object")} ${Number(m.score).toFixed(2)} (${esc(m.source)})</div>` : "";
  div.innerHTML = `
    <div><span class="score">#${r.rank} · ${r.score.toFixed(3)}</span> <span class="name">id ${r.id}</span>${r.weak ? ' <span class="weak-label">weak match</span>' : ""}</div>
    <div class="pics"><img class="thumb" src="${r.thumb_url}" alt="thumbnail">${crop}</div>
    ${matched}<div class="why">why: ${esc(r.why ? r.why.text : "whole image")}</div>
    <div>${tags || '<span class="name">no classes</span>'}</div>
    <div class="imagenet-tags">${imagenet}</div>
    <div class="name">${esc(r.name)} · <a href="${r.overlay_url}" target="_blank">full image</a></div>`;
  div.querySelector("a").onclick = (e) => e.stopPropagation();
  div.onclick = () => { window.scrollTo(0, 0); searchId(r.id); };
  return div;
}

// Drawing a box: screen coordinates on the shown image, scaled to its natural pixels.
(function () {
  const stage = $("stage"), img = $("qimg"), sel = $("sel");
  let start = null;
  const pos = (e) => { const r = img.getBoundingClientRect();
    return [Math.min(Math.max(e.clientX - r.left, 0), r.width), Math.min(Math.max(e.clientY - r.top, 0), r.height)]; };
  stage.addEventListener("mousedown", (e) => { if (img.hidden) return; e.preventDefault(); start = pos(e); });
  window.addEventListener("mousemove", (e) => {
    if (!start) return; const p = pos(e);
    Object.assign(sel.style, {display: "block", left: Math.min(start[0], p[0]) + "px", top: Math.min(start[1], p[1]) + "px",
      width: Math.abs(p[0] - start[0]) + "px", height: Math.abs(p[1] - start[1]) + "px"});
  });
  window.addEventListener("mouseup", (e) => {
    if (!start) return; const p = pos(e), s = start; start = null;
    if (Math.abs(p[0] - s[0]) < 6 || Math.abs(p[1] - s[1]) < 6) { sel.style.display = "none"; return; }
    const fx = img.naturalWidth / img.clientWidth, fy = img.naturalHeight / img.clientHeight;
    setBox([Math.round(Math.min(s[0], p[0]) * fx), Math.round(Math.min(s[1], p[1]) * fy),
            Math.round(Math.max(s[0], p[0]) * fx), Math.round(Math.max(s[1], p[1]) * fy)]);
    run();
  });
})();

$("file").onchange = () => {
  const f = $("file").files[0]; if (!f) return;
  query = {file: f}; $("rid").value = ""; location.hash = "";
  showQuery(URL.createObjectURL(f)); run();
};
$("go").onclick = () => { if ($("rid").value) searchId($("rid").value); };
$("rid").onkeydown = (e) => { if (e.key === "Enter") $("go").click(); };
const repick = () => { pickOffset = 0; loadPicker().catch(e => status(e.message, true)); };
for (const id of ["label", "dataset", "minscore", "under", "tag"]) $(id).onchange = () => { repick(); run(); };
for (const id of ["pickfolder", "pickorient"]) $(id).onchange = repick;
$("pickname").oninput = repick;
$("pickprev").onclick = () => { pickOffset = Math.max(0, pickOffset - pickLimit); loadPicker().catch(e => status(e.message, true)); };
$("picknext").onclick = () => { pickOffset += pickLimit; loadPicker().catch(e => status(e.message, true)); };
$("export").onclick = (e) => { exportUpload(e).catch(err => status(err.message, true)); };
$("k").onchange = run;
$("clearbox").onclick = () => { setBox(null); run(); };
$("objects").onchange = () => { setBox(null); run(); };
$("training").onchange = run;

loadInfo().then(() => {
  const m = location.hash.match(/id=(\d+)/);
  if (m) searchId(m[1]);
}).catch(e => status(e.message, true));
</script>
</body></html>
"""
