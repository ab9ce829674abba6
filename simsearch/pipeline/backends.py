"""Backends: what runs a backbone's forward pass, PyTorch or OpenVINO, picked at run time.

A backend turns preprocessed batches, one (B, 3, H, W) tensor per input shape, into the
backbone's feature maps (B, C, h, w); pooling, tags and maps stay in `Embedder.embed_groups`,
the same for all. On a CPU OpenVINO, one stream a core with a few images a request, ran
ResNet50 2-3x and Lite0 4-5x PyTorch eager bf16 on the same images
(benchmarks/bench_backends.py), with vectors at mean cosine 0.999 to fp32 (top-10 neighbours
0.97 the same), so `auto` takes it where it is installed (the `openvino` extra) and the
device is a CPU; everywhere else `auto` is PyTorch, which needs nothing more.

OpenVINO's conversion of a torch module (tracing, then graph passes) costs seconds,
and compiling the converted model costs more: both are cached in the user cache
(`cache_dir()`), keyed by the backbone's weights and the precision, so a second run
reads the converted model and its compiled kernels from disk.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from simsearch.errors import BadInputError
from simsearch.pipeline.decode import normalize, pixel_mean_std
from simsearch.pipeline.openvino_cache import mark_used, prune_stale_cache
from simsearch.spec import EmbedderSpec, Preprocess

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino")
# SIMSEARCH_BACKEND=torch makes `auto` PyTorch everywhere (commands without --backend, such as
# query and serve, included): for a process that must not load OpenVINO beside something else.
BACKEND_ENV = "SIMSEARCH_BACKEND"
# Bumped when the conversion below changes, so caches made by older code are not reused.
CONVERSION_VERSION = 1


class Runner(Protocol):
    """A backbone's forward pass on one backend."""

    name: str  # "torch" or "openvino": recorded in the index spec

    def __call__(self, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each (B, 3, H, W) normalised float input on the embedder's device -> its (B, C, h, w) feature map.

        A batch of mixed input shapes comes as one tensor per shape, all in one call, so a
        backend with several streams can keep every core busy across them. A runner whose
        `takes_uint8` is True is handed the decoders' uint8 pixels instead, and normalises them itself.
        """
        ...


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run: `auto` is OpenVINO on a CPU where it is installed, else torch."""
    if backend not in BACKENDS:
        raise BadInputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "openvino":
        if device.type != "cpu":
            raise BadInputError("--backend openvino runs on the CPU; use --device cpu, or --backend torch on a GPU")
        if not openvino_installed():
            raise BadInputError("--backend openvino needs OpenVINO: pip install 'simsearch[openvino]', "
                                "or use --backend torch")
        return backend
    if backend == "auto":
        wanted = os.environ.get(BACKEND_ENV, "").strip().lower()
        if wanted == "torch":
            return "torch"
        return "openvino" if device.type == "cpu" and dtype != torch.float16 and openvino_installed() else "torch"
    return backend


def cache_dir() -> Path:
    """Where converted models are kept: $SIMSEARCH_CACHE_DIR, else the XDG user cache."""
    if os.environ.get("SIMSEARCH_CACHE_DIR"):
        return Path(os.environ["SIMSEARCH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "simsearch"


class TorchRunner:
    """PyTorch eager, under autocast when the precision is below fp32."""

    name = "torch"

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype

    def __call__(self, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            # channels_last: oneDNN's and cuDNN's fastest layout
            return [self.model(x.contiguous(memory_format=torch.channels_last)) for x in batches]


class OpenVINORunner:
    """The backbone converted to OpenVINO once, with dynamic batch and input sides.

    One dynamic model serves every aspect-kept input shape: never a compile per new shape (a
    model compiled per static shape was not measured). It is compiled for streams, and on first
    use for single requests when a call is too small to fill them (`__call__`), each for uint8 or
    float input as calls bring them (a build compiles one, a query a second). bf16 runs on AMX /
    AVX512-BF16 through OpenVINO's inference precision; the weights stay fp32 in the cache.

    uint8 batches (what the decoders give) go to the model with the backbone's normalisation
    added in front of it (`_normalising`), so OpenVINO converts the pixels inside its first
    layer: the build's shape groups ran 1.13x (Lite0) and 1.08x (ResNet50) as fast as with
    the pixels normalised by torch first (ad-hoc interleaved probe, 8 and 6 rounds), with
    vectors at cosine 0.9999998 to that. Floats (already normalised) run the model as converted.
    """

    name = "openvino"
    takes_uint8 = True  # `Embedder.embed_groups` hands uint8 batches over as they are

    def __init__(self, model: nn.Module, spec: EmbedderSpec, dtype: torch.dtype, cache: Path | None = None):
        import openvino as ov

        self.precision = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(dtype)
        if self.precision is None:
            raise BadInputError("OpenVINO runs fp32 or bf16 here; use --precision bf16 or fp32")
        self.folder = (cache or cache_dir()) / "openvino" / _cache_key(spec, ov.get_version())
        self.converted = False  # True when this load paid the conversion (the cache was cold)
        started = time.perf_counter()
        core = ov.Core()
        core.set_property({"CACHE_DIR": str(self.folder / "compiled")})  # OpenVINO's own kernel cache
        xml = self.folder / "model.xml"
        if not xml.is_file():
            self._convert(model, spec, xml)
            self.converted = True
        self._core, self._xml, self._pre = core, xml, spec.preprocess
        self._source = (model, spec)  # to convert again if the cached files were pruned since (`_run`)
        self._images_per_request = IMAGES_PER_REQUEST.get(spec.backbone, 1)
        # Compiled on first use, by input kind and by streams or one request: a build uses one of them.
        self._runs: dict[tuple[bool, bool], StreamedRequests | OneRequest] = {}
        self._runs_lock = threading.Lock()
        self._streams = self._run(uint8=True, streams=True)  # a build's: compiled now, and it counts streams
        log.info("openvino %s model %s in %.1fs (%s)", self.precision, "converted" if self.converted else "loaded",
                 time.perf_counter() - started, self.folder)
        prune_stale_cache(self.folder.parent, keep=self.folder)
        self._stamped = time.monotonic()  # and again once a day while this process uses it (`__call__`)

    def _convert(self, model: nn.Module, spec: EmbedderSpec, xml: Path) -> None:
        """Trace the module and write the model beside its key, atomically (parallel runs may race)."""
        import openvino as ov

        side = spec.preprocess.size
        example = torch.zeros(1, 3, side, side)
        with torch.no_grad():
            converted = ov.convert_model(model.float().eval(), example_input=example, input=[(-1, 3, -1, -1)])
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.folder, prefix=".converting-"))
        try:
            ov.save_model(converted, str(staging / "model.xml"), compress_to_fp16=False)
            (staging / "model.bin").replace(xml.with_suffix(".bin"))
            (staging / "model.xml").replace(xml)  # last: its presence says the pair is complete
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _config(self, hint: str) -> dict:
        # As many threads as torch would use: OMP_NUM_THREADS and a Ray actor's CPU share hold for both.
        threads = torch.get_num_threads()
        # OpenVINO pins its threads to the first cores; several processes given a share each (Ray
        # actors on one machine) would all pin to the same ones.
        return {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": hint,
                "INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": threads >= (os.cpu_count() or 1)}

    def __call__(self, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if time.monotonic() - self._stamped > 86400:  # a server up for months: its model is in use
            mark_used(self.folder)
            self._stamped = time.monotonic()
        uint8 = all(x.dtype == torch.uint8 for x in batches)
        if not uint8:  # mixed kinds (never from a decoder): all as normalised floats
            batches = [normalize(x, self._pre) for x in batches]
        if self._streams.request_count(batches) >= self._streams.requests:
            return self._run(uint8, streams=True)(batches)
        # Fewer requests than streams (a query's one image): a stream has one core, so the whole
        # model on every thread answers sooner (Lite0 6.0 against 11.3 ms here, ResNet50 22.9 against 32.8).
        # Compiled on first use (about 0.3 s from OpenVINO's cache), so a build seldom pays it.
        return self._run(uint8, streams=False)(batches)

    def _run(self, uint8: bool, streams: bool) -> StreamedRequests | OneRequest:
        run = self._runs.get((uint8, streams))
        if run is not None:  # compiled: no lock (a first compile of another kind may be holding it)
            return run
        with self._runs_lock:
            if (uint8, streams) not in self._runs:
                if not self._xml.is_file():  # pruned by another process while this one ran for weeks
                    self._convert(*self._source, self._xml)
                mark_used(self.folder)
                model = self._core.read_model(str(self._xml))
                if uint8:
                    model = _normalising(model, self._pre)
                compiled = self._core.compile_model(model, "CPU", self._config("THROUGHPUT" if streams else "LATENCY"))
                self._runs[uint8, streams] = (StreamedRequests(compiled, self._images_per_request) if streams
                                              else OneRequest(compiled))
            return self._runs[uint8, streams]

    def one_request(self, uint8: bool = True) -> OneRequest:
        """The model compiled for one request over every thread (the LATENCY hint), for uint8 or float input."""
        run = self._run(uint8, streams=False)
        assert isinstance(run, OneRequest)
        return run


def _normalising(model, pre: Preprocess):
    """`model` taking uint8 pixels, with the backbone's normalisation (`decode.normalize`) in front of it."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    steps = PrePostProcessor(model)
    steps.input().tensor().set_element_type(ov.Type.u8)
    steps.input().model().set_layout(ov.Layout("NCHW"))
    mean, std = pixel_mean_std(pre)
    steps.input().preprocess().convert_element_type(ov.Type.f32).mean(mean).scale(std)
    return steps.build()


class OneRequest:
    """A compiled model's single request, each input shape in turn, under a lock (a request is not thread-safe)."""

    def __init__(self, compiled):
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    def __call__(self, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with self._lock:
            # The request reuses its output buffer on the next call: copy before handing it on.
            return [torch.from_numpy(self._request.infer({0: x.detach().cpu().contiguous().numpy()})[0].copy())
                    for x in batches]


# Images per OpenVINO request when the model runs several streams. ResNet50's weights (50 MB in
# bf16) are read once a request, so two images a request beat one; Lite0's are 7 MB and one
# image a request ran fastest. Measured on the 2-core AMX machine, 8 interleaved rounds of one
# 32-image batch (ad-hoc probe): ResNet50 1/2/4 a request 84/113/105 img/s against 72 for one
# request of 32 on two threads; Lite0 375/301/296 against 300.
IMAGES_PER_REQUEST = {"resnet50": 2}


class StreamedRequests:
    """Runs batches through a compiled model's streams: a few images a request, then waits for all.

    One request on two threads runs each layer at its slower thread's pace, and on a shared
    machine the two cores' speeds differ from one moment to the next (a one-thread ResNet50
    ran 35-80 img/s on either core here). Independent requests, one stream a core, let the
    faster core take more of the batch. Several requests also overlap one input shape's tail
    with the next shape's start.

    The requests are plain ones, twice as many in flight as there are streams (so a stream finds
    the next one queued while this thread waits for an older one), waited for in the order they
    were started, each call holding its own (calls from several threads need no lock). Not
    OpenVINO's `AsyncInferQueue`: its Python callback runs on the stream threads, and a compiled
    model freed while one of them was still in it deadlocked the process (the freeing thread
    holds the GIL and joins the stream threads, which wait for the GIL): 3 of 3 stress runs here
    hung within 11 rounds of making and dropping embedders (on a busy machine; `bench_faults.py
    --only embedders`). Nothing Python runs on OpenVINO's threads now.
    """

    def __init__(self, compiled, images_per_request: int = 1):
        self.compiled = compiled
        self.requests = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        # With one stream, small requests only lose the batch's efficiency: send each batch whole.
        self.images_per_request = images_per_request if self.requests > 1 else 1 << 30
        self.in_flight = 2 * self.requests  # a call's requests running or queued at once
        self._idle: list = []  # requests no call holds, at most `in_flight`; list.pop and append are atomic

    def request_count(self, batches: Sequence[torch.Tensor]) -> int:
        """How many requests these batches make."""
        return sum(-(-len(x) // self.images_per_request) for x in batches)

    def __call__(self, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        import numpy as np

        if any(len(x) == 0 for x in batches):
            raise ValueError("every batch needs at least one image")
        arrays = [x.detach().cpu().contiguous().numpy() for x in batches]
        outputs: list[np.ndarray | None] = [None] * len(arrays)
        running: deque = deque()  # (request, batch, first image), oldest first

        def finish_oldest():
            request, b, start = running[0]
            request.wait()
            data = request.get_output_tensor(0).data  # the request's own buffer: copied before its reuse
            if outputs[b] is None:
                outputs[b] = np.empty((len(arrays[b]), *data.shape[1:]), data.dtype)
            outputs[b][start:start + len(data)] = data
            return running.popleft()[0]

        try:
            for b, array in enumerate(arrays):
                for start in range(0, len(array), self.images_per_request):
                    request = finish_oldest() if len(running) >= self.in_flight else self._request()
                    running.append((request, b, start))
                    # Shared, not copied: `arrays` outlives every request (each is waited for).
                    request.start_async({0: array[start:start + self.images_per_request]}, share_inputs=True)
            while running:
                self._release(finish_oldest())
        except BaseException:  # a failed request, a bad input, Ctrl-C: none may still read `arrays`
            self._settle(running)
            raise
        return [torch.from_numpy(out) for out in outputs]

    def _request(self):
        try:
            return self._idle.pop()
        except IndexError:  # every pooled request is in another call
            return self.compiled.create_infer_request()

    def _release(self, request) -> None:
        if len(self._idle) < self.in_flight:  # beyond that (calls from several threads at once): freed
            self._idle.append(request)

    def _settle(self, running: deque) -> None:
        """Wait for every request still running, even through a second Ctrl-C; outputs unread."""
        interrupted: BaseException | None = None
        while running:
            request = running.popleft()[0]
            while True:
                try:
                    request.wait()
                    break
                except KeyboardInterrupt as e:  # keep waiting: the request still reads its input
                    interrupted = interrupted or e
                except Exception:  # noqa: BLE001 - a failed request; the caller raises the first error
                    break
            self._release(request)
        if interrupted is not None:
            raise interrupted


def _cache_key(spec: EmbedderSpec, openvino_version: str) -> str:
    """One cached model per backbone, weights, input layout and OpenVINO version (precision is a compile option)."""
    parts = (spec.backbone, spec.weights_sha256, str(spec.feature_shape), openvino_version, str(CONVERSION_VERSION))
    return f"{spec.backbone}-{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:16]}"


def make_runner(backend: str, model: nn.Module, spec: EmbedderSpec, device: torch.device,
                dtype: torch.dtype, fallback: bool = False) -> Runner:
    """The runner for a resolved backend name (see `resolve_backend`).

    `fallback` (the user said auto): a model OpenVINO cannot convert or compile (weights with an
    op it lacks, say) runs on torch with a warning rather than stopping the build.
    """
    if backend == "openvino":
        try:
            return OpenVINORunner(model, spec, dtype)
        except BadInputError:
            raise
        except Exception as e:  # noqa: BLE001 - conversion and compilation raise many kinds; all mean "not here"
            if not fallback:
                raise BadInputError(f"OpenVINO could not run {spec.backbone} ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200]}); use --backend torch") from e
            log.warning("OpenVINO could not run %s (%s); running it with torch", spec.backbone, type(e).__name__)
    return TorchRunner(model, device, dtype)
