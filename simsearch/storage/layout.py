"""The index folder: what each file in it is called, and the rule that keeps index.faiss true to SQLite.

An index folder holds:

| file | what | written by |
|---|---|---|
| `simsearch.sqlite` | records, boxes, vectors, maps, predictions, spec: the source of truth | build, localize |
| `spec.json` | a human-readable copy of the spec | build |
| `index.faiss` + `index.state.json` | FAISS over the vectors, stamped with the generation, size and sha256 it holds | build, or any reader that found it stale |
| `localizer.pt` | the trained head: weights and spec in one file | train-localizer |
| `write.lock` | held by the one writer at a time | build, localize, train-localizer |
| `thumbs/` | cached thumbnails and box crops | views |

FAISS is derived data: whenever its stamp does not match SQLite's generation (a
killed build, a damaged or replaced file) it is rebuilt from the vectors, with the
generation read in the same transaction as them (`open_faiss`, `sync_faiss`).

One writer at a time: every command that writes (build-index, localize,
train-localizer) holds `write.lock` with `flock`, which the kernel releases when
its holder dies, so a `kill -9` never leaves a stale lock to clean up; a reader
that rebuilt FAISS saves it only when no writer holds the folder.
"""
from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from simsearch.errors import BadInputError, IndexBusyError, IndexDamagedError, NotFoundError
from simsearch.spec import IndexSpec
from simsearch.storage import faiss_index

if TYPE_CHECKING:
    from simsearch.spec import EmbedderSpec
    from simsearch.storage.store import Store

log = logging.getLogger(__name__)

DB = "simsearch.sqlite"
SPEC = "spec.json"
FAISS = "index.faiss"
FAISS_STATE = "index.state.json"
HEAD = "localizer.pt"
LEGACY_HEAD_SPEC = "localizer.json"  # the head's spec before it moved into HEAD
LOCK = "write.lock"
THUMBS = "thumbs"
SHARDS = "shards"  # vector and map rows (storage/shards.py)


def faiss_paths(index_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(index.faiss, index.state.json) of a folder."""
    return Path(index_dir) / FAISS, Path(index_dir) / FAISS_STATE


def faiss_generation(index_dir: str | os.PathLike, verify: bool | None = None) -> int | None:
    """The SQLite generation the folder's FAISS file holds, or None when there is no file to trust."""
    return faiss_index.saved_generation(*faiss_paths(index_dir), verify=verify)


def open_faiss(store: "Store", spec: IndexSpec):
    """(generation, index) for searching: the saved file when current and sound, else rebuilt from SQLite.

    A rebuilt file is saved for the next process unless a writer holds the folder
    (it will write its own) or the folder is read-only (the rebuild still answers).
    """
    generation = store.generation
    index = None
    if faiss_generation(store.dir) == generation:
        try:
            index = faiss_index.load(*faiss_paths(store.dir))
        except IndexDamagedError as e:
            log.warning("%s; rebuilding it from %s", e, store.dir / DB)
    if index is None:
        log.warning("index.faiss is stale or damaged; rebuilding it from %s", store.dir / DB)
        generation, ids, xb = store.vector_snapshot()
        if not len(ids):
            raise NotFoundError(f"{store.dir} holds no images (all were pruned); add some: "
                                f"simsearch build-index DATA --index {store.dir}")
        index = faiss_index.build(xb, ids, spec.index_type)
        _save_unless_busy(store.dir, index, generation)
    faiss_index.apply_params(index, faiss_index.SearchParams(spec.nprobe, spec.efsearch))
    return generation, index


def _save_unless_busy(index_dir: Path, index, generation: int) -> None:
    try:
        lock = try_writer_lock(index_dir, "a reader saving a rebuilt index.faiss")
    except OSError:
        return  # read-only index folder
    if lock is None:
        return
    try:
        faiss_index.save(index, *faiss_paths(index_dir), generation)
    except OSError:
        pass
    finally:
        release_writer_lock(lock)


# An IVF index is trained once, on the collection as it was; new vectors are added to its lists
# until the collection has grown this many times over, when its centroids no longer fit and it is
# retrained. Search breadth is re-tuned after updates that grow the collection by RETUNE_GROWTH.
RETRAIN_GROWTH = 4.0
RETUNE_GROWTH = 1.25


@dataclass(frozen=True)
class FaissSync:
    """What `sync_faiss` did: the spec it saved, and how the FAISS file came to match SQLite."""

    spec: IndexSpec
    action: str  # "kept" (already current), "updated" (vectors added/removed in place) or "rebuilt"
    added: int = 0
    removed: int = 0


def sync_faiss(store: "Store", embedder_spec: "EmbedderSpec", index_type: str | None = None) -> FaissSync:
    """Make index.faiss hold exactly SQLite's vectors (the writer's side: it holds the lock).

    An incremental run updates the saved index in place (new vectors added, removed ones
    taken out) instead of rebuilding it from every vector; it is rebuilt when its type
    changes with the collection's size, when it cannot remove (HNSW), when an IVF has
    outgrown its training, or when the file is not to be trusted. The file's checksum is
    read, not assumed: build-index vouches for what it leaves.
    """
    if index_type:
        store.set_meta("index_type_forced", index_type)  # a forced type sticks for later incremental runs
    count = store.count("embeddings")
    if count == 0:
        raise BadInputError(f"no images could be indexed (see the skipped files: simsearch info --index {store.dir})")
    factory = store.get_meta("index_type_forced") or faiss_index.choose_factory(count, embedder_spec.dim)
    saved = store.spec
    same_type = saved is not None and saved.index_type == factory
    on_disk = faiss_generation(store.dir, verify=True)
    if same_type and on_disk == store.generation:
        return FaissSync(saved, "kept")
    update = _updated_in_place(store, factory) if same_type and on_disk is not None else None
    if update is not None:
        index, generation, added, removed = update
        params = faiss_index.SearchParams(saved.nprobe, saved.efsearch)
        tuned_at = int(store.get_meta("faiss_tuned_count", "0") or 0)
        if index.ntotal > RETUNE_GROWTH * tuned_at and (params.nprobe or params.efsearch):
            _, ids, xb = store.vector_snapshot()  # the writer holds the lock: this is `generation`'s vectors
            params, _ = faiss_index.tune_params(index, xb, ids)
            store.set_meta("faiss_tuned_count", str(index.ntotal))
        faiss_index.save(index, *faiss_paths(store.dir), generation)
        result = FaissSync(saved, "updated", added, removed)
    else:
        # Generation and vectors from one read transaction: the stamp can only name what the file holds.
        generation, ids, xb = store.vector_snapshot()
        index = faiss_index.build(xb, ids, factory)
        params, _ = faiss_index.tune_params(index, xb, ids)
        faiss_index.save(index, *faiss_paths(store.dir), generation)
        store.set_meta("faiss_trained_count", str(len(ids)))
        store.set_meta("faiss_tuned_count", str(len(ids)))
        result = FaissSync(saved, "rebuilt", len(ids), 0)
    spec = IndexSpec(embedder_spec, factory, nprobe=params.nprobe, efsearch=params.efsearch)
    if saved != spec:
        store.save_spec(spec)
    return FaissSync(spec, result.action, result.added, result.removed)


def _updated_in_place(store: "Store", factory: str):
    """(index, generation, added, removed): the saved index brought up to SQLite's ids, or None to rebuild."""
    generation, ids = store.id_snapshot()
    try:
        index = faiss_index.load(*faiss_paths(store.dir), use_gpu=False, writable=True)
    except IndexDamagedError as e:
        log.warning("%s; rebuilding it", e)
        return None
    held = faiss_index.ids_of(index)
    wanted = set(ids.tolist())
    removed = sorted(held - wanted)
    added = sorted(wanted - held)
    if removed and not faiss_index.can_remove(index):
        log.info("%s cannot remove vectors: rebuilding instead", factory)
        return None
    trained = int(store.get_meta("faiss_trained_count", "0") or 0)
    if faiss_index.is_trained_on_data(index) and len(ids) > RETRAIN_GROWTH * max(trained, 1):
        log.info("%s was trained on %d vectors and the index now holds %d: retraining", factory, trained, len(ids))
        return None
    if removed:
        index.remove_ids(np.asarray(removed, dtype=np.int64))
    if added:
        new_ids, xb = store.vectors(added)
        index.add_with_ids(np.ascontiguousarray(xb, dtype=np.float32), new_ids)
    if faiss_index.ids_of(index) != wanted:  # never save an index that does not hold exactly SQLite's ids
        log.warning("in-place update of %s left other ids than SQLite's: rebuilding", factory)
        return None
    log.info("updated %s in place: %d added, %d removed", factory, len(added), len(removed))
    return index, generation, len(added), len(removed)


def faiss_is_current(store: "Store") -> bool:
    """Whether a search would use the saved FAISS file as it is (for `info`)."""
    return faiss_generation(store.dir) == store.generation


# ---------------------------------------------------------------- the one writer

@contextmanager
def writer_lock(index_dir: str | os.PathLike, what: str = "build-index") -> Iterator[None]:
    """Hold the index's write lock for the block, or raise IndexBusyError naming the holder."""
    if not Path(index_dir).is_dir():
        raise NotFoundError(f"{index_dir}: no index here. Build one first: simsearch build-index DATA --index {index_dir}")
    try:
        lock = try_writer_lock(index_dir, what)
    except OSError as e:
        raise BadInputError(f"cannot write to {index_dir} ({e.strerror or e}); {what} needs a writable index folder") from e
    if lock is None:
        raise IndexBusyError(
            f"another simsearch command is writing to {index_dir} ({holder(index_dir)}); "
            "wait for it to finish (or stop it), then run this again")
    try:
        yield
    finally:
        release_writer_lock(lock)


def try_writer_lock(index_dir: str | os.PathLike, what: str) -> int | None:
    """The locked file descriptor (close it to release), or None when another process holds it."""
    path = Path(index_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{what} pid {os.getpid()}\n".encode())
    _HELD.add(fd)
    return fd


def release_writer_lock(fd: int) -> None:
    _HELD.discard(fd)
    os.close(fd)


# flock belongs to the open file, which a fork shares: a decode worker forked by a build would
# keep the index locked after the build itself is killed. Children close their copies at once.
_HELD: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def writer(index_dir: str | os.PathLike) -> str | None:
    """Who is writing to the index now ("build-index pid 1234"), or None when nobody is.

    Read from the kernel's table of locks (Linux /proc/locks), never by taking the
    lock: a check that took it, however briefly, could make a starting build fail.
    """
    try:
        info = os.stat(Path(index_dir) / LOCK)
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    held = any(parts[1] == "FLOCK" and device in parts for parts in (line.split() for line in table.splitlines())
               if len(parts) > 5)
    return holder(index_dir) if held else None


def holder(index_dir: str | os.PathLike) -> str:
    """Who holds the lock, as its holder wrote it ("build-index pid 1234")."""
    try:
        return (Path(index_dir) / LOCK).read_text().strip() or "a process"
    except OSError:
        return "a process"
