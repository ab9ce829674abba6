"""Predicting with a trained head and storing what it says, for every record or for new ones."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simsearch.errors import NotFoundError
from simsearch.localizer.head import Localizer
from simsearch.pipeline.embed import EmbedConfig, Embedder, iter_file_batches, load_backbone_for
from simsearch.records import Prediction
from simsearch.storage.store import Store
from simsearch.storage.layout import writer_lock

log = logging.getLogger(__name__)


@dataclass
class LocalizeReport:
    index_dir: str
    head_version: str
    predicted: int
    seconds: float


def open_localizer(store: Store, head_dir: str | os.PathLike | None = None, device: str = "cpu") -> Localizer:
    """Load the head (from the index folder by default) and check it reads this index's features."""
    folder = Path(head_dir) if head_dir is not None else store.dir
    localizer = Localizer.load(folder, device)
    spec = store.spec
    if spec is None:
        raise NotFoundError(f"{store.dir}: index has no spec; rebuild it")
    localizer.spec.check(spec.embedder, str(folder))
    return localizer


def predictions_from_maps(localizer: Localizer, maps: np.ndarray, sizes: Sequence[tuple[int, int]]
                          ) -> list[Prediction]:
    """One prediction per map, its box in pixels of the original image of the (width, height) given."""
    labels, scores, boxes = localizer.predict_maps(maps)
    return [Prediction(localizer.spec.classes[int(label)], float(score), float(box[0] * w), float(box[1] * h),
                       float(box[2] * w), float(box[3] * h), localizer.spec.version)
            for label, score, box, (w, h) in zip(labels, scores, boxes, sizes)]


def predict_records(store: Store, localizer: Localizer, ids: Sequence[int], chunk: int = 2048
                    ) -> dict[int, Prediction]:
    """Predictions for records `ids`, with boxes in pixels of each original image.

    Kept maps are read from the store; records whose map was not kept get it from the
    backbone again (their files are read once more); a record whose file is gone by
    then is left without a prediction, and said so in the log.
    """
    out: dict[int, Prediction] = {}
    kept = store.ids_with_feature_map(ids)
    stored = [int(i) for i in ids if int(i) in kept]
    for start in range(0, len(stored), chunk):
        part = stored[start:start + chunk]
        sizes = store.sizes(part)
        out.update(zip(part, predictions_from_maps(localizer, store.feature_maps(part), [sizes[i] for i in part])))
    again = [int(i) for i in ids if int(i) not in kept]
    if again:
        out.update(_predict_from_files(store, localizer, again))
    return out


def _predict_from_files(store: Store, localizer: Localizer, ids: list[int]) -> dict[int, Prediction]:
    spec = store.spec
    if spec is None:
        raise NotFoundError(f"{store.dir}: index has no spec; rebuild it")
    log.info("embedding %d images again for their feature maps (not kept: build with --keep-maps to keep them)",
             len(ids))
    embedder = Embedder(load_backbone_for(spec.embedder, None, store.get_meta("weights_path")))
    records = store.records(ids)
    order = [i for i in ids if i in records]
    out: dict[int, Prediction] = {}
    for batch in iter_file_batches([records[i].path for i in order], embedder, EmbedConfig(quiet=True)):
        for position, reason in batch.failures:
            log.warning("%s: cannot predict (%s)", records[order[position]].path, reason)
        if batch.embedded is None:
            continue
        part = [order[position] for position in batch.indices]
        out.update(zip(part, predictions_from_maps(localizer, batch.embedded.maps, batch.sizes)))
    return out


def localize(index_dir: str | os.PathLike, head_dir: str | os.PathLike | None = None,
             ids: Sequence[int] | None = None) -> LocalizeReport:
    """Predict class, score and box for every record (or `ids`) and store them."""
    started = time.perf_counter()
    with writer_lock(index_dir, "localize"), Store(index_dir) as store:
        localizer = open_localizer(store, head_dir)
        predictions = predict_records(store, localizer, store.ids() if ids is None else ids)
        store.write_predictions(predictions)
    return LocalizeReport(str(index_dir), localizer.spec.version, len(predictions), time.perf_counter() - started)


def predict_missing(store: Store) -> int:
    """Predictions for every record without one, when the index has a head; how many were stored.

    That is the images a build just added, and any that a killed build committed
    before it could predict them (the re-run sees those as unchanged).
    """
    if not Localizer.exists(store.dir):
        return 0
    ids = store.ids_without_prediction()
    if not ids:
        return 0
    localizer = open_localizer(store)
    store.write_predictions(predict_records(store, localizer, ids))
    log.info("localized %d images with head %s", len(ids), localizer.spec.version)
    return len(ids)
