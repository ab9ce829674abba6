"""What the engine sees in a query image: its localizer prediction(s), its ImageNet tags, its drawn boxes.

A user who searches with a photo should first learn what the engine thinks is in
it, since that is what the neighbours are similar to. An indexed query (by id, or a
file whose bytes are indexed) shows what the index stored for it; an outside file
shows what the one forward pass that embedded it said (the classifier's tags, and
the localizer's prediction from the same feature map), so no second pass is paid.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from simsearch.records import UNKNOWN, GroundTruthObject, Prediction, Record, Tag


@dataclass
class QueryContents:
    """The query image's own contents, as the index knows them or as its embedding pass saw them."""

    predictions: list[Prediction] = field(default_factory=list)  # the localizer's, best first (none: no head)
    tags: list[Tag] = field(default_factory=list)  # ImageNet tags, most probable first (none: no classifier)
    objects: list[GroundTruthObject] = field(default_factory=list)  # drawn boxes: only an indexed record has them
    seen: str = "stored"  # "stored": the indexed record's; "embedded": this query's own forward pass

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
                "seen": self.seen}

    def text(self) -> str:
        """'predicted: chair 0.81 [12,30,200,220]  tags: espresso 0.96, cup 0.12' (what a terminal shows)."""
        shown = []
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
