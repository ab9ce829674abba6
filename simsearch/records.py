"""The shapes a record takes, from a file found on disk to a neighbour shown to a user.

One place for them, below every stage: `read` makes `ImageRecord`s, the store keeps
them and gives back `Record`s (with their objects and prediction), and search
carries those `Record`s to the views; JSON is made from them only at the CLI and
HTTP edges (`Record.to_json`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


UNKNOWN = "unknown"  # a prediction's label when the head is not confident enough to name a class


@dataclass(frozen=True)
class GroundTruthObject:
    """One annotated box, in pixels of the (EXIF-upright) image."""

    label: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: bool = False
    truncated: bool = False

    @property
    def area(self) -> float:
        return max(0.0, self.xmax - self.xmin) * max(0.0, self.ymax - self.ymin)

    def to_json(self) -> dict:
        return {"label": self.label, "box": [self.xmin, self.ymin, self.xmax, self.ymax], "difficult": self.difficult,
                "truncated": self.truncated}


@dataclass
class ImageRecord:
    """An image found on disk, with whatever its dataset says about it."""

    path: Path
    source: str  # "voc", "boxes" or "folder"
    dataset: str  # e.g. "VOC2007", "indoor-boxes", or the scanned folder's name
    split: str | None = None
    objects: list[GroundTruthObject] = field(default_factory=list)
    annotation: Path | None = None  # the XML or box-list file the objects came from


@dataclass(frozen=True)
class Skipped:
    """A file that could not be used, and why (recorded, reported, never fatal)."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Prediction:
    """The localizer's class, confidence and box for one record, in pixels of the original image.

    `label` is UNKNOWN when the head's best class scored below its threshold: the
    score and box are kept, but no class is claimed.
    """

    label: str
    score: float
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    head_version: str = ""  # which trained head said so

    def to_json(self) -> dict:
        return {"label": self.label, "score": self.score, "box": [self.xmin, self.ymin, self.xmax, self.ymax]}


@dataclass(frozen=True)
class Tag:
    """An ImageNet class the backbone's own classifier gave the whole image, with its probability.

    Distinct from boxes' classes: a tag says nothing about where, and comes from the
    1000 ImageNet classes, not from an annotation or the trained localizer.
    """

    label: str
    score: float

    def to_json(self) -> dict:
        return {"label": self.label, "score": self.score}


@dataclass(frozen=True)
class ObjectMatch:
    """A box with its own vector in the objects index: a ground-truth object or the localizer's prediction."""

    id: int  # the box's id in the objects index (not the image's)
    image_id: int
    label: str | None
    score: float  # 1.0 for a ground-truth box (a fact); the localizer's confidence for a predicted one
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    source: str  # "truth" or "predicted"

    @property
    def box(self) -> list[float]:
        return [self.xmin, self.ymin, self.xmax, self.ymax]

    def to_json(self) -> dict:
        return {"object_id": self.id, "label": self.label, "score": round(self.score, 4), "box": self.box,
                "source": self.source}


@dataclass
class Record:
    """An indexed image with what is known of it: the one shape search results carry."""

    id: int
    path: str
    sha256: str
    width: int
    height: int
    split: str | None = None
    source: str = "folder"
    dataset: str | None = None
    objects: list[GroundTruthObject] = field(default_factory=list)
    prediction: Prediction | None = None
    tags: list[Tag] = field(default_factory=list)  # ImageNet tags, most probable first

    @property
    def classes(self) -> list[str]:
        return sorted({o.label for o in self.objects})

    def to_json(self) -> dict:
        return {
            "id": self.id, "path": self.path, "width": self.width, "height": self.height, "split": self.split,
            "dataset": self.dataset,
            "objects": [o.to_json() for o in self.objects],
            "prediction": self.prediction.to_json() if self.prediction else None,
            "tags": [t.to_json() for t in self.tags],
        }
