"""Backends and decoding: which backend runs, that OpenVINO's vectors match fp32, that its conversion is cached.

The OpenVINO tests skip without the `openvino` extra; the fidelity test also without ../shared.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import time
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from simsearch.errors import BadInputError
from simsearch.pipeline import backends
from simsearch.pipeline.backends import OpenVINORunner, StreamedRequests, resolve_backend
from simsearch.pipeline.openvino_cache import STALE_AFTER_DAYS, TRASH_PREFIX, USED_STAMP, prune_stale_cache
from simsearch.pipeline.decode import normalize, preprocess
from simsearch.spec import EmbedderSpec, IndexSpec, Preprocess, check_compatible

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def _auto_as_users_get_it(monkeypatch):
    """conftest keeps the rest of the suite on torch; here `auto` is what a user gets."""
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)


def test_auto_is_openvino_on_a_cpu_only_where_it_is_installed(monkeypatch):
    monkeypatch.setattr(backends, "openvino_installed", lambda: True)
    assert resolve_backend("auto", CPU, torch.bfloat16) == "openvino"
    assert resolve_backend("auto", CPU, torch.float32) == "openvino"
    assert resolve_backend("auto", CUDA, torch.bfloat16) == "torch"  # OpenVINO here is a CPU runtime
    assert resolve_backend("torch", CPU, torch.bfloat16) == "torch"
    monkeypatch.setattr(backends, "openvino_installed", lambda: False)
    assert resolve_backend("auto", CPU, torch.bfloat16) == "torch"  # the default works without the extra


def test_simsearch_backend_torch_keeps_auto_off_openvino(monkeypatch):
    monkeypatch.setattr(backends, "openvino_installed", lambda: True)
    monkeypatch.setenv(backends.BACKEND_ENV, "torch")
    assert resolve_backend("auto", CPU, torch.bfloat16) == "torch"
    assert resolve_backend("openvino", CPU, torch.bfloat16) == "openvino"  # an explicit ask still wins
    monkeypatch.setenv(backends.BACKEND_ENV, "")
    assert resolve_backend("auto", CPU, torch.bfloat16) == "openvino"


def test_asking_for_openvino_where_it_cannot_run_says_what_to_do(monkeypatch):
    monkeypatch.setattr(backends, "openvino_installed", lambda: False)
    with pytest.raises(BadInputError, match=r"simsearch\[openvino\]"):
        resolve_backend("openvino", CPU, torch.bfloat16)
    monkeypatch.setattr(backends, "openvino_installed", lambda: True)
    with pytest.raises(BadInputError, match="--device cpu"):
        resolve_backend("openvino", CUDA, torch.bfloat16)
    with pytest.raises(BadInputError, match="auto, torch, openvino"):
        resolve_backend("tensorrt", CPU, torch.bfloat16)


def _spec(backend: str = "torch") -> EmbedderSpec:
    return EmbedderSpec("tiny", "random", "seed0", 8, (8, 7, 7), Preprocess(), backend=backend)


def test_spec_records_the_backend_and_older_specs_read_as_torch():
    saved = IndexSpec(_spec("openvino"), index_type="Flat")
    assert IndexSpec.from_json(saved.to_json()).embedder.backend == "openvino"
    old = json.loads(saved.to_json())
    del old["embedder"]["backend"]  # spec.json written before backends existed
    assert IndexSpec.from_json(json.dumps(old)).embedder.backend == "torch"
    # Noted, not refused: vectors from the two backends agree (see the fidelity test).
    check_compatible(_spec("torch"), _spec("openvino"), "this index")


def test_the_embedder_records_what_ran_its_model():
    from simsearch.pipeline.embed import Embedder, load_backbone

    embedder = Embedder(load_backbone("efficientnet-lite0", "random"), "cpu", "fp32", "torch")
    assert embedder.spec.backend == "torch"


def test_auto_falls_back_to_torch_when_openvino_fails_and_an_explicit_ask_says_why(monkeypatch):
    from simsearch.pipeline.embed import Embedder, load_backbone

    def broken(*args, **kwargs):
        raise RuntimeError("Cannot create Foo layer: unsupported op")

    monkeypatch.setattr(backends, "openvino_installed", lambda: True)
    monkeypatch.setattr(backends, "OpenVINORunner", broken)
    backbone = load_backbone("efficientnet-lite0", "random")
    embedder = Embedder(backbone, "cpu", "fp32", "auto")
    assert embedder.spec.backend == "torch"
    assert embedder.embed_batch([torch.zeros(3, 224, 224, dtype=torch.uint8)]).vectors.shape == (1, 1280)
    with pytest.raises(BadInputError, match="unsupported op.*--backend torch"):
        Embedder(backbone, "cpu", "fp32", "openvino")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=32, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def test_openvino_conversion_is_cached_and_serves_every_input_shape(tmp_path: Path):
    pytest.importorskip("openvino")
    model, spec = _Tiny().eval(), _spec()
    first = OpenVINORunner(model, spec, torch.float32, cache=tmp_path)
    assert first.converted and (first.folder / "model.xml").is_file()
    second = OpenVINORunner(model, spec, torch.float32, cache=tmp_path)
    assert not second.converted  # read from the cache: no second trace and conversion
    # Aspect-kept inputs: several shapes, all in one call.
    inputs = [torch.randn(*shape) for shape in ((2, 3, 224, 224), (3, 3, 192, 288), (1, 3, 320, 160))]
    for x, got in zip(inputs, second(inputs), strict=True):
        with torch.no_grad():
            expected = model(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    single = torch.randn(1, 3, 160, 224)  # fewer images than streams: the whole model on every thread
    with torch.no_grad():
        torch.testing.assert_close(second([single])[0], model(single), rtol=1e-4, atol=1e-4)
    assert ((False, False) in second._runs) == (second._streams.requests > 1)
    other = _spec()
    other = EmbedderSpec(other.backbone, other.weights, "other-weights", other.dim, other.feature_shape)
    assert OpenVINORunner(model, other, torch.float32, cache=tmp_path).converted  # other weights: not reused


def test_stale_cached_models_and_kernels_are_deleted_and_a_pruned_model_converts_again(tmp_path: Path):
    """Each OpenVINO version, weights file and thread count leaves its own files: unused for long, they go."""
    pytest.importorskip("openvino")
    model, spec = _Tiny().eval(), _spec()
    runner = OpenVINORunner(model, spec, torch.float32, cache=tmp_path)
    root, old = runner.folder.parent, time.time() - (STALE_AFTER_DAYS + 1) * 86400
    stale_model, fresh_model, stampless = root / "resnet50-0old", root / "resnet50-1new", root / "lite0-older-code"
    for folder in (stale_model, fresh_model, stampless):
        (folder / "compiled").mkdir(parents=True)
        (folder / "model.xml").write_text("<net/>")
    (stale_model / USED_STAMP).touch()
    os.utime(stale_model / USED_STAMP, (old, old))  # last loaded two months ago
    os.utime(stale_model, (old, old))
    half_deleted = root / f"{TRASH_PREFIX}0123"  # a pruning process killed mid-delete
    (half_deleted / "compiled").mkdir(parents=True)
    (fresh_model / USED_STAMP).touch()
    os.utime(stampless, (old, old))  # made before stamps, untouched since
    old_blob, new_blob = runner.folder / "compiled" / "1.blob", runner.folder / "compiled" / "2.blob"
    old_blob.write_bytes(b"kernels for another thread count")
    new_blob.write_bytes(b"kernels used today")
    os.utime(old_blob, (old, old))
    OpenVINORunner(model, spec, torch.float32, cache=tmp_path)  # the next load prunes
    assert not stale_model.exists() and not stampless.exists() and not old_blob.exists()
    assert not half_deleted.exists() and not any(p.name.startswith(TRASH_PREFIX) for p in root.iterdir())
    assert fresh_model.is_dir() and new_blob.is_file() and (runner.folder / "model.xml").is_file()
    assert prune_stale_cache(root, keep=runner.folder) == []  # nothing more is stale
    assert (runner.folder / USED_STAMP).stat().st_mtime > old  # the model in use is stamped, never stale

    # Another process pruned this runner's model while it ran: its next compile converts it again.
    shutil.rmtree(runner.folder)
    single = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(runner.one_request(uint8=False)([single])[0], model(single), rtol=1e-4, atol=1e-4)
    assert (runner.folder / "model.xml").is_file()


def test_openvino_normalises_uint8_pixels_inside_the_model_as_torch_would(tmp_path: Path):
    """The decoders' uint8 batches skip torch's normalisation: OpenVINO's model must apply the same one."""
    pytest.importorskip("openvino")
    model = _Tiny().eval()
    pre = Preprocess(mean=(0.2, 0.5, 0.7), std=(0.3, 0.25, 0.6))  # per-channel: a swapped axis would show
    spec = replace(_spec(), preprocess=pre)
    runner = OpenVINORunner(model, spec, torch.float32, cache=tmp_path)
    torch.manual_seed(1)
    pixels = [torch.randint(0, 256, shape, dtype=torch.uint8) for shape in ((3, 3, 64, 96), (2, 3, 96, 64))]
    single = [torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)]  # the one-request path
    for batches in (pixels, single):
        for x, got in zip(batches, runner(batches), strict=True):
            with torch.no_grad():
                torch.testing.assert_close(got, model(normalize(x, pre)), rtol=1e-4, atol=1e-4)
    assert (True, True) in runner._runs  # uint8 ran on the model with normalisation inside
    assert ((True, False) in runner._runs) == (runner._streams.requests > 1)  # and the single image on one request
    assert not any(not uint8 for uint8, _ in runner._runs)  # never needing the float one
    mixed = [pixels[0], normalize(pixels[1], pre)]  # uint8 beside floats: all run as floats
    for x, got in zip(mixed, runner(mixed), strict=True):
        with torch.no_grad():
            torch.testing.assert_close(got, model(normalize(x, pre)), rtol=1e-4, atol=1e-4)


def _tiny_streams(images_per_request: int = 2) -> tuple[nn.Module, StreamedRequests]:
    ov = pytest.importorskip("openvino")
    model = _Tiny().eval()
    converted = ov.convert_model(model, example_input=torch.zeros(1, 3, 64, 64), input=[(-1, 3, -1, -1)])
    compiled = ov.Core().compile_model(converted, "CPU", {"NUM_STREAMS": 2, "INFERENCE_NUM_THREADS": 2,
                                                         "INFERENCE_PRECISION_HINT": "f32"})
    streams = StreamedRequests(compiled, images_per_request=images_per_request)
    if streams.requests < 2:
        pytest.skip("OpenVINO gave one stream on this machine")
    return model, streams


def test_streamed_requests_split_each_batch_and_return_it_whole_in_order():
    """Two streams, two images a request: 5 images come back from 3 requests, 3 from 2, in their order."""
    model, streams = _tiny_streams()
    inputs = [torch.randn(5, 3, 64, 96), torch.randn(3, 3, 96, 64)]
    assert streams.request_count(inputs) == 5
    for _ in range(2):  # a second call gets no output of the first
        outputs = streams(inputs)
        for x, got in zip(inputs, outputs, strict=True):
            with torch.no_grad():
                torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)


def test_streamed_requests_serve_calls_from_several_threads_at_once():
    """Calls from several threads at once (Ray actors, a library user): none gets another's outputs."""
    from concurrent.futures import ThreadPoolExecutor

    model, streams = _tiny_streams(images_per_request=1)
    inputs = [torch.randn(3 + i % 4, 3, 64, 64) for i in range(24)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda x: streams([x])[0], inputs))
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_failed_request_raises_once_and_the_next_call_works():
    """A request that fails to start raises; the requests already started are waited for and reused."""
    model, streams = _tiny_streams()
    good = torch.randn(4, 3, 64, 64)
    with pytest.raises(Exception):
        streams([good, torch.randn(2, 5, 64, 64)])  # 5 channels: the model takes 3
    with torch.no_grad():
        torch.testing.assert_close(streams([good])[0], model(good), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at least one image"):
        streams([torch.empty(0, 3, 64, 64)])


class _FakeRequest:
    """An infer request whose `wait` may fail, recording what was asked of it."""

    def __init__(self, fail_wait: bool):
        self.fail_wait, self.waits, self.started = fail_wait, 0, []

    def start_async(self, inputs, share_inputs):
        self.started.append(inputs[0])

    def wait(self):
        self.waits += 1
        if self.fail_wait:
            raise RuntimeError("inference failed")

    def get_output_tensor(self, i):
        class Out:
            data = np.zeros((1, 4), np.float32)
        return Out()


def test_a_request_failing_in_wait_leaves_no_other_request_running_and_the_pool_usable():
    """share_inputs: a call may not return, even by raising, while a request still reads its input."""
    made: list[_FakeRequest] = []

    class Compiled:
        def get_property(self, name):
            return 2  # two streams: four requests in flight

        def create_infer_request(self):
            made.append(_FakeRequest(fail_wait=len(made) == 1))  # the second request fails
            return made[-1]

    streams = StreamedRequests(Compiled(), images_per_request=1)
    with pytest.raises(RuntimeError, match="inference failed"):
        streams([torch.zeros(6, 3, 8, 8)])
    assert len(made) == 4 and all(r.waits >= 1 for r in made)  # every started request was waited for
    assert len(streams._idle) <= streams.in_flight
    for r in made:
        r.fail_wait = False
    assert streams([torch.zeros(3, 3, 8, 8)])[0].shape == (3, 4)  # the pool still works


def test_a_dropped_runner_is_freed(tmp_path: Path):
    """Nothing of OpenVINO may hold the runner: a callback that did kept every discarded embedder's model."""
    pytest.importorskip("openvino")
    runner = OpenVINORunner(_Tiny().eval(), _spec(), torch.float32, cache=tmp_path)
    runner([torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)])
    runner([torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)])
    gone = weakref.ref(runner)
    del runner
    gc.collect()
    assert gone() is None


def _top10(v: np.ndarray) -> np.ndarray:
    s = v @ v.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1)[:, :10]


def test_openvino_vectors_match_fp32_on_real_photos(shared_data: Path, tmp_path_factory, monkeypatch):
    """The bar that lets `auto` pick OpenVINO: mean cosine >= 0.995, top-10 neighbours >= 0.95 shared."""
    pytest.importorskip("openvino")
    from simsearch.pipeline.embed import Embedder, load_backbone
    from simsearch.pipeline.read import open_image

    monkeypatch.setenv("SIMSEARCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    backbone = load_backbone("efficientnet-lite0")
    paths = sorted(p for p in shared_data.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    images = [open_image(p, draft=backbone.spec.preprocess.input_size) for p in paths]
    reference = Embedder(backbone, "cpu", "fp32", "torch").embed_images(images)
    fast = Embedder(backbone, "cpu", "bf16", "openvino")
    assert fast.spec.backend == "openvino"
    got = fast.embed_images(images)
    cosine = (reference.vectors * got.vectors).sum(axis=1)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(_top10(reference.vectors), _top10(got.vectors))])
    assert len(paths) >= 100 and cosine.mean() >= 0.995 and overlap >= 0.95, (cosine.mean(), overlap)
    assert got.maps.shape == reference.maps.shape and got.maps.dtype == np.float16
    same_top_tag = [bool(a) == bool(b) and (not a or a[0].label == b[0].label) for a, b in zip(got.tags, reference.tags)]
    assert np.mean(same_top_tag) >= 0.9  # near-ties (washbasin / bathtub) may swap, nothing more


def test_decode_resizes_in_uint8_like_pillow_and_normalises_like_before():
    from PIL import Image

    rng = np.random.default_rng(0)
    # A smooth image (a photo, not noise): gradients plus a little texture.
    yy, xx = np.mgrid[0:240, 0:320]
    pixels = np.stack([xx * 0.7, yy * 0.9, (xx + yy) * 0.4], axis=2) + rng.normal(0, 8, (240, 320, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    pre = Preprocess()
    x = preprocess(image, pre)
    width, height = pre.input_size(320, 240)
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, height, width)
    pillow = np.asarray(image.resize((width, height), Image.BICUBIC), dtype=np.float32).transpose(2, 0, 1)
    assert np.abs(x.numpy().astype(np.float32) - pillow).mean() < 0.5  # within half a grey level of Pillow's
    expected = (torch.from_numpy(pillow) / 255 - torch.tensor(pre.mean).view(3, 1, 1)) / torch.tensor(pre.std).view(3, 1, 1)
    got = normalize(x[None], pre)[0]
    assert got.dtype == torch.float32
    assert (got - expected).abs().mean() < 0.01
    floats = torch.randn(1, 3, 8, 8)
    assert normalize(floats, pre) is floats  # already normalised input passes through


def test_a_build_records_its_backend_and_another_backend_adds_with_a_warning(tmp_path: Path, monkeypatch, caplog):
    from PIL import Image

    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig
    from simsearch.storage.store import Store

    data, index = tmp_path / "data", tmp_path / "index"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(data / f"{i}.png")
    embed = EmbedConfig(model="efficientnet-lite0", weights="random", device="cpu", precision="fp32", workers=0,
                        quiet=True, backend="torch")
    assert build_index(BuildConfig(data, index, embed)).backend == "torch"
    with Store(index) as store:
        assert store.spec.embedder.backend == "torch"
    pytest.importorskip("openvino")
    monkeypatch.setenv("SIMSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(data / "new.png")
    with caplog.at_level("WARNING"):
        report = build_index(BuildConfig(data, index, replace(embed, backend="openvino")))
    assert report.added == 1 and report.backend == "openvino"  # added, not refused
    assert "built with backend torch" in caplog.text and "--backend torch" in caplog.text
    with Store(index) as store:
        assert store.spec.embedder.backend == "torch"  # the spec keeps what first built the index

