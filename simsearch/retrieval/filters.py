"""Filters: which records a search may answer with, applied inside the search rather than after it.

A filter is a set of conditions on a record (where its file is, which dataset it came
from, which ImageNet tag it holds) and on its boxes (class, size, confidence). The store turns it into the sorted
ids that pass (`Store.ids_matching`) and FAISS searches only those, so a query returns
k results whenever k records pass, however rare they are (a pool fetched first and
filtered after returned fewer than k, or none, for a rare class).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from simsearch.errors import BadInputError

ORIENTATIONS = ("landscape", "portrait", "square")  # by the upright image's width against its height


@dataclass(frozen=True)
class Filters:
    """Conditions a result must meet; unset fields (None, empty) do not filter.

    Box conditions (label, min_box_area, min_score) hold together on one box: an image
    passes when at least one of its boxes (ground truth, score 1.0, or the localizer's
    prediction) meets all of them, so "a large dog" is not met by a large cat beside a
    small dog. Folder, dataset and tag conditions hold on the image itself.
    """

    label: str | None = None  # class of at least one box (ground truth or predicted)
    min_box_area: float | None = None  # that box covers at least this fraction (0..1) of the image
    min_score: float | None = None  # and has at least this confidence (0..1; drawn boxes count 1.0)
    # Files under these folders (any of them); made absolute and resolved as build-index stores
    # paths, so `--under photos/2024` and `--under /home/me/photos/2024/` mean the same folder.
    under: tuple[str, ...] = ()
    not_under: tuple[str, ...] = ()  # and under none of these
    dataset: tuple[str, ...] = ()  # from one of these datasets (VOC2007, a box-list name, a folder's name)
    not_dataset: tuple[str, ...] = ()  # and from none of these
    tag: str | None = None  # holds this ImageNet tag (any case), as the build's classifier gave it
    name: str | None = None  # the file's name (not its folders) contains this text, in any case
    orientation: str | None = None  # landscape (wider than high), portrait (higher than wide) or square

    def __post_init__(self) -> None:
        label = self.label.strip() if isinstance(self.label, str) else self.label
        object.__setattr__(self, "label", label or None)  # "" is what a form's "all classes" sends
        tag = self.tag.strip() if isinstance(self.tag, str) else self.tag
        object.__setattr__(self, "tag", tag or None)
        name = self.name.strip() if isinstance(self.name, str) else self.name
        object.__setattr__(self, "name", name or None)
        orientation = self.orientation.strip().lower() if isinstance(self.orientation, str) else self.orientation
        if orientation and orientation not in ORIENTATIONS:
            raise BadInputError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {self.orientation!r}")
        object.__setattr__(self, "orientation", orientation or None)
        object.__setattr__(self, "min_box_area", _fraction(self.min_box_area, "min_box_area",
                                                           "a fraction of the image area, e.g. 0.1 for a tenth"))
        object.__setattr__(self, "min_score", _fraction(self.min_score, "min_score",
                                                        "a prediction confidence, e.g. 0.5"))
        for name in ("under", "not_under"):
            folders = tuple(_folder(f, name) for f in _names(getattr(self, name), name))
            object.__setattr__(self, name, tuple(dict.fromkeys(folders)))
        for name in ("dataset", "not_dataset"):
            object.__setattr__(self, name, tuple(dict.fromkeys(_names(getattr(self, name), name))))
        for wanted, unwanted, what in (("under", "not_under", "folder"), ("dataset", "not_dataset", "dataset")):
            both = set(getattr(self, wanted)) & set(getattr(self, unwanted))
            if both:
                raise BadInputError(f"{what} {sorted(both)[0]} is both wanted ({wanted}) and excluded "
                                    f"({unwanted}); keep one of them")

    @property
    def active(self) -> bool:
        """Whether any condition is set (an inactive filter searches everything)."""
        return any(getattr(self, f.name) not in (None, ()) for f in fields(self))

    @property
    def on_boxes(self) -> bool:
        """Whether a condition concerns boxes: then an image needs a box that meets them all."""
        return self.label is not None or self.min_box_area is not None or self.min_score is not None


def _fraction(value, name: str, what: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadInputError(f"{name} must be a number between 0 and 1 ({what}), got {value!r}") from None
    if math.isnan(number) or not 0.0 <= number <= 1.0:
        raise BadInputError(f"{name} must be between 0 and 1 ({what}), got {value!r}")
    return number


def _names(values, name: str) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, (str, os.PathLike)):
        values = (values,)  # one folder or name, not its characters
    found = []
    for value in values:
        text = os.fspath(value).strip() if isinstance(value, (str, os.PathLike)) else None
        if not text:
            raise BadInputError(f"{name} needs a non-empty name, got {value!r}")
        found.append(text)
    return tuple(found)


def _folder(text: str, name: str) -> str:
    """A folder as build-index records the paths below it: absolute, links resolved."""
    try:
        return str(Path(text).expanduser().resolve())
    except (OSError, RuntimeError) as e:  # a link loop
        raise BadInputError(f"{name}: cannot resolve folder {text!r} ({e})") from None
