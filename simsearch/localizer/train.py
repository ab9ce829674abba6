"""Training and evaluating the localizer head on an index's stored maps and ground-truth boxes.

Cross-entropy for the class and smooth-L1 plus GIoU for the box train together;
the epoch with the best validation loss is kept, then its class scores are
calibrated on the validation images (one temperature, and the "unknown"
threshold: `calibrate`). Validation images are chosen by
a rule recorded in the head's spec (a split name, or a fraction by sha256), so
`evaluate` scores exactly the images the head never trained on.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from simsearch.errors import BadInputError, NotFoundError
from simsearch.localizer.head import (HeadSpec, Localizer, LocalizerHead, cxcywh_to_xyxy, giou_loss, head_version,
                                      one_cycle, xyxy_to_cxcywh)
from simsearch.localizer.dense import DenseConfig
from simsearch.localizer.calibrate import (KEEP_CORRECT, KEEP_CORRECT_SCORE, fit_temperature, nll, softmax,
                                           unknown_threshold)
from simsearch.localizer.familiarity import References, choose, familiarity
from simsearch.localizer.metrics import expected_calibration_error
from simsearch.pipeline.box_vectors import fractions, pool_boxes
from simsearch.records import UNKNOWN, GroundTruthObject
from simsearch.storage.store import Store
from simsearch.storage.layout import writer_lock

log = logging.getLogger(__name__)

TARGETS = ("largest", "every")  # the single-object head learns the largest object; the dense head every one


# ---------------------------------------------------------------- data

@dataclass(frozen=True)
class TrainConfig:
    """How to train the head (defaults measured on composites and indoor-boxes)."""

    index_dir: Path
    epochs: int = 40  # upper bound: early stopping usually ends sooner
    patience: int = 8  # epochs without a better validation loss before stopping
    batch_size: int | None = None  # None: 64 for the single-object head, DenseConfig.batch_size for the dense one
    lr: float = 1e-3  # AdamW, cosine-decayed to zero over `epochs`
    weight_decay: float = 1e-2
    box_weight: float = 2.0  # loss = cross-entropy + box_weight * (smooth-L1 + GIoU)
    val_split: str | None = "val"  # images.split value held out; when no image has it, use val_fraction
    val_fraction: float = 0.2  # share held out (chosen by each image's sha256) when there is no split
    target: str = "largest"  # "largest": the single-object head; "every": the dense head (every non-difficult box)
    flip: bool = True  # also train on mirrored maps (box mirrored too): cheap augmentation
    width: int = 256  # channels after the 1x1 reduction
    hidden: int = 512  # MLP width
    seed: int = 0
    device: str = "cpu"  # auto | cpu | cuda: the head is small, a CPU is fine
    quiet: bool = False
    keep_correct: float = KEEP_CORRECT  # the "unknown" threshold keeps this share of correct val predictions
    exclude_classes: tuple[str, ...] = ()  # images whose target has these classes are left out (open-set tests)
    head_dir: Path | None = None  # where the head is saved; default the index folder
    dense: DenseConfig = field(default_factory=DenseConfig)  # the dense head's shape and loss (target "every")


@dataclass
class Examples:
    """Images with a target: ids, class names, boxes normalised to [0, 1] (x1, y1, x2, y2)."""

    ids: list[int]
    labels: list[str]
    boxes: np.ndarray
    sizes: list[tuple[int, int]]  # width, height: to turn normalised boxes back into pixels


def pick_target(objects: Sequence[GroundTruthObject], policy: str = "largest") -> GroundTruthObject | None:
    """The object an image is trained and scored on (None: nothing usable).

    The dense head ("every") learns all of them, but the largest is still the one
    its best detection is scored against (accuracy, CorLoc), and an image has one
    exactly when it has any usable box, so both heads hold out the same images.
    """
    if policy not in TARGETS:
        raise BadInputError(f"unknown target policy {policy!r}; use one of {', '.join(TARGETS)}")
    usable = [o for o in objects if not o.difficult and o.area > 0]
    return max(usable, key=lambda o: o.area) if usable else None


def examples(store: Store, ids: Sequence[int] | None = None, policy: str = "largest") -> Examples:
    """Every image (of `ids`, or all) that has a target object."""
    if ids is None:
        ids = store.ids_with_objects()
    rows = store.images(ids)
    objects = store.objects(ids)
    keep, labels, boxes, sizes = [], [], [], []
    for i in ids:
        target = pick_target(objects.get(i, []), policy)
        if target is None or i not in rows:
            continue
        w, h = rows[i]["width"], rows[i]["height"]
        keep.append(int(i))
        labels.append(target.label)
        boxes.append([target.xmin / w, target.ymin / h, target.xmax / w, target.ymax / h])
        sizes.append((w, h))
    return Examples(keep, labels, np.clip(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), 0, 1), sizes)


def held_out(store: Store, ids: Sequence[int], validation: dict) -> set[int]:
    """Which of `ids` are validation images under a head's recorded rule."""
    rows = store.images(ids)
    if "split" in validation:
        return {i for i in ids if rows[i]["split"] == validation["split"]}
    fraction, seed = validation["fraction"], validation.get("seed", 0)
    # Hash of the image's bytes: the same photo stays held out however the index grows or is rebuilt.
    return {i for i in ids if _unit_hash(f"{seed}:{rows[i]['sha256']}") < fraction}


def _unit_hash(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32


def choose_validation(store: Store, ids: Sequence[int], config: TrainConfig) -> dict:
    if config.val_split:
        if store.count_split(config.val_split):
            return {"split": config.val_split}
        log.info("no image has split %r: holding out %.0f%% by sha256", config.val_split, 100 * config.val_fraction)
    if not 0 < config.val_fraction < 1:
        raise BadInputError("--val-fraction must be between 0 and 1 when the index has no validation split")
    return {"fraction": config.val_fraction, "seed": config.seed}


def load_maps(store: Store, ids: Sequence[int], chunk: int = 1024) -> np.ndarray:
    """Feature maps in `ids` order, read in chunks so peak memory stays near one copy."""
    spec = store.spec
    out = np.empty((len(ids), *spec.embedder.feature_shape), dtype=np.float16)
    for start in range(0, len(ids), chunk):
        out[start:start + chunk] = store.feature_maps(ids[start:start + chunk])
    return out


# ---------------------------------------------------------------- training

@dataclass
class TrainReport:
    index_dir: str
    head_version: str
    classes: list[str]
    train_images: int
    val_images: int
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    val_accuracy: float  # dense head: its best detection's class against the largest object's
    val_corloc: float
    seconds: float
    history: list[dict] = field(default_factory=list)  # per epoch: train/val cross-entropy and box loss
    calibration: dict = field(default_factory=dict)  # temperature, threshold, val NLL and ECE before/after
    target: str = "largest"
    val_map: float | None = None  # mAP@0.5 on the validation images (every box, VOC AP)


def _losses(head: LocalizerHead, x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, box_weight: float):
    logits, box = head(x)
    known = y >= 0
    ce = F.cross_entropy(logits[known], y[known]) if known.any() else logits.sum() * 0
    pred = cxcywh_to_xyxy(box)
    box_loss = F.smooth_l1_loss(box, xyxy_to_cxcywh(b), beta=0.05) + giou_loss(pred, b)
    return ce, box_loss, ce + box_weight * box_loss, logits, pred


def train(config: TrainConfig) -> TrainReport:
    """Train a head on the index's stored maps, keep the epoch with the best validation loss, save it.

    Holds the index's writer lock from the start: a concurrent build is refused at
    once rather than minutes of training being thrown away at save time.
    """
    with writer_lock(config.index_dir, "train-localizer"):
        if config.target == "every":
            return _train_every(config)
        if config.target not in TARGETS:
            raise BadInputError(f"unknown target {config.target!r}; use one of {', '.join(TARGETS)}")
        return _train(config)


@dataclass
class Split:
    """Which images a head trains on and which it is validated on (positions in `every`)."""

    every: Examples  # every image with a usable box, its largest object as target
    validation: dict  # the rule, recorded in the head's spec
    train_idx: np.ndarray
    val_idx: np.ndarray


def split(store: Store, config: TrainConfig) -> Split:
    """Hold out the validation images by the recorded rule; a VOC test split is never trained on."""
    spec = store.spec
    if spec is None or not store.finished:
        raise NotFoundError(f"{config.index_dir}: the index was never finished; run simsearch build-index again")
    every = examples(store, policy=config.target)
    if not every.ids:
        raise BadInputError(
            f"{config.index_dir}: no image has ground-truth boxes to learn from. Index a VOC folder or a "
            "box-list dataset (or composites from `simsearch synth`)")
    validation = choose_validation(store, every.ids, config)
    val_ids = held_out(store, every.ids, validation)
    rows = store.images(every.ids)
    # "unknown" is what a prediction says when it names no class: a class of that name would read as one.
    excluded = set(config.exclude_classes) | {UNKNOWN}
    if UNKNOWN in every.labels:
        log.warning("images whose largest box is labelled %r are left out of training: simsearch reserves that "
                    "name for predictions that name no class", UNKNOWN)
    is_train = [i not in val_ids and rows[i]["split"] != "test" and label not in excluded
                for i, label in zip(every.ids, every.labels)]
    is_val = [i in val_ids and label not in excluded for i, label in zip(every.ids, every.labels)]
    train_idx = np.flatnonzero(is_train)
    val_idx = np.flatnonzero(is_val)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise BadInputError(
            f"{len(train_idx)} training and {len(val_idx)} validation images: both are needed. "
            "Change --val-split or --val-fraction")
    return Split(every, validation, train_idx, val_idx)


def _train_every(config: TrainConfig) -> TrainReport:
    """The dense head (`train_dense.fit_dense`) on the same split as the single-object head's, saved the same way."""
    from simsearch.localizer.train_dense import fit_dense, truths

    started = time.perf_counter()
    with Store(config.index_dir) as store:
        chosen = split(store, config)
        truth = truths(store, chosen.every.ids)
        embedder = store.spec.embedder
        maps = torch.from_numpy(load_maps(store, chosen.every.ids))  # fp16 in memory, fp32 one batch at a time
        train_ids = [chosen.every.ids[j] for j in chosen.train_idx]
        train_objects = store.objects(train_ids)
        datasets = sorted({row["dataset"] for row in store.images(train_ids).values()} - {None})
    fit = fit_dense(config, chosen, truth, maps, embedder)
    where = {c: k for k, c in enumerate(fit.spec.classes)}
    references = training_references(maps, chosen.every, chosen.train_idx, train_objects, where, config.seed)
    familiar = Localizer(fit.head, fit.spec, references=references)
    threshold = _dense_familiarity_threshold(familiar, maps, chosen.val_idx, truth, config.keep_correct)
    spec = replace(fit.spec, familiarity_threshold=threshold,
                   training={**fit.spec.training, "datasets": datasets, "familiarity_threshold": threshold})
    folder = config.head_dir or config.index_dir
    Path(folder).mkdir(parents=True, exist_ok=True)
    Localizer(fit.head, spec, references=references).save(folder)
    return TrainReport(str(config.index_dir), spec.version, list(spec.classes), len(chosen.train_idx),
                       len(chosen.val_idx), len(fit.history), fit.best_epoch, fit.best_val_loss, fit.val_accuracy,
                       fit.val_corloc, time.perf_counter() - started, fit.history,
                       {"threshold": spec.threshold, "familiarity_threshold": threshold,
                        **spec.training["threshold"]}, "every", fit.val_map)


def _dense_familiarity_threshold(localizer: Localizer, maps: torch.Tensor, val_idx: np.ndarray,
                                 truth: Sequence, keep_correct: float) -> float:
    """The familiarity that keeps `keep_correct` of the right validation detections (IoU >= 0.5 with a box of
    their class) at or above it; -1 (no test) when none is right."""
    from simsearch.localizer.metrics import CORLOC_IOU, box_iou

    val_maps = maps[torch.from_numpy(val_idx)].float().numpy()
    found = localizer.detect_maps(val_maps)
    vectors = pool_boxes(val_maps, [d.boxes for d in found])
    right = []
    for d, v, j in zip(found, vectors, val_idx):
        t = truth[j]
        familiar = familiarity(localizer.references, v, d.labels)
        for label, box, f in zip(d.labels, d.boxes, familiar):
            same = [b for name, b in zip(t.labels, t.boxes) if name == localizer.spec.classes[int(label)]]
            if same and box_iou(np.repeat(box[None], len(same), 0), np.asarray(same)).max() >= CORLOC_IOU:
                right.append(f)
    if not right:
        return -1.0
    return unknown_threshold(np.asarray(right), np.ones(len(right), dtype=bool), keep_correct)


def _train(config: TrainConfig) -> TrainReport:
    from tqdm import tqdm

    from simsearch.pipeline.embed import resolve_device

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    batch_size = config.batch_size or 64
    with Store(config.index_dir) as store:
        spec = store.spec
        chosen = split(store, config)
        every, validation, train_idx, val_idx = chosen.every, chosen.validation, chosen.train_idx, chosen.val_idx
        excluded = set(config.exclude_classes) | {UNKNOWN}
        rows = store.images(every.ids)
        classes = sorted({every.labels[i] for i in train_idx})
        where = {c: k for k, c in enumerate(classes)}
        maps = torch.from_numpy(load_maps(store, every.ids))  # fp16 in memory, fp32 one batch at a time
        train_objects = store.objects([every.ids[j] for j in train_idx])
        y = torch.tensor([where.get(label, -1) for label in every.labels])  # -1: a class only val has
        b = torch.from_numpy(every.boxes)
        embedder = spec.embedder

    device = resolve_device(config.device)
    head = LocalizerHead(embedder.feature_shape[0], len(classes), embedder.feature_shape[1:],
                         config.width, config.hidden).to(device)
    optimiser, schedule = one_cycle(head, config.lr, config.weight_decay, config.epochs, -(-len(train_idx) // batch_size))
    best = (float("inf"), -1, None)
    history: list[dict] = []
    bar = tqdm(range(config.epochs), desc="training", unit="epoch", disable=config.quiet, dynamic_ncols=True)
    for epoch in bar:
        head.train()
        order = rng.permutation(train_idx)
        sums = np.zeros(3)
        for start in range(0, len(order), batch_size):
            batch = torch.from_numpy(order[start:start + batch_size])
            if len(batch) < 2:
                continue  # BatchNorm needs two samples
            x, yb, bb = maps[batch].to(device).float(), y[batch].to(device), b[batch].to(device)
            if config.flip:
                flip = torch.rand(len(batch), device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                mirrored = torch.stack([1 - bb[:, 2], bb[:, 1], 1 - bb[:, 0], bb[:, 3]], dim=1)
                bb = torch.where(flip[:, None], mirrored, bb)
            ce, box_loss, loss, _, _ = _losses(head, x, yb, bb, config.box_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            sums += [ce.item() * len(batch), box_loss.item() * len(batch), len(batch)]
        val = _validate(head, maps, y, b, val_idx, device, config)
        row = {"epoch": epoch + 1, "train_ce": sums[0] / sums[2], "train_box": sums[1] / sums[2], **val}
        history.append(row)
        bar.set_postfix(ce=f"{row['train_ce']:.3f}", box=f"{row['train_box']:.3f}", val_ce=f"{val['val_ce']:.3f}",
                        val_box=f"{val['val_box']:.3f}", val_acc=f"{val['val_accuracy']:.2f}",
                        corloc=f"{val['val_corloc']:.2f}")
        log.info("epoch %d: %s", epoch + 1, row)
        if val["val_loss"] < best[0]:
            best = (val["val_loss"], epoch, {k: v.detach().clone() for k, v in head.state_dict().items()})
        elif epoch - best[1] >= config.patience:
            break
    bar.close()
    if best[2] is None:  # no epoch had a finite validation loss (NaN compares false with everything)
        raise BadInputError(
            f"training diverged: the validation loss was not a number in all {len(history)} epochs. "
            "Check the index's boxes (simsearch info), or train with a lower --lr")
    head.load_state_dict(best[2])
    known_val = val_idx[(y[val_idx] >= 0).numpy()]
    val_logits = _logits(head, maps, known_val, device)
    references = training_references(maps, every, train_idx, train_objects, where, config.seed)
    probe = Localizer(head, _probe_spec(classes, embedder, config), device, references)
    familiar = probe.predict(maps[torch.from_numpy(known_val)].float().numpy()).familiarity
    calibration = calibrate(val_logits, y[known_val].numpy(), config.keep_correct, familiar)
    log.info("calibration: %s", calibration)
    seconds = time.perf_counter() - started
    best_row = history[best[1]]
    version = head_version(head)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    spec = HeadSpec(
        tuple(classes), embedder.backbone, embedder.weights, embedder.weights_sha256, tuple(embedder.feature_shape),
        version, config.width, config.hidden, config.target, validation,
        {"config": settings, "train_images": int(len(train_idx)), "val_images": int(len(val_idx)),
         "best_epoch": best[1] + 1, "epochs_run": len(history), "best": best_row, "seconds": round(seconds, 2),
         "calibration": calibration, "excluded_classes": sorted(excluded - {UNKNOWN}),
         "datasets": sorted({rows[every.ids[j]]["dataset"] for j in train_idx} - {None})},  # searches leave these out
        temperature=calibration["temperature"], threshold=calibration["threshold"],
        familiarity_threshold=calibration["familiarity_threshold"],
    )
    Path(config.head_dir or config.index_dir).mkdir(parents=True, exist_ok=True)
    Localizer(head.cpu(), spec, references=references).save(config.head_dir or config.index_dir)
    return TrainReport(str(config.index_dir), version, classes, int(len(train_idx)), int(len(val_idx)), len(history),
                       best[1] + 1, best[0], best_row["val_accuracy"], best_row["val_corloc"], seconds, history,
                       calibration)


def calibrate(logits: np.ndarray, labels: np.ndarray, keep_correct: float = KEEP_CORRECT,
              familiar: np.ndarray | None = None) -> dict:
    """Fit the temperature on validation logits and read the "unknown" thresholds off the validation predictions.

    With the familiarity of each validation box (`familiarity.py`), that is the
    main test: its threshold keeps `keep_correct` of the correct predictions, and
    the score threshold only catches the least confident (it keeps
    KEEP_CORRECT_SCORE of them). Without, the score threshold keeps `keep_correct`.
    Returns what the spec and the report record: T, the thresholds, and the
    validation NLL and ECE before (T = 1) and after.
    """
    temperature = fit_temperature(logits, labels) if len(labels) else 1.0
    before, after = softmax(logits), softmax(logits, temperature)
    correct = before.argmax(1) == labels  # the same for both: T never changes the ranking
    if familiar is None or not correct.any():
        threshold, familiarity_threshold = unknown_threshold(after.max(1), correct, keep_correct), -1.0
        unknown = after.max(1) < threshold
    else:
        threshold = unknown_threshold(after.max(1), correct, KEEP_CORRECT_SCORE)
        familiarity_threshold = unknown_threshold(familiar, correct, keep_correct)
        unknown = (after.max(1) < threshold) | (np.asarray(familiar) < familiarity_threshold)
    score_only = unknown_threshold(after.max(1), correct, keep_correct)
    return {"temperature": temperature, "threshold": threshold, "familiarity_threshold": familiarity_threshold,
            "score_only_threshold": score_only,
            "unknown_share_score_only": float((after.max(1) < score_only).mean()) if len(labels) else 0.0,
            "keep_correct": keep_correct, "val_images": len(labels),
            "nll_before": nll(logits, labels) if len(labels) else 0.0,
            "nll_after": nll(logits, labels, temperature) if len(labels) else 0.0,
            "ece_before": expected_calibration_error(before.max(1), correct),
            "ece_after": expected_calibration_error(after.max(1), correct),
            "unknown_share": float(unknown.mean()) if len(labels) else 0.0,
            "correct_kept": float((correct & ~unknown).sum() / max(int(correct.sum()), 1))}


def training_references(maps: torch.Tensor, every: Examples, train_idx: np.ndarray,
                        objects: dict[int, list[GroundTruthObject]], where: dict[str, int], seed: int = 0,
                        chunk: int = 256) -> References:
    """The pooled vectors of every usable ground-truth box of a trained class in the training images.

    Every box, not only each image's target: the chairs beside the largest table
    are chairs too, and they are what a "chair" prediction elsewhere should resemble.
    """
    vectors, labels = [], []
    for start in range(0, len(train_idx), chunk):
        part = train_idx[start:start + chunk]
        boxes, classes = [], []
        for j in part:
            w, h = every.sizes[j]
            usable = [o for o in objects.get(every.ids[j], []) if o.label in where and not o.difficult and o.area > 0]
            boxes.append(fractions([(o.xmin, o.ymin, o.xmax, o.ymax) for o in usable], w, h) if usable
                         else np.zeros((0, 4)))
            classes += [where[o.label] for o in usable]
        pooled = pool_boxes(maps[torch.from_numpy(part)].float(), boxes)
        vectors += [v for v in pooled if len(v)]
        labels += classes
    if not labels:
        return choose(np.zeros((0, maps.shape[1]), np.float32), [])
    return choose(np.concatenate(vectors), labels, seed=seed)


def _probe_spec(classes: Sequence[str], embedder, config: TrainConfig) -> HeadSpec:
    """A spec good enough to run the head before its real spec (which records the calibration) exists."""
    return HeadSpec(tuple(classes), embedder.backbone, embedder.weights, embedder.weights_sha256,
                    tuple(embedder.feature_shape), "probe", config.width, config.hidden, config.target)


@torch.no_grad()
def _logits(head: LocalizerHead, maps, idx: np.ndarray, device) -> np.ndarray:
    head.eval()
    out = [head(maps[torch.from_numpy(idx[s:s + 512])].to(device).float())[0].cpu().numpy()
           for s in range(0, len(idx), 512)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, head.classify.out_features))


@torch.no_grad()
def _validate(head: LocalizerHead, maps, y, b, idx: np.ndarray, device, config: TrainConfig) -> dict:
    from simsearch.localizer.metrics import box_iou, corloc

    head.eval()
    sums = np.zeros(4)
    ious, correct = [], []
    for start in range(0, len(idx), 512):
        batch = torch.from_numpy(idx[start:start + 512])
        x, yb, bb = maps[batch].to(device).float(), y[batch].to(device), b[batch].to(device)
        ce, box_loss, loss, logits, pred = _losses(head, x, yb, bb, config.box_weight)
        known = int((yb >= 0).sum())
        sums += [ce.item() * known, box_loss.item() * len(batch), known, len(batch)]
        correct += (logits.argmax(1) == yb).cpu().tolist()
        ious += box_iou(pred.clamp(0, 1).cpu().numpy(), bb.cpu().numpy()).tolist()
    val_ce = sums[0] / max(sums[2], 1)
    val_box = sums[1] / sums[3]
    return {"val_ce": val_ce, "val_box": val_box, "val_loss": val_ce + config.box_weight * val_box,
            "val_accuracy": float(np.mean(correct)), "val_mean_iou": float(np.mean(ious)), "val_corloc": corloc(ious)}
