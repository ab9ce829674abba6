"""The most similar pairs of distinct images in an index (the seed's Figure 5).

Byte-identical files (same sha256) are not a finding, so they are skipped. The
global top-n pairs are found exactly from each record's top neighbours: if
(a, b) is among the n best pairs, b is among a's n best distinct neighbours.
"""
from __future__ import annotations

import heapq
import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from simsearch.storage import faiss_index
from simsearch.errors import BadInputError
from simsearch.search.searcher import Searcher
from simsearch.views.render import Renderer, font, record_box

log = logging.getLogger(__name__)


@dataclass
class Pair:
    rank: int
    score: float  # cosine similarity of the two images
    a_id: int
    a_path: str
    b_id: int
    b_path: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def most_similar_pairs(index_dir: str | os.PathLike, n: int = 10, batch: int = 4096) -> list[Pair]:
    """The `n` highest-scoring pairs of records whose files differ, best first."""
    if n < 1:
        raise BadInputError("--n must be at least 1")
    started = time.perf_counter()
    searcher = Searcher(index_dir)
    try:
        store = searcher.store
        ids, xb = store.vectors()
        if len(ids) < 2:
            raise BadInputError(f"{index_dir} holds {len(ids)} image(s); pairs need at least 2")
        sha = {i: s for i, s in store.db.execute("SELECT id, sha256 FROM images")}
        # Enough neighbours per record that n distinct-file ones survive dropping duplicates.
        biggest_group = store.db.execute(
            "SELECT max(c) FROM (SELECT count(*) AS c FROM images GROUP BY sha256)").fetchone()[0] or 1
        k = int(min(len(ids), n + biggest_group))
        # A min-heap of the n best pairs so far: memory stays O(n) however large the index,
        # and a row stops at its first neighbour that cannot beat the n-th best.
        heap: list[tuple[float, tuple[int, int]]] = []
        kept: set[tuple[int, int]] = set()
        for start in range(0, len(ids), batch):
            scores, hits = faiss_index.search(searcher.index, xb[start:start + batch], k)
            for a, row_scores, row_hits in zip(ids[start:start + batch], scores, hits):
                a = int(a)
                for s, b in zip(row_scores, row_hits):  # best first
                    if len(heap) == n and s <= heap[0][0]:
                        break
                    b = int(b)
                    key = (min(a, b), max(a, b))
                    if b < 0 or b == a or sha.get(a) == sha.get(b) or key in kept:
                        continue
                    kept.add(key)
                    if len(heap) < n:
                        heapq.heappush(heap, (float(s), key))
                    else:
                        heapq.heapreplace(heap, (float(s), key))
        top = sorted(((key, score) for score, key in heap), key=lambda kv: (-kv[1], kv[0]))
        rows = store.images([i for pair, _ in top for i in pair])
    finally:
        searcher.close()
    log.info("pairs: %d records, k=%d, %.2fs", len(ids), k, time.perf_counter() - started)
    return [Pair(rank, round(score, 6), a, rows[a]["path"], b, rows[b]["path"])
            for rank, ((a, b), score) in enumerate(top, 1)]


def pairs_figure(index_dir: str | os.PathLike, pairs: list[Pair], out: str | os.PathLike,
                 cell: int = 220, columns: int = 2) -> Path:
    """A PNG grid: each pair side by side (box crops), with its rank, score and file names."""
    if not pairs:
        raise BadInputError("no pairs to draw")
    from simsearch.storage.store import Store

    renderer = Renderer(index_dir, size=cell)
    store = Store(index_dir)
    try:
        ids = [i for p in pairs for i in (p.a_id, p.b_id)]
        rows, objects, predicted = store.images(ids), store.objects(ids), store.predictions(ids)
    finally:
        store.close()
    pad, caption = 10, 44
    pair_w, pair_h = 2 * cell + 3 * pad, cell + caption + pad
    nrows = (len(pairs) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * pair_w, nrows * pair_h), "white")
    draw = ImageDraw.Draw(sheet)
    caption_font = font(14)
    for i, p in enumerate(pairs):
        x0, y0 = (i % columns) * pair_w, (i // columns) * pair_h
        for j, image_id in enumerate((p.a_id, p.b_id)):
            row = rows[image_id]
            box = record_box(objects.get(image_id, []), predicted.get(image_id), row["width"], row["height"])
            tile = Image.open(io.BytesIO(renderer.crop(row, box)))
            tx = x0 + pad + j * (cell + pad) + (cell - tile.width) // 2
            ty = y0 + pad + (cell - tile.height) // 2
            sheet.paste(tile, (tx, ty))
            draw.text((x0 + pad + j * (cell + pad), y0 + pad + cell + 20), Path(row["path"]).name[:30],
                      fill=(80, 80, 80), font=caption_font)
        draw.text((x0 + pad, y0 + pad + cell + 3), f"#{p.rank}  score {p.score:.3f}", fill=(0, 0, 0), font=caption_font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
