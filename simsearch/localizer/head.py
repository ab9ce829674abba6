"""The localizer's model: a small head over cached feature maps, its spec, and its one file on disk.

The head reads the backbone's spatial map (C, 7, 7) that the build stored for
every image, so training never runs the backbone again. The map is resampled to
one grid over the whole image (the input keeps its aspect ratio, never cropped),
so a box normalised by the image's width and height lands directly on the grid.
Two outputs: class logits and a box (cx, cy, w, h in [0, 1]). The head is saved
beside the index with a spec naming the backbone whose features it reads; any
other backbone is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simsearch.errors import IndexDamagedError, NotFoundError, SpecMismatchError
from simsearch.localizer.familiarity import References, familiarity
from simsearch.pipeline.box_vectors import pool_boxes
from simsearch.localizer.dense import DenseHead, Detections, decode
from simsearch.records import UNKNOWN
from simsearch.spec import EmbedderSpec
from simsearch.storage import layout

HEAD_FILE = layout.HEAD  # {"format", "spec" (HeadSpec JSON), "state" (weights)}: one file, one rename
HEAD_FORMAT = 2
LEGACY_SPEC = layout.LEGACY_HEAD_SPEC  # format 1 kept the spec in a second file, which a kill could leave stale


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


def one_cycle(head: nn.Module, lr: float, weight_decay: float, epochs: int, steps_per_epoch: int):
    """AdamW under a one-cycle schedule over the whole run: how both heads train (measured on composites and
    indoor-boxes: warm-up a tenth of the steps, then cosine to zero)."""
    optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=epochs * max(1, steps_per_epoch),
                                                   pct_start=0.1)
    return optimiser, schedule


# ---------------------------------------------------------------- spec and files

@dataclass(frozen=True)
class HeadSpec:
    """Everything a saved head records: what the head predicts and whose features it reads."""

    classes: tuple[str, ...]
    backbone: str  # EmbedderSpec.backbone of the features it was trained on
    weights: str
    weights_sha256: str  # the backbone weights' hash: features of other weights mean nothing to it
    feature_shape: tuple[int, int, int]  # C, H, W of the maps it reads
    version: str  # a hash of the weights (same weights, same version); stored with each prediction
    width: int = 256
    hidden: int = 512
    target: str = "largest"
    validation: dict = field(default_factory=dict)  # how the held-out images were chosen
    training: dict = field(default_factory=dict)  # config, epochs, losses, seconds: for the record
    # Heads saved before calibration lack these two: T = 1 and no threshold predict exactly as they did.
    temperature: float = 1.0  # logits are divided by T before the softmax (fitted on validation, calibrate.py)
    threshold: float = 0.0  # a calibrated score below this is stored as UNKNOWN (0: never); dense: not stored either
    # Heads saved before familiarity lack this: -1 never calls a box unknown on that ground (familiarity.py).
    familiarity_threshold: float = -1.0  # a predicted box less similar than this to its class's training boxes: UNKNOWN
    # The dense head's (target "every", dense.py); a single-object head leaves them empty.
    anchors: tuple[tuple[float, float], ...] = ()  # anchor width, height per cell, fractions of the image
    upsample: int = 1  # its grid is the map's times this
    nms_iou: float = 0.5  # per-class NMS overlap
    max_detections: int = 100  # per image, after NMS

    @property
    def dense(self) -> bool:
        """A head that finds every object (many detections an image) rather than the largest one."""
        return self.target == "every"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "HeadSpec":
        data = json.loads(text)
        data["classes"] = tuple(data["classes"])
        data["feature_shape"] = tuple(data["feature_shape"])
        data["anchors"] = tuple(tuple(a) for a in data.get("anchors", ()))
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


@dataclass
class HeadOutput:
    """What the head says of n maps: the best class even when it is not claimed (see `unknown`)."""

    classes: np.ndarray  # (n,) index of the best class
    scores: np.ndarray  # (n,) its calibrated probability
    boxes: np.ndarray  # (n, 4) x1, y1, x2, y2 in [0, 1]
    familiarity: np.ndarray  # (n,) similarity of the box to its class's training boxes (familiarity.py)
    unknown: np.ndarray  # (n,) bool: score or familiarity below the head's thresholds


class Localizer:
    """A trained head ready to predict from stored feature maps."""

    def __init__(self, head: nn.Module, spec: HeadSpec, device: str = "cpu",
                 references: References | None = None):
        self.spec = spec
        self.device = torch.device(device)
        self.head = head.to(self.device).eval()
        self.references = references  # the training boxes' vectors that familiarity is measured against

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
            head = build_head(spec)
            head.load_state_dict(saved["state"])
            references = References.from_state(saved["references"]) if "references" in saved else None
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise IndexDamagedError(f"{path} is inconsistent ({str(e).splitlines()[0]}); {retrain}") from e
        return cls(head, spec, device, references)

    def save(self, folder: str | os.PathLike) -> None:
        """Weights and spec in one file, replaced atomically: a kill leaves the old head or the new one."""
        folder = Path(folder)
        tmp = folder / f"{HEAD_FILE}.{os.getpid()}.tmp"
        state = {k: v.cpu() for k, v in self.head.state_dict().items()}
        saved = {"format": HEAD_FORMAT, "spec": self.spec.to_json(), "state": state}
        if self.references is not None:
            saved["references"] = self.references.to_state()
        torch.save(saved, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must not land before the bytes do
        os.replace(tmp, folder / HEAD_FILE)
        (folder / LEGACY_SPEC).unlink(missing_ok=True)  # the old layout's second file, now meaningless

    @torch.inference_mode()
    def predict_maps(self, maps: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, C, H, W) maps -> class indices (n,), calibrated class scores (n,), boxes (n, 4) x1, y1, x2, y2 in [0, 1].

        Indices are the best class even below the threshold; `label_of` names them.
        """
        if self.spec.dense:  # its best detection: what the predictions table and Record.prediction hold
            best = [(d.labels[0], d.scores[0], d.boxes[0]) for d in self.detect_maps(maps, 0.0, batch_size)]
            if not best:
                return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, 4), np.float32)
            labels, scores, boxes = zip(*best)
            return np.array(labels, np.int64), np.array(scores, np.float32), np.stack(boxes).astype(np.float32)
        labels, scores, boxes = [], [], []
        for start in range(0, len(maps), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(maps[start:start + batch_size])).to(self.device).float()
            logits, box = self.head(x)
            prob = (logits / self.spec.temperature).softmax(dim=1)
            score, label = prob.max(dim=1)
            labels.append(label.cpu().numpy())
            scores.append(score.cpu().numpy())
            boxes.append(cxcywh_to_xyxy(box).clamp(0, 1).cpu().numpy())
        if not labels:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, 4), np.float32)
        return np.concatenate(labels), np.concatenate(scores), np.concatenate(boxes)

    def predict(self, maps: np.ndarray) -> HeadOutput:
        """Class, score and box of each map, and whether the head can claim that class (`unknown` when not).

        A prediction is unknown when its calibrated score is below the head's
        threshold, or when its box looks unlike every training box of that class.
        """
        labels, scores, boxes = self.predict_maps(maps)
        if self.references is not None and len(labels):
            vectors = np.concatenate(pool_boxes(maps, [b[None] for b in boxes]))
            familiar = familiarity(self.references, vectors, labels)
        else:
            familiar = familiarity(None, np.zeros((len(labels), 0)), labels)
        return HeadOutput(labels, scores, boxes, familiar, self._unknown(scores, familiar))

    def _unknown(self, scores: np.ndarray, familiar: np.ndarray) -> np.ndarray:
        """The one rule: a score below the head's threshold, or a box less familiar than its familiarity threshold."""
        return (scores < self.spec.threshold) | (familiar < self.spec.familiarity_threshold)

    @torch.inference_mode()
    def detect_maps(self, maps: np.ndarray, min_score: float | None = None, batch_size: int = 512
                    ) -> list[Detections]:
        """(n, C, H, W) maps -> each image's detections, best first (boxes as fractions of the image).

        A dense head gives every detection scoring at least `min_score` (default
        its threshold) after per-class NMS, and at least its best one whatever it
        scores; a single-object head gives its one box.
        """
        if not self.spec.dense:
            labels, scores, boxes = self.predict_maps(maps, batch_size)
            return [Detections(labels[k:k + 1], scores[k:k + 1], boxes[k:k + 1]) for k in range(len(labels))]
        floor = self.spec.threshold if min_score is None else min_score
        anchors = torch.tensor(self.spec.anchors, dtype=torch.float32, device=self.device)
        out: list[Detections] = []
        for start in range(0, len(maps), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(maps[start:start + batch_size])).to(self.device).float()
            raw = self.head(x)
            everything = decode(raw, anchors, 0.0, self.spec.nms_iou, self.spec.max_detections,
                                temperature=self.spec.temperature)
            for d in everything:
                keep = d.scores >= floor
                keep[:1] = True  # the best one always: an image's prediction row is never missing
                out.append(Detections(d.labels[keep], d.scores[keep], d.boxes[keep]))
        return out

    def judge(self, found: list[Detections], vectors: list[np.ndarray]) -> list[np.ndarray]:
        """For each map's detections, given their pooled box vectors, which ones the head cannot claim.

        One familiarity search for all of them: a build judges a batch of images at once.
        """
        counts = [len(d.labels) for d in found]
        if not sum(counts):
            return [np.zeros(0, dtype=bool) for _ in found]
        labels = np.concatenate([d.labels for d in found])
        scores = np.concatenate([d.scores for d in found])
        familiar = familiarity(self.references, np.concatenate(vectors), labels)
        return np.split(self._unknown(scores, familiar), np.cumsum(counts)[:-1])

    def label_of(self, index: int, unknown: bool) -> str:
        """The class name a prediction is stored under: UNKNOWN when the head cannot claim its best class."""
        return UNKNOWN if unknown else self.spec.classes[int(index)]

    @torch.inference_mode()
    def logits(self, maps: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """(n, C, H, W) maps -> (n, K) raw class logits, before the temperature: what calibration fits."""
        out = [self.head(torch.from_numpy(np.ascontiguousarray(maps[s:s + batch_size])).to(self.device).float())[0]
               .cpu().numpy() for s in range(0, len(maps), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.spec.classes)), np.float32)


def build_head(spec: HeadSpec) -> nn.Module:
    """The module a spec describes: the dense head for target "every", else the single-object head."""
    if spec.dense:
        return DenseHead(spec.feature_shape[0], len(spec.classes), len(spec.anchors), spec.width, spec.upsample)
    return LocalizerHead(spec.feature_shape[0], len(spec.classes), spec.feature_shape[1:], spec.width, spec.hidden)


def head_version(head: nn.Module) -> str:
    """A short hash of the weights: the same head always has the same version."""
    digest = hashlib.sha256()
    for key, value in sorted(head.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]
