"""What an index holds and how it was built, for `simsearch info`."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from simsearch.errors import NotFoundError
from simsearch.storage.calibration import load as load_calibration, load_boxes as load_boxes_calibration
from simsearch.storage import layout
from simsearch.storage import similarity
from simsearch.storage.store import Store


def describe_index(index_dir: str | os.PathLike) -> dict:
    with Store(index_dir) as store:
        summary = store.summary()
        spec = store.spec
        emb = spec.embedder if spec else None
        boxes = store.vector_set("boxes")
        calibration = load_calibration(store)
        objects_calibration = load_boxes_calibration(store)
        learned = similarity.load(store)
        return {
            "index": str(index_dir),
            # False while a build has not reached its end (interrupted, killed): no FAISS file, fit or calibration yet.
            "finished": spec is not None and store.finished,
            **summary,
            "ids": id_range(store),  # "1..1234": what `query --id` accepts (gaps where records were removed)
            "index_type": spec.index_type if spec else None,
            "backbone": emb.backbone if emb else None,
            "weights": emb.weights if emb else None,
            "dim": emb.dim if emb else None,
            "score_cutoff": calibration.cutoff if calibration else None,  # results below it are weak
            "calibration": asdict(calibration) if calibration else None,
            # How searches rank: a similarity learned from the ground-truth classes, or plain appearance (None).
            "learned_similarity": learned.summary() if learned else None,
            "similarity_mode": similarity.mode_of(store),  # what the index was told: auto or plain (--similarity)
            "labelled_images": len(store.ids_with_objects()),  # records with ground-truth boxes: what it learns from
            "objects_score_cutoff": objects_calibration.cutoff if objects_calibration else None,
            "spec": asdict(spec) if spec else None,
            "faiss_up_to_date": layout.faiss_is_current(store),
            # Every ground-truth and predicted box with its own vector, searchable with query --box/--objects.
            "object_vectors": boxes.count(),
            "objects_index_type": boxes.spec.index_type if boxes.count() and boxes.spec else None,
            "writer": layout.writer(index_dir),  # who is writing to it now, if anyone
            "disk": _disk(Path(index_dir), summary["images"]),
            "skipped_files": store.skipped(),
        }


def id_range(store: Store) -> str | None:
    """'FIRST..LAST' of the record ids, or None when the index is empty: the ids a user can pass to --id."""
    ids = store.id_snapshot()[1]
    return f"{ids[0]}..{ids[-1]}" if len(ids) else None


def unknown_id(store: Store, image_id: int) -> NotFoundError:
    """The error for an id the index lacks, saying which ids it has (ids are not shown anywhere else before a query)."""
    found = id_range(store)
    held = f"its ids run {found} (simsearch info shows the range)" if found else "it holds no images yet"
    return NotFoundError(f"no record with id {image_id} in {store.dir}: {held}")


def _disk(index_dir: Path, images: int) -> dict:
    """Bytes on disk by part, and per image without thumbnails (which are made on demand)."""
    parts = {"sqlite": 0, "shards": 0, "faiss": 0, "thumbs": 0}
    for path in index_dir.rglob("*"):
        if not path.is_file():
            continue
        top = path.relative_to(index_dir).parts[0]
        part = ("thumbs" if top == layout.THUMBS else "shards" if top == layout.SHARDS
                else "sqlite" if top.startswith(layout.DB) else "faiss" if top.startswith(("index.", "objects.")) else None)
        if part:
            parts[part] += path.stat().st_size
    parts["per_image_without_thumbs"] = (sum(parts.values()) - parts["thumbs"]) // images if images else 0
    return parts
