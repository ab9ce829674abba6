"""Object search's own logic: box hits grouped per image, and the reason a result is similar.

Pure functions over hits and vectors: `Searcher` fetches them, this module decides
what a result is. An image holding five chairs is one answer to "chairs like this",
not five, so box hits are grouped by image and each image keeps its best box.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from simsearch.records import ObjectMatch


@dataclass(frozen=True)
class QueryPart:
    """Something a query searches with: one of its objects, a box drawn on it, or the whole image."""

    vector: np.ndarray  # (D,) L2-normalised
    label: str | None = None  # its class, when the query's box has one
    box: tuple[float, float, float, float] | None = None  # pixels of the query image; None: the whole image
    source: str = "image"  # "truth", "predicted", "drawn" or "image"

    def describe(self) -> str:
        if self.box is None:
            return "your image"
        return f"your {self.label}" if self.label else "your box"

    def to_json(self) -> dict:
        return {"label": self.label, "box": list(self.box) if self.box else None, "source": self.source}


@dataclass(frozen=True)
class Why:
    """Why a result is similar: which of its objects matched which part of the query, or the whole image."""

    score: float
    part: QueryPart | None = None  # the query's part that matched (None: the whole image)
    match: ObjectMatch | None = None  # the result's object that matched (None: the whole image)

    @property
    def text(self) -> str:
        if self.match is None and (self.part is None or self.part.box is None):
            return "whole image"
        theirs = f"its {self.match.label or 'object'}" if self.match is not None else "the whole image"
        ours = self.part.describe() if self.part is not None else "your image"
        return f"{theirs} ~ {ours} ({self.score:.2f})"

    def to_json(self) -> dict:
        return {"text": self.text, "score": round(self.score, 6),
                "query": self.part.to_json() if self.part is not None else None,
                "object": self.match.to_json() if self.match is not None else None}


def best_per_image(hits: Sequence[tuple[int, int, float, int]], k: int, exclude: set[int] | frozenset[int] = frozenset()
                   ) -> list[tuple[int, int, float, int]]:
    """(image_id, box_id, score, query part) hits -> the best hit of each image, best first, at most k images."""
    best: dict[int, tuple[int, int, float, int]] = {}
    for hit in hits:
        image_id = hit[0]
        if image_id in exclude:
            continue
        if image_id not in best or hit[2] > best[image_id][2]:
            best[image_id] = hit
    return sorted(best.values(), key=lambda h: (-h[2], h[0]))[:k]


def explain(parts: Sequence[QueryPart], whole_score: float, boxes: Sequence[ObjectMatch],
            box_vectors: np.ndarray) -> Why:
    """The best-matching (query part, result object) pair, or the whole image when no object pair beats it.

    `parts` are the query's objects (boxes) and `boxes`/`box_vectors` the result's;
    the whole query is compared with each of the result's objects too, so "its dog
    is what looks like your photo" is found when the query has no boxes.
    """
    whole = next((p for p in parts if p.box is None), None)
    best = Why(whole_score, whole, None)
    if not len(boxes):
        return best
    xq = np.stack([p.vector for p in parts])
    scores = xq @ np.asarray(box_vectors, dtype=np.float32).T  # (parts, boxes)
    q, b = np.unravel_index(int(np.argmax(scores)), scores.shape)
    if float(scores[q, b]) > whole_score:
        best = Why(float(scores[q, b]), parts[q], boxes[b])
    return best
