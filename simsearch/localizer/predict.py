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
from simsearch.pipeline.box_vectors import pool_boxes, record_boxes
from simsearch.pipeline.stored_maps import iter_maps
from simsearch.records import Prediction
from simsearch.storage.store import Store
from simsearch.storage import layout
from simsearch.storage.calibration import ensure_boxes_calibrated
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
    """One prediction per map, its box in pixels of the original image of the (width, height) given.

    When the head cannot claim its best class (a low score, or a box unlike its
    training boxes) the label is UNKNOWN; the score and the box are kept.
    """
    out = localizer.predict(maps)
    return [Prediction(localizer.label_of(label, unknown), float(score), float(box[0] * w), float(box[1] * h),
                       float(box[2] * w), float(box[3] * h), localizer.spec.version)
            for label, unknown, score, box, (w, h) in zip(out.classes, out.unknown, out.scores, out.boxes, sizes)]


def predict_records(store: Store, localizer: Localizer, ids: Sequence[int], chunk: int = 2048
                    ) -> tuple[dict[int, Prediction], dict[int, np.ndarray]]:
    """Predictions for records `ids` (boxes in pixels of each original image), and each predicted box's vector.

    The maps come from the store where kept, else from the backbone again
    (`stored_maps.iter_maps`); the box vectors are pooled from the same maps, so a
    head trained after the build adds its boxes to the objects index.
    """
    predictions: dict[int, Prediction] = {}
    vectors: dict[int, np.ndarray] = {}
    for part, maps, sizes in iter_maps(store, ids, chunk):
        found = predictions_from_maps(localizer, maps, sizes)
        pooled = pool_boxes(maps, [record_boxes([], p, w, h) for p, (w, h) in zip(found, sizes)])
        predictions.update(zip(part, found))
        vectors.update((i, v[0]) for i, v in zip(part, pooled))
    return predictions, vectors


def localize(index_dir: str | os.PathLike, head_dir: str | os.PathLike | None = None,
             ids: Sequence[int] | None = None) -> LocalizeReport:
    """Predict class, score and box for every record (or `ids`) and store them."""
    started = time.perf_counter()
    with writer_lock(index_dir, "localize"), Store(index_dir) as store:
        localizer = open_localizer(store, head_dir)
        predictions, vectors = predict_records(store, localizer, store.ids() if ids is None else ids)
        store.write_predictions(predictions, vectors)
        layout.sync_objects(store, store.spec.embedder)
        ensure_boxes_calibrated(store)
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
    store.write_predictions(*predict_records(store, localizer, ids))
    log.info("localized %d images with head %s", len(ids), localizer.spec.version)
    return len(ids)
