"""The build pipeline: read -> embed -> store, batch by batch, then sync the FAISS index.

Incremental and crash-safe by construction: each embedded batch's vectors go to
shard files first, then one SQLite transaction commits its records, boxes,
predictions and the positions of its vectors together; FAISS is updated from the
store whenever its stamp says it is stale. Killing the process at any moment loses at
most the images not yet committed (the batch in flight, and those waiting for a full batch
of their shape: `shape_bins.ShapeBins`); running again finishes the job with no duplicates.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from simsearch.storage import layout
from simsearch.pipeline.embed import EmbedConfig, FileBatch, embedder_from_config, iter_file_batches
from simsearch.errors import BadInputError, NotFoundError
from simsearch.pipeline.read import file_sha256, fit_objects, scan
from simsearch.localizer.head import Localizer
from simsearch.localizer.predict import detect, open_localizer, predict_missing
from simsearch.pipeline.box_vectors import pool_boxes, pool_one, record_boxes
from simsearch.pipeline.stored_maps import iter_maps
from simsearch.records import ImageRecord, Skipped
from simsearch.spec import EmbedderSpec, IndexSpec, check_compatible
from simsearch.storage.calibration import ensure_boxes_calibrated, ensure_calibrated
from simsearch.storage.similarity import ensure_learned
from simsearch.storage.store import NewImage, Store
from simsearch.storage.layout import writer_lock

log = logging.getLogger(__name__)

DEFAULT_INDEX_DIR = Path("indexes") / "default"


@dataclass(frozen=True)
class BuildConfig:
    """What to index, where, and how."""

    data: Path  # folder to scan (VOC, box lists, plain images)
    index_dir: Path = DEFAULT_INDEX_DIR  # where simsearch.sqlite, index.faiss and spec.json live
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index_type: str | None = None  # faiss factory string; None: chosen by size
    prune: bool = False  # drop records under `data` whose files are gone
    # Feature maps (125-200 KB an image) are kept for records with boxes, which the localizer trains
    # on; True keeps every record's, so that a new head predicts without reading the images again.
    keep_maps: bool = False
    engine: str = "local"  # who embeds: "local" (this process and its decode workers) or "ray" (a Ray actor pool)
    address: str | None = None  # engine "ray": the cluster (auto, HEAD:6379); None: $RAY_ADDRESS, else a private local Ray
    # "auto": searches rank by a similarity learned from the ground-truth classes when enough images
    # carry them (storage/similarity.py); "plain": by appearance alone, as vectors compare; None: what
    # the index was last told ("auto" for a new one).
    similarity: str | None = None


@dataclass
class BuildReport:
    """What a build did: printed by the CLI, asserted by the tests."""

    index_dir: str
    scanned: int = 0
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    moved: int = 0  # known files found at a new path: kept their vectors, not embedded again
    pruned: int = 0
    skipped: list[dict] = field(default_factory=list)
    index_type: str = ""
    faiss: str = ""  # how index.faiss came to match: kept, updated (in place) or rebuilt
    ntotal: int = 0
    similarity: str = ""  # how searches rank: "learned" from the labels, or "plain" appearance
    objects: int = 0  # boxes in the objects index (ground truth and predicted), each with its own vector
    seconds: float = 0.0
    images_per_second: float = 0.0
    precision: str = ""
    device: str = ""
    backend: str = ""  # what ran the model: torch or openvino


def build_index(config: BuildConfig) -> BuildReport:
    """Index (or update the index of) every image under `config.data`."""
    started = time.perf_counter()
    if config.prune and not Path(config.data).exists():
        return _prune_vanished(config, started)
    result = scan(config.data)
    report = BuildReport(index_dir=str(config.index_dir), scanned=len(result.records))
    # The backbone loads first, and the engine is checked: when either cannot run, no empty index folder is left behind.
    file_batches = _engine(config)
    embedder = embedder_from_config(_driver_embed(config))
    Path(config.index_dir).mkdir(parents=True, exist_ok=True)
    with writer_lock(config.index_dir, "build-index"), Store(config.index_dir, create=True) as store:
        report.precision, report.device = embedder.precision_name, str(embedder.device)
        report.backend = embedder.spec.backend
        if config.engine == "ray":  # the actors pick theirs
            report.precision, report.device = config.embed.precision, f"ray {config.address or 'local'}"
            report.backend = config.embed.backend
        saved = store.spec
        if saved is not None:
            check_compatible(saved.embedder, embedder.spec, f"index {config.index_dir}")
            if saved.embedder.backend != embedder.spec.backend:  # close, not identical vectors: noted, not refused
                log.warning("%s was built with backend %s; this run embeds with %s (vectors agree to mean cosine "
                            "0.999). Pass --backend %s to match.", config.index_dir, saved.embedder.backend,
                            embedder.spec.backend, saved.embedder.backend)
        else:  # claim the index for this embedder before the first vector lands
            store.save_spec(IndexSpec(embedder.spec, index_type=None))
        # The spec keeps what first built the index (its backend included), whatever adds to it later.
        recorded = saved.embedder if saved is not None else embedder.spec
        if store.upgrade_layout():
            log.info("%s: vectors moved out of SQLite into %s", config.index_dir, layout.SHARDS)
        store.clean_shards()  # rows a killed build wrote but never committed
        _backfill_object_vectors(store)
        localizer = open_localizer(store) if Localizer.exists(store.dir) else None
        if config.embed.weights and Path(config.embed.weights).is_file():
            store.set_meta("weights_path", str(Path(config.embed.weights).resolve()))  # for query-by-image
        known = store.known_files()
        skipped: list[Skipped] = list(result.skipped)
        plan = _plan(store, known, result.records)
        todo, report.unchanged, report.moved = plan.todo, plan.unchanged, plan.moved
        skipped += plan.skipped
        # An unchanged image's annotation problems were recorded (with those found against the decoded
        # image) when it was embedded; the scan's partial list must not replace them.
        settled = {r.annotation for r in result.records if r.annotation} - {r.annotation for r, _ in todo}
        skipped = [s for s in skipped if s.path not in settled]
        new_ids: list[int] = []
        embed_started = time.perf_counter()
        if todo:
            for batch in file_batches([r.path for r, _ in todo], embedder, config.embed):
                stale = []
                for i, reason in batch.failures:
                    path = todo[i][0].path
                    if str(path) in known:  # changed bytes that no longer decode: the record is of bytes gone
                        stale.append(known[str(path)][0])
                        reason += "; its record from the earlier file was removed"
                    skipped.append(Skipped(path, reason))
                report.pruned += store.remove_images(stale)
                if batch.embedded is None:
                    continue
                # Each image's predicted boxes, best first (a dense head's every detection, else one).
                detected, detected_vectors = (detect(localizer, batch.embedded.maps, batch.sizes) if localizer
                                              else ([[] for _ in batch.indices], [None for _ in batch.indices]))
                records = []
                for row, i in enumerate(batch.indices):
                    record, problems = _fitted(todo[i][0], *batch.sizes[row])
                    skipped += problems
                    records.append(record)
                # Every box gets its own vector from the map in hand: the ground truth's here, the predicted
                # ones' came with the detections.
                pooled = pool_boxes(batch.embedded.maps, [record_boxes(r.objects, None, *size) for r, size
                                                          in zip(records, batch.sizes)])
                items = []
                for row, (i, record) in enumerate(zip(batch.indices, records)):
                    _, (sha, size, mtime) = todo[i]
                    width, height = batch.sizes[row]
                    keep = config.keep_maps or bool(record.objects)
                    boxes = detected[row]
                    found = detected_vectors[row]
                    items.append(NewImage(record, sha, size, mtime, width, height, batch.embedded.vectors[row],
                                          batch.embedded.maps[row] if keep else None, boxes[0] if boxes else None,
                                          pooled[row], found[0] if boxes else None,
                                          tags=batch.embedded.tags[row] if batch.embedded.tags is not None else (),
                                          detections=list(zip(boxes[1:], found[1:])) if boxes else []))
                report.replaced += sum(str(it.record.path) in known for it in items)
                new_ids += store.add_images(items)
        embedded = len(new_ids)
        report.added = embedded - report.replaced
        report.images_per_second = embedded / max(time.perf_counter() - embed_started, 1e-9) if embedded else 0.0
        if config.prune:
            report.pruned += _prune(store, config.data, result.records)
        _compact(store)
        skipped = _merged(skipped)
        store.record_skipped(skipped)
        report.skipped = [{"path": str(s.path), "reason": s.reason} for s in skipped]
        synced = layout.sync_faiss(store, recorded, config.index_type)
        report.index_type, report.ntotal, report.faiss = synced.spec.index_type, store.count("embeddings"), synced.action
        ensure_calibrated(store, embedder)  # the "no good match" cutoff, redone when the collection moved by 10%
        report.similarity = "learned" if ensure_learned(store, config.similarity) is not None else "plain"
        predict_missing(store)
        report.objects = _sync_objects(store, recorded)
    report.seconds = time.perf_counter() - started
    return report


def _engine(config: BuildConfig) -> Callable[..., Iterator[FileBatch]]:
    """Who embeds the files, as a function of (paths, embedder, embed config) yielding FileBatches."""
    if config.engine == "local":
        if config.address is not None:
            raise BadInputError("--address is for --engine ray")
        return iter_file_batches
    if config.engine == "ray":
        if config.embed.workers != EmbedConfig.workers:  # taken silently before: the actors decode their own batches
            raise BadInputError("--workers is for --engine local; with --engine ray each actor decodes its own "
                                "batches, and the pool is sized from the cluster's CPUs and GPUs: leave --workers out")
        from simsearch.pipeline.ray_engine import ray_file_batches

        return ray_file_batches(config.address)
    raise BadInputError(f"unknown engine {config.engine!r}; use local or ray")


def _driver_embed(config: BuildConfig) -> EmbedConfig:
    """What this process loads: with Ray the actors embed, on the cluster's devices, so here the
    backbone only vouches for the spec (on the CPU, whatever --device and --precision ask of the actors)."""
    return config.embed if config.engine != "ray" else replace(config.embed, device="cpu", precision="fp32", backend="torch")


def _prune_vanished(config: BuildConfig, started: float) -> BuildReport:
    """`--prune` on a folder that is gone: drop its records (a moved or deleted folder); nothing to embed."""
    report = BuildReport(index_dir=str(config.index_dir))
    if not (Path(config.index_dir) / layout.DB).exists():
        raise NotFoundError(f"{config.data}: no such folder, and no index at {config.index_dir} to prune")
    with writer_lock(config.index_dir, "build-index"), Store(config.index_dir) as store:
        saved = store.spec
        if saved is None or not store.finished:
            raise NotFoundError(f"{config.data}: no such folder (and the index was never finished)")
        report.pruned = _prune(store, config.data, [])
        _compact(store)
        log.info("%s is gone: pruned its %d records", config.data, report.pruned)
        if store.count("embeddings"):
            synced = layout.sync_faiss(store, saved.embedder, config.index_type)
            report.index_type, report.ntotal, report.faiss = synced.spec.index_type, store.count("embeddings"), synced.action
            report.objects = _sync_objects(store, saved.embedder)
    report.seconds = time.perf_counter() - started
    return report


def _compact(store: Store) -> None:
    """Rewrite shards once removed and replaced records hold half their rows (bounded dead space)."""
    for kind in ("vec", "map", "box"):
        store.compact(kind)


def _sync_objects(store: Store, spec: EmbedderSpec) -> int:
    """Bring objects.faiss to the box vectors; how many boxes it holds."""
    synced = layout.sync_objects(store, spec)
    ensure_boxes_calibrated(store)  # the objects index's own "no good match" cutoff
    return 0 if synced is None else store.vector_set("boxes").count()


def _backfill_object_vectors(store: Store) -> None:
    """Box vectors for ground-truth boxes and predictions that have none (indexes made before them).

    Records with boxes keep their maps, so this reads maps, not images, except for
    predictions of records whose map was not kept.
    """
    objects = store.objects_without_vectors()
    predicted = store.predictions_without_vectors()
    if not objects and not predicted:
        return
    log.info("pooling box vectors for %d images' boxes and %d predictions made before box vectors",
             len(objects), len(predicted))
    missing = {oid for ids in objects.values() for oid in ids}
    wanted = set(predicted)
    for part, maps, sizes in iter_maps(store, sorted(set(objects) | wanted)):
        records = store.records(part)
        object_ids = store.object_ids(part)
        boxes = [record_boxes(records[i].objects, records[i].prediction if i in wanted else None, *size)
                 for i, size in zip(part, sizes)]
        pooled = pool_boxes(maps, boxes)
        vectors = {oid: v for i, vs in zip(part, pooled) for oid, v in zip(object_ids[i], vs) if oid in missing}
        store.add_object_vectors(vectors)
        store.write_predictions({i: records[i].prediction for i in part if i in wanted},
                                {i: vs[-1] for i, vs in zip(part, pooled) if i in wanted})


def _fitted(record: ImageRecord, width: int, height: int) -> tuple[ImageRecord, list[Skipped]]:
    """The record with its boxes clipped to the decoded image; boxes with nothing inside are reported."""
    objects, problems = fit_objects(record.objects, width, height)
    if not problems:
        return (replace(record, objects=objects) if objects != record.objects else record), []
    where = record.annotation or record.path
    return replace(record, objects=objects), [Skipped(where, f"{p} ({width}x{height} image)") for p in problems]


def _merged(skipped: list[Skipped]) -> list[Skipped]:
    """One entry per file (the table is keyed by path): its reasons joined, in order, without repeats."""
    reasons: dict[Path, list[str]] = {}
    for item in skipped:
        seen = reasons.setdefault(Path(item.path), [])
        if item.reason not in seen:
            seen.append(item.reason)
    return [Skipped(path, "; ".join(why)) for path, why in reasons.items()]


@dataclass
class _Plan:
    todo: list[tuple[ImageRecord, tuple[str, int, int]]]  # to embed, with (sha256, size, mtime_ns)
    unchanged: int = 0
    moved: int = 0
    skipped: list[Skipped] = field(default_factory=list)


def _plan(store: Store, known: dict[str, tuple[int, str, int, int]], records: list[ImageRecord]) -> _Plan:
    """Which records need embedding: new paths, and files whose bytes changed (`known`: path -> stored row).

    A file that cannot be read is skipped and reported, never fatal. A new path whose
    bytes match a record whose own file is gone is that record, moved: it keeps its id
    and vector instead of being embedded again beside a dead twin.
    """
    plan = _Plan([])
    for record in records:
        try:
            stat = os.stat(record.path)
            entry = known.get(str(record.path))
            if entry and entry[2] == stat.st_size and entry[3] == stat.st_mtime_ns:
                plan.unchanged += 1  # same size and timestamp: trusted without reading the bytes
                continue
            sha = file_sha256(record.path)
        except OSError as e:
            plan.skipped.append(Skipped(record.path, f"cannot be read ({e.strerror or e})"))
            continue
        if entry and entry[1] == sha:
            store.touch(str(record.path), stat.st_size, stat.st_mtime_ns)
            plan.unchanged += 1
            continue
        if entry is None and known:  # a first build has no records that could have moved
            gone = [i for path, i in store.paths_with_sha256(sha).items() if not os.path.exists(path)]
            # A moved record's boxes get their vectors from its kept map; one without a kept map is
            # embedded again when it now has boxes (its map was not kept because it had none).
            if gone and (not record.objects or store.ids_with_feature_map(gone[:1])):
                row = store.image(gone[0])
                record, problems = _fitted(record, row["width"], row["height"])
                plan.skipped += problems
                vectors = (pool_one(store.feature_maps(gone[:1])[0],
                                    record_boxes(record.objects, None, row["width"], row["height"]))
                           if record.objects else None)
                store.move_image(gone[0], record, stat.st_size, stat.st_mtime_ns, vectors)
                plan.moved += 1
                continue
        plan.todo.append((record, (sha, stat.st_size, stat.st_mtime_ns)))
    return plan


def _prune(store: Store, data: Path, records: list[ImageRecord]) -> int:
    """Remove records under `data` that the scan no longer found (deleted or moved files)."""
    root = os.path.abspath(data)
    roots = {root, str(Path(data).resolve())}  # the folder as given and as its links resolve
    present = {str(r.path) for r in records}
    gone = [i for path, (i, *_rest) in store.known_files().items()
            if any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots) and path not in present]
    return store.remove_images(gone)
