"""What the engine sees in a query image: its localizer prediction(s), its ImageNet tags, its drawn boxes.

A user who searches with a photo should first learn what the engine thinks is in
it, since that is what the neighbours are similar to. An indexed query (by id, or a
file whose bytes are indexed) shows what the index stored for it; an outside file
shows what the one forward pass that embedded it said (the classifier's tags, and
the localizer's prediction from the same feature map), so no second pass is paid.

It also says what the index already holds of the image (`Copies`): a query's own
bytes are no answer to "images like this one", so they are left out of the
neighbours, and the user is told so ("already indexed as id 12") rather than left to
wonder where the best match went; near-duplicates (another file scoring at least
NEAR_DUPLICATE) are named the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from simsearch.records import UNKNOWN, GroundTruthObject, Prediction, Record, Tag

# Cosine at or above which another file is called a near-duplicate of an image (imagededup's CNN
# default too). Measured with EfficientNet-Lite0 on the 114 shared images, 9 Copydays edits each
# (benchmarks/bench_duplicates.py): at 0.90 it finds 54% of the edited copies (mirror 100%, colour
# 98%, 75% crop 86%, JPEG q10-50 60%, caption 46%, 25% rescale 33%, half-area crop 7%) and claims 9 of
# 6,441 distinct pairs (12% of records), all re-shots of one scene (a kitchen counter moments apart,
# 0.95) or the stereo motorcycle pair (0.93); 0.85 finds 80% of copies but claims 36 pairs (33%).
NEAR_DUPLICATE = 0.90


@dataclass
class Copies:
    """What the index already holds of a query image: the same bytes (by sha256), and near-duplicates."""

    exact: list[int] = field(default_factory=list)  # records holding these very bytes (less the id queried)
    near: list[tuple[int, float]] = field(default_factory=list)  # other files scoring >= threshold, best first
    threshold: float = NEAR_DUPLICATE  # the cosine that makes a near-duplicate
    by_id: bool = False  # the query is itself a record (`--id`): its copies are other records, not "it"

    def __bool__(self) -> bool:
        return bool(self.exact or self.near)

    def to_json(self) -> dict:
        return {"exact": list(self.exact), "near": [{"id": i, "score": round(s, 4)} for i, s in self.near],
                "threshold": self.threshold}

    def text(self) -> str:
        """'already indexed as id 12; near-duplicate of id 40 (0.97)', or '' when the index holds no copy."""
        shown = []
        if self.exact:
            ids = ("ids " if len(self.exact) > 1 else "id ") + ", ".join(str(i) for i in self.exact)
            shown.append(f"{'same file as' if self.by_id else 'already indexed as'} {ids}")
        if self.near:
            shown.append("near-duplicate of " + ", ".join(f"id {i} ({s:.2f})" for i, s in self.near))
        return "; ".join(shown)


@dataclass
class QueryContents:
    """The query image's own contents, as the index knows them or as its embedding pass saw them."""

    predictions: list[Prediction] = field(default_factory=list)  # the localizer's, best first (none: no head)
    tags: list[Tag] = field(default_factory=list)  # ImageNet tags, most probable first (none: no classifier)
    objects: list[GroundTruthObject] = field(default_factory=list)  # drawn boxes: only an indexed record has them
    seen: str = "stored"  # "stored": the indexed record's; "embedded": this query's own forward pass
    copies: Copies | None = None  # what the index already holds of the image (None: not looked for)

    @classmethod
    def of_record(cls, record: Record) -> "QueryContents":
        """What the index stored for a record: nothing is computed again."""
        predictions = [record.prediction] if record.prediction is not None else []
        return cls(predictions, list(record.tags), list(record.objects), "stored")

    @property
    def prediction(self) -> Prediction | None:
        """The localizer's best prediction, the one a neighbour's `prediction` field would show."""
        return self.predictions[0] if self.predictions else None

    def to_json(self) -> dict:
        return {"prediction": self.prediction.to_json() if self.prediction is not None else None,
                "predictions": [p.to_json() for p in self.predictions],
                "tags": [t.to_json() for t in self.tags],
                "objects": [o.to_json() for o in self.objects],
                "seen": self.seen,
                "duplicates": self.copies.to_json() if self.copies is not None else None}

    def text(self) -> str:
        """'already indexed as id 12  predicted: chair 0.81 [12,30,200,220]  tags: espresso 0.96' (a terminal's line)."""
        shown = [self.copies.text()] if self.copies else []
        if self.predictions:
            shown.append("predicted: " + ", ".join(prediction_text(p) for p in self.predictions))
        if self.objects:
            shown.append("objects: " + ", ".join(sorted({o.label for o in self.objects})))
        shown.append("tags: " + (", ".join(f"{t.label} {t.score:.2f}" for t in self.tags) or "none"))
        return "  ".join(shown)


def prediction_text(p: Prediction) -> str:
    """'chair 0.81 [12,30,200,220]'; an unknown names no class, so its box is not offered as one: 'unknown 0.42'."""
    if p.label == UNKNOWN:
        return f"{UNKNOWN} {p.score:.2f}"
    return f"{p.label} {p.score:.2f} [{','.join(f'{v:.0f}' for v in (p.xmin, p.ymin, p.xmax, p.ymax))}]"
