"""A query's result as one self-contained HTML page: the query, then its neighbours.

Pictures (thumbnails and box crops) are embedded as data URIs, so the page can be
mailed or moved; each card links to the full image by a path relative to the
page, which works while the page sits beside the data it was made from.
"""
from __future__ import annotations

import base64
import html
import os
import urllib.parse
from pathlib import Path

from simsearch.views.output import output_file, write_text
from simsearch.records import GroundTruthObject, Prediction, Tag, UNKNOWN
from simsearch.retrieval.contents import QueryContents
from simsearch.retrieval.objects import QueryPart
from simsearch.retrieval.searcher import QueryResult
from simsearch.pipeline.read import open_image
from simsearch.views.render import Box, Renderer, crop, jpeg_bytes, match_box, overlay, record_box, thumbnail

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; }
.muted { color: #666; }
.query { display: flex; gap: 16px; align-items: flex-start; margin: 16px 0 24px; }
.query img { max-width: 320px; max-height: 320px; border: 1px solid #ccc; background: #fff; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 14px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; }
.pics { display: flex; gap: 6px; align-items: flex-end; margin: 4px 0; }
.pics img { max-width: 128px; max-height: 128px; border: 1px solid #eee; display: block; margin: 0 auto; }
.pics figure { margin: 0; text-align: center; }
.pics figcaption { font-size: 11px; color: #888; }
.score { font-weight: 600; }
.path { font-size: 12px; word-break: break-all; }
.tag { display: inline-block; background: #eef; border-radius: 3px; padding: 0 5px; margin: 1px; font-size: 12px; }
.tag.pred { background: #dde8ff; }
.tag.imagenet { background: #eee; color: #555; border: 1px dashed #bbb; }
.why { font-size: 12px; color: #444; margin-top: 2px; }
.query .pics img { max-width: 160px; max-height: 160px; }
.card[data-weak="true"] { opacity: 0.55; filter: grayscale(0.8); }
.weak-label { color: #a33; font-size: 12px; font-weight: 600; }
.no-match { color: #a33; margin: 0 0 12px; }
.contents { margin: 4px 0; }
.left-out { color: #666; margin: 0 0 12px; font-size: 12px; }
.copies { color: #7a4b00; font-weight: 600; margin: 2px 0; }
"""


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def relative_link(target: str | os.PathLike, page: Path) -> str:
    """A URL from the page's folder to `target` (relative, so the pair can move together)."""
    rel = os.path.relpath(Path(target).resolve(), page.resolve().parent)
    return urllib.parse.quote(Path(rel).as_posix())


def render_query_page(index_dir: str | os.PathLike, result: QueryResult, page_path: str | os.PathLike) -> str:
    """The HTML text of the result page that will live at `page_path`."""
    page = Path(page_path)
    renderer = Renderer(index_dir)
    query_path = result.query["path"]
    e = html.escape
    boxed = [p for p in result.parts if p.box is not None]
    part_crops: list[tuple[QueryPart, bytes]] = []
    if boxed:  # an object query: its boxes drawn on it, and each cropped
        query_jpeg, part_crops = _query_boxes(query_path, boxed)
    elif result.record is not None:
        query_jpeg = renderer.thumb(result.record)
    else:  # an outside file: not cached, it belongs to no record
        query_jpeg = jpeg_bytes(thumbnail(open_image(query_path, draft=lambda w, h: (320, 320)), 320))
    parts_html = "".join(
        f'<figure><img class="part" data-source="{e(p.source)}" alt="query box" src="{data_uri(jpeg)}">'
        f"<figcaption>{e(_part_caption(p))}</figcaption></figure>" for p, jpeg in part_crops)
    cards = []
    for n in result.neighbours:
        record = n.record
        # The object that matched (object queries), or the one the reason names: the crop shows what the why says.
        shown = n.match if n.match is not None else (n.why.match if n.why is not None else None)
        box = match_box(shown, record) if shown is not None else record_box(record)
        tags = "".join(f'<span class="tag">{e(c)}</span>' for c in record.classes)
        tags += _prediction_chips([record.prediction] if record.prediction else [])
        # ImageNet tags are the backbone's guess at the whole image, not a box class: shown apart.
        imagenet_tags = _tag_chips(record.tags)
        if shown is not None:
            crop_caption = f"matched {shown.label or 'object'} {shown.score:.2f} ({shown.source})"
        else:
            crop_caption = (f"{box.source} box{': ' + box.label if box.label else ''}" if box.source != "image"
                            else "no box: whole image")
        matched = f' data-box-id="{shown.id}"' if shown is not None else ""
        why = n.why.text if n.why is not None else "whole image"
        weak = (f' <span class="weak-label" title="below this index\'s cutoff {result.cutoff:.3f}: no better than '
                f'unrelated images score">weak match</span>' if n.weak else "")
        learned = (f' <span class="muted" title="the learned similarity\'s score, which set this order">learned '
                   f'{n.learned:.3f}</span>' if n.learned is not None else "")
        cards.append(f"""
<div class="card" data-rank="{n.rank}" data-id="{n.id}" data-weak="{str(n.weak).lower()}">
  <div><span class="score">#{n.rank} &middot; {n.score:.3f}</span>{learned} <span class="muted">id {n.id}</span>{weak}</div>
  <div class="pics">
    <figure><img class="thumb" alt="thumbnail of {e(Path(record.path).name)}" src="{data_uri(renderer.thumb(record))}"><figcaption>image</figcaption></figure>
    <figure><img class="crop" data-source="{e(box.source)}"{matched} alt="box crop" src="{data_uri(renderer.crop(record, box))}"><figcaption>{e(crop_caption)}</figcaption></figure>
  </div>
  <div class="why">why: {e(why)}</div>
  <div>{tags or '<span class="muted">no classes</span>'}</div>
  <div class="imagenet-tags">{imagenet_tags}</div>
  <div class="path"><a href="{relative_link(record.path, page)}">{e(Path(record.path).name)}</a> <span class="muted">{record.width}&times;{record.height}</span></div>
</div>""")
    title = (f"Objects like {'your box' if boxed[0].source == 'drawn' else 'those'} in {Path(query_path).name}"
             if boxed else f"Images like {Path(query_path).name}")
    cutoff = f" &middot; weak below {result.cutoff:.3f}" if result.cutoff is not None else ""
    if result.ranked_by == "learned":
        cutoff += (" &middot; ranked by the similarity learned from the index's labels, the nearest in appearance "
                   "first when a good match")
    note = ""
    if result.left_out is not None:
        note += (f'<div class="left-out" id="left-out">Left out {result.left_out.images} training images of '
                 f'{e(", ".join(result.left_out.datasets))} (the localizer learned from them); '
                 f'query with --include-training to see them.</div>')
    if result.no_good_match:
        note += (f'<div class="no-match" id="no-good-match">No good match in this index: the best score, '
                f'{result.neighbours[0].score:.3f}, is below its cutoff {result.cutoff:.3f}.</div>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>{e(title)}</h1>
<div class="muted">index {e(str(index_dir))} &middot; {len(result.neighbours)} neighbours &middot; score = cosine similarity{cutoff}</div>
<div class="query"><img id="query" alt="query image" src="{data_uri(query_jpeg)}">
  <div><div><b>query</b></div><div class="path"><a href="{relative_link(query_path, page)}">{e(str(query_path))}</a></div>
  {_contents_html(result.contents)}
  <div class="pics">{parts_html}</div></div></div>
{note}<div class="grid">{''.join(cards)}
</div>
</body></html>
"""


def _prediction_chips(predictions: list[Prediction]) -> str:
    """The localizer's chips; "unknown" is a score, not a class, and its title says so rather than name one."""
    chips = []
    for p in predictions:
        title = "predicted: no class scored above the localizer's threshold" if p.label == UNKNOWN else "predicted"
        chips.append(f'<span class="tag pred" title="{title}">{html.escape(p.label)} {p.score:.2f}</span>')
    return "".join(chips)


def _tag_chips(tags: list[Tag]) -> str:
    return "".join(f'<span class="tag imagenet" title="ImageNet tag">{html.escape(t.label)} {t.score:.2f}</span>'
                   for t in tags)


def _contents_html(contents: QueryContents | None) -> str:
    """What the engine sees in the query, above its neighbours: drawn classes, the prediction(s), ImageNet tags."""
    if contents is None:
        return ""
    classes = "".join(f'<span class="tag">{html.escape(c)}</span>' for c in sorted({o.label for o in contents.objects}))
    seen = "stored in the index" if contents.seen == "stored" else "seen in this image"
    chips = classes + _prediction_chips(contents.predictions) or '<span class="muted">no localizer prediction</span>'
    tags = _tag_chips(contents.tags) or '<span class="muted">no ImageNet tags</span>'
    copies = (f'<div class="copies" id="query-copies" title="the index holds these very bytes (left out of the '
              f'neighbours below), or files scoring at least {contents.copies.threshold:.2f}">'
              f'{html.escape(contents.copies.text())}</div>' if contents.copies else "")
    return (f'<div class="contents" id="query-contents" data-seen="{contents.seen}" title="{seen}">{copies}'
            f'<div>{chips}</div><div class="imagenet-tags">{tags}</div></div>')


def _part_caption(part: QueryPart) -> str:
    """'your box' for a drawn box, 'your chair (truth)' for one of the query's own objects."""
    return part.describe() + (f" ({part.source})" if part.source != "drawn" else "")


def _query_boxes(path: str | os.PathLike, parts: list[QueryPart]) -> tuple[bytes, list[tuple[QueryPart, bytes]]]:
    """The query image with its boxes drawn (320 px), and a crop of each box (160 px)."""
    image = open_image(path, draft=lambda w, h: (640, 640))  # a reduced decode: boxes are scaled onto it
    full_w, full_h = image.info.get("full_size", image.size)
    sx, sy = image.width / full_w, image.height / full_h
    drawn = overlay(image, [GroundTruthObject(p.label or "your box", *p.box) for p in parts])
    crops = [(p, jpeg_bytes(thumbnail(crop(image, Box(p.box[0] * sx, p.box[1] * sy, p.box[2] * sx, p.box[3] * sy)),
                                      160))) for p in parts]
    return jpeg_bytes(thumbnail(drawn, 320)), crops


def write_query_page(index_dir: str | os.PathLike, result: QueryResult, out: str | os.PathLike) -> Path:
    """Write the result page to `out` (its folder is created); returns the path written."""
    out = output_file(out)
    return write_text(out, render_query_page(index_dir, result, out))
