"""Training and scoring the dense head (`dense.py`): every box of every training image, mAP@0.5 on held-out ones.

The same data rules as the single-object head (`train.split`: the validation rule
is recorded in the spec, so `evaluate` scores exactly the held-out images),
horizontal flips, AdamW with a one-cycle schedule, and the epoch with the best
validation loss kept. Targets are assigned once per image (and once for its
mirror), not per step: assignment is the slow part in Python.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from simsearch.errors import BadInputError
from simsearch.localizer.dense import (DenseConfig, DenseHead, Detections, Targets, assign, decode, dense_loss,
                                       fit_anchors, mirror)
from simsearch.localizer.head import HeadSpec, head_version, one_cycle
from simsearch.localizer.metrics import DetectionTruth, box_iou, corloc, match_detections, mean_average_precision
from simsearch.storage.store import Store

log = logging.getLogger(__name__)


def truths(store: Store, ids: Sequence[int]) -> list[DetectionTruth]:
    """Every box of each image (difficult ones flagged), as fractions of the image, in `ids` order."""
    rows = store.images(ids)
    objects = store.objects(ids)
    out = []
    for i in ids:
        w, h = rows[i]["width"], rows[i]["height"]
        usable = [o for o in objects.get(i, []) if o.area > 0]
        boxes = np.array([[o.xmin / w, o.ymin / h, o.xmax / w, o.ymax / h] for o in usable], np.float32).reshape(-1, 4)
        out.append(DetectionTruth([o.label for o in usable], np.clip(boxes, 0, 1),
                                  np.array([o.difficult for o in usable], dtype=bool)))
    return out


def detection_scores(detections: Sequence[Detections], truth: Sequence[DetectionTruth], classes: Sequence[str]
                     ) -> tuple[float, dict[str, float], dict[str, int]]:
    """mAP@0.5 of detections (class indices into `classes`) against every box: (mAP, AP per class, boxes per class).

    The mean is over the head's classes that have a box here: a class it never
    learnt cannot be found, and is left out rather than counted as zero.
    """
    named = [([classes[int(k)] for k in d.labels], d.scores, d.boxes) for d in detections]
    return mean_average_precision(named, truth, classes)


def f1_threshold(detections: Sequence[Detections], truth: Sequence[DetectionTruth], classes: Sequence[str],
                 floor: float = 0.05) -> tuple[float, float]:
    """(score, F1): the detection score above which the stored boxes are most often right and miss least (max F1
    of right boxes at IoU 0.5 over every class pooled), read off validation images. Never below `floor`."""
    scores, right, n_truth = [], [], 0
    for d, t in zip(detections, truth):
        names = np.array([classes[int(k)] for k in d.labels])
        labels = np.array(t.labels)
        difficult = np.asarray(t.difficult, dtype=bool)
        n_truth += int(sum(not x and c in classes for c, x in zip(t.labels, difficult)))
        for c in set(names.tolist()):
            mine, theirs = names == c, labels == c if len(labels) else np.zeros(0, bool)
            matched, counted = match_detections(d.boxes[mine], d.scores[mine], t.boxes[theirs], difficult[theirs])
            scores += d.scores[mine][counted].tolist()
            right += matched[counted].tolist()
    if not scores or not n_truth:
        return floor, 0.0
    order = np.argsort(-np.asarray(scores), kind="stable")
    ranked, hits = np.asarray(scores)[order], np.cumsum(np.asarray(right)[order])
    f1 = 2 * hits / (np.arange(1, len(ranked) + 1) + n_truth)
    best = int(f1.argmax())
    return max(float(ranked[best]), floor), float(f1[best])


def _targets(truth: Sequence[DetectionTruth], where: dict[str, int], anchors: np.ndarray, grid: tuple[int, int],
             config: DenseConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, n, A, H, W) classes and (2, n, A, H, W, 4) boxes: each image as it is [0] and mirrored [1]."""
    classes, boxes = [], []
    for flip in (False, True):
        per_class, per_box = [], []
        for t in truth:
            keep = np.array([not d and c in where for c, d in zip(t.labels, t.difficult)], dtype=bool)
            b = t.boxes[keep] if len(t.boxes) else t.boxes
            if flip:
                b = mirror(b)
            labels = np.array([where[c] for c, k in zip(t.labels, keep) if k], dtype=np.int64)
            c, x = assign(b, labels, anchors, grid, config.anchor_ratio, config.neighbours)
            per_class.append(c)
            per_box.append(x)
        classes.append(np.stack(per_class))
        boxes.append(np.stack(per_box))
    return torch.from_numpy(np.stack(classes)), torch.from_numpy(np.stack(boxes))


@dataclass
class DenseFit:
    """A trained dense head, its spec, and how training went: what `train.train` saves and reports."""

    head: DenseHead
    spec: HeadSpec
    history: list[dict]
    best_epoch: int  # 1-based
    best_val_loss: float
    val_accuracy: float  # best detection's class against the largest object's
    val_corloc: float
    val_map: float


def fit_dense(config, chosen, truth: Sequence[DetectionTruth], maps: torch.Tensor, embedder) -> DenseFit:
    """Train the dense head on every non-difficult box of the known classes of the training images.

    `config` is a `train.TrainConfig`, `chosen` its `train.Split`, `truth` every
    box of `chosen.every`'s images, `maps` their stored maps (in that order).
    """
    from tqdm import tqdm

    from simsearch.pipeline.embed import resolve_device

    dense: DenseConfig = config.dense
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    every, train_idx, val_idx = chosen.every, chosen.train_idx, chosen.val_idx
    excluded = set(config.exclude_classes)
    classes = sorted({c for k in train_idx for c, d in zip(truth[k].labels, truth[k].difficult)
                      if not d and c not in excluded})
    where = {c: k for k, c in enumerate(classes)}
    sizes = np.concatenate([np.stack([t.boxes[:, 2] - t.boxes[:, 0], t.boxes[:, 3] - t.boxes[:, 1]], 1)
                            for t in (truth[k] for k in train_idx) if len(t.boxes)])
    anchors = fit_anchors(sizes, dense.anchors, seed=config.seed)
    grid = (embedder.feature_shape[1] * dense.upsample, embedder.feature_shape[2] * dense.upsample)
    target_classes, target_boxes = _targets(truth, where, anchors, grid, dense)
    anchors_t = torch.from_numpy(anchors)

    device = resolve_device(config.device)
    head = DenseHead(embedder.feature_shape[0], len(classes), len(anchors), dense.width, dense.upsample,
                     dense.dropout).to(device)
    anchors_t = anchors_t.to(device)
    batch_size = config.batch_size or dense.batch_size
    optimiser, schedule = one_cycle(head, config.lr, config.weight_decay, config.epochs, -(-len(train_idx) // batch_size))
    best = (float("inf"), -1, None)
    history: list[dict] = []
    val_truth = [truth[k] for k in val_idx]
    bar = tqdm(range(config.epochs), desc="training (every object)", unit="epoch", disable=config.quiet,
               dynamic_ncols=True)
    for epoch in bar:
        head.train()
        order = rng.permutation(train_idx)
        sums, seen = {"obj": 0.0, "cls": 0.0, "box": 0.0}, 0
        for start in range(0, len(order), batch_size):
            batch = torch.from_numpy(order[start:start + batch_size])
            if len(batch) < 2:
                continue  # BatchNorm needs two samples
            flip = (torch.rand(len(batch)) < 0.5) if config.flip else torch.zeros(len(batch), dtype=torch.bool)
            x = maps[batch].float()
            x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
            side = flip.long()
            targets = Targets(target_classes[side, batch].to(device), target_boxes[side, batch].to(device))
            loss, parts = dense_loss(head(x), anchors_t, targets, dense)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            for key in sums:
                sums[key] += parts[key] * len(batch)
            seen += len(batch)
        val_loss, val_parts, found = _validate(head, maps, val_idx, anchors_t, target_classes, target_boxes, dense,
                                               device)
        val_map = detection_scores(found, val_truth, classes)[0]
        row = {"epoch": epoch + 1, **{f"train_{k}": v / max(seen, 1) for k, v in sums.items()},
               "val_loss": val_loss, **{f"val_{k}": v for k, v in val_parts.items()}, "val_map": val_map}
        history.append(row)
        bar.set_postfix(loss=f"{sum(sums.values()) / max(seen, 1):.3f}", val_loss=f"{val_loss:.3f}",
                        val_map=f"{val_map:.3f}")
        log.info("epoch %d: %s", epoch + 1, row)
        if val_loss < best[0]:
            best = (val_loss, epoch, {k: v.detach().clone() for k, v in head.state_dict().items()})
        elif epoch - best[1] >= config.patience:
            break
    bar.close()
    if best[2] is None:
        raise BadInputError(
            f"training diverged: the validation loss was not a number in all {len(history)} epochs. "
            "Check the index's boxes (simsearch info), or train with a lower --lr")
    head.load_state_dict(best[2])
    _, _, found = _validate(head, maps, val_idx, anchors_t, target_classes, target_boxes, dense, device)
    accuracy, top_corloc = _top_scores(found, [every.labels[k] for k in val_idx], every.boxes[val_idx], classes)
    threshold, f1 = f1_threshold(found, val_truth, classes)
    if dense.score_threshold is not None:
        threshold = dense.score_threshold
    seconds = time.perf_counter() - started
    best_row = {**history[best[1]], "val_accuracy": accuracy, "val_corloc": top_corloc}
    version = head_version(head)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    spec = HeadSpec(
        tuple(classes), embedder.backbone, embedder.weights, embedder.weights_sha256, tuple(embedder.feature_shape),
        version, dense.width, 0, "every", chosen.validation,
        {"config": settings, "train_images": int(len(train_idx)), "val_images": int(len(val_idx)),
         "train_boxes": sum(int(not d and c in where) for k in train_idx
                            for c, d in zip(truth[k].labels, truth[k].difficult)), "best_epoch": best[1] + 1,
         "epochs_run": len(history), "best": best_row, "seconds": round(seconds, 2),
         "excluded_classes": sorted(excluded), "threshold": {"score": threshold, "val_f1": f1,
                                                             "chosen": dense.score_threshold is None}},
        threshold=threshold, anchors=tuple(tuple(float(v) for v in a) for a in anchors),
        upsample=dense.upsample, nms_iou=dense.nms_iou, max_detections=dense.max_detections,
    )
    return DenseFit(head.cpu(), spec, history, best[1] + 1, best[0], accuracy, top_corloc, best_row["val_map"])


@torch.no_grad()
def _validate(head: DenseHead, maps: torch.Tensor, idx: np.ndarray, anchors: torch.Tensor, classes: torch.Tensor,
              boxes: torch.Tensor, config: DenseConfig, device) -> tuple[float, dict[str, float], list[Detections]]:
    """Validation loss (as the images are, no flip), its parts, and the detections mAP is read from."""
    head.eval()
    total, sums, found = 0.0, {"obj": 0.0, "cls": 0.0, "box": 0.0}, []
    for start in range(0, len(idx), 256):
        batch = torch.from_numpy(idx[start:start + 256])
        raw = head(maps[batch].float().to(device))
        loss, parts = dense_loss(raw, anchors, Targets(classes[0, batch].to(device), boxes[0, batch].to(device)),
                                 config)
        total += float(loss) * len(batch)
        for key in sums:
            sums[key] += parts[key] * len(batch)
        found += decode(raw, anchors, 0.0, config.nms_iou, config.max_detections)
    n = max(len(idx), 1)
    return total / n, {k: v / n for k, v in sums.items()}, found


def _top_scores(found: Sequence[Detections], labels: Sequence[str], boxes: np.ndarray, classes: Sequence[str]
                ) -> tuple[float, float]:
    """Accuracy and CorLoc of each image's best detection against its largest object: the single head's measures."""
    if not found:
        return 0.0, 0.0
    right = [bool(len(d.labels)) and classes[int(d.labels[0])] == label for d, label in zip(found, labels)]
    ious = [float(box_iou(d.boxes[0], b)) if len(d.labels) else 0.0 for d, b in zip(found, boxes)]
    return float(np.mean(right)), corloc(ious)
