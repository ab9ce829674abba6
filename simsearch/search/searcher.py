"""Stage 6, query: neighbours of an image file or a record id, with what is known of each.

A `Searcher` keeps the FAISS index, the SQLite connection and (once needed) the
backbone loaded, so repeated queries pay only for the search and one lookup.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from simsearch.storage import faiss_index
from simsearch.pipeline.embed import Embedder, load_backbone
from simsearch.errors import BadInputError, IndexDamagedError, NotFoundError
from simsearch.pipeline.read import DEFAULT_MAX_PIXELS, file_sha256, open_image
from simsearch.spec import IndexSpec, check_compatible
from simsearch.storage.store import Store
from simsearch.storage.writelock import try_writer_lock

log = logging.getLogger(__name__)


@dataclass
class Neighbour:
    rank: int
    id: int
    path: str
    score: float  # cosine similarity, 1.0 = same direction
    width: int
    height: int
    split: str | None
    dataset: str | None
    objects: list[dict] = field(default_factory=list)  # ground truth: label, box, difficult, truncated
    prediction: dict | None = None  # the localizer's label, score and box, when it has run

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QueryResult:
    query: dict  # {"path": ...} or {"id": ...}, with its sha256
    neighbours: list[Neighbour]


class Searcher:
    """An opened index, ready to answer many queries."""

    def __init__(self, index_dir: str | os.PathLike, device: str = "auto", precision: str = "auto",
                 weights: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.store = Store(index_dir)
        spec = self.store.spec
        if spec is None or spec.index_type == "pending":
            self.store.close()
            raise NotFoundError(
                f"{index_dir}: the index was never finished; run simsearch build-index again with --index {index_dir}"
            )
        self.spec: IndexSpec = spec
        self.device, self.precision, self.weights, self.max_pixels = device, precision, weights, max_pixels
        self._embedder: Embedder | None = None
        self.loaded_generation, self.index = self._open_faiss()

    def _open_faiss(self) -> tuple[int, object]:
        """(generation, index): the saved file when it is current and sound, else rebuilt from SQLite."""
        generation = self.store.generation
        index = None
        if faiss_index.saved_generation(self.store.dir) == generation:
            try:
                index = faiss_index.load(self.store.dir)
            except IndexDamagedError as e:
                log.warning("%s; rebuilding it from %s", e, self.store.dir / "simsearch.sqlite")
        if index is None:
            # Interrupted, damaged or stale: FAISS is derived data, rebuilt from SQLite (the source of
            # truth), with the generation read in the same transaction as the vectors.
            log.warning("index.faiss is stale or damaged; rebuilding it from %s", self.store.dir)
            generation, ids, xb = self.store.vector_snapshot()
            if not len(ids):
                self.store.close()
                raise NotFoundError(f"{self.store.dir} holds no images (all were pruned); add some: "
                                    f"simsearch build-index DATA --index {self.store.dir}")
            index = faiss_index.build(xb, ids, self.spec.index_type)
            self._save_quietly(index, generation)
        faiss_index.apply_params(index, faiss_index.SearchParams(self.spec.nprobe, self.spec.efsearch))
        return generation, index

    def _save_quietly(self, index, generation: int) -> None:
        """Keep the rebuilt file for the next process, unless a writer is busy or the folder is read-only."""
        try:
            lock = try_writer_lock(self.store.dir, "query (saving a rebuilt index.faiss)")
        except OSError:
            return  # read-only index folder: the in-memory rebuild still answers correctly
        if lock is None:
            return  # a build is running and will write its own
        try:
            faiss_index.save(index, self.store.dir, generation)
        except OSError:
            pass
        finally:
            os.close(lock)

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            wanted = self.spec.embedder
            weights = self.weights
            if weights is None and wanted.weights not in ("IMAGENET1K_V2", "random"):
                saved_path = self.store.get_meta("weights_path")
                weights = saved_path if saved_path and Path(saved_path).is_file() else None
            if weights is None and wanted.weights == "random":
                weights = "random"
            backbone = load_backbone(wanted.backbone, weights)
            check_compatible(wanted, backbone.spec, f"index {self.store.dir}")
            self._embedder = Embedder(backbone, self.device, self.precision)
        return self._embedder

    def vector_of_file(self, path: str | os.PathLike) -> np.ndarray:
        image = open_image(path, draft=self.spec.embedder.preprocess.input_size, max_pixels=self.max_pixels)
        return self.embedder.embed_images([image]).vectors[0]

    def search(self, query: int | str | os.PathLike, k: int = 10) -> QueryResult:
        """Neighbours of a record id (int) or an image file (path), best first."""
        if k < 1:
            raise BadInputError("k must be at least 1")
        # The query itself (and byte-identical copies) is no answer to "images like this one".
        if isinstance(query, (int, np.integer)):
            record = self.store.image(int(query))
            _, xq = self.store.vectors([int(query)])
            described = {"id": record["id"], "path": record["path"], "sha256": record["sha256"]}
        else:
            path = Path(query)
            if not path.is_file():
                raise NotFoundError(f"{path}: no such image file")
            xq = self.vector_of_file(path)[None, :]
            described = {"path": str(path), "sha256": file_sha256(path)}
        excluded = self.store.ids_with_sha256(described["sha256"])
        scores, ids = faiss_index.search(self.index, xq, k + len(excluded))
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and int(i) not in excluded][:k]
        return QueryResult(described, self.describe(hits))

    def describe(self, hits: list[tuple[int, float]]) -> list[Neighbour]:
        """Attach paths, ground truth and predictions to (id, score) hits."""
        ids = [i for i, _ in hits]
        rows, objects, predictions = self.store.images(ids), self.store.objects(ids), self.store.predictions(ids)
        neighbours = []
        for rank, (i, score) in enumerate(hits, 1):
            row = rows.get(i)
            if row is None:
                continue  # removed since the FAISS file was written
            neighbours.append(Neighbour(
                rank, i, row["path"], round(score, 6), row["width"], row["height"], row["split"], row["dataset"],
                [{"label": o.label, "box": [o.xmin, o.ymin, o.xmax, o.ymax], "difficult": o.difficult,
                  "truncated": o.truncated} for o in objects.get(i, [])],
                predictions.get(i),
            ))
        return neighbours


_OPEN: dict[str, Searcher] = {}


def search(index_dir: str | os.PathLike, image_or_id: int | str | os.PathLike, k: int = 10) -> QueryResult:
    """Neighbours of an image file or record id; the index stays open between calls."""
    key = str(Path(index_dir).resolve())
    searcher = _OPEN.get(key)
    if searcher is None or searcher.store.generation != searcher.loaded_generation:
        if searcher is not None:
            searcher.close()  # a build changed the index since it was opened
        searcher = _OPEN[key] = Searcher(index_dir)
    return searcher.search(image_or_id, k)
