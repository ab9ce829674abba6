"""Ray engine: embed a build's files on a Ray actor pool, on this machine or a cluster.

`iter_ray_file_batches` keeps the contract of `embed.iter_file_batches`: the same
`FileBatch` objects, decoded by the same `ImageFileDataset` (`open_image` + `preprocess`)
and embedded by the same `Embedder.embed_batch`, so the build commits them exactly as it
commits the local engine's (one SQLite transaction a batch, FAISS synced at the end) and
is as crash-safe. Ray Data reads the (position, path) list, `map_batches` runs `EmbedActor`
in a pool (one GPU per actor where the cluster has GPUs, CPU actors otherwise), and the
driver ingests the vectors and feature maps as they come back.

Each actor loads the backbone itself (model name + weights), so every node needs
simsearch, the backbone's weights at the same path, and the image files at the paths the
driver scanned (a shared filesystem).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from simsearch import errors
from simsearch.errors import BadInputError, SimsearchError
from simsearch.pipeline.embed import (
    EmbedConfig, EmbeddedBatch, Embedder, FileBatch, ImageFileDataset, load_backbone,
)
from simsearch.records import Tag
from simsearch.spec import EmbedderSpec, check_compatible

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'simsearch[ray]'"
MAX_CPUS_PER_ACTOR = 8  # a many-core node gets several 8-thread actors, not one wide one (a choice, not measured here)
CONNECT_TIMEOUT_S = 5.0  # Ray itself retries an unreachable address for minutes; we ask once, briefly
ADDRESS_HELP = "--address is auto (the cluster `ray start --head` runs on this machine) or HEAD:6379 (its head node)"

FileBatches = Callable[[Sequence[str | os.PathLike], Embedder, EmbedConfig], Iterator[FileBatch]]


def ray_file_batches(address: str | None = None) -> FileBatches:
    """The Ray engine, called like `iter_file_batches`, after checking it can run.

    Checked now, before a build writes anything: Ray is installed, and `address` is
    well formed and answers. Ray itself is started (or joined) only once there is
    something to embed. `address` None: $RAY_ADDRESS, else a Ray instance private to
    the build, started and stopped with it.
    """
    _import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    _check_reachable(address)
    return functools.partial(iter_ray_file_batches, address=address)


def iter_ray_file_batches(
    paths: Sequence[str | os.PathLike], embedder: Embedder, config: EmbedConfig, address: str | None = None
) -> Iterator[FileBatch]:
    """Embed files on a Ray actor pool, batch by batch, in the order the batches finish.

    `embedder` is the driver's: only its spec is used, and every actor's backbone must
    match it. `config.device` picks the actors' device: auto takes the cluster's GPUs
    when it has any.
    """
    ray = _import_ray()
    from tqdm import tqdm

    if not paths:
        return
    config = _portable(config)
    # stdout is data: what Ray prints for the driver (a task being retried, say) goes to stderr.
    with redirect_stdout(sys.stderr), _connected(ray, address), _quiet_ray_data(ray):
        pool = plan_pool(ray, config.device, config.batch_size, len(paths))
        log.info("ray: %s", pool.describe())
        dataset = ray.data.from_items([{"position": i, "path": str(p)} for i, p in enumerate(paths)])
        embedded = dataset.map_batches(
            EmbedActor,
            fn_constructor_kwargs={"spec": embedder.spec, "config": config, "device": pool.device,
                                   "threads": pool.cpus_per_actor},
            batch_size=config.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.cpus_per_actor,
            num_gpus=pool.gpus_per_actor,
        )
        started = time.perf_counter()
        with tqdm(total=len(paths), unit="img", disable=config.quiet, desc=f"embedding on ray ({pool.describe()})",
                  dynamic_ncols=True) as bar:
            try:
                for block in embedded.iter_batches(batch_size=None, batch_format="numpy"):
                    yield file_batch(block)
                    bar.update(len(block["position"]))
            except SimsearchError:
                raise
            except Exception as e:  # noqa: BLE001 - Ray's failures come in many types; each is one line here
                raise _one_line(e) from None
        log.info("ray: %d images in %.1fs", len(paths), time.perf_counter() - started)


def file_batch(block: dict[str, np.ndarray]) -> FileBatch:
    """An actor's output rows as the FileBatch the build commits (or the actor's own error, raised here)."""
    if len(block["fatal"]) and block["fatal"][0]:
        name, _, message = str(block["fatal"][0]).partition(": ")
        kind = getattr(errors, name, None)
        raise (kind if isinstance(kind, type) and issubclass(kind, SimsearchError) else SimsearchError)(message)
    ok = block["ok"].astype(bool)
    positions = block["position"].astype(np.int64)
    failures = [(int(i), str(why)) for i, why in zip(positions[~ok], block["error"][~ok])]
    if not ok.any():
        return FileBatch([], [], None, failures)
    vectors = np.ascontiguousarray(block["vector"][ok], dtype=np.float32)
    maps = np.ascontiguousarray(block["map"][ok], dtype=np.float16)
    sizes = [(int(w), int(h)) for w, h in zip(block["width"][ok], block["height"][ok])]
    # Tags travel as one JSON text a row ("" where the backbone has no classifier): Arrow holds strings.
    texts = [str(t) for t in block["tags"][ok]] if "tags" in block else []
    tags = [[Tag(label, score) for label, score in json.loads(t)] for t in texts] if any(texts) else None
    return FileBatch([int(i) for i in positions[ok]], sizes, EmbeddedBatch(vectors, maps, tags), failures)


class EmbedActor:
    """One model replica in the pool: decodes its batch with the local engine's dataset, then embeds it."""

    def __init__(self, spec: EmbedderSpec, config: EmbedConfig, device: str, threads: int):
        import torch

        torch.set_num_threads(threads)  # the CPUs Ray gave this actor, not the whole node's
        self.spec, self.max_pixels = spec, config.max_pixels
        # Pillow decodes and resizes without the GIL: threads decode a batch in parallel.
        self.decoders = ThreadPoolExecutor(max(1, threads))
        # Our own errors (weights missing or different on this node) travel back as data: Ray would
        # report a failed constructor as an ActorDiedError holding only the traceback's text.
        self.fatal = ""
        try:
            backbone = load_backbone(config.model, config.weights)
            check_compatible(spec, backbone.spec, "the index (on a Ray worker)")
            self.embedder = Embedder(backbone, device, config.precision, config.backend)
        except SimsearchError as e:
            self.fatal = f"{type(e).__name__}: {e}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, spec = len(batch["position"]), self.spec
        rows = {"position": batch["position"], "ok": np.zeros(n, dtype=bool), "error": np.full(n, "", dtype=object),
                "width": np.zeros(n, dtype=np.int64), "height": np.zeros(n, dtype=np.int64),
                "vector": np.zeros((n, spec.dim), dtype=np.float32),
                "map": np.zeros((n, *spec.feature_shape), dtype=np.float16),
                "tags": np.full(n, "", dtype=object),
                "fatal": np.full(n, self.fatal, dtype=object)}
        if self.fatal:
            return rows
        files = ImageFileDataset(list(batch["path"]), spec.preprocess, self.max_pixels)
        decoded = list(self.decoders.map(files.__getitem__, range(n)))
        for d in decoded:
            rows["ok"][d.index], rows["width"][d.index], rows["height"][d.index] = d.tensor is not None, d.width, d.height
            if d.tensor is None:
                rows["error"][d.index] = d.error or "unreadable"
        good = np.flatnonzero(rows["ok"])
        if len(good):
            out = self.embedder.embed_batch([decoded[i].tensor for i in good])
            rows["vector"][good], rows["map"][good] = out.vectors, out.maps
            for i, tags in zip(good, out.tags or []):
                rows["tags"][i] = json.dumps([[t.label, t.score] for t in tags])
        return rows


@dataclass(frozen=True)
class Pool:
    """The actor pool a build asks Ray for."""

    actors: int
    cpus_per_actor: int
    gpus_per_actor: int
    device: str  # what each actor's Embedder runs on: "cpu", or "cuda" (the one GPU Ray gave it)

    def describe(self) -> str:
        kind = "GPU" if self.gpus_per_actor else "CPU"
        return f"{self.actors} {kind} actor{'s' if self.actors != 1 else ''}, {self.cpus_per_actor} CPUs each"


def plan_pool(ray, device: str, batch_size: int, n_images: int) -> Pool:
    """One actor per GPU when there are GPUs (and the device allows them), else CPU actors filling the nodes.

    Never more actors than batches: each one loads a model.
    """
    if not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise BadInputError(f"unknown device {device!r}; use auto, cpu or cuda")
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    batches = max(1, math.ceil(n_images / batch_size))
    if device.startswith("cuda") and gpus == 0:
        raise BadInputError("--device cuda asked for, but the Ray cluster has no GPU. Use --device auto or cpu.")
    if device != "cpu" and gpus > 0:
        cpus = max(1, min(MAX_CPUS_PER_ACTOR, int(total.get("CPU", 1)) // gpus))
        return Pool(min(gpus, batches), cpus, 1, "cuda")
    nodes = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    nodes = [c for c in nodes if c >= 1] or [1]
    cpus = max(1, min(MAX_CPUS_PER_ACTOR, min(nodes)))
    return Pool(min(sum(c // cpus for c in nodes), batches), cpus, 0, "cpu")


# ---------------------------------------------------------------- Ray itself

def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the engine's API; ray without its data extra lacks pyarrow)
    except ImportError as e:
        raise BadInputError(f"--engine ray needs Ray ({e}): {INSTALL_HINT}") from None
    return ray


def _portable(config: EmbedConfig) -> EmbedConfig:
    """The config as actors read it: a relative weights path made absolute (workers run in another folder)."""
    if config.weights and Path(config.weights).is_file():
        return replace(config, weights=str(Path(config.weights).resolve()))
    return config


def _check_reachable(address: str | None) -> None:
    """A host:port address (or the one `auto` finds) must parse and accept a connection within seconds."""
    if address in (None, "local"):
        return  # a private instance, started by the build
    if address.startswith("ray://"):
        # Ray Data's streaming executor needs a driver inside the cluster (Ray 2.60: AttributeError 'core_worker').
        raise BadInputError(f"--address {address}: Ray Data does not run through Ray Client (ray://); run build-index "
                            "on a node of the cluster with --address auto or HEAD:6379, or submit it there with "
                            "`ray job submit --address http://HEAD:8265 -- simsearch build-index ... --engine ray`")
    target = _auto_address(address) if address == "auto" else address
    if target is None:
        return
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInputError(f"--address {address!r} is not a Ray address; {ADDRESS_HELP}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise BadInputError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one with "
                            f"`ray start --head` there; {ADDRESS_HELP}") from None


def _auto_address(address: str) -> str | None:
    """The host:port `auto` means here (the cluster `ray start` left on this machine), or None when Ray cannot tell us."""
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:  # a private helper of Ray's: without it, ray.init's own lookup speaks later
        return None
    try:
        return canonicalize_bootstrap_address_or_die(address)
    except ConnectionError as e:
        raise BadInputError(f"--address auto: no Ray cluster runs on this machine ({_first_line(e)}); start one "
                            "with `ray start --head`, or leave --address out for a Ray instance of the build's own") from None


@contextmanager
def _connected(ray, address: str | None) -> Iterator[None]:
    """Ray connected for the block: joined when this process already is, else started or joined and left after."""
    if ray.is_initialized():
        yield
        return
    # Workers' output stays in their log files: stdout is data here. Errors still come back as exceptions.
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address in (None, "local"):  # private to this build: no dashboard, stopped when it ends
            ray.init(address="local", include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
        raise BadInputError(f"cannot connect to Ray at {address or 'a local instance'} ({_first_line(e)}); "
                            f"{ADDRESS_HELP}; a cluster with token authentication (Ray's default) also needs "
                            "RAY_AUTH_MODE=token and its token in ~/.ray/auth_token") from None
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _quiet_ray_data(ray) -> Iterator[None]:
    """Ray Data's own progress bars and INFO lines off (ours are on stderr), unless simsearch logs INFO (-v)."""
    from ray.util.debug import log_once

    context = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    saved = context.enable_progress_bars, logger.level
    context.enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # its warning that bars are off: we turned them off
    if not log.isEnabledFor(logging.INFO):
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        context.enable_progress_bars, level = saved
        logger.setLevel(level)


def _one_line(error: BaseException) -> SimsearchError:
    """A failure inside Ray (a node lost, an actor that died) as one line: the error its traceback ends with."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt): ", ln)]
    what = raised[-1] if raised else f"{type(error).__name__}: {lines[0] if lines else ''}"
    return SimsearchError(f"the Ray build failed ({what}); the images committed so far are kept: "
                          "run the same command again to finish")


def _first_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[0] if lines else type(error).__name__
