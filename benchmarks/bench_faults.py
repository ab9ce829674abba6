"""Fault campaign: nothing a folder or a request holds can stop, hang or corrupt simsearch.

Five parts, each printed as a table and saved to benchmarks/results/faults.json:

1. random kills: `kill -9` of the simsearch process at a seeded random moment during
   `build-index` (fresh and incremental), `localize`, `train-localizer` and
   `build-index --prune`; the same command is then run again to completion and the
   index checked: SQLite integrity, FAISS ids == SQLite ids, one record per path,
   one vector and one feature map per record, FAISS stamp current, every image
   predicted when a head exists, the head loads, the records are the folder's files.
   The immediate re-run is also watched: the kill must not leave the index locked.
2. concurrent writers: two builds started at once on one index, a build racing a
   `localize`, a build racing a `train-localizer`. Each loser must wait or exit 1
   with the one-line "another simsearch command is writing ..." message; afterwards
   the index is consistent and a re-run has nothing new to embed.
3. a hostile folder (benchmarks/hostile.py): truncated, empty, fake, bomb and odd-mode
   images, a FIFO, links to /dev/zero, to nowhere and to the folder itself, a folder
   named like an image, NaN / inverted / outside boxes, broken and billion-laughs XML,
   a garbage box list. Each build runs under a timeout (a hang is a failure); every
   input must be indexed once or listed in `simsearch info`'s skipped files.
4. the server under a bounded upload load mixing normal images and decompression-bomb
   PNGs: status codes and the server's resident memory before and under load.
5. embedders made and dropped in one process (`--only embedders`, OpenVINO installed): rounds of
   a new embedder timed on a repeated batch, another on decoded batches, then a decode, as
   `bench_embed.py --rounds` runs them; the process runs under a timeout, and a hang is a
   failure. With OpenVINO's AsyncInferQueue (before 2026-12-06), freeing a model while one of
   its stream threads waited for the GIL deadlocked such a process: 3 of 3 stress runs of this
   pattern on 1,000 replicated real photos hung within 11 rounds while the machine was busy,
   yet in a calm stretch the old code passed 30 rounds of it, and of this part's generated
   images too. A pass here is evidence, not proof.

Everything runs offline with `--model efficientnet-lite0` on generated images, in
subprocesses exactly as a user runs them (the `simsearch` console script).

    python benchmarks/bench_faults.py --quick     # 8 kills, 20 uploads: ~4 minutes on 2 shared cores
    python benchmarks/bench_faults.py             # 30 kills, 40 uploads: ~8 minutes (7m54s measured)

Exit code 1 when a part failed (a kill not survived, a writer race or a hostile input
mishandled, the server down or answering 5xx); the JSON says which trial and why.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from common import print_table, progress, write_result

import hostile

MODEL = ["--model", "efficientnet-lite0"]
BUILD_FLAGS = MODEL + ["--batch-size", "8", "--quiet"]
BUSY = "another simsearch command is writing"
TIMEOUT = 300  # seconds any one command may take: longer is a hang
KINDS = ("fresh build", "incremental build", "localize", "train-localizer", "prune build")


def simsearch() -> list[str]:
    """The console script beside this interpreter (as a user runs it), else `python -m simsearch.cli`."""
    script = Path(sys.executable).parent / "simsearch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "simsearch.cli"]


# ---------------------------------------------------------------- running commands

@dataclass
class Ran:
    command: list[str]
    rc: int | None  # None: killed by us (timeout)
    seconds: float
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def last_line(self) -> str:
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    @property
    def stderr_lines(self) -> int:
        return len([ln for ln in self.stderr.strip().splitlines() if ln.strip()])

    @property
    def busy(self) -> bool:
        return self.rc == 1 and BUSY in self.stderr

    def report(self) -> dict:
        """stdout's first line as JSON (build-index / localize reports), or None."""
        for line in self.stdout.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    return None
        return None


class Spawned:
    """A command in its own session, output to files (a killed parent's orphans may hold pipes open)."""

    def __init__(self, args: list[str], tmp: Path):
        tmp.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        self.args = simsearch() + args
        self.out_path, self.err_path = tmp / f"{tag}.out", tmp / f"{tag}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(self.args, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        """The exit code once it has exited (noting when), else None."""
        rc = self.proc.poll()
        if rc is not None and self.ended is None:
            self.ended = time.perf_counter()
        return rc

    ended: float | None = None

    def wait(self, timeout: float = TIMEOUT) -> Ran:
        timed_out = False
        try:
            rc = self.proc.wait(timeout=max(0.0, timeout - (time.perf_counter() - self.started)))
        except subprocess.TimeoutExpired:
            timed_out, rc = True, None
            kill_session(self.pid)
            self.proc.wait()
        seconds = (self.ended or time.perf_counter()) - self.started
        self._out.close()
        self._err.close()
        return Ran(self.args, rc, seconds, self.out_path.read_text(errors="replace"),
                   self.err_path.read_text(errors="replace"), timed_out)


def run(args: list[str], tmp: Path, timeout: float = TIMEOUT) -> Ran:
    return Spawned(args, tmp).wait(timeout)


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`: a killed command's orphaned children."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry))
    return found


def kill_session(sid: int) -> None:
    for pid in session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def lock_holders(pids: list[int], index_dir: Path) -> list[int]:
    """Which of `pids` hold an open descriptor on the index's write.lock (read from /proc, never locking it)."""
    target = str((index_dir / "write.lock").resolve())
    holders = []
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        holders.append(pid)
                        break
                except OSError:
                    continue
        except OSError:
            continue
    return holders


def wait_gone(pids: list[int], timeout: float = 60) -> float | None:
    """Seconds until every pid in `pids` has exited (None: still alive after `timeout`)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return time.perf_counter() - started
        time.sleep(0.05)
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2:].split()[0] != "Z"


# ---------------------------------------------------------------- the consistency check

def _shard_problems(conn, index_dir: Path) -> list[str]:
    """Every position points inside a committed row of an existing shard file, and no two share a row."""
    problems = []
    committed = {(k, sh): n for k, sh, n in conn.execute("SELECT kind, shard, rows FROM shards")}
    row = conn.execute("SELECT value FROM meta WHERE key='spec'").fetchone()
    if row is None:
        return []  # reported by the caller
    spec = json.loads(row[0])
    dim = spec["embedder"]["dim"]
    c, h, w = spec["embedder"]["feature_shape"]
    has_boxes = conn.execute("SELECT 1 FROM sqlite_master WHERE name='boxes'").fetchone()
    kinds = [("vec", "embeddings", "image_id", dim * 2), ("map", "feature_maps", "image_id", c * h * w * 2)]
    kinds += [("box", "boxes", "id", dim * 2)] if has_boxes else []
    for kind, table, id_column, row_bytes in kinds:
        seen = set()
        for image_id, shard, row in conn.execute(f"SELECT {id_column}, shard, row FROM {table}"):
            path = index_dir / "shards" / f"{kind}-{shard:06d}.f16"
            if (shard, row) in seen:
                problems.append(f"{table}: two records at {kind} shard {shard} row {row}")
            seen.add((shard, row))
            if row >= committed.get((kind, shard), 0):
                problems.append(f"{table}: record {image_id} points past the committed rows of {path.name}")
            elif not path.exists() or path.stat().st_size < (row + 1) * row_bytes:
                problems.append(f"{table}: record {image_id}'s row is missing from {path.name}")
        if len(problems) > 5:
            break
    return problems[:5]


def kill_when(spawned: Spawned, index: Path, reached) -> bool:
    """kill -9 the command as soon as `reached(records committed)`; False if it finished first."""
    while spawned.proc.poll() is None:
        if reached(_count_images(index)):
            os.kill(spawned.pid, signal.SIGKILL)
            spawned.wait()
            return True
        time.sleep(0.005)
    spawned.wait()
    return False


def check_index(index_dir: str | os.PathLike, expected: set[str] | None = None,
                need_predictions: bool = False) -> dict:
    """Everything a finished index must satisfy; `problems` is empty when it does.

    `expected`: the resolved paths the index must hold exactly. `need_predictions`:
    every record must have a localizer prediction (an index with a head).
    """
    import faiss

    from simsearch.storage import layout

    index_dir = Path(index_dir)
    problems: list[str] = []
    out: dict = {"images": None, "ntotal": None, "problems": problems}
    db_path = index_dir / "simsearch.sqlite"
    if not db_path.exists():
        problems.append("no simsearch.sqlite")
        out["ok"] = False
        return out
    conn = sqlite3.connect(str(db_path), timeout=30)
    try:
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        if integrity != ["ok"]:
            problems.append(f"integrity_check: {integrity[:3]}")
        fk = conn.execute("PRAGMA foreign_key_check").fetchall()
        if fk:
            problems.append(f"foreign_key_check: {len(fk)} rows, e.g. {fk[:2]}")
        rows = conn.execute("SELECT id, path, sha256, width, height FROM images").fetchall()
        ids = sorted(r[0] for r in rows)
        out["images"] = len(ids)
        paths = [r[1] for r in rows]
        if len(paths) != len(set(paths)):
            problems.append(f"{len(paths) - len(set(paths))} duplicate paths")
        shas = [r[2] for r in rows]
        out["duplicate_sha256"] = len(shas) - len(set(shas))
        got = sorted(r[0] for r in conn.execute("SELECT image_id FROM embeddings"))
        if got != ids:
            problems.append(f"embeddings: {len(got)} rows for {len(ids)} images"
                            + ("" if len(got) != len(ids) else " (different ids)"))
        # Maps are kept for every record with boxes (and may be for others), never for a missing record.
        mapped = {r[0] for r in conn.execute("SELECT image_id FROM feature_maps")}
        boxed = {r[0] for r in conn.execute("SELECT DISTINCT image_id FROM objects")}
        if mapped - set(ids) or boxed - mapped:
            problems.append(f"feature_maps: {len(mapped - set(ids))} for missing images, "
                            f"{len(boxed - mapped)} records with boxes lack one")
        problems += _shard_problems(conn, index_dir)
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        spec = json.loads(meta["spec"]) if "spec" in meta else None
        if spec is None or spec.get("index_type") in (None, "pending"):
            problems.append(f"spec missing or unfinished: {None if spec is None else spec.get('index_type')}")
        generation = int(meta.get("generation", "0"))
        size = {r[0]: (r[3], r[4]) for r in rows}
        bad_boxes = []
        for image_id, label, *box in conn.execute("SELECT image_id, label, xmin, ymin, xmax, ymax FROM objects"):
            w, h = size.get(image_id, (None, None))
            if w is None:
                bad_boxes.append((image_id, label, box, "no such image"))
            elif any(v is None or not math.isfinite(v) for v in box):
                bad_boxes.append((image_id, label, box, "not finite"))
            elif not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
                bad_boxes.append((image_id, label, box, f"outside {w}x{h} or empty"))
        if bad_boxes:
            problems.append(f"{len(bad_boxes)} bad object boxes, e.g. {bad_boxes[:2]}")
        out["objects"] = conn.execute("SELECT count(*) FROM objects").fetchone()[0]
        has_predictions = conn.execute("SELECT 1 FROM sqlite_master WHERE name='predictions'").fetchone()
        predicted = set()
        if has_predictions:
            for image_id, *box in conn.execute("SELECT image_id, xmin, ymin, xmax, ymax FROM predictions"):
                predicted.add(image_id)
                if any(v is None or not math.isfinite(v) for v in box):
                    problems.append(f"prediction for {image_id} has a non-finite box {box}")
            if predicted - set(ids):
                problems.append(f"{len(predicted - set(ids))} predictions for missing images")
        out["predictions"] = len(predicted)
        if need_predictions and set(ids) - predicted:
            problems.append(f"{len(set(ids) - predicted)} of {len(ids)} images have no prediction "
                            "(the index has a localizer head)")
        # Every ground-truth box and every stored detection has exactly one box vector (the objects index): each
        # prediction's own box once among its image's predicted boxes (a dense head stores more), no predicted box
        # of an image without a prediction, and no two boxes pointing at one vector row.
        box_ids: list[int] = []
        predicted_boxes = 0
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name='boxes'").fetchone():
            box_ids = sorted(r[0] for r in conn.execute("SELECT id FROM boxes"))
            lacking = conn.execute("SELECT count(*) FROM objects o WHERE (SELECT count(*) FROM boxes b "
                                   "WHERE b.object_id = o.id) != 1").fetchone()[0]
            if lacking:
                problems.append(f"{lacking} ground-truth boxes lack a box vector (or have several)")
            if has_predictions:
                unpredicted = conn.execute(
                    "SELECT count(*) FROM predictions p WHERE (SELECT count(*) FROM boxes b WHERE b.image_id = "
                    "p.image_id AND b.object_id IS NULL AND b.label IS p.label AND b.score = p.score AND b.xmin = p.xmin "
                    "AND b.ymin = p.ymin AND b.xmax = p.xmax AND b.ymax = p.ymax) != 1").fetchone()[0]
                if unpredicted:
                    problems.append(f"{unpredicted} predictions lack a box vector (or have several)")
                orphans = conn.execute("SELECT count(*) FROM boxes b WHERE b.object_id IS NULL AND NOT EXISTS "
                                       "(SELECT 1 FROM predictions p WHERE p.image_id = b.image_id)").fetchone()[0]
                if orphans:
                    problems.append(f"{orphans} predicted boxes belong to images without a prediction")
            shared = conn.execute("SELECT count(*) FROM (SELECT 1 FROM boxes GROUP BY shard, row "
                                  "HAVING count(*) > 1)").fetchone()[0]
            if shared:
                problems.append(f"{shared} box vector rows are pointed at by several boxes")
            predicted_boxes = conn.execute("SELECT count(*) FROM boxes WHERE object_id IS NULL").fetchone()[0]
        out["boxes"] = len(box_ids)
        out["predicted_boxes"] = predicted_boxes
        boxes_generation = int(meta.get("boxes_generation", "0"))
    finally:
        conn.close()

    if box_ids:
        objects_path = index_dir / "objects.faiss"
        try:
            index = faiss.read_index(str(objects_path))
            found = sorted(faiss.vector_to_array(faiss.downcast_index(index).id_map).tolist())
            if found != box_ids:
                problems.append(f"objects.faiss holds {len(found)} boxes, SQLite {len(box_ids)}")
        except Exception as e:  # noqa: BLE001 - any failure to read it is the finding
            problems.append(f"objects.faiss unreadable: {type(e).__name__}: {e}")
        if layout.faiss_generation(index_dir, verify=True, collection="boxes") != boxes_generation:
            problems.append(f"objects.faiss stamp is not boxes generation {boxes_generation} (stale or damaged)")

    faiss_path = index_dir / "index.faiss"
    if not faiss_path.exists():
        problems.append("no index.faiss")
    else:
        try:
            index = faiss.read_index(str(faiss_path))
            out["ntotal"] = int(index.ntotal)
            faiss_ids = sorted(faiss.vector_to_array(faiss.downcast_index(index).id_map).tolist())
            if faiss_ids != ids:
                problems.append(f"FAISS holds {len(faiss_ids)} ids, SQLite {len(ids)}: "
                                f"{len(set(faiss_ids) - set(ids))} extra, {len(set(ids) - set(faiss_ids))} missing")
        except Exception as e:  # noqa: BLE001 - any failure to read it is the finding
            problems.append(f"index.faiss unreadable: {type(e).__name__}: {e}")
        if layout.faiss_generation(index_dir, verify=True) != generation:
            problems.append(f"index.faiss stamp is not generation {generation} (stale or damaged)")
    try:
        from simsearch.retrieval.searcher import Searcher

        with Searcher(index_dir, device="cpu") as searcher:
            if searcher.index.ntotal != len(ids):
                problems.append(f"Searcher sees {searcher.index.ntotal} vectors for {len(ids)} images")
            if ids:
                searcher.search(ids[0], 3)
    except Exception as e:  # noqa: BLE001
        problems.append(f"Searcher failed: {type(e).__name__}: {str(e)[:200]}")
    if (index_dir / "localizer.pt").exists():
        try:
            from simsearch.localizer.predict import open_localizer
            from simsearch.storage.store import Store

            with Store(index_dir) as store:
                open_localizer(store)
            out["head"] = "loads"
        except Exception as e:  # noqa: BLE001
            problems.append(f"localizer head does not load: {type(e).__name__}: {str(e)[:200]}")
            out["head"] = "broken"
    if expected is not None:
        missing, extra = expected - set(paths), set(paths) - expected
        if missing or extra:
            problems.append(f"records differ from the folder: {len(missing)} missing "
                            f"(e.g. {sorted(missing)[:1]}), {len(extra)} extra (e.g. {sorted(extra)[:1]})")
    out["leftover_tmp"] = sorted(p.name for p in index_dir.glob("*.tmp"))
    out["ok"] = not problems
    return out


# ---------------------------------------------------------------- data and reference indexes

@dataclass
class Setup:
    """Folders and finished indexes the trials start from (copied, never changed)."""

    work: Path
    shapes: Path  # plain folder: fresh builds
    inc: Path  # boxes/ (in the base index, with a head) + extra/ (not yet): incremental builds
    prune: Path  # base index holds files since deleted
    base_inc: Path  # index of inc/boxes only, head trained, every record predicted
    full_inc: Path  # base_inc brought up to date with inc/ (localize and train-localizer start here)
    base_prune: Path
    fresh_ref: Path  # a finished index of shapes/ (the server's)
    seconds: dict = field(default_factory=dict)  # an uninterrupted run of each kind: the kill window
    train_args: list = field(default_factory=list)


def fresh_only_setup(work: Path, n_shapes: int, seed: int = 0) -> Setup:
    """Just a folder of `n_shapes` images for fresh-build trials (tests: no reference indexes, no timing)."""
    missing = work / "absent"
    setup = Setup(work, work / "data" / "shapes", missing, missing, missing, missing, missing, missing)
    hostile.shape_folder(setup.shapes, n_shapes, seed, prefix="shape")
    return setup


def copy_index(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _must(ran: Ran, what: str) -> Ran:
    if ran.rc != 0:
        raise RuntimeError(f"{what} failed (rc {ran.rc}): {ran.stderr[-800:]}")
    return ran


def command_for(kind: str, setup: Setup, index: Path) -> list[str]:
    if kind == "fresh build":
        return ["build-index", str(setup.shapes), "--index", str(index)] + BUILD_FLAGS
    if kind == "incremental build":
        return ["build-index", str(setup.inc), "--index", str(index)] + BUILD_FLAGS
    if kind == "prune build":
        return ["build-index", str(setup.prune), "--index", str(index), "--prune"] + BUILD_FLAGS
    if kind == "localize":
        return ["localize", "--index", str(index)]
    if kind == "train-localizer":
        return ["train-localizer", "--index", str(index)] + setup.train_args
    raise ValueError(kind)


def start_state(kind: str, setup: Setup, index: Path) -> None:
    """Put the index a trial of `kind` starts from in place."""
    shutil.rmtree(index, ignore_errors=True)
    if kind == "incremental build":
        copy_index(setup.base_inc, index)
    elif kind == "prune build":
        copy_index(setup.base_prune, index)
    elif kind in ("localize", "train-localizer"):
        copy_index(setup.full_inc, index)
        if kind == "localize":  # so that a lost localize shows as missing predictions
            with sqlite3.connect(index / "simsearch.sqlite") as conn:
                conn.execute("DELETE FROM predictions")


def expectation(kind: str, setup: Setup) -> tuple[set[str], bool]:
    """(the paths the finished index must hold, whether every record must have a prediction)."""
    if kind == "fresh build":
        return hostile.image_files(setup.shapes), False
    if kind == "prune build":
        return hostile.image_files(setup.prune), False
    return hostile.image_files(setup.inc), True


def prepare(work: Path, n_shapes: int = 160, n_boxes: int = 50, n_extra: int = 80, n_prune: int = 50,
            epochs: int = 12, seed: int = 0) -> Setup:
    """Generate the folders and build the reference indexes; time one uninterrupted run of each kind."""
    data, tmp = work / "data", work / "tmp"
    setup = Setup(work, data / "shapes", data / "inc", data / "prune", work / "ref" / "base_inc",
                  work / "ref" / "full_inc", work / "ref" / "base_prune", work / "ref" / "fresh",
                  train_args=["--epochs", str(epochs), "--patience", str(epochs), "--quiet"])
    hostile.shape_folder(setup.shapes, n_shapes, seed, prefix="shape")
    hostile.box_dataset(setup.inc / "boxes", n_boxes, seed, prefix="box")
    prune_files = hostile.shape_folder(setup.prune, n_prune, seed, prefix="prune")

    progress(f"reference: fresh build of {n_shapes} images")
    ran = _must(run(command_for("fresh build", setup, setup.fresh_ref), tmp), "fresh build")
    setup.seconds["fresh build"] = ran.seconds
    progress(f"reference: box dataset of {n_boxes} images, head, predictions")
    _must(run(["build-index", str(setup.inc), "--index", str(setup.base_inc)] + BUILD_FLAGS, tmp), "base build")
    _must(run(command_for("train-localizer", setup, setup.base_inc), tmp), "train-localizer")
    _must(run(command_for("localize", setup, setup.base_inc), tmp), "localize")
    hostile.shape_folder(setup.inc / "extra", n_extra, seed, prefix="extra")  # new since base_inc
    copy_index(setup.base_inc, setup.full_inc)
    ran = _must(run(command_for("incremental build", setup, setup.full_inc), tmp), "incremental build")
    setup.seconds["incremental build"] = ran.seconds
    for kind in ("localize", "train-localizer"):
        scratch = work / "ref" / "scratch"
        start_state(kind, setup, scratch)
        setup.seconds[kind] = _must(run(command_for(kind, setup, scratch), tmp), kind).seconds
        shutil.rmtree(scratch)
    progress(f"reference: prune base of {n_prune} images, then {len(prune_files[::3])} files deleted")
    _must(run(["build-index", str(setup.prune), "--index", str(setup.base_prune)] + BUILD_FLAGS, tmp), "prune base")
    for path in prune_files[::3]:
        path.unlink()
    scratch = work / "ref" / "scratch"
    start_state("prune build", setup, scratch)
    setup.seconds["prune build"] = _must(run(command_for("prune build", setup, scratch), tmp), "prune").seconds
    shutil.rmtree(scratch)
    for kind, ref in (("fresh build", setup.fresh_ref), ("incremental build", setup.full_inc)):
        expected, predictions = expectation(kind, setup)
        check = check_index(ref, expected, predictions)
        if True:
            if not check["ok"]:
                raise RuntimeError(f"reference index for {kind} is inconsistent before any fault: {check['problems']}")
    return setup


# ---------------------------------------------------------------- 1. random kills

def _committed(index: Path) -> dict:
    """What the killed process left committed (best effort, read before the re-run)."""
    db = index / "simsearch.sqlite"
    if not db.exists():
        return {"images": None}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            found = {"images": conn.execute("SELECT count(*) FROM images").fetchone()[0]}
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name='predictions'").fetchone():
                found["predictions"] = conn.execute("SELECT count(*) FROM predictions").fetchone()[0]
            return found
    except sqlite3.Error as e:
        return {"images": None, "error": str(e)}


def _count_images(index: Path) -> int:
    try:
        with sqlite3.connect(f"file:{index / 'simsearch.sqlite'}?mode=ro", uri=True, timeout=0.5) as conn:
            return conn.execute("SELECT count(*) FROM images").fetchone()[0]
    except sqlite3.Error:
        return -1


def kill_trial(kind: str, setup: Setup, index: Path, kill_at: float, at_images: int | None = None) -> dict:
    """Start `kind`, kill -9 its process, run the same command again at once, check the index.

    The kill comes `kill_at` seconds after the start, or (builds, `at_images`) as soon as
    that many records are committed: a random moment by progress rather than by clock,
    which reaches the window between the last commit and the end of the build.
    """
    tmp = setup.work / "tmp"
    start_state(kind, setup, index)
    command = command_for(kind, setup, index)
    expected, need_predictions = expectation(kind, setup)
    head_before = (index / "localizer.pt").read_bytes() if (index / "localizer.pt").exists() else None
    row: dict = {"kind": kind, "trigger": f"images >= {at_images}" if at_images else f"{kill_at:.2f}s",
                 "kill_at_s": round(kill_at, 2) if not at_images else None}
    spawned = Spawned(command, tmp)
    while spawned.proc.poll() is None:
        if at_images is None and time.perf_counter() - spawned.started >= kill_at:
            break
        if at_images is not None and _count_images(index) >= at_images:
            break
        if time.perf_counter() - spawned.started > TIMEOUT:
            break
        time.sleep(0.005 if at_images else 0.01)
    if spawned.proc.poll() is not None:
        row["killed"] = False
        first = spawned.wait()
        row["note"] = f"finished (rc {first.rc}) before the kill ({row['trigger']})"
        row["first_run_s"] = round(first.seconds, 2)
    else:
        os.kill(spawned.pid, signal.SIGKILL)
        row["kill_at_s"] = round(time.perf_counter() - spawned.started, 2)
        spawned.wait()
        row["killed"] = True
    orphans = session_members(spawned.pid)
    row["orphans_after_kill"] = len(orphans)
    row["orphans_holding_lock"] = len(lock_holders(orphans, index))
    row["left_committed"] = _committed(index)
    rerun = run(command, tmp)  # at once, as a user would
    row["rerun_rc"] = rerun.rc
    row["rerun_refused_busy"] = rerun.busy
    if rerun.busy:
        row["rerun_message"] = rerun.last_line
        gone = wait_gone(orphans)
        row["orphans_gone_after_s"] = None if gone is None else round(gone, 2)
        rerun = run(command, tmp)
        row["second_rerun_rc"] = rerun.rc
    kill_session(spawned.pid)
    if rerun.rc != 0:
        row["rerun_error"] = rerun.last_line[:300] or f"rc {rerun.rc}"
    report = rerun.report() or {}
    if "added" in report:
        row["rerun_report"] = {k: report.get(k) for k in ("added", "replaced", "unchanged", "pruned")}
    check = check_index(index, expected, need_predictions)
    if kind == "train-localizer" and head_before is not None and (index / "localizer.pt").read_bytes() == head_before:
        row["head"] = "unchanged"  # deterministic training (seeded) may well write the same head
    row["problems"] = check["problems"]
    row["leftover_tmp"] = check["leftover_tmp"]
    row["images"] = check["images"]
    row["survived"] = rerun.rc == 0 and check["ok"]
    return row


def kill_campaign(setup: Setup, n: int, seed: int = 0) -> list[dict]:
    """`n` kills, the commands in turn; builds are killed by clock and by progress in alternate rounds."""
    rng = random.Random(seed)
    rows = []
    fresh_total = len(hostile.image_files(setup.shapes))
    inc_base, inc_total = _count_images(setup.base_inc), len(hostile.image_files(setup.inc))
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        kill_at = rng.uniform(0.15, 0.95) * setup.seconds[kind]
        at_images = None
        if (i // len(KINDS)) % 2 == 1 and kind in ("fresh build", "incremental build"):
            low, high = (1, fresh_total) if kind == "fresh build" else (inc_base + 1, inc_total)
            # a third of them at the last commit: the window before FAISS and the predictions are written
            at_images = high if rng.random() < 0.34 else rng.randint(low, high - 1)
        what = f"once {at_images} images are committed" if at_images else \
            f"at {kill_at:.2f}s of ~{setup.seconds[kind]:.1f}s"
        progress(f"kill {i + 1}/{n}: {kind}, kill -9 {what}")
        row = kill_trial(kind, setup, setup.work / "trials" / f"kill{i:03d}", kill_at, at_images)
        if not row["killed"] and at_images is None:
            # The shared machine ran it faster than the reference run: same share of this run's duration.
            retry_at = kill_at / setup.seconds[kind] * row["first_run_s"]
            progress(f"  finished first ({row['first_run_s']:.1f}s); again, kill -9 at {retry_at:.2f}s")
            row = {**kill_trial(kind, setup, setup.work / "trials" / f"kill{i:03d}", retry_at), "retried": True}
        row["trial"] = i + 1
        if not row["survived"]:
            progress(f"  NOT SURVIVED: {row.get('rerun_error', '')} {row['problems']}")
        if row["rerun_refused_busy"]:
            progress(f"  immediate re-run refused: {row['rerun_message']}")
        rows.append(row)
        shutil.rmtree(setup.work / "trials" / f"kill{i:03d}", ignore_errors=True)
    return rows


def _failure_kinds(rows: list[dict]) -> str:
    """Distinct failure messages with their numbers replaced by N, each with how many trials showed it."""
    import re

    counts: dict[str, int] = {}
    for r in rows:
        for text in ([r["rerun_error"]] if r.get("rerun_error") else []) + r["problems"]:
            key = re.sub(r"\d+", "N", text)[:100]
            counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{k} (x{n})" for k, n in sorted(counts.items()))


def kill_summary(rows: list[dict]) -> list[dict]:
    out = []
    for kind in KINDS + ("all",):
        mine = [r for r in rows if kind in ("all", r["kind"])]
        killed = [r for r in mine if r["killed"]]
        if not mine:
            continue
        images = [r["left_committed"].get("images") for r in killed if r["left_committed"].get("images") is not None]
        out.append({
            "command": kind, "tried": len(killed), "survived": sum(r["survived"] for r in killed),
            "finished_first": len(mine) - len(killed),
            "rerun_refused_busy": sum(r["rerun_refused_busy"] for r in killed),
            "orphans_held_lock": sum(r["orphans_holding_lock"] > 0 for r in killed),
            "committed_at_kill": f"{min(images)}-{max(images)}" if images else "",
            "leftover_tmp": sum(bool(r["leftover_tmp"]) for r in killed),
            "failures": _failure_kinds([r for r in killed if not r["survived"]]),
        })
    return out


# ---------------------------------------------------------------- 2. concurrent writers

def _outcome(ran: Ran) -> str:
    if ran.timed_out:
        return "hung (timeout)"
    if ran.rc == 0:
        return "ok"
    if ran.busy:
        return "refused: busy, one line" if ran.stderr_lines == 1 else f"refused: busy, {ran.stderr_lines} lines"
    return f"failed rc {ran.rc}: {ran.last_line[:160]}"


def concurrent_scenario(name: str, setup: Setup, index: Path, second: str) -> dict:
    """A build of inc/ (or shapes/ for a fresh index) and `second` started at the same moment on one index."""
    tmp = setup.work / "tmp"
    if name.startswith("two fresh builds"):
        shutil.rmtree(index, ignore_errors=True)
        data, head = setup.shapes, False
    else:
        copy_index(setup.base_inc, index)  # inc/extra is new to it: the build has work to do
        data, head = setup.inc, True
    build = ["build-index", str(data), "--index", str(index)] + BUILD_FLAGS
    other = build if second == "build" else command_for(second, setup, index)
    a, b = Spawned(build, tmp), Spawned(other, tmp)
    while None in (a.poll(), b.poll()) and time.perf_counter() - a.started < TIMEOUT:
        time.sleep(0.02)  # both polled every time: each one's own finishing time
    ra, rb = a.wait(), b.wait()
    kill_session(a.pid)
    kill_session(b.pid)
    # As the message says: the refused command, run again once the other is done, must finish.
    loser_reruns = {}
    for label, ran, args in (("first", ra, build), ("second", rb, other)):
        if ran.busy:
            again = run(args, tmp)
            loser_reruns[label] = f"rc {again.rc}" + (f", {again.report()['added']} added"
                                                      if again.rc == 0 and (again.report() or {}).get("added")
                                                      is not None else "")
            if again.rc != 0:
                loser_reruns[label] += f": {again.last_line[:160]}"
    again = run(build, tmp)
    report = again.report() or {}
    expected = hostile.image_files(data)
    check = check_index(index, expected, need_predictions=head)
    outcomes = [_outcome(ra), _outcome(rb)]
    nothing_new = again.rc == 0 and report.get("added") == 0 and report.get("replaced") == 0
    acceptable = all(o == "ok" or o == "refused: busy, one line" for o in outcomes)
    row = {
        "scenario": name, "first": outcomes[0], "second": outcomes[1],
        "first_s": round(ra.seconds, 1), "second_s": round(rb.seconds, 1),
        "busy_messages": [r.last_line for r in (ra, rb) if r.busy],
        "loser_rerun": "; ".join(f"{k}: {v}" for k, v in loser_reruns.items()),
        "rerun": f"rc {again.rc}, {report.get('added')} added, {report.get('replaced')} replaced",
        "images": check["images"], "ntotal": check["ntotal"], "consistent": check["ok"],
        "problems": check["problems"], "nothing_new_on_rerun": nothing_new,
        "passed": acceptable and check["ok"] and nothing_new and "ok" in outcomes
        and all(v.startswith("rc 0") for v in loser_reruns.values()),
    }
    return row


def concurrent_campaign(setup: Setup) -> list[dict]:
    scenarios = [("two fresh builds at once", "build"), ("two incremental builds at once", "build"),
                 ("build racing localize", "localize"), ("build racing train-localizer", "train-localizer")]
    rows = []
    for i, (name, second) in enumerate(scenarios):
        progress(f"concurrent: {name}")
        rows.append(concurrent_scenario(name, setup, setup.work / "trials" / f"race{i}", second))
        shutil.rmtree(setup.work / "trials" / f"race{i}", ignore_errors=True)
    return rows


# ---------------------------------------------------------------- 3. the hostile folder

def hostile_campaign(work: Path, seed: int = 0, timeout: float = TIMEOUT, n_good: int = 12) -> dict:
    """Build over the hostile folder twice (each under `timeout`), then judge every input."""
    folder, index, tmp = work / "hostile", work / "hostile-index", work / "tmp"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(index, ignore_errors=True)
    good, inputs = hostile.write_hostile_folder(folder, seed, n_good)
    try:
        build = ["build-index", str(folder), "--index", str(index)] + BUILD_FLAGS
        first = run(build, tmp, timeout)
        second = run(build, tmp, timeout)
        info_ran = run(["info", "--index", str(index)], tmp, 120)
        info = json.loads(info_ran.stdout) if info_ran.rc == 0 else {"skipped_files": []}
        must = hostile.good_images(folder, inputs, good)
        check = check_index(index) if (index / "simsearch.sqlite").exists() else \
            {"ok": False, "problems": ["no index"], "images": 0}
        rows = _judge(folder, index, inputs, good, info.get("skipped_files", []))
    finally:
        if (folder / "unreadable.jpg").exists():
            os.chmod(folder / "unreadable.jpg", 0o644)  # so the folder can be removed by anyone
    report = second.report() or {}
    builds_ok = first.rc == 0 and second.rc == 0
    summary = {
        "first_build": {"rc": first.rc, "seconds": round(first.seconds, 1), "timed_out": first.timed_out,
                        "stderr_tail": first.stderr[-600:] if first.rc != 0 else ""},
        "second_build": {"rc": second.rc, "seconds": round(second.seconds, 1), "timed_out": second.timed_out,
                         "added": report.get("added"), "replaced": report.get("replaced")},
        "stderr_noise": [ln for ln in first.stderr.splitlines()
                         if ln.strip() and not ln.startswith(("indexed ", "  skipped ", "  ..."))],
        "images": check["images"], "must_index": len(must), "consistent": check["ok"],
        "problems": check["problems"], "duplicate_sha256": check.get("duplicate_sha256"),
        "skipped_listed": len(info.get("skipped_files", [])),
        "handled": sum(r["handled"] for r in rows), "tried": len(rows),
        "good_indexed_once": sum(_indexed_count(index, p) == 1 for p in good), "good": len(good),
        "passed": builds_ok and check["ok"] and all(r["handled"] for r in rows)
        and report.get("added") == 0 and report.get("replaced") == 0 and not check.get("duplicate_sha256")
        and all(_indexed_count(index, p) == 1 for p in good),
    }
    return {"summary": summary, "rows": rows}


def _db_rows(index: Path) -> list[tuple]:
    db = index / "simsearch.sqlite"
    if not db.exists():
        return []
    with sqlite3.connect(str(db)) as conn:
        return conn.execute("SELECT id, path, width, height FROM images").fetchall()


def _indexed_count(index: Path, path: Path) -> int:
    target = str(Path(path).resolve())
    return sum(r[1] == target for r in _db_rows(index))


def _judge(folder: Path, index: Path, inputs: list[hostile.Input], good: list[Path], skipped: list[dict]) -> list[dict]:
    rows = _db_rows(index)
    by_path = {}
    for image_id, path, w, h in rows:
        by_path.setdefault(path, []).append((image_id, w, h))
    skipped_reason = {s["path"]: s["reason"] for s in skipped}
    objects: dict[int, list] = {}
    if (index / "simsearch.sqlite").exists():
        with sqlite3.connect(str(index / "simsearch.sqlite")) as conn:
            for image_id, *box in conn.execute("SELECT image_id, xmin, ymin, xmax, ymax FROM objects"):
                objects.setdefault(image_id, []).append(box)
    loop_prefix = str(folder / "loop") + os.sep
    under_loop = [p for p in by_path if p.startswith(loop_prefix)]

    def records(rel: str) -> list:
        return by_path.get(str((folder / rel).resolve()), [])

    def listed(rel: str) -> str | None:
        for form in (os.path.abspath(folder / rel), os.path.realpath(folder / rel)):
            if form in skipped_reason:
                return skipped_reason[form]
        return None

    out = []
    for item in inputs:
        n = len(records(item.path)) if item.expect in ("indexed", "skipped", "either") else 0
        why = listed(item.path)
        outcome, handled = "", False
        if item.expect in ("indexed", "skipped", "either"):
            outcome = f"indexed x{n}" if n else ("skipped: " + why if why else "neither indexed nor listed")
            if item.expect == "indexed":
                handled = n == 1
                size = item.extra.get("upright_size")
                if handled and size and [records(item.path)[0][1], records(item.path)[0][2]] != size:
                    handled, outcome = False, f"indexed at {records(item.path)[0][1:]} not upright {size}"
            elif item.expect == "skipped":
                handled = n == 0 and why is not None
            else:
                handled = (n == 1) != (why is not None)
        elif item.expect == "walked":
            inner = len(records(item.target))
            own = len(by_path.get(str((folder / item.path).resolve()), []))
            handled = inner == 1 and own == 0
            outcome = f"folder walked: {item.target} indexed x{inner}"
        elif item.expect == "once":
            n = len(records(item.target))
            handled = n == 1 and not under_loop and not records(item.path)[1:]
            outcome = f"{item.target} indexed x{n}; {len(under_loop)} records under loop/"
        elif item.expect == "annotation":
            image = records(item.target)
            kept = objects.get(image[0][0], []) if len(image) == 1 else []
            w, h = (image[0][1], image[0][2]) if len(image) == 1 else (0, 0)
            sound = all(all(v is not None and math.isfinite(v) for v in b) and 0 <= b[0] < b[2] <= w
                        and 0 <= b[1] < b[3] <= h for b in kept)
            handled = len(image) == 1 and len(kept) == item.objects and sound and (not item.reported or why is not None)
            outcome = (f"image indexed x{len(image)}, {len(kept)} boxes kept (want {item.objects})"
                       + (", all inside" if sound else ", a box is NaN or outside")
                       + (f"; listed: {why[:90]}" if why else "; not listed"))
        out.append({"input": item.name, "path": item.path, "expect": item.expect, "outcome": outcome[:110],
                    "handled": handled, "note": item.note})
    return out


# ---------------------------------------------------------------- 4. the server under upload load

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _multipart(payload: bytes, filename: str, k: int) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _post(url: str, payload: bytes, filename: str, timeout: float) -> tuple[str, float, str]:
    body, ctype = _multipart(payload, filename, 5)
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return str(response.status), time.perf_counter() - started, ""
    except urllib.error.HTTPError as e:
        detail = e.read()[:200].decode(errors="replace")
        return str(e.code), time.perf_counter() - started, detail
    except Exception as e:  # noqa: BLE001 - a reset or a timeout is the finding
        return f"error: {type(e).__name__}", time.perf_counter() - started, str(e)[:200]


class _Sampler(threading.Thread):
    """VmRSS of `pid` every few ms; `peak_kb` is the largest seen since the last `reset`."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.stopped = pid, 0, threading.Event()

    def reset(self) -> None:
        self.peak_kb = _status_kb(self.pid, "VmRSS") or 0

    def run(self) -> None:
        while not self.stopped.is_set():
            rss = _status_kb(self.pid, "VmRSS")
            if rss is None:
                return
            self.peak_kb = max(self.peak_kb, rss)
            time.sleep(0.01)


def serve_campaign(work: Path, index: Path, n_requests: int = 40, concurrency: int = 4,
                   time_cap: float = 240.0, seed: int = 0) -> dict:
    """Start `simsearch serve`, send normal uploads, then normal + bomb uploads; status codes and RSS."""
    tmp = work / "tmp"
    port = _free_port()
    server = Spawned(["serve", "--index", str(index), "--host", "127.0.0.1", "--port", str(port)], tmp)
    base = f"http://127.0.0.1:{port}"
    result: dict = {"port": port, "requests_planned": n_requests, "concurrency": concurrency}
    try:
        ready = time.perf_counter()
        while time.perf_counter() - ready < 120:
            if server.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(base + "/api/info", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.25)
        if server.proc.poll() is not None or time.perf_counter() - ready >= 120:
            done = server.wait(5)
            result["error"] = f"server did not come up (rc {done.rc}): {done.stderr[-500:]}"
            return result
        result["startup_s"] = round(time.perf_counter() - server.started, 1)
        pid = server.pid
        result["rss_before_mb"] = round((_status_kb(pid, "VmRSS") or 0) / 1024, 1)
        result["hwm_before_mb"] = round((_status_kb(pid, "VmHWM") or 0) / 1024, 1)
        rng = random.Random(seed)
        normals = [hostile.jpeg_bytes(hostile.shape_image(rng)[0]) for _ in range(n_requests)]
        bombs = {"bomb 19000x19000": hostile.bomb_png(19000, 19000), "bomb 14000x14000": hostile.bomb_png(14000, 14000)}
        n_warm = max(4, n_requests // 5)
        plan_warm = [("normal", normals[i], f"n{i}.jpg") for i in range(n_warm)]
        cycle = ["normal", "bomb 19000x19000", "normal", "bomb 14000x14000"]
        plan_mixed = []
        for i in range(n_requests - n_warm):
            kind = cycle[i % len(cycle)]
            plan_mixed.append((kind, normals[n_warm + i] if kind == "normal" else bombs[kind],
                               f"{i}.jpg" if kind == "normal" else f"{i}.png"))
        sampler = _Sampler(pid)
        sampler.start()
        deadline = time.perf_counter() + time_cap
        phases = []
        for phase, plan in (("normal uploads only", plan_warm), ("normal + bomb uploads", plan_mixed)):
            sampler.reset()
            started = time.perf_counter()
            outcomes: list[tuple[str, str, float, str]] = []

            def one(item, outcomes=outcomes):
                kind, payload, name = item
                if time.perf_counter() > deadline:
                    outcomes.append((kind, "not sent (time cap)", 0.0, ""))
                    return
                status, seconds, detail = _post(base + "/api/search", payload, name,
                                                timeout=max(5.0, deadline - time.perf_counter()))
                outcomes.append((kind, status, seconds, detail))

            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(one, plan))
            by_kind: dict[str, dict] = {}
            for kind, status, seconds, detail in outcomes:
                entry = by_kind.setdefault(kind, {"statuses": {}, "seconds": [], "details": set()})
                entry["statuses"][status] = entry["statuses"].get(status, 0) + 1
                entry["seconds"].append(seconds)
                if detail and not status.startswith("2"):
                    entry["details"].add(detail[:160])
            phases.append({
                "phase": phase, "requests": len(plan), "seconds": round(time.perf_counter() - started, 1),
                "peak_rss_mb": round(sampler.peak_kb / 1024, 1),
                "by_kind": {k: {"statuses": v["statuses"], "p50_s": round(statistics.median(v["seconds"]), 3),
                                "max_s": round(max(v["seconds"]), 3), "details": sorted(v["details"])[:3]}
                            for k, v in by_kind.items()},
            })
        sampler.stopped.set()
        result["phases"] = phases
        result["hwm_after_mb"] = round((_status_kb(pid, "VmHWM") or 0) / 1024, 1)
        result["rss_after_mb"] = round((_status_kb(pid, "VmRSS") or 0) / 1024, 1)
        try:
            with urllib.request.urlopen(base + "/api/info", timeout=10) as r:
                result["alive_after"] = r.status == 200
        except Exception as e:  # noqa: BLE001
            result["alive_after"] = False
            result["after_error"] = str(e)[:200]
        result["bomb_decoded_rgb_mb"] = {k: round(int(k.split()[1].split("x")[0]) ** 2 * 3 / 2**20)
                                         for k in bombs}
    finally:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGINT)
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                kill_session(server.pid)
        done = server.wait(10)
        kill_session(server.pid)
        result["server_rc"] = done.rc
        result["server_stderr_tail"] = done.stderr[-800:]
    statuses = [s for p in result.get("phases", []) for v in p["by_kind"].values() for s in v["statuses"]]
    normal_ok = all(set(p["by_kind"].get("normal", {"statuses": {"200": 1}})["statuses"]) == {"200"}
                    for p in result.get("phases", []))
    result["passed"] = bool(result.get("alive_after")) and normal_ok and not any(
        s.startswith("5") or s.startswith("error") for s in statuses)
    return result


# ---------------------------------------------------------------- main

CHURN = """
import faulthandler
import sys
import time
from pathlib import Path

import torch

from simsearch.pipeline.embed import Embedder, ImageFileDataset, _decoded_batches, load_backbone

paths = sorted(Path(sys.argv[1]).glob("*.jpg"))
backbone = load_backbone("efficientnet-lite0")
pre = backbone.spec.preprocess
batches = list(_decoded_batches(ImageFileDataset(paths, pre), 32, 0, pin_memory=False))
pixels = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8)


def timed(embedder, seconds=1.0):
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        embedder.embed_batch(pixels)


def groups(embedder):
    for batch in batches:
        embedder.embed_groups(len(batch.good), batch.groups)


faulthandler.dump_traceback_later(float(sys.argv[3]), exit=True)  # a hang: its stacks, then exit 1
for r in range(int(sys.argv[2])):
    timed(Embedder(backbone, "cpu", "auto", "openvino"))
    groups(Embedder(backbone, "cpu", "auto", "openvino"))
    for batch in _decoded_batches(ImageFileDataset(paths[:100], pre), 32, 0, pin_memory=False):
        pass
    print(r + 1, flush=True)
"""


def embedder_campaign(work: Path, rounds: int = 30) -> dict:
    """Make and drop OpenVINO embedders in one process, decoding between: it must finish, not hang."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return {"rounds": 0, "passed": True, "outcome": "skipped: OpenVINO not installed"}
    from PIL import Image
    import numpy as np

    folder = work / "churn"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(320):  # photo-sized JPEGs of a few aspect ratios, as a build decodes
        w, h = [(500, 375), (375, 500), (500, 333), (448, 448)][i % 4]
        noise = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(noise).resize((w, h), Image.BILINEAR).save(folder / f"{i:03d}.jpg", quality=85)
    # A round took 2 s here when idle and about 5 s under load: 20 s a round is a hang, not a slow machine.
    limit = 60 + 20 * rounds
    started = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-c", CHURN, str(folder), str(rounds), str(limit)],
                             capture_output=True, text=True, timeout=limit + 30)
        done = len(out.stdout.split())
        hung = "Timeout (" in out.stderr  # faulthandler's dump: the child's stacks are in its stderr
        outcome = ("finished" if out.returncode == 0 and done == rounds
                   else f"hung after {done} rounds: {out.stderr[-400:]}" if hung
                   else f"exit {out.returncode}: {out.stderr[-300:]}")
    except subprocess.TimeoutExpired:
        done, outcome = -1, f"hung, and killed at {limit + 30} s"
    return {"rounds": rounds, "completed": done, "seconds": round(time.perf_counter() - started, 1),
            "outcome": outcome, "passed": outcome == "finished"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 kills, 20 uploads: a few minutes")
    parser.add_argument("--kills", type=int, help="random kills (default 30; 8 with --quick)")
    parser.add_argument("--requests", type=int, help="uploads sent to the server (default 40; 20 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same kill moments and inputs")
    parser.add_argument("--only", help="comma-separated subset of kills,concurrent,hostile,serve,embedders")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed) for inspection")
    args = parser.parse_args()
    n_kills = args.kills if args.kills is not None else (8 if args.quick else 30)
    n_requests = args.requests or (20 if args.quick else 40)
    parts = set(args.only.split(",")) if args.only else {"kills", "concurrent", "hostile", "serve", "embedders"}
    work = Path(tempfile.mkdtemp(prefix="simsearch-faults-"))
    started = time.perf_counter()
    payload: dict = {"seed": args.seed, "quick": args.quick, "commands": {}, "uid": os.geteuid()}
    failed: list[str] = []
    try:
        setup = None
        if parts & {"kills", "concurrent", "serve"}:
            setup = prepare(work, seed=args.seed)
            payload["uninterrupted_seconds"] = {k: round(v, 2) for k, v in setup.seconds.items()}
            payload["commands"] = {k: ("simsearch " + " ".join(command_for(k, setup, Path("IDX")))).replace(
                str(work), "WORK") for k in KINDS}
        if "kills" in parts:
            rows = kill_campaign(setup, n_kills, args.seed)
            summary = kill_summary(rows)
            payload["kills"] = {"summary": summary, "trials": rows}
            print_table(f"Random kill -9, then the same command again ({n_kills} trials, seed {args.seed})", summary,
                        ["command", "tried", "survived", "finished_first", "rerun_refused_busy", "orphans_held_lock",
                         "committed_at_kill", "leftover_tmp", "failures"],
                        ["survived: the re-run exits 0 and the index passes every check (integrity, FAISS ids == "
                         "SQLite ids, one record per path, vectors and maps per record, stamp current, predictions "
                         "for every record when a head exists, head loads, records == the folder's files)",
                         "rerun_refused_busy: the immediate re-run exited 1 with 'another simsearch command is "
                         "writing'; it then ran once the killed command's orphans were gone",
                         "orphans_held_lock: after the kill, a child of the killed process still held write.lock",
                         "committed_at_kill: images the killed command had committed (range over trials)"])
            if any(not r["survived"] for r in rows if r["killed"]):
                failed.append("kills")
            for r in rows:
                if not r["survived"] and r["killed"]:
                    print(f"  trial {r['trial']} {r['kind']} killed at {r['kill_at_s']}s: "
                          f"{r.get('rerun_error', '')} {r['problems']}")
        if "concurrent" in parts:
            rows = concurrent_campaign(setup)
            payload["concurrent"] = rows
            print_table("Concurrent writers on one index", rows,
                        ["scenario", "first", "second", "first_s", "second_s", "loser_rerun", "rerun", "images",
                         "ntotal", "consistent", "passed"],
                        ["first: build-index; second: the other command, started at the same moment",
                         "loser_rerun: the refused command run again once the other finished (as its message says)",
                         "rerun: build-index again at the end (nothing new to embed expected)"])
            for r in rows:
                for message in r["busy_messages"]:
                    print(f"  {r['scenario']}: {message}")
                if r["problems"]:
                    print(f"  {r['scenario']}: {r['problems']}")
            if not all(r["passed"] for r in rows):
                failed.append("concurrent")
        if "hostile" in parts:
            progress("hostile folder: two builds, each under a timeout")
            result = hostile_campaign(work, args.seed)
            payload["hostile"] = result
            s = result["summary"]
            print_table(f"Hostile folder: {s['handled']}/{s['tried']} inputs handled; build rc "
                        f"{s['first_build']['rc']} in {s['first_build']['seconds']}s, re-run rc "
                        f"{s['second_build']['rc']} ({s['second_build']['added']} added); {s['images']} images, "
                        f"{s['skipped_listed']} skipped listed, consistent {s['consistent']}",
                        result["rows"], ["input", "expect", "handled", "outcome"],
                        [f"good images indexed exactly once: {s['good_indexed_once']}/{s['good']}; "
                         f"duplicate files in the index: {s['duplicate_sha256']}",
                         *[f"stderr of the build besides its summary: {ln}" for ln in s["stderr_noise"][:4]],
                         *[f"{r['input']}: {r['note']}" for r in result["rows"]
                           if r["note"] and (r["expect"] != "either" or r["outcome"].startswith("skipped"))]])
            if not s["passed"]:
                failed.append("hostile")
        if "serve" in parts:
            progress(f"serve: {n_requests} uploads, at most 4 at once, normal images and bomb PNGs")
            result = serve_campaign(work, setup.fresh_ref, n_requests, seed=args.seed)
            payload["serve"] = result
            rows = []
            for p in result.get("phases", []):
                for kind, v in p["by_kind"].items():
                    rows.append({"phase": p["phase"], "upload": kind, "statuses": json.dumps(v["statuses"]),
                                 "p50_s": v["p50_s"], "max_s": v["max_s"], "phase_peak_rss_mb": p["peak_rss_mb"]})
            print_table(f"simsearch serve under upload load: RSS before {result.get('rss_before_mb')} MB, "
                        f"peak (VmHWM) after {result.get('hwm_after_mb')} MB, alive after: "
                        f"{result.get('alive_after')}", rows,
                        ["phase", "upload", "statuses", "p50_s", "max_s", "phase_peak_rss_mb"],
                        [f"decoded as RGB the bombs would take {result.get('bomb_decoded_rgb_mb')} MB",
                         *(f"{p['phase']} / {k}: {d}" for p in result.get("phases", [])
                           for k, v in p["by_kind"].items() for d in v["details"][:1]),
                         *([result["error"]] if "error" in result else [])])
            if not result.get("passed"):
                failed.append("serve")
        if "embedders" in parts:
            rounds = 10 if args.quick else 30
            progress(f"embedders: {rounds} rounds of making and dropping OpenVINO embedders in one process")
            result = embedder_campaign(work, rounds)
            payload["embedders"] = result
            print_table("Embedders made and dropped in one process", [result],
                        ["rounds", "completed", "seconds", "outcome", "passed"],
                        ["a round: an embedder timed on a repeated 224 x 224 batch for 1 s, dropped; another over "
                         "every decoded batch, dropped; a decode of 100 files (two threads)"])
            if not result["passed"]:
                failed.append("embedders")
    finally:
        payload["wall_seconds"] = round(time.perf_counter() - started, 1)
        payload["failed_parts"] = failed
        write_result("faults", payload)
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            for p in work.rglob("*"):
                if p.is_file() and not p.is_symlink():
                    try:
                        os.chmod(p, 0o644)
                    except OSError:
                        pass
            shutil.rmtree(work, ignore_errors=True)
    progress(f"done in {time.perf_counter() - started:.0f}s; "
             + (f"FAILED: {', '.join(failed)}" if failed else "every part passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
