"""How familiar a predicted box looks: its similarity to the training boxes of the class the head gave it.

A softmax over a handful of classes must spread all its mass over them, so a
butterfly still comes out "pillow 0.95": the class score cannot say "none of
these". The box's own backbone vector can. Each head keeps the pooled vectors
(`pipeline.box_vectors`) of the ground-truth boxes it was trained on, and a
prediction's familiarity is the cosine similarity to the k-th nearest of them
among its predicted class (deep k-nearest-neighbour OOD detection, Sun et al.
2022). A box unlike every training example of its class scores low whatever the
softmax says. Measured in `benchmarks/bench_open_set.py`: on photos of other
things, the share called "unknown" rises from 24-83% (softmax alone) to 93-100%.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

K = 5  # the k-th neighbour: one stray training box cannot vouch for a prediction
PER_CLASS = 1000  # reference boxes kept per class (chosen at random beyond that): bounds the head file and the search
NO_REFERENCES = 1.0  # familiarity when a head has no references (saved before them): never "unknown" on this ground


@dataclass(frozen=True)
class References:
    """Training boxes' L2-normalised vectors (float16) and their class indices."""

    vectors: np.ndarray  # (n, C)
    labels: np.ndarray  # (n,) int64, into the head's classes
    k: int = K

    def __len__(self) -> int:
        return len(self.labels)

    def to_state(self) -> dict:
        return {"vectors": torch.from_numpy(np.ascontiguousarray(self.vectors, dtype=np.float16)),
                "labels": torch.from_numpy(np.ascontiguousarray(self.labels, dtype=np.int64)),
                "k": torch.tensor(self.k)}

    @staticmethod
    def from_state(state: dict) -> "References":
        return References(state["vectors"].numpy(), state["labels"].numpy(), int(state["k"]))


def choose(vectors: np.ndarray, labels: Sequence[int], per_class: int = PER_CLASS, seed: int = 0) -> References:
    """At most `per_class` boxes of each class, at random: a class with 50,000 boxes must not make the file huge."""
    vectors = np.asarray(vectors, dtype=np.float32).reshape(len(labels), -1)
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        keep.append(where if len(where) <= per_class else np.sort(rng.choice(where, per_class, replace=False)))
    order = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    return References(vectors[order].astype(np.float16), labels[order])


def familiarity(references: References | None, vectors: np.ndarray, classes: np.ndarray,
                chunk: int = 1024) -> np.ndarray:
    """(n,) cosine similarity of each box vector to the k-th nearest reference of its class (fewer: the farthest).

    A class with no reference scores -1 (nothing vouches for it); no references at
    all scores NO_REFERENCES for every box.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    classes = np.asarray(classes, dtype=np.int64)
    if references is None or len(references) == 0:
        return np.full(len(vectors), NO_REFERENCES, dtype=np.float32)
    ref = torch.from_numpy(references.vectors.astype(np.float32))
    ref_labels = torch.from_numpy(references.labels)
    out = np.full(len(vectors), -1.0, dtype=np.float32)
    for start in range(0, len(vectors), chunk):
        v = torch.from_numpy(vectors[start:start + chunk])
        c = torch.from_numpy(classes[start:start + chunk])
        sims = v @ ref.T
        same = ref_labels[None, :] == c[:, None]
        sims = sims.masked_fill(~same, -2.0)  # other classes never count as neighbours
        count = same.sum(1)
        k = min(references.k, ref.shape[0])
        top = sims.topk(k, dim=1).values  # descending
        # The k-th neighbour, or the farthest one when the class has fewer than k.
        pick = (count.clamp(min=1, max=k) - 1).unsqueeze(1)
        kth = top.gather(1, pick).squeeze(1)
        out[start:start + chunk] = torch.where(count > 0, kth, torch.tensor(-1.0)).numpy()
    return out
