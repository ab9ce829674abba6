"""Search: neighbours of an image file, a record id or a vector, with what is known of each.

`Searcher` is the one search path: the CLI, the HTML page and the web app go
through `search`/`search_vector` (exclusions and the class filter included),
`pairs` through its batched `knn`, and `refresh` is the one place that reopens an
index a build has changed. It keeps the
FAISS index, the SQLite connection and (once needed) the backbone loaded, so
repeated queries pay only for the search and one lookup. Results carry `Record`s;
JSON is made from them at the CLI and HTTP edges.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from simsearch.errors import BadInputError, NotFoundError
from simsearch.pipeline.embed import Embedder, load_backbone_for
from simsearch.pipeline.read import DEFAULT_MAX_PIXELS, file_sha256, open_image
from simsearch.records import Record
from simsearch.retrieval import calibration
from simsearch.retrieval.calibration import Calibration
from simsearch.spec import IndexSpec
from simsearch.storage import faiss_index, layout
from simsearch.storage.store import Store

log = logging.getLogger(__name__)

FILTER_POOL = 500  # neighbours fetched before a class filter is applied, so filtered lists still fill up


@dataclass
class Neighbour:
    """One result: a record, where it ranks and how similar it is."""

    rank: int
    score: float  # cosine similarity, 1.0 = same direction
    record: Record
    weak: bool = False  # scored below the index's calibrated cutoff: no better than unrelated images score

    @property
    def id(self) -> int:
        return self.record.id

    @property
    def path(self) -> str:
        return self.record.path

    def to_json(self) -> dict:
        shown = self.record.to_json()
        return {"rank": self.rank, "id": shown.pop("id"), "path": shown.pop("path"), "score": self.score,
                "weak": self.weak, **shown}


@dataclass
class QueryResult:
    query: dict  # {"path": ...} or {"id": ...}, with its sha256
    neighbours: list[Neighbour]
    record: Record | None = None  # the query's own record, when it is one
    cutoff: float | None = None  # the index's score cutoff: neighbours below it are weak (None: not calibrated)

    @property
    def no_good_match(self) -> bool:
        """Whether every neighbour is weak (and there is at least one)."""
        return bool(self.neighbours) and all(n.weak for n in self.neighbours)


class Searcher:
    """An opened index, ready to answer many queries (not thread-safe: serve holds a lock around it)."""

    def __init__(self, index_dir: str | os.PathLike, device: str = "auto", precision: str = "auto",
                 weights: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.dir = Path(index_dir)
        self.device, self.precision, self.weights, self.max_pixels = device, precision, weights, max_pixels
        self._embedder: Embedder | None = None
        self._open()
        self._closed = False

    def _open(self) -> None:
        self.store = Store(self.dir)
        try:
            spec = self.store.spec
            if spec is None or not self.store.finished:
                raise NotFoundError(f"{self.dir}: the index was never finished; run simsearch build-index "
                                    f"again with --index {self.dir}")
            self.spec: IndexSpec = spec
            self.loaded_generation, self.index = layout.open_faiss(self.store, spec)
            self.calibration: Calibration | None = calibration.load(self.store)
        except BaseException:
            self.store.close()
            raise

    def refresh(self) -> bool:
        """Reopen the index if a build changed it since it was loaded; whether it did.

        The backbone is kept: an index never changes its embedder (the build refuses).
        A reopen that fails (everything pruned, a damaged file) raises now and is tried
        again on the next call, never leaving a closed store behind.
        """
        if self._closed or self.store.generation != self.loaded_generation:
            self.store.close()
            self._closed = True
            self._open()
            self._closed = False
            return True
        return False

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------ query vectors

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            backbone = load_backbone_for(self.spec.embedder, self.weights, self.store.get_meta("weights_path"))
            self._embedder = Embedder(backbone, self.device, self.precision)
        return self._embedder

    def vector_of_image(self, image: Image.Image) -> np.ndarray:
        """(1, D) vector of a decoded image (a photo, a region of one)."""
        return self.embedder.embed_images([image]).vectors[:1]

    def vector_of_file(self, path: str | os.PathLike) -> np.ndarray:
        """(1, D) vector of an image file, decoded no larger than the model needs."""
        image = open_image(path, draft=self.spec.embedder.preprocess.input_size, max_pixels=self.max_pixels)
        return self.vector_of_image(image)

    # ------------------------------------------------------------ searching

    def knn(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """D, I for each row of `xq` (I is -1 where fewer than k vectors exist): FAISS in its own words.

        An index of compressed codes has its candidates re-scored with the stored vectors (`spec.rerank`).
        """
        return faiss_index.search(self.index, xq, k, self.spec.rerank, self.store.vectors)

    def search_vector(self, xq: np.ndarray, k: int, exclude: set[int] | frozenset[int] = frozenset(),
                      label: str | None = None) -> list[Neighbour]:
        """The k best records for one query vector, without `exclude`, of class `label` when given."""
        if k < 1:
            raise BadInputError("k must be at least 1")
        wanted = (max(FILTER_POOL, k * 20) if label else k) + len(exclude)
        scores, ids = self.knn(xq, min(self.index.ntotal, wanted))
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and int(i) not in exclude]
        if label:  # filter ids first: only the k kept are described
            keep = self.store.ids_with_label(label)
            hits = [h for h in hits if h[0] in keep]
        return self.describe(hits[:k])

    def search(self, query: int | str | os.PathLike, k: int = 10, label: str | None = None) -> QueryResult:
        """Neighbours of a record id (int) or an image file (path), best first."""
        if k < 1:
            raise BadInputError("k must be at least 1")
        record = None
        if isinstance(query, (int, np.integer)):
            record = self.record(int(query))  # NotFoundError with its hint when the id is unknown
            xq = self.store.vectors([record.id])[1]
            described = {"id": record.id, "path": record.path, "sha256": record.sha256}
        else:
            path = Path(query)
            if not path.is_file():
                raise NotFoundError(f"{path}: no such image file")
            xq = self.vector_of_file(path)
            described = {"path": str(path), "sha256": file_sha256(path)}
        # The query itself (and byte-identical copies) is no answer to "images like this one".
        excluded = self.copies_of(described["sha256"])
        return QueryResult(described, self.search_vector(xq, k, excluded, label), record, self.cutoff)

    def copies_of(self, sha256: str) -> set[int]:
        """Records holding these very bytes: no answer to a query made of them."""
        return self.store.ids_with_sha256(sha256)

    @property
    def cutoff(self) -> float | None:
        """Scores below this are weak matches in this index (None: too small to calibrate, or never was)."""
        return self.calibration.cutoff if self.calibration else None

    # ------------------------------------------------------------ records

    def describe(self, hits: list[tuple[int, float]]) -> list[Neighbour]:
        """(id, score) hits as ranked Neighbours with their records (ids removed since are dropped)."""
        records = self.store.records([i for i, _ in hits])
        found = [(records[i], score) for i, score in hits if i in records]
        cutoff = self.cutoff
        return [Neighbour(rank, round(score, 6), record, cutoff is not None and score < cutoff)
                for rank, (record, score) in enumerate(found, 1)]

    def record(self, image_id: int) -> Record:
        found = self.store.records([int(image_id)])
        if not found:
            self.store.image(image_id)  # raises NotFoundError with its hint
        return found[int(image_id)]


_OPEN: dict[str, Searcher] = {}


def search(index_dir: str | os.PathLike, image_or_id: int | str | os.PathLike, k: int = 10) -> QueryResult:
    """Neighbours of an image file or record id; the index stays open between calls."""
    key = str(Path(index_dir).resolve())
    searcher = _OPEN.get(key)
    if searcher is None:
        searcher = _OPEN[key] = Searcher(index_dir)
    searcher.refresh()  # a build may have changed the index since it was opened
    return searcher.search(image_or_id, k)
