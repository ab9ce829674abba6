"""What an index was built with, saved beside it so a query can never mix embedders."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from simsearch.errors import SpecMismatchError


@dataclass(frozen=True)
class Preprocess:
    """How pixels become the backbone's input; travels with the weights, as in torchvision."""

    size: int = 224  # the input holds about size*size pixels; never cropped, so boxes stay inside
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # "aspect": keep the aspect ratio (sides rounded to the stride); measured better for retrieval
    # than squashing, and padding hurt more than either. "squash": size x size, for fixed-shape runs.
    resize: str = "aspect"
    stride: int = 32  # the backbone's output stride: input sides are multiples of it
    interpolation: str = "bicubic"

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the backbone sees for an image of this size."""
        if self.resize == "squash":
            return self.size, self.size
        scale = self.size / max(1.0, (width * height) ** 0.5)
        def side(v: int) -> int:
            return int(min(2 * self.size, max(self.stride, round(v * scale / self.stride) * self.stride)))
        return side(width), side(height)


@dataclass(frozen=True)
class EmbedderSpec:
    """The part of the spec that decides which vectors are comparable."""

    backbone: str  # registry name, e.g. "resnet50"
    weights: str  # e.g. "IMAGENET1K_V2", a local file name, or "random" (plumbing only)
    weights_sha256: str  # hash (or torchvision's hash prefix) of the weights actually loaded
    dim: int  # length of the pooled vector
    feature_shape: tuple[int, int, int]  # C, H, W of the stored map: resampled to this grid over the whole image
    preprocess: Preprocess = field(default_factory=Preprocess)
    pooling: str = "avg+l2"  # global average pool, then L2 normalisation
    # What ran the backbone when the index was first built: "torch" or "openvino". Recorded, not
    # compared: their vectors differ like bf16's from fp32's (measured: mean cosine 0.999, top-10 overlap
    # 0.97 on ../shared/data), so an index built with OpenVINO stays queryable without it.
    backend: str = "torch"


@dataclass(frozen=True)
class IndexSpec:
    """Everything `spec.json` records about an index."""

    embedder: EmbedderSpec
    index_type: str | None  # faiss factory string, e.g. "Flat" or "IVF1024,Flat"; None until FAISS is first built
    metric: str = "inner_product"  # on L2-normalised vectors, i.e. cosine similarity
    nprobe: int | None = None  # search-time breadth for IVF indexes
    efsearch: int | None = None  # search-time breadth for HNSW indexes
    rerank: int | None = None  # candidates re-scored with the stored float32 vectors (PQ codes); None: FAISS's scores

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "IndexSpec":
        data = json.loads(text)
        emb = data["embedder"]
        emb["preprocess"] = Preprocess(
            **{**emb["preprocess"], "mean": tuple(emb["preprocess"]["mean"]), "std": tuple(emb["preprocess"]["std"])}
        )
        emb["feature_shape"] = tuple(emb["feature_shape"])
        data["embedder"] = EmbedderSpec(**emb)
        if data.get("index_type") == "pending":  # how indexes made before the `finished` rule said None
            data["index_type"] = None
        return IndexSpec(**data)


def check_compatible(saved: EmbedderSpec, wanted: EmbedderSpec, where: str) -> None:
    """Refuse to mix vectors from different embedders: their similarities mean nothing."""
    for name in ("backbone", "weights_sha256", "dim", "preprocess", "pooling"):
        a, b = getattr(saved, name), getattr(wanted, name)
        if a != b:
            raise SpecMismatchError(
                f"{where} was built with backbone {saved.backbone!r} (weights {saved.weights}), "
                f"but this run uses {wanted.backbone!r} (weights {wanted.weights}): {name} differs. "
                f"Use --model {saved.backbone} with the same weights, or build a new index with --index."
            )
