"""What a search answers with by default: the user's collection, without the localizer's training data.

A head trained on labelled datasets (VOC, `simsearch synth` composites) that sit in
the same index as the user's photos would otherwise crowd every neighbour list with
its training images. The head records which datasets it trained on
(`HeadSpec.training["datasets"]`); a search leaves those out through the ordinary
`Filters.not_dataset`, inside the search, so k results still come back. Nothing is
left out when every image is training data, when the user names datasets himself
(`--dataset` wins), or when asked to include them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from collections.abc import Mapping, Sequence

from simsearch.retrieval.filters import Filters


@dataclass(frozen=True)
class LeftOut:
    """Training datasets a search left out by default, and how many images they hold."""

    datasets: tuple[str, ...]
    images: int

    def to_json(self) -> dict:
        return {"datasets": list(self.datasets), "images": self.images}

    def text(self, hint: str = "--include-training") -> str:
        return f"left out {self.images} training images of {', '.join(self.datasets)}; {hint} to see them"


def leave_out_training(filters: Filters | None, trained: Sequence[str], counts: Mapping[str, int]
                       ) -> tuple[Filters | None, LeftOut | None]:
    """`filters` with the head's training datasets excluded, and what that left out (None: nothing).

    `trained` is what the head trained on, `counts` the index's images per dataset.
    """
    if filters is not None and filters.dataset:
        return filters, None  # the user chose the datasets: theirs is the last word
    present = [d for d in dict.fromkeys(trained) if counts.get(d)]
    if not present or set(counts) <= set(present):
        return filters, None  # no training data here, or nothing but: leaving it out would leave nothing
    base = filters if filters is not None else Filters()
    new = tuple(d for d in present if d not in base.not_dataset)
    if not new:
        return filters, None  # the user left them out already
    scoped = replace(base, not_dataset=base.not_dataset + new)
    return scoped, LeftOut(new, sum(counts[d] for d in new))
