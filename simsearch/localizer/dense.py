"""The dense localizer head: objectness, class and box for every anchor of every grid cell, so it finds every object.

The single-object head (`head.LocalizerHead`) flattens the map into one answer
per image, the largest object. This head stays convolutional, in the spirit of
YOLO/SSD, over the same cached (C, 7, 7) maps (no second backbone pass): each
cell of the grid has a few anchors (box shapes from k-means of the training
boxes), and each anchor predicts objectness, class logits and a box. Training
assigns every ground-truth box to the anchors whose shape fits it in the cell
holding its centre and the two nearest neighbouring cells (YOLOv5's rule: more
positives per box, which a few dozen training images need). Decoding scores
each (anchor, class) as sigmoid(objectness) * softmax(class), keeps the best per
class with `torchvision.ops.batched_nms`, and drops what scores below a threshold.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

OBJECTNESS_PRIOR = 0.01  # the objectness bias starts here: almost every anchor is background


@dataclass(frozen=True)
class DenseConfig:
    """What the dense head is and how it is trained, beside `train.TrainConfig` (defaults measured on indoor-boxes)."""

    anchors: int = 3  # box shapes per cell: k-means (1 - IoU distance) of the training boxes' width and height
    upsample: int = 2  # the head's grid is the map's times this (14x14 from 7x7): small objects get cells of their own
    width: int = 128  # channels after the 1x1 reduction: small, since a few dozen images train it
    dropout: float = 0.3  # spatial dropout after the reduction
    anchor_ratio: float = 4.0  # a box goes to an anchor when neither side is more than this factor off the anchor's
    neighbours: bool = True  # also the two neighbouring cells nearest the box centre: three times the positives
    obj_weight: float = 5.0  # loss = obj_weight * BCE(objectness) + cls_weight * CE(class) + box_weight * (1 - GIoU)
    cls_weight: float = 1.0
    box_weight: float = 2.0
    iou_objectness: bool = True  # a positive's objectness target is its box's IoU: scores rank well-placed boxes first
    score_threshold: float | None = None  # detections scoring below are not stored (HeadSpec.threshold); None:
    # the score of best F1 (right boxes at IoU 0.5) on the validation images, `train_dense.f1_threshold`
    nms_iou: float = 0.5  # per-class NMS: a box overlapping a better one of its class this much is dropped
    max_detections: int = 100  # per image, after NMS
    batch_size: int = 16  # small batches: a few dozen images still give several steps an epoch


@dataclass
class Detections:
    """One image's detections, best first: class indices, scores, boxes x1, y1, x2, y2 as fractions of the image."""

    labels: np.ndarray  # (n,) int64
    scores: np.ndarray  # (n,) float32
    boxes: np.ndarray  # (n, 4) float32


class DenseHead(nn.Module):
    """Conv layers only, so every output keeps its place on the grid: (B, A, H, W, 5 + K) per map."""

    def __init__(self, in_channels: int, num_classes: int, num_anchors: int, width: int = 128, upsample: int = 2,
                 dropout: float = 0.3):
        super().__init__()
        self.num_classes, self.num_anchors = num_classes, num_anchors
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 1, bias=False),  # channel reduction: most of the parameters
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        ]
        if upsample > 1:
            layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
        layers += [
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(inplace=True),
        ]
        self.features = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, num_anchors * (5 + num_classes), 1)
        with torch.no_grad():  # start from "nothing here" so the many background anchors do not swamp the first steps
            bias = self.out.bias.view(num_anchors, 5 + num_classes)
            bias[:, 4] = float(np.log(OBJECTNESS_PRIOR / (1 - OBJECTNESS_PRIOR)))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) maps -> (B, A, H, W, 5 + K): box offsets (4), objectness logit, class logits."""
        out = self.out(self.features(maps))
        b, _, h, w = out.shape
        return out.view(b, self.num_anchors, 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2)


# ---------------------------------------------------------------- anchors and boxes

def fit_anchors(sizes: np.ndarray, k: int, iterations: int = 50, seed: int = 0) -> np.ndarray:
    """(k, 2) anchor widths and heights (fractions of the image): k-means of box (w, h) with 1 - IoU as distance.

    IoU of two shapes aligned at one corner, as in YOLOv2: a plain Euclidean
    k-means lets the large boxes pull every centre.
    """
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    if len(sizes) == 0:
        return np.full((k, 2), 0.3)
    rng = np.random.default_rng(seed)
    centres = sizes[rng.choice(len(sizes), size=min(k, len(sizes)), replace=False)]
    for _ in range(iterations):
        nearest = shape_iou(sizes, centres).argmax(1)
        moved = np.array([np.median(sizes[nearest == c], axis=0) if (nearest == c).any() else centres[c]
                          for c in range(len(centres))])
        if np.allclose(moved, centres):
            break
        centres = moved
    if len(centres) < k:  # fewer boxes than anchors: repeat shapes rather than fail
        centres = np.concatenate([centres, np.repeat(centres[-1:], k - len(centres), axis=0)])
    return centres[np.argsort(centres.prod(1))].astype(np.float32)


def shape_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) IoU of (n, 2) and (m, 2) width/height pairs placed at the same corner."""
    inter = np.minimum(a[:, None, 0], b[None, :, 0]) * np.minimum(a[:, None, 1], b[None, :, 1])
    return inter / (a[:, None].prod(-1) + b[None].prod(-1) - inter)


def decode_boxes(raw: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(B, A, H, W, >=4) raw offsets -> (B, A, H, W, 4) boxes x1, y1, x2, y2 as fractions of the image.

    YOLOv5's bounded form: the centre may sit up to a cell beyond its own cell
    (so neighbouring cells can be positives), a side up to 4x its anchor's.
    """
    _, _, h, w, _ = raw.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=raw.device), torch.arange(w, device=raw.device), indexing="ij")
    t = raw[..., :4].sigmoid()
    cx = (xs + 2 * t[..., 0] - 0.5) / w
    cy = (ys + 2 * t[..., 1] - 0.5) / h
    bw = anchors[None, :, None, None, 0] * (2 * t[..., 2]) ** 2
    bh = anchors[None, :, None, None, 1] * (2 * t[..., 3]) ** 2
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)


def mirror(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) boxes (fractions) mirrored left-right, to go with a mirrored map."""
    return np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1) if len(boxes) else boxes


# ---------------------------------------------------------------- targets and loss

@dataclass
class Targets:
    """Per anchor and cell of a batch: the box assigned there (class -1: background)."""

    classes: torch.Tensor  # (B, A, H, W) int64, -1 where no box is assigned
    boxes: torch.Tensor  # (B, A, H, W, 4) x1, y1, x2, y2 fractions; meaningful where classes >= 0


def assign(boxes: np.ndarray, labels: np.ndarray, anchors: np.ndarray, grid: tuple[int, int],
           ratio: float = 4.0, neighbours: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One image's boxes (n, 4) and class indices (n,) -> (A, H, W) classes (-1: none) and (A, H, W, 4) boxes.

    A box goes to every anchor whose shape is within `ratio` of its own (its best
    anchor when none is), in the cell of its centre and, with `neighbours`, the two
    cells nearest the centre. Where boxes compete for a slot the smaller one keeps
    it: large boxes have more cells to fall back on.
    """
    h, w = grid
    a = len(anchors)
    classes = np.full((a, h, w), -1, dtype=np.int64)
    targets = np.zeros((a, h, w, 4), dtype=np.float32)
    order = np.argsort(-((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))  # largest first, smallest last
    for k in order:
        x1, y1, x2, y2 = boxes[k]
        bw, bh = max(x2 - x1, 1e-6), max(y2 - y1, 1e-6)
        off = np.maximum(np.maximum(bw / anchors[:, 0], anchors[:, 0] / bw),
                         np.maximum(bh / anchors[:, 1], anchors[:, 1] / bh))
        chosen = np.flatnonzero(off < ratio)
        if chosen.size == 0:
            chosen = np.array([off.argmin()])
        gx, gy = (x1 + x2) / 2 * w, (y1 + y2) / 2 * h
        cx, cy = min(int(gx), w - 1), min(int(gy), h - 1)
        cells = [(cy, cx)]
        if neighbours:
            fx, fy = gx - cx, gy - cy
            nx = cx - 1 if fx < 0.5 else cx + 1
            ny = cy - 1 if fy < 0.5 else cy + 1
            if 0 <= nx < w:
                cells.append((cy, nx))
            if 0 <= ny < h:
                cells.append((ny, cx))
        for j, i in cells:
            classes[chosen, j, i] = labels[k]
            targets[chosen, j, i] = boxes[k]
    return classes, targets


def dense_loss(raw: torch.Tensor, anchors: torch.Tensor, targets: Targets, config: DenseConfig
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Objectness BCE over every anchor, class CE and 1 - GIoU over the assigned ones; (loss, its parts)."""
    from torchvision.ops import generalized_box_iou_loss

    positive = targets.classes >= 0
    obj_target = torch.zeros_like(raw[..., 4])
    if positive.any():
        pred = decode_boxes(raw, anchors)[positive]
        truth = targets.boxes[positive]
        giou = generalized_box_iou_loss(pred, truth, reduction="none")
        box_loss = giou.mean()
        cls_loss = F.cross_entropy(raw[..., 5:][positive], targets.classes[positive])
        if config.iou_objectness:
            from torchvision.ops import box_iou

            iou = box_iou(pred.detach(), truth).diagonal().clamp(0, 1)
            obj_target[positive] = iou.to(obj_target.dtype)
        else:
            obj_target[positive] = 1.0
    else:
        box_loss = cls_loss = raw.sum() * 0
    obj_loss = F.binary_cross_entropy_with_logits(raw[..., 4], obj_target)  # mean over every anchor and cell
    loss = config.obj_weight * obj_loss + config.cls_weight * cls_loss + config.box_weight * box_loss
    return loss, {"obj": float(obj_loss.detach()), "cls": float(cls_loss.detach()), "box": float(box_loss.detach())}


# ---------------------------------------------------------------- decoding

@torch.no_grad()
def decode(raw: torch.Tensor, anchors: torch.Tensor, min_score: float = 0.0, nms_iou: float = 0.5,
           max_detections: int = 100, pre_nms: int = 1000, temperature: float = 1.0) -> list[Detections]:
    """(B, A, H, W, 5 + K) outputs -> each image's detections, best first, after per-class NMS.

    Every (anchor, class) pair is a candidate scored sigmoid(objectness) *
    softmax(class / T); the `pre_nms` best of an image go to `batched_nms`.
    """
    from torchvision.ops import batched_nms

    b = raw.shape[0]
    k = raw.shape[-1] - 5
    boxes = decode_boxes(raw, anchors).clamp(0, 1).reshape(b, -1, 4)
    scores = (raw[..., 4:5].sigmoid() * (raw[..., 5:] / temperature).softmax(-1)).reshape(b, -1, k)
    out = []
    for n in range(b):
        flat = scores[n].reshape(-1)
        top, where = flat.topk(min(pre_nms, flat.numel()))
        keep = top >= min_score
        top, where = top[keep], where[keep]
        anchor, label = where // k, where % k
        chosen = boxes[n][anchor]
        sizable = (chosen[:, 2] > chosen[:, 0]) & (chosen[:, 3] > chosen[:, 1])
        if sizable.any():  # a box clamped to nothing (wholly outside the image) is no detection, unless all are
            top, label, chosen = top[sizable], label[sizable], chosen[sizable]
        kept = batched_nms(chosen, top, label, nms_iou)[:max_detections]
        out.append(Detections(label[kept].cpu().numpy().astype(np.int64), top[kept].cpu().numpy().astype(np.float32),
                              chosen[kept].cpu().numpy().astype(np.float32)))
    return out
