"""The most similar pairs of records in an index (the seed's Figure 5).

Byte-identical files (same sha256) are kept and marked `identical`: two copies of
one file are exactly what a user looking at the closest pairs wants to learn of
(`simsearch duplicates` groups them all). The figure shows whole photos, since a
pair is two pictures, not two predicted boxes. The global top-n pairs come from
each record's top neighbours as the index finds them: if (a, b) is among the n best
pairs, b is among a's n best neighbours, so the result is exact wherever the
index's search is (Flat, up to 50k records) and as good as its tuned recall above
that (HNSW, IVF).
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

from simsearch.views.output import output_file
from simsearch.errors import BadInputError
from simsearch.retrieval.searcher import Searcher
from simsearch.records import Record
from simsearch.views.render import Renderer, font

log = logging.getLogger(__name__)


@dataclass
class Pair:
    rank: int
    score: float  # cosine similarity of the two images
    a: Record
    b: Record

    @property
    def identical(self) -> bool:
        """Two records of the very same bytes (sha256)."""
        return self.a.sha256 == self.b.sha256

    def to_json(self) -> dict:
        return {"rank": self.rank, "score": self.score, "identical": self.identical, "a_id": self.a.id,
                "a_path": self.a.path, "b_id": self.b.id, "b_path": self.b.path}


def most_similar_pairs(index_dir: str | os.PathLike, n: int = 10, batch: int = 4096) -> list[Pair]:
    """The `n` highest-scoring pairs of records, best first (identical files included, marked so)."""
    if n < 1:
        raise BadInputError("--n must be at least 1")
    started = time.perf_counter()
    with Searcher(index_dir) as searcher:
        ids, xb = searcher.store.vectors()
        if len(ids) < 2:
            raise BadInputError(f"{index_dir} holds {len(ids)} image(s); pairs need at least 2")
        # n neighbours besides the record itself (which identical copies may outrank on a tie).
        k = int(min(len(ids), n + 1))
        # A min-heap of the n best pairs so far: memory stays O(n) however large the index,
        # and a row stops at its first neighbour that cannot beat the n-th best.
        heap: list[tuple[float, tuple[int, int]]] = []
        kept: set[tuple[int, int]] = set()
        for start in range(0, len(ids), batch):
            scores, hits = searcher.knn(xb[start:start + batch], k)
            for a, row_scores, row_hits in zip(ids[start:start + batch], scores, hits):
                a = int(a)
                for s, b in zip(row_scores, row_hits):  # best first
                    if len(heap) == n and s <= heap[0][0]:
                        break
                    b = int(b)
                    key = (min(a, b), max(a, b))
                    if b < 0 or b == a or key in kept:
                        continue
                    kept.add(key)
                    if len(heap) < n:
                        heapq.heappush(heap, (float(s), key))
                    else:
                        heapq.heapreplace(heap, (float(s), key))
        top = sorted(((key, score) for score, key in heap), key=lambda kv: (-kv[1], kv[0]))
        records = searcher.store.records([i for pair, _ in top for i in pair])
    log.info("pairs: %d records, k=%d, %.2fs", len(ids), k, time.perf_counter() - started)
    # float32 inner products of unit vectors overshoot 1 by rounding (identical files: 1.000081); a cosine never does
    return [Pair(rank, round(min(score, 1.0), 6), records[a], records[b]) for rank, ((a, b), score) in enumerate(top, 1)]


def pairs_figure(index_dir: str | os.PathLike, pairs: list[Pair], out: str | os.PathLike,
                 cell: int = 220, columns: int = 2) -> Path:
    """A PNG grid: each pair side by side (whole photos), with its rank, score and file names."""
    if not pairs:
        raise BadInputError("no pairs to draw")
    renderer = Renderer(index_dir, size=cell)
    pad, caption = 10, 44
    pair_w, pair_h = 2 * cell + 3 * pad, cell + caption + pad
    nrows = (len(pairs) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * pair_w, nrows * pair_h), "white")
    draw = ImageDraw.Draw(sheet)
    caption_font = font(14)
    for i, p in enumerate(pairs):
        x0, y0 = (i % columns) * pair_w, (i // columns) * pair_h
        for j, record in enumerate((p.a, p.b)):
            tile = Image.open(io.BytesIO(renderer.thumb(record)))
            tx = x0 + pad + j * (cell + pad) + (cell - tile.width) // 2
            ty = y0 + pad + (cell - tile.height) // 2
            sheet.paste(tile, (tx, ty))
            draw.text((x0 + pad + j * (cell + pad), y0 + pad + cell + 20), Path(record.path).name[:30],
                      fill=(80, 80, 80), font=caption_font)
        same = "  identical files" if p.identical else ""
        draw.text((x0 + pad, y0 + pad + cell + 3), f"#{p.rank}  score {p.score:.3f}{same}", fill=(0, 0, 0),
                  font=caption_font)
    out = output_file(out)
    try:
        sheet.save(out)
    except OSError as e:
        raise BadInputError(f"cannot write {out}: {e.strerror or e}; choose another path") from None
    return out
