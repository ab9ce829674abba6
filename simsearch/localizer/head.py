"""Stage 4, localize: a small head over cached feature maps predicts each image's main object and its box.

The head reads the backbone's spatial map (C, 7, 7) that the build stored for
every image, so training never runs the backbone again and takes minutes on a
CPU. Images were squashed (not cropped) to the backbone's input, so a box
normalised by the image's width and height lands directly on the 7x7 grid.
Two losses train it together: cross-entropy for the class, and smooth-L1 plus
GIoU for the box. The head is saved beside the index with a spec naming the
backbone whose features it reads; any other backbone is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from simsearch.pipeline import build as _build
from simsearch.errors import BadInputError, IndexDamagedError, NotFoundError, SpecMismatchError
from simsearch.localizer.metrics import Evaluation, evaluate_predictions
from simsearch.pipeline.read import GroundTruthObject
from simsearch.spec import EmbedderSpec
from simsearch.storage.store import Store
from simsearch.storage.writelock import writer_lock

log = logging.getLogger(__name__)

HEAD_FILE = "localizer.pt"  # {"format", "spec" (HeadSpec JSON), "state" (weights)}: one file, one rename
HEAD_FORMAT = 2
LEGACY_SPEC = "localizer.json"  # format 1 kept the spec in a second file, which a kill could leave stale
TARGETS = ("largest",)  # how one image's objects become its training target(s)

PREDICTIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
    label TEXT,
    score REAL,
    xmin REAL, ymin REAL, xmax REAL, ymax REAL,  -- pixels of the original image
    head_version TEXT
);
"""


# ---------------------------------------------------------------- the head

class LocalizerHead(nn.Module):
    """Conv layers keep the map's geometry; an MLP over the flattened grid predicts class and box."""

    def __init__(self, in_channels: int, num_classes: int, grid: tuple[int, int] = (7, 7),
                 width: int = 256, hidden: int = 512, dropout: float = 0.3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),  # channel reduction: most of the parameters
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(width // 2 * grid[0] * grid[1], hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.classify = nn.Linear(hidden, num_classes)
        self.box = nn.Linear(hidden, 4)

    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) maps -> (B, K) class logits, (B, 4) boxes as cx, cy, w, h in [0, 1]."""
        h = self.mlp(self.features(maps))
        return self.classify(h), torch.sigmoid(self.box(h))


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean 1 - GIoU of matching (B, 4) x1, y1, x2, y2 boxes: a gradient even when boxes do not overlap."""
    from torchvision.ops import generalized_box_iou_loss

    return generalized_box_iou_loss(pred, target, reduction="mean")


# ---------------------------------------------------------------- spec and files

@dataclass(frozen=True)
class HeadSpec:
    """Everything a saved head records: what the head predicts and whose features it reads."""

    classes: tuple[str, ...]
    backbone: str  # EmbedderSpec.backbone of the features it was trained on
    weights: str
    weights_sha256: str  # the backbone weights' hash: features of other weights mean nothing to it
    feature_shape: tuple[int, int, int]  # C, H, W of the maps it reads
    version: str  # changes with every training run; stored with each prediction
    width: int = 256
    hidden: int = 512
    target: str = "largest"
    validation: dict = field(default_factory=dict)  # how the held-out images were chosen
    training: dict = field(default_factory=dict)  # config, epochs, losses, seconds: for the record

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "HeadSpec":
        data = json.loads(text)
        data["classes"] = tuple(data["classes"])
        data["feature_shape"] = tuple(data["feature_shape"])
        return HeadSpec(**data)

    def check(self, embedder: EmbedderSpec, where: str) -> None:
        """Refuse features from any other backbone, weights or map shape."""
        mine = (self.backbone, self.weights_sha256, tuple(self.feature_shape))
        theirs = (embedder.backbone, embedder.weights_sha256, tuple(embedder.feature_shape))
        if mine != theirs:
            raise SpecMismatchError(
                f"the localizer head in {where} was trained on {self.backbone} features (weights {self.weights}, "
                f"map {tuple(self.feature_shape)}), but this index holds {embedder.backbone} features (weights "
                f"{embedder.weights}, map {tuple(embedder.feature_shape)}). Train a head for this index: "
                f"simsearch train-localizer --index INDEX"
            )


class Localizer:
    """A trained head ready to predict from stored feature maps."""

    def __init__(self, head: LocalizerHead, spec: HeadSpec, device: str = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.head = head.to(self.device).eval()

    @staticmethod
    def exists(folder: str | os.PathLike) -> bool:
        return (Path(folder) / HEAD_FILE).is_file()

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str = "cpu") -> "Localizer":
        """The head saved in `folder`: weights and spec from one file, so they can never disagree."""
        folder = Path(folder)
        path = folder / HEAD_FILE
        if not path.is_file():
            raise NotFoundError(f"{folder}: no localizer head here. Train one: simsearch train-localizer --index {folder}")
        retrain = f"train it again: simsearch train-localizer --index {folder}"
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: torch raises many types
            raise IndexDamagedError(f"{path} cannot be read ({type(e).__name__}); {retrain}") from e
        if not isinstance(saved, dict) or saved.get("format") != HEAD_FORMAT:
            raise IndexDamagedError(f"{path} was written by an older simsearch (weights and spec in two files); "
                                    f"{retrain}")
        try:
            spec = HeadSpec.from_json(saved["spec"])
            head = LocalizerHead(spec.feature_shape[0], len(spec.classes), spec.feature_shape[1:], spec.width,
                                 spec.hidden)
            head.load_state_dict(saved["state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise IndexDamagedError(f"{path} is inconsistent ({str(e).splitlines()[0]}); {retrain}") from e
        return cls(head, spec, device)

    def save(self, folder: str | os.PathLike) -> None:
        """Weights and spec in one file, replaced atomically: a kill leaves the old head or the new one."""
        folder = Path(folder)
        tmp = folder / f"{HEAD_FILE}.{os.getpid()}.tmp"
        state = {k: v.cpu() for k, v in self.head.state_dict().items()}
        torch.save({"format": HEAD_FORMAT, "spec": self.spec.to_json(), "state": state}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must not land before the bytes do
        os.replace(tmp, folder / HEAD_FILE)
        (folder / LEGACY_SPEC).unlink(missing_ok=True)  # the old layout's second file, now meaningless

    @torch.inference_mode()
    def predict_maps(self, maps: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, C, H, W) maps -> class indices (n,), class scores (n,), boxes (n, 4) x1, y1, x2, y2 in [0, 1]."""
        labels, scores, boxes = [], [], []
        for start in range(0, len(maps), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(maps[start:start + batch_size])).to(self.device).float()
            logits, box = self.head(x)
            prob = logits.softmax(dim=1)
            score, label = prob.max(dim=1)
            labels.append(label.cpu().numpy())
            scores.append(score.cpu().numpy())
            boxes.append(cxcywh_to_xyxy(box).clamp(0, 1).cpu().numpy())
        if not labels:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, 4), np.float32)
        return np.concatenate(labels), np.concatenate(scores), np.concatenate(boxes)


# ---------------------------------------------------------------- data

@dataclass(frozen=True)
class TrainConfig:
    """How to train the head (defaults measured on composites and indoor-boxes)."""

    index_dir: Path
    epochs: int = 40  # upper bound: early stopping usually ends sooner
    patience: int = 8  # epochs without a better validation loss before stopping
    batch_size: int = 64
    lr: float = 1e-3  # AdamW, cosine-decayed to zero over `epochs`
    weight_decay: float = 1e-2
    box_weight: float = 2.0  # loss = cross-entropy + box_weight * (smooth-L1 + GIoU)
    val_split: str | None = "val"  # images.split value held out; when no image has it, use val_fraction
    val_fraction: float = 0.2  # share held out (chosen by each image's sha256) when there is no split
    target: str = "largest"  # which object of an image is its target: the largest non-difficult one
    flip: bool = True  # also train on mirrored maps (box mirrored too): cheap augmentation
    width: int = 256  # channels after the 1x1 reduction
    hidden: int = 512  # MLP width
    seed: int = 0
    device: str = "cpu"  # auto | cpu | cuda: the head is small, a CPU is fine
    quiet: bool = False


@dataclass
class Examples:
    """Images with a target: ids, class names, boxes normalised to [0, 1] (x1, y1, x2, y2)."""

    ids: list[int]
    labels: list[str]
    boxes: np.ndarray
    sizes: list[tuple[int, int]]  # width, height: to turn normalised boxes back into pixels


def pick_target(objects: Sequence[GroundTruthObject], policy: str = "largest") -> GroundTruthObject | None:
    """The object an image is trained and scored on (None: nothing usable)."""
    if policy not in TARGETS:
        raise BadInputError(f"unknown target policy {policy!r}; use one of {', '.join(TARGETS)}")
    usable = [o for o in objects if not o.difficult and o.area > 0]
    return max(usable, key=lambda o: o.area) if usable else None


def examples(store: Store, ids: Sequence[int] | None = None, policy: str = "largest") -> Examples:
    """Every image (of `ids`, or all) that has a target object."""
    if ids is None:
        ids = [r[0] for r in store.db.execute("SELECT DISTINCT image_id FROM objects ORDER BY image_id")]
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
        present = store.db.execute("SELECT count(*) FROM images WHERE split = ?", [config.val_split]).fetchone()[0]
        if present:
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
    val_accuracy: float
    val_corloc: float
    seconds: float
    history: list[dict] = field(default_factory=list)  # per epoch: train/val cross-entropy and box loss


def _losses(head: LocalizerHead, x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, box_weight: float):
    logits, box = head(x)
    known = y >= 0
    ce = F.cross_entropy(logits[known], y[known]) if known.any() else logits.sum() * 0
    pred = cxcywh_to_xyxy(box)
    box_loss = F.smooth_l1_loss(box, xyxy_to_cxcywh(b), beta=0.05) + giou_loss(pred, b)
    return ce, box_loss, ce + box_weight * box_loss, logits, pred


def train(config: TrainConfig) -> TrainReport:
    """Train a head on the index's stored maps, keep the epoch with the best validation loss, save it."""
    from tqdm import tqdm

    from simsearch.pipeline.embed import resolve_device

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    store = Store(config.index_dir)
    try:
        spec = store.spec
        if spec is None or spec.index_type == "pending":
            raise NotFoundError(f"{config.index_dir}: the index was never finished; run simsearch build-index again")
        every = examples(store, policy=config.target)
        if not every.ids:
            raise BadInputError(
                f"{config.index_dir}: no image has ground-truth boxes to learn from. Index a VOC folder or a "
                "box-list dataset (or composites from `simsearch synth`)")
        validation = choose_validation(store, every.ids, config)
        val_ids = held_out(store, every.ids, validation)
        rows = store.images(every.ids)
        # A VOC test split is never trained on: it stays clean for a final measurement.
        is_train = [i not in val_ids and rows[i]["split"] != "test" for i in every.ids]
        is_val = [i in val_ids for i in every.ids]
        train_idx = np.flatnonzero(is_train)
        val_idx = np.flatnonzero(is_val)
        if len(train_idx) == 0 or len(val_idx) == 0:
            raise BadInputError(
                f"{len(train_idx)} training and {len(val_idx)} validation images: both are needed. "
                "Change --val-split or --val-fraction")
        classes = sorted({every.labels[i] for i in train_idx})
        where = {c: k for k, c in enumerate(classes)}
        maps = torch.from_numpy(load_maps(store, every.ids))  # fp16 in memory, fp32 one batch at a time
        y = torch.tensor([where.get(label, -1) for label in every.labels])  # -1: a class only val has
        b = torch.from_numpy(every.boxes)
        embedder = spec.embedder
    finally:
        store.close()

    device = resolve_device(config.device)
    head = LocalizerHead(embedder.feature_shape[0], len(classes), embedder.feature_shape[1:],
                         config.width, config.hidden).to(device)
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, -(-len(train_idx) // config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.lr, total_steps=config.epochs * steps_per_epoch,
                                                   pct_start=0.1)
    best = (float("inf"), -1, None)
    history: list[dict] = []
    bar = tqdm(range(config.epochs), desc="training", unit="epoch", disable=config.quiet, dynamic_ncols=True)
    for epoch in bar:
        head.train()
        order = rng.permutation(train_idx)
        sums = np.zeros(3)
        for start in range(0, len(order), config.batch_size):
            batch = torch.from_numpy(order[start:start + config.batch_size])
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
    head.load_state_dict(best[2])
    seconds = time.perf_counter() - started
    best_row = history[best[1]]
    version = _version(head)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    spec = HeadSpec(
        tuple(classes), embedder.backbone, embedder.weights, embedder.weights_sha256, tuple(embedder.feature_shape),
        version, config.width, config.hidden, config.target, validation,
        {"config": settings, "train_images": int(len(train_idx)), "val_images": int(len(val_idx)),
         "best_epoch": best[1] + 1, "epochs_run": len(history), "best": best_row, "seconds": round(seconds, 2)},
    )
    with writer_lock(config.index_dir, "train-localizer"):
        Localizer(head.cpu(), spec).save(config.index_dir)
    return TrainReport(str(config.index_dir), version, classes, int(len(train_idx)), int(len(val_idx)), len(history),
                       best[1] + 1, best[0], best_row["val_accuracy"], best_row["val_corloc"], seconds, history)


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


def _version(head: nn.Module) -> str:
    """A short hash of the weights: the same head always has the same version."""
    digest = hashlib.sha256()
    for key, value in sorted(head.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------- predicting and storing

@dataclass
class LocalizeReport:
    index_dir: str
    head_version: str
    predicted: int
    seconds: float


def open_localizer(store: Store, head_dir: str | os.PathLike | None = None, device: str = "cpu") -> Localizer:
    """Load the head (from the index folder by default) and check it reads this index's features."""
    folder = Path(head_dir) if head_dir is not None else store.dir
    localizer = Localizer.load(folder, device)
    spec = store.spec
    if spec is None:
        raise NotFoundError(f"{store.dir}: index has no spec; rebuild it")
    localizer.spec.check(spec.embedder, str(folder))
    return localizer


def predict_records(store: Store, localizer: Localizer, ids: Sequence[int], chunk: int = 2048) -> list[dict]:
    """Predictions for records `ids`, with boxes in pixels of each original image."""
    out: list[dict] = []
    for start in range(0, len(ids), chunk):
        part = [int(i) for i in ids[start:start + chunk]]
        rows = store.images(part)
        labels, scores, boxes = localizer.predict_maps(store.feature_maps(part))
        for i, label, score, box in zip(part, labels, scores, boxes):
            w, h = rows[i]["width"], rows[i]["height"]
            out.append({"image_id": i, "label": localizer.spec.classes[int(label)], "score": float(score),
                        "xmin": float(box[0] * w), "ymin": float(box[1] * h),
                        "xmax": float(box[2] * w), "ymax": float(box[3] * h),
                        "head_version": localizer.spec.version})
    return out


def write_predictions(store: Store, predictions: Sequence[dict]) -> None:
    """Insert or replace rows of the `predictions` table (created on first use) in one transaction."""
    with store.transaction() as conn:
        conn.execute(PREDICTIONS_SCHEMA.strip().rstrip(";"))  # not executescript: it would commit early
        conn.executemany(
            "INSERT OR REPLACE INTO predictions(image_id, label, score, xmin, ymin, xmax, ymax, head_version)"
            " VALUES (:image_id, :label, :score, :xmin, :ymin, :xmax, :ymax, :head_version)", predictions)


def localize(index_dir: str | os.PathLike, head_dir: str | os.PathLike | None = None,
             ids: Sequence[int] | None = None) -> LocalizeReport:
    """Predict class, score and box for every record (or `ids`) and store them in `predictions`."""
    started = time.perf_counter()
    with writer_lock(index_dir, "localize"), Store(index_dir) as store:
        localizer = open_localizer(store, head_dir)
        if ids is None:
            ids = [r[0] for r in store.db.execute("SELECT image_id FROM feature_maps ORDER BY image_id")]
        predictions = predict_records(store, localizer, ids)
        write_predictions(store, predictions)
    return LocalizeReport(str(index_dir), localizer.spec.version, len(predictions), time.perf_counter() - started)


def _after_build(store: Store, new_ids: list[int], config) -> None:
    """build-index hook: new images get predictions when the index has a head."""
    if not new_ids or not Localizer.exists(store.dir):
        return
    localizer = open_localizer(store)
    write_predictions(store, predict_records(store, localizer, new_ids))
    log.info("localized %d new images with head %s", len(new_ids), localizer.spec.version)


if _after_build not in _build.POST_BUILD_HOOKS:
    _build.POST_BUILD_HOOKS.append(_after_build)


# ---------------------------------------------------------------- evaluating

def evaluation_ids(store: Store, spec: HeadSpec, split: str) -> list[int]:
    """Images with a target in `split`: val/train = the head's own held-out/training images, all, or a split name."""
    every = examples(store, policy=spec.target).ids
    if split == "all":
        return every
    if split in ("val", "train"):
        val = held_out(store, every, spec.validation)
        rows = store.images(every)
        if split == "val":
            return [i for i in every if i in val]
        return [i for i in every if i not in val and rows[i]["split"] != "test"]
    rows = store.images(every)
    chosen = [i for i in every if rows[i]["split"] == split]
    if not chosen:
        raise BadInputError(f"no image with ground truth has split {split!r}; use val, train, all or a split name")
    return chosen


def evaluate(index_dir: str | os.PathLike, split: str = "val", head_dir: str | os.PathLike | None = None) -> Evaluation:
    """Score the head on images with ground truth: top-1 accuracy, mean IoU, CorLoc, per class, confusion."""
    store = Store(index_dir)
    try:
        localizer = open_localizer(store, head_dir)
        ids = evaluation_ids(store, localizer.spec, split)
        if not ids:
            raise BadInputError(f"no images with ground truth in split {split!r} of {index_dir}")
        truth = examples(store, ids, localizer.spec.target)
        labels, _, boxes = localizer.predict_maps(load_maps(store, truth.ids))
    finally:
        store.close()
    predicted = [localizer.spec.classes[int(k)] for k in labels]
    result = evaluate_predictions(truth.labels, predicted, truth.boxes, boxes)
    known = set(localizer.spec.classes)
    result.extra = {"split": split, "head_version": localizer.spec.version,
                    "unseen_class_images": sum(label not in known for label in truth.labels),
                    "chance_accuracy": _majority_share(truth.labels)}
    return result


def _majority_share(labels: Sequence[str]) -> float:
    """Accuracy of always answering the most common class: the bar a head must clear."""
    from collections import Counter

    return Counter(labels).most_common(1)[0][1] / len(labels) if labels else 0.0
