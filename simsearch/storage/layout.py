"""The index folder: what each file in it is called, and the rule that keeps index.faiss true to SQLite.

An index folder holds:

| file | what | written by |
|---|---|---|
| `simsearch.sqlite` | records, boxes, predictions, spec, where each vector and map sits: the source of truth | build, localize |
| `shards/vec-N.f16`, `shards/map-N.f16` | float16 vectors and kept feature maps, append-only (`shards.py`) | build |
| `spec.json` | a human-readable copy of the spec | build |
| `index.faiss` + `index.state.json` | FAISS over the vectors, stamped with the generation, size and sha256 it holds | build, or any reader that found it stale |
| `index.delta-N.faiss` | an IVF's vectors added since index.faiss was written (named in the stamp) | build |
| `objects.faiss` + `objects.state.json` (+ `objects.delta-N.faiss`) | the same over the box vectors: the objects index | build, localize |
| `localizer.pt` | the trained head: weights and spec in one file | train-localizer |
| `write.lock` | held by the one writer at a time | build, localize, train-localizer |
| `thumbs/` | cached thumbnails and box crops | views |

FAISS is derived data: whenever its stamp does not match SQLite's generation (a
killed build, a damaged or replaced file) it is rebuilt from the vectors, with the
generation read in the same transaction as them (`open_faiss`, `sync_faiss`). The
images and the boxes are two vector sets (`Store.vector_set`), each with its own
FAISS files and generation, kept true by the same code.

One writer at a time: every command that writes (build-index, localize,
train-localizer) holds `write.lock` with `flock`, which the kernel releases when
its holder dies, so a `kill -9` never leaves a stale lock to clean up; a reader
that rebuilt FAISS saves it only when no writer holds the folder.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
    from simsearch.storage.store import Store, VectorSet

log = logging.getLogger(__name__)

DB = "simsearch.sqlite"
SPEC = "spec.json"
FAISS = "index.faiss"
FAISS_STATE = "index.state.json"
FAISS_DELTA = "index.delta-{generation}.faiss"  # vectors added to an IVF since index.faiss was written
HEAD = "localizer.pt"
LEGACY_HEAD_SPEC = "localizer.json"  # the head's spec before it moved into HEAD
LOCK = "write.lock"
THUMBS = "thumbs"
SHARDS = "shards"  # vector and map rows (storage/shards.py)
# The objects index: the same three files over the box vectors.
OBJECTS_FAISS, OBJECTS_STATE, OBJECTS_DELTA = "objects.faiss", "objects.state.json", "objects.delta-{generation}.faiss"
_FILES = {"images": (FAISS, FAISS_STATE, FAISS_DELTA), "boxes": (OBJECTS_FAISS, OBJECTS_STATE, OBJECTS_DELTA)}


def faiss_paths(index_dir: str | os.PathLike, collection: str = "images") -> tuple[Path, Path]:
    """(index.faiss, index.state.json) of a folder, or the objects index's pair for collection "boxes"."""
    name, state, _ = _FILES[collection]
    return Path(index_dir) / name, Path(index_dir) / state


def faiss_generation(index_dir: str | os.PathLike, verify: bool | None = None, collection: str = "images") -> int | None:
    """The SQLite generation the folder's FAISS file holds, or None when there is no file to trust."""
    return faiss_index.saved_generation(*faiss_paths(index_dir, collection), verify=verify)


def open_faiss(store: "Store", spec: IndexSpec, collection: str = "images"):
    """(generation, index) for searching: the saved file when current and sound, else rebuilt from SQLite.

    A rebuilt file is saved for the next process unless a writer holds the folder
    (it will write its own) or the folder is read-only (the rebuild still answers).
    """
    vs = store.vector_set(collection)
    index = None
    for _ in range(3):  # a writer that moved on between our reads: read its new stamp rather than rebuild
        generation = vs.generation
        if faiss_generation(vs.dir, collection=collection) == generation:
            try:
                index = faiss_index.load(*faiss_paths(vs.dir, collection))
                break
            except IndexDamagedError as e:
                if faiss_generation(vs.dir, collection=collection) == generation:
                    log.warning("%s; rebuilding it from %s", e, vs.dir / DB)
                    break
        elif vs.generation == generation:
            break
    if index is None:
        log.warning("%s is stale or damaged; rebuilding it from %s", _FILES[collection][0], vs.dir / DB)
        if not vs.count():
            raise NotFoundError(f"{vs.dir} holds no {'images' if collection == 'images' else 'objects'} "
                                f"(all were pruned); add some: simsearch build-index DATA --index {vs.dir}")
        generation, ids, index, _, _ = _rebuilt(vs, spec.index_type, spec.embedder.dim, probe=False)
        # Read in chunks outside one transaction: saved only if nothing changed meanwhile and
        # it holds exactly that generation's ids (a writer may be committing).
        if vs.generation == generation and np.array_equal(faiss_index.ids_of(index), ids):
            _save_unless_busy(vs.dir, index, generation, collection)
    faiss_index.apply_params(index, faiss_index.SearchParams(spec.nprobe, spec.efsearch))
    return generation, index


def _save_unless_busy(index_dir: Path, index, generation: int, collection: str = "images") -> None:
    try:
        lock = try_writer_lock(index_dir, "a reader saving a rebuilt index.faiss")
    except OSError:
        return  # read-only index folder
    if lock is None:
        return
    try:
        faiss_index.save(index, *faiss_paths(index_dir, collection), generation)
    except OSError:
        pass
    finally:
        release_writer_lock(lock)


# An IVF index is trained once, on a sample of the collection as it was; new vectors are added to
# its lists until the collection has grown this many times over, when its centroids no longer fit
# and it is retrained. After every update the recall target is re-checked on the recall probe
# (widening the search if it fell short); after growth by RETUNE_GROWTH the breadth is tuned
# again from the narrowest step, since a wider collection may also need less.
RETRAIN_GROWTH = 4.0
RETUNE_GROWTH = 1.25
CHUNK = 50_000  # vectors read from the store at a time while building: bounds the writer's memory
DELTA_MAX_SHARE = 0.1  # an IVF's delta is folded into its file past this share of the file's vectors
PROBE_META = "faiss_recall_probe"  # the exact neighbours tuning measures recall against, with their generation


@dataclass(frozen=True)
class FaissSync:
    """What `sync_faiss` did: the spec it saved, and how the FAISS file came to match SQLite."""

    spec: IndexSpec
    action: str  # "kept" (already current), "updated" (vectors added/removed in place) or "rebuilt"
    added: int = 0
    removed: int = 0
    recall: float | None = None  # recall@10 against exact search on the probe, at the saved breadth (None: exact)
    retuned: bool = False  # whether the search breadth was chosen again


def sync_faiss(store: "Store", embedder_spec: "EmbedderSpec", index_type: str | None = None,
               collection: str = "images") -> FaissSync:
    """Make index.faiss hold exactly SQLite's vectors (the writer's side: it holds the lock).

    An incremental run updates the saved index in place (new vectors added, removed ones
    taken out) instead of rebuilding it from every vector; it is rebuilt when its type
    changes with the collection's size (an IVF keeps its lists while it grows, see
    RETRAIN_GROWTH), when it cannot remove (HNSW), when an IVF has outgrown its
    training, or when the file is not to be trusted. The file's checksum is read, not
    assumed: build-index vouches for what it leaves. A rebuild reads the vectors CHUNK
    at a time, so the writer holds the index and one chunk, never every vector.
    """
    store = store.vector_set(collection)  # from here on, the one vector set this index is over
    if index_type:
        store.set_meta("index_type_forced", index_type)  # a forced type sticks for later incremental runs
    with ThreadPoolExecutor(1) as pool:
        # The checksum of a large file takes about as long as listing a million ids (hashlib and
        # faiss leave the GIL): both at once.
        checked = pool.submit(faiss_generation, store.dir, True, collection)
        generation, ids = store.id_snapshot()
        on_disk = checked.result()
    if not len(ids):
        raise BadInputError(f"no images could be indexed (see the skipped files: simsearch info --index {store.dir})")
    forced = store.get_meta("index_type_forced")
    wanted = forced or faiss_index.choose_factory(len(ids), embedder_spec.dim)
    saved = store.spec
    saved_type = saved.index_type if saved is not None else None
    same_type = saved_type == wanted or (not forced and faiss_index.same_family(saved_type, wanted))
    factory = saved_type if same_type else wanted  # an IVF keeps its list count until it is retrained
    if same_type and on_disk == generation:
        return FaissSync(saved, "kept")
    update = _updated_in_place(store, factory, on_disk, generation, ids) if same_type and on_disk is not None else None
    if update is not None:
        generation, probe, index = update.generation, update.probe, update.searched
        params, recall, retuned = _rechecked(store, index, probe, update.xq,
                                             faiss_index.SearchParams(saved.nprobe, saved.efsearch),
                                             faiss_index.rerank_depth(factory))
        result = FaissSync(saved, "updated", update.added, update.removed)
    else:
        factory = wanted
        generation, ids, index, probe, xq = _rebuilt(store, factory, embedder_spec.dim)
        if not np.array_equal(faiss_index.ids_of(index), ids):
            raise IndexDamagedError(f"{store.dir / DB} changed while index.faiss was rebuilt; was another process "
                                    "writing without the lock? Run build-index again")
        params, recall = (faiss_index.tune(index, probe, xq, rerank=faiss_index.rerank_depth(factory),
                                           vectors_of=store.vectors)
                          if probe is not None else (faiss_index.SearchParams(), None))
        result, retuned = FaissSync(saved, "rebuilt", len(ids), 0), True
    paths = faiss_paths(store.dir, collection)
    if update is not None and update.layered:
        delta_name = _FILES[collection][2].format(generation=generation)
        faiss_index.save_delta(update.index, *paths, store.dir / delta_name, generation)
    else:
        faiss_index.save(index, *paths, generation)
    _remove_stale_deltas(store.dir, collection)
    # What the file was trained and tuned on is recorded once it exists (a kill before leaves the old file's).
    if result.action == "rebuilt":
        store.set_meta("faiss_trained_count", str(index.ntotal))
    if retuned:
        store.set_meta("faiss_tuned_count", str(index.ntotal))
    if probe is not None:
        store.set_meta(PROBE_META, json.dumps({"generation": generation, "probe": probe.to_json()}))
    spec = IndexSpec(embedder_spec, factory, nprobe=params.nprobe, efsearch=params.efsearch,
                     rerank=faiss_index.rerank_depth(factory))
    if saved != spec:
        store.save_spec(spec)
    return FaissSync(spec, result.action, result.added, result.removed, recall, retuned)


def _chunks(ids: np.ndarray) -> Iterator[np.ndarray]:
    size = CHUNK
    for start in range(0, len(ids), size):
        yield ids[start:start + size]


def _rebuilt(store: "VectorSet", factory: str, dim: int, probe: bool = True):
    """(generation, ids, index, probe, xq): a new index of SQLite's vectors, read CHUNK at a time.

    The generation is read with the ids, in one transaction; the writer holds the lock,
    so the vectors read after are that generation's (the caller checks the ids). The
    recall probe's exact neighbours are gathered on the same pass; its queries are
    records outside the training sample, so they meet the centroids as new images do.
    """
    generation, ids = store.id_snapshot()
    index = faiss_index.empty(factory, dim)
    wanted = faiss_index.training_size(index, len(ids))
    rng = np.random.default_rng(0)
    trained_on = np.zeros(0, dtype=np.int64)
    if wanted:
        trained_on = np.sort(rng.choice(ids, wanted, replace=False)) if wanted < len(ids) else ids
        faiss_index.train(index, store.vectors(trained_on)[1])
    recall_probe = xq = None
    if probe and faiss_index.is_tunable(index):
        outside = np.setdiff1d(ids, trained_on, assume_unique=True)
        recall_probe = faiss_index.RecallProbe.sample(outside if len(outside) >= faiss_index.PROBE_QUERIES else ids)
        xq = _probe_vectors(store, recall_probe)
    _add_in_chunks(store, index, ids, recall_probe, xq)
    return generation, ids, index, recall_probe, xq


def _add_in_chunks(store: "VectorSet", index, ids: np.ndarray, probe: "faiss_index.RecallProbe | None",
                   xq: np.ndarray | None) -> None:
    """Add these records' vectors CHUNK at a time (bounded memory), keeping the recall probe's exact answers current."""
    for chunk in _chunks(ids):
        chunk_ids, xb = store.vectors(chunk)
        faiss_index.add(index, xb, chunk_ids)
        if probe is not None:
            probe.add(xq, xb, chunk_ids)


def _probe_vectors(store: "VectorSet", probe: "faiss_index.RecallProbe") -> np.ndarray:
    """The probe's query vectors, in its order (queries whose record is gone are dropped from it)."""
    found, xq = store.vectors(probe.queries)
    gone = np.setdiff1d(probe.queries, found, assume_unique=True)
    if len(gone):
        probe.remove(gone)
    return xq.reshape(len(probe.queries), -1)


def _saved_probe(store: "VectorSet", generation: int) -> "faiss_index.RecallProbe | None":
    """The recall probe that matches the FAISS file of this generation, if one was saved with it."""
    try:
        saved = json.loads(store.get_meta(PROBE_META) or "null")
        if saved is None or int(saved["generation"]) != generation:
            return None
        return faiss_index.RecallProbe.from_json(saved["probe"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class _Update:
    """An index brought up to SQLite's ids in place, ready to save."""

    index: object  # what is saved: the whole index, or (layered) the delta beside the unchanged file
    searched: object  # what a reader searches: the index, or the file and the delta stacked
    layered: bool
    generation: int
    added: int
    removed: int
    probe: "faiss_index.RecallProbe | None"
    xq: np.ndarray | None


def _updated_in_place(store: "VectorSet", factory: str, on_disk: int, generation: int, ids: np.ndarray) -> _Update | None:
    """The saved index (checksummed, of generation `on_disk`) brought up to `ids`, or None to rebuild.

    An IVF takes new vectors into a delta beside its file (`index.delta-N.faiss`), so
    adding 1% to a million-image index writes megabytes, not the whole file; the delta
    is folded into a rewritten file when it passes DELTA_MAX_SHARE of it, or when
    vectors must be removed from the file. Other types are read, changed and rewritten.
    The recall probe saved with the file follows the same changes (new vectors merged
    into its neighbour lists, removed ones struck out); without one, a fresh probe is
    gathered with an exact pass over every vector.
    """
    path, state_path = faiss_paths(store.dir, store.name)
    try:
        base, delta = faiss_index.load_layers(path, state_path)
    except IndexDamagedError as e:
        log.warning("%s; rebuilding it", e)
        return None
    base_ids = faiss_index.ids_of(base)
    delta_ids = faiss_index.ids_of(delta) if delta is not None else np.zeros(0, dtype=np.int64)
    held = np.sort(np.concatenate([base_ids, delta_ids]))
    removed = np.setdiff1d(held, ids, assume_unique=True)
    added = np.setdiff1d(ids, held, assume_unique=True)
    if len(removed) and not faiss_index.can_remove(base):
        log.info("%s cannot remove vectors: rebuilding instead", factory)
        return None
    trained = int(store.get_meta("faiss_trained_count", "0") or 0)
    if faiss_index.is_trained_on_data(base) and len(ids) > RETRAIN_GROWTH * max(trained, 1):
        log.info("%s was trained on %d vectors and the index now holds %d: retraining", factory, trained, len(ids))
        return None
    delta_after = len(delta_ids) + len(added) - np.isin(removed, delta_ids).sum()
    layered = (faiss_index.can_layer(base) and not np.isin(removed, base_ids).any()
               and delta_after <= DELTA_MAX_SHARE * base.ntotal)
    if layered:
        index = delta if delta is not None else faiss_index.empty_delta(path)
    else:
        try:
            index = faiss_index.load(path, state_path, use_gpu=False, writable=True)
        except IndexDamagedError as e:
            log.warning("%s; rebuilding it", e)
            return None
    probe = _saved_probe(store, on_disk) if faiss_index.is_tunable(base) else None
    faiss_index.remove(index, removed)
    xq = None
    if probe is not None:
        probe.remove(removed)
        xq = _probe_vectors(store, probe)
    _add_in_chunks(store, index, added, probe, xq)
    searched = faiss_index.stacked(base, index) if layered else index
    now = np.sort(np.concatenate([base_ids, faiss_index.ids_of(index)])) if layered else faiss_index.ids_of(index)
    if not np.array_equal(now, ids):  # never save an index without exactly SQLite's ids
        log.warning("in-place update of %s left other ids than SQLite's: rebuilding", factory)
        return None
    if faiss_index.is_tunable(base) and (probe is None or len(probe.queries) < faiss_index.PROBE_QUERIES // 2
                                         or probe.usable(10, len(ids)).sum() < len(probe.queries) // 2):
        log.info("no usable recall probe for %s: an exact pass over %d vectors", factory, len(ids))
        probe = faiss_index.RecallProbe.sample(ids)
        xq = _probe_vectors(store, probe)
        for chunk in _chunks(ids):
            chunk_ids, xb = store.vectors(chunk)
            probe.add(xq, xb, chunk_ids)
    log.info("updated %s in place%s: %d added, %d removed", factory, " (delta)" if layered else "",
             len(added), len(removed))
    return _Update(index, searched, layered, generation, len(added), len(removed), probe, xq)


def _remove_stale_deltas(index_dir: Path, collection: str = "images") -> None:
    """Delete delta files the stamp no longer names (a reader that has one open keeps reading it)."""
    keep = faiss_index.delta_file(*faiss_paths(index_dir, collection))
    for found in Path(index_dir).glob(_FILES[collection][2].format(generation="*")):
        if found != keep:
            try:
                found.unlink()
            except OSError:
                pass


def _rechecked(store: "VectorSet", index, probe, xq, params: "faiss_index.SearchParams", rerank: int | None):
    """(params, recall, retuned) after an in-place update: the recall target re-checked, widened if short."""
    if probe is None:
        return params, None, False
    tuned_at = int(store.get_meta("faiss_tuned_count", "0") or 0)
    if index.ntotal > RETUNE_GROWTH * tuned_at:
        params, recall = faiss_index.tune(index, probe, xq, rerank=rerank, vectors_of=store.vectors)
        return params, recall, True
    faiss_index.apply_params(index, params)
    recall = faiss_index.probe_recall(index, probe, xq, rerank=rerank, vectors_of=store.vectors)
    if recall < faiss_index.RECALL_TARGET:
        log.info("recall@10 %.3f at %s after the update: widening", recall, params)
        params, recall = faiss_index.tune(index, probe, xq, above=params, rerank=rerank, vectors_of=store.vectors)
        return params, recall, False
    return params, recall, False


def faiss_is_current(store: "Store", collection: str = "images") -> bool:
    """Whether a search would use the saved FAISS file as it is (for `info`)."""
    return faiss_generation(store.dir, collection=collection) == store.vector_set(collection).generation


def sync_objects(store: "Store", embedder_spec: "EmbedderSpec") -> FaissSync | None:
    """Make objects.faiss hold exactly the box vectors; None (and no files) when the index has no boxes."""
    if not store.vector_set("boxes").any():
        remove_faiss(store.dir, "boxes")
        return None
    return sync_faiss(store, embedder_spec, collection="boxes")


def remove_faiss(index_dir: Path, collection: str) -> None:
    """Delete a vector set's FAISS files (its set is empty): stamp first, so a reader never trusts a half."""
    path, state = faiss_paths(index_dir, collection)
    for found in (state, path, *Path(index_dir).glob(_FILES[collection][2].format(generation="*"))):
        try:
            found.unlink()
        except FileNotFoundError:
            pass


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
    _remove_dead_temporaries(Path(index_dir))
    try:
        yield
    finally:
        release_writer_lock(lock)


def _remove_dead_temporaries(index_dir: Path) -> None:
    """Delete `NAME.PID.tmp` files whose writer is gone: a `kill -9` while FAISS or its stamp was
    being written left one behind for good. A live process's (a reader writing a page) is kept."""
    for tmp in index_dir.glob("*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2] if tmp.name.count(".") >= 2 else ""
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (PermissionError, OverflowError):  # alive under another user, or no such pid at all
            pass


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
    info = os.fstat(fd)
    _HELD[fd] = (info.st_dev, info.st_ino)
    return fd


def release_writer_lock(fd: int) -> None:
    _HELD.pop(fd, None)
    os.close(fd)


# flock belongs to the open file, which a fork shares: a decode worker forked by a build would
# keep the index locked after the build itself is killed. Children close their copies at once.
# Each is kept with the lock file's identity: a descriptor closed without `release_writer_lock`
# may be reused by anything (a pipe, a socket), and closing that in a child broke it (a lost
# DataLoader message, a subprocess's EBADF), so a child closes only what is still the lock file.
_HELD: dict[int, tuple[int, int]] = {}


def _close_inherited_locks() -> None:
    for fd, identity in list(_HELD.items()):
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) == identity:
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
