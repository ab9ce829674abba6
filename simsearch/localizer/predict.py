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
from simsearch.pipeline.box_vectors import pool_boxes
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
    predicted: int  # images
    seconds: float
    boxes: int = 0  # predicted boxes stored: one an image, more with a dense head


def open_localizer(store: Store, head_dir: str | os.PathLike | None = None, device: str = "cpu") -> Localizer:
    """Load the head (from the index folder by default) and check it reads this index's features."""
    folder = Path(head_dir) if head_dir is not None else store.dir
    localizer = Localizer.load(folder, device)
    spec = store.spec
    if spec is None:
        raise NotFoundError(f"{store.dir}: index has no spec; rebuild it")
    localizer.spec.check(spec.embedder, str(folder))
    return localizer


def detect(localizer: Localizer, maps: np.ndarray, sizes: Sequence[tuple[int, int]]
           ) -> tuple[list[list[Prediction]], list[np.ndarray]]:
    """Each map's boxes to store, best first, in pixels of the original image of the (width, height) given, and
    their pooled box vectors (n_i, C): pooled once, for judging them and for storing them.

    The first is the image's prediction (one a record, what chips read); a dense
    head adds every further detection scoring at least its threshold, a
    single-object head none. A box the head cannot claim (below the score
    threshold, or unlike its class's training boxes) is labelled UNKNOWN; its
    score and box are kept.
    """
    every = localizer.detect_maps(maps)
    vectors = pool_boxes(maps, [d.boxes for d in every])
    out = []
    for found, unknown, (w, h) in zip(every, localizer.judge(every, vectors), sizes):
        out.append([Prediction(localizer.label_of(label, claim), float(score), float(box[0] * w),
                               float(box[1] * h), float(box[2] * w), float(box[3] * h), localizer.spec.version)
                    for label, claim, score, box in zip(found.labels, unknown, found.scores, found.boxes)])
    return out, vectors


def predictions_from_maps(localizer: Localizer, maps: np.ndarray, sizes: Sequence[tuple[int, int]]
                          ) -> list[Prediction]:
    """One prediction per map: its best box (`detect`'s first)."""
    return [found[0] for found in detect(localizer, maps, sizes)[0]]


Detected = dict[int, list[tuple[Prediction, np.ndarray]]]  # image id -> further detections, each with its box vector


def predict_records(store: Store, localizer: Localizer, ids: Sequence[int], chunk: int = 2048
                    ) -> tuple[dict[int, Prediction], dict[int, np.ndarray], Detected]:
    """Predictions for records `ids` (boxes in pixels of each original image), each predicted box's vector, and a
    dense head's further detections with theirs: the arguments of `Store.write_predictions`.

    The maps come from the store where kept, else from the backbone again
    (`stored_maps.iter_maps`); the box vectors are pooled from the same maps, so a
    head trained after the build adds its boxes to the objects index.
    """
    predictions: dict[int, Prediction] = {}
    vectors: dict[int, np.ndarray] = {}
    detections: Detected = {}
    for part, maps, sizes in iter_maps(store, ids, chunk):
        found, pooled = detect(localizer, maps, sizes)
        for i, boxes, v in zip(part, found, pooled):
            predictions[i], vectors[i] = boxes[0], v[0]
            if len(boxes) > 1:
                detections[i] = list(zip(boxes[1:], v[1:]))
    return predictions, vectors, detections


def localize(index_dir: str | os.PathLike, head_dir: str | os.PathLike | None = None,
             ids: Sequence[int] | None = None) -> LocalizeReport:
    """Predict class, score and box for every record (or `ids`) and store them; a dense head's every detection too.

    A head from another folder is copied into the index first: the index then
    predicts its new images at build time and tells what is in a query with the
    same head that made its stored predictions.
    """
    started = time.perf_counter()
    with writer_lock(index_dir, "localize"), Store(index_dir) as store:
        localizer = open_localizer(store, head_dir)
        if head_dir is not None and Path(head_dir).resolve() != Path(index_dir).resolve():
            localizer.save(index_dir)  # atomic; before the predictions, so a kill leaves the next build to finish them
        predictions, vectors, detections = predict_records(store, localizer, store.ids() if ids is None else ids)
        store.write_predictions(predictions, vectors, detections)
        layout.sync_objects(store, store.spec.embedder)
        ensure_boxes_calibrated(store)
    return LocalizeReport(str(index_dir), localizer.spec.version, len(predictions), time.perf_counter() - started,
                          len(predictions) + sum(len(d) for d in detections.values()))


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
