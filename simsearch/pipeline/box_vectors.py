"""Box vectors: one vector per object, pooled from the image's feature map (no second backbone pass).

A box's vector is made the way an image's is: the feature map averaged over the
region, then L2-normalised, so boxes and images live in the same space and a box is
compared with boxes by cosine similarity. The region average is
`torchvision.ops.roi_align` over the stored map (the same grid over the whole image
for every record, `EmbedderSpec.feature_shape`), so a query box pooled from a query's
own map and a stored box pooled at build time are made identically.

Why not crop and embed each box again: that is a forward pass per object (VOC images
hold 2-3, indoor photos 8), and a crop seen alone loses the context the map carries.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from simsearch.errors import BadInputError

BINS = 2  # roi_align output bins a side, averaged: with 2 samples a bin, 16 bilinear samples per box
SAMPLES = 2


def fractions(boxes: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """(n, 4) boxes in pixels of a width x height image -> fractions of it, clipped to [0, 1]."""
    if width <= 0 or height <= 0:
        raise BadInputError(f"an image of {width}x{height} pixels has no boxes")
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / np.array([width, height, width, height], dtype=np.float64)
    return np.clip(out, 0.0, 1.0)


def pool_boxes(maps: np.ndarray | torch.Tensor, boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """For each map (B, C, H, W), the (n_i, C) L2-normalised vectors of its boxes (n_i, 4) given as fractions.

    One `roi_align` call for the whole batch. A box thinner than a cell still gets a
    vector: bilinear samples between the cell centres around it.
    """
    x = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps).float()
    if x.ndim != 4 or len(boxes) != x.shape[0]:
        raise ValueError(f"pool_boxes: {len(boxes)} box lists for maps of shape {tuple(x.shape)}")
    _, channels, grid_h, grid_w = x.shape
    scale = torch.tensor([grid_w, grid_h, grid_w, grid_h], dtype=torch.float32)
    rois = [torch.as_tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4)) * scale for b in boxes]
    counts = [len(r) for r in rois]
    if not sum(counts):
        return [np.zeros((0, channels), dtype=np.float32) for _ in boxes]
    # Imported only when there are boxes: importing torchvision.ops costs ~3 s (it loads torch._dynamo),
    # which a folder of photos without boxes never needs to pay.
    from torchvision.ops import roi_align

    # aligned=True: a box edge at x is the continuous coordinate x, cell i spans [i, i+1).
    pooled = roi_align(x, rois, output_size=(BINS, BINS), spatial_scale=1.0, sampling_ratio=SAMPLES, aligned=True)
    vectors = torch.nn.functional.normalize(pooled.mean(dim=(2, 3)), dim=1).numpy()
    return list(np.split(vectors, np.cumsum(counts)[:-1]))


def pool_one(feature_map: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(n, C) vectors of boxes (fractions) on one (C, H, W) map."""
    return pool_boxes(np.asarray(feature_map)[None], [boxes])[0]


def record_boxes(objects: Sequence, predicted, width: int, height: int) -> np.ndarray:
    """(n, 4) fractions of an image's boxes as the store keeps their vectors: ground truth in order, then the
    predicted ones (`predicted`: one prediction, a list of them best first, or None)."""
    boxes = [(o.xmin, o.ymin, o.xmax, o.ymax) for o in objects]
    if predicted is not None:
        for p in (predicted if isinstance(predicted, (list, tuple)) else [predicted]):
            boxes.append((p.xmin, p.ymin, p.xmax, p.ymax))
    return fractions(boxes, width, height) if boxes else np.zeros((0, 4))
