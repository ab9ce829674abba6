"""Search: neighbours of an image file, a record id or a vector, with what is known of each.

`Searcher` is the one search path: the CLI, the HTML page and the web app go
through `search`/`search_vector` (exclusions and filters included),
`pairs` through its batched `knn`, and `refresh` is the one place that reopens an
index a build has changed. It keeps the
FAISS index, the SQLite connection and (once needed) the backbone loaded, so
repeated queries pay only for the search and one lookup. Results carry `Record`s;
JSON is made from them at the CLI and HTTP edges.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from simsearch.errors import BadInputError, IndexDamagedError, NotFoundError, SimsearchError, SpecMismatchError
from simsearch.pipeline.read import DEFAULT_MAX_PIXELS, file_sha256, open_image
from simsearch.records import ObjectMatch, Record, Tag
from simsearch.retrieval.contents import NEAR_DUPLICATE, Copies, QueryContents
from simsearch.retrieval.filters import Filters
from simsearch.retrieval.objects import QueryPart, Why, best_per_image, explain
from simsearch.retrieval.scope import LeftOut, leave_out_training
from simsearch.storage import calibration, similarity
from simsearch.storage.calibration import Calibration
from simsearch.storage.similarity import LearnedSimilarity
from simsearch.spec import IndexSpec
from simsearch.storage import faiss_index, layout
from simsearch.storage.store import Store

if TYPE_CHECKING:  # torch loads only when a query is embedded: `query --id` and stored-record searches never need it
    from simsearch.pipeline.embed import Embedder

log = logging.getLogger(__name__)

# A drawn box searches with its pooled vector + CROP_WEIGHT x its pixels' own vector. Measured with
# benchmarks/bench_objects.py's protocol on 150 held-out boxes of each set, p@5: weight 0 (pooled alone)
# 0.49 composites / 0.80 indoor; 1.0: 0.56 / 0.81; 1.5: 0.58 / 0.80; 3.0: 0.61 / 0.74; crop alone among
# whole images 0.56 / 0.53. 1.5 is the largest weight that keeps the real photos' precision.
CROP_WEIGHT = 1.5
# Near-duplicates a query names at most ("near-duplicate of id 12 (0.97), ..."): the best few, not a list to read.
NEAR_SHOWN = 5

@dataclass
class Neighbour:
    """One result: a record, where it ranks, how similar it is, and why."""

    rank: int
    score: float  # cosine similarity, 1.0 = same direction: how alike the two look
    record: Record
    match: ObjectMatch | None = None  # object queries: the result's object that matched
    why: Why | None = None  # which of its objects matched which part of the query, or the whole image
    weak: bool = False  # scored below the index's calibrated cutoff: no better than unrelated images score
    # The learned similarity's score that ranked it (storage/similarity.py), None where plain `score` ranked:
    # a cosine with the query moved along the labels' directions, so lower than `score` even for a copy.
    learned: float | None = None

    @property
    def id(self) -> int:
        return self.record.id

    @property
    def path(self) -> str:
        return self.record.path

    def to_json(self) -> dict:
        shown = self.record.to_json()
        return {"rank": self.rank, "id": shown.pop("id"), "path": shown.pop("path"), "score": self.score,
                "match": self.match.to_json() if self.match is not None else None,
                "why": self.why.to_json() if self.why is not None else None,
                "weak": self.weak, "learned": self.learned, **shown}


@dataclass
class QueryResult:
    query: dict  # {"path": ...} or {"id": ...}, with its sha256
    neighbours: list[Neighbour]
    record: Record | None = None  # the query's own record: the id queried, or the record holding the file's bytes
    parts: list[QueryPart] = field(default_factory=list)  # what an object query searched with
    cutoff: float | None = None  # the index's score cutoff: neighbours below it are weak (None: not calibrated)
    contents: QueryContents | None = None  # what the engine sees in the query: prediction(s), tags, drawn boxes
    left_out: LeftOut | None = None  # the localizer's training images, left out by default (None: nothing was)
    ranked_by: str = "plain"  # or "learned": the index's learned similarity set the order (see Neighbour.learned)

    def query_to_json(self) -> dict:
        """What was searched with and what the engine sees in it: the first line of `query`'s JSON output.

        `id` is the query's record (a file whose bytes are indexed counts as that record:
        its stored contents are shown); `left_out` names the training datasets a search
        left out by default.
        """
        indexed = self.contents is not None and self.contents.seen == "stored"
        shown = {"path": self.query.get("path"), "id": self.record.id if self.record is not None else None,
                 "sha256": self.query.get("sha256"), "indexed": indexed}
        if "box" in self.query:
            shown["box"] = list(self.query["box"])
        if self.parts:
            shown["parts"] = [p.to_json() for p in self.parts]
        shown.update((self.contents or QueryContents()).to_json())
        shown["left_out"] = self.left_out.to_json() if self.left_out is not None else None
        shown["ranked_by"] = self.ranked_by
        return shown

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
        self._objects_index = None  # (spec, index, generation) of the objects index, opened on first use
        self._localizer = (None, None)  # (the head file's stat, its Localizer): loaded once, again when retrained
        self._head_warned = None  # the head file's stat when its damage was last reported
        self._datasets = (None, {})  # (store generation, images per dataset): counted once per change, not per query
        self.objects_calibration: Calibration | None = None
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
            self._objects_index = None
            self.calibration: Calibration | None = calibration.load(self.store)
            self.similarity: LearnedSimilarity | None = similarity.load(self.store)
            self._similarity_stamp = similarity.stamp(self.store)
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
        stamp = similarity.stamp(self.store)
        if stamp != self._similarity_stamp:  # a build refitted (or dropped) it
            self.similarity, self._similarity_stamp = similarity.load(self.store), stamp
            return True
        if self._objects_index is not None and self.store.boxes_generation != self._objects_index[2]:
            self._objects_index = None  # a localize added or replaced predicted boxes: reopened when next needed
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
            from simsearch.pipeline.embed import Embedder, load_backbone_for

            backbone = load_backbone_for(self.spec.embedder, self.weights, self.store.get_meta("weights_path"))
            self._embedder = Embedder(backbone, self.device, self.precision)
        return self._embedder

    def vector_of_image(self, image: Image.Image) -> np.ndarray:
        """(1, D) vector of a decoded image (a photo, a region of one)."""
        return self.embedder.embed_images([image]).vectors[:1]

    def vector_of_file(self, path: str | os.PathLike) -> np.ndarray:
        """(1, D) vector of an image file, decoded no larger than the model needs."""
        return self.embed_file(path)[0]

    def embed_file(self, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """(1, D) vector, (C, H, W) map and upright (width, height) of an image file: one forward pass."""
        return self.embed_file_tagged(path)[:3]

    def embed_file_tagged(self, path: str | os.PathLike
                          ) -> tuple[np.ndarray, np.ndarray, tuple[int, int], list[Tag]]:
        """`embed_file` and the file's ImageNet tags from the same pass: what a query shows it holds."""
        image = open_image(path, draft=self.spec.embedder.preprocess.input_size, max_pixels=self.max_pixels)
        embedded = self.embedder.embed_images([image])
        tags = embedded.tags[0] if embedded.tags is not None else []
        return embedded.vectors[:1], embedded.maps[0], tuple(image.info.get("full_size", image.size)), tags

    def look(self, image: Image.Image) -> tuple[np.ndarray, QueryContents]:
        """(1, D) vector of decoded pixels and what that same pass sees in them (tags, the localizer's prediction)."""
        embedded = self.embedder.embed_images([image])
        tags = embedded.tags[0] if embedded.tags is not None else []
        size = tuple(image.info.get("full_size", image.size))
        return embedded.vectors[:1], self.contents_seen(embedded.maps[0], size, tags)

    # ------------------------------------------------------------ the query's own contents

    def localizer(self):
        """The index's own localizer head, or None: loaded once, and again when a training run replaces it."""
        path = self.dir / layout.HEAD
        try:
            st = path.stat()
        except FileNotFoundError:
            self._localizer = (None, None)
            return None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._localizer[0] != key:
            from simsearch.localizer.predict import open_localizer

            try:
                self._localizer = (key, open_localizer(self.store))
            except (IndexDamagedError, SpecMismatchError) as e:
                self._localizer = (key, e)  # the same file fails the same way: not read again until it changes
        if isinstance(self._localizer[1], Exception):
            raise self._localizer[1]
        return self._localizer[1]

    def optional_localizer(self):
        """The head when it loads, else None with one warning: a damaged head must not stop plain searches.

        Only the query's contents and the training-data default depend on it there;
        object searches that need the head call `localizer()` and report the damage.
        """
        try:
            return self.localizer()
        except (IndexDamagedError, SpecMismatchError) as e:
            if self._head_warned != self._localizer[0]:
                log.warning("the localizer head is not used: %s", e)
                self._head_warned = self._localizer[0]
            return None

    def contents_seen(self, fmap: np.ndarray, size: tuple[int, int], tags: list[Tag]) -> QueryContents:
        """An outside image's contents from its own pass: its tags, and the head's prediction from its map."""
        predictions = []
        localizer = self.optional_localizer()
        if localizer is not None:
            from simsearch.localizer.predict import predictions_from_maps

            predictions = predictions_from_maps(localizer, fmap[None], [size])
        return QueryContents(predictions, list(tags), [], "embedded")

    # ------------------------------------------------------------ what a search answers with

    def training_datasets(self) -> tuple[str, ...]:
        """The datasets the index's localizer head trained on (none: no usable head, or one trained before they were recorded)."""
        localizer = self.optional_localizer()
        return tuple(localizer.spec.training.get("datasets", ())) if localizer is not None else ()

    def scope(self, filters: Filters | None, include_training: bool = False) -> tuple[Filters | None, LeftOut | None]:
        """`filters` as a search applies them: the head's training datasets left out unless `include_training`."""
        if include_training or (filters is not None and filters.dataset) or not (self.dir / layout.HEAD).exists():
            return filters, None
        generation = self.store.generation
        if self._datasets[0] != generation:
            self._datasets = (generation, self.store.datasets())
        if len(self._datasets[1]) <= 1:  # one dataset is never left out: spare reading the head (a torch checkpoint)
            return filters, None
        trained = self.training_datasets()
        if not trained:
            return filters, None
        return leave_out_training(filters, trained, self._datasets[1])

    # ------------------------------------------------------------ searching

    def knn(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """D, I for each row of `xq` (I is -1 where fewer than k vectors exist): FAISS in its own words.

        An index of compressed codes has its candidates re-scored with the stored vectors (`spec.rerank`).
        """
        return faiss_index.search(self.index, xq, k, self.spec.rerank, self.store.vectors)

    def search_vector(self, xq: np.ndarray, k: int, exclude: set[int] | frozenset[int] = frozenset(),
                      filters: Filters | None = None) -> list[Neighbour]:
        """The k best records for one query vector, without `exclude`, among those passing `filters`.

        A filter is applied inside the search: the store names the ids that pass and FAISS
        searches only those (less the excluded), so k come back whenever k records pass.
        With a learned similarity (`storage/similarity.py`) the order is the moved query's,
        except that the nearest record in appearance comes first when it is a good match
        (at or above the calibrated cutoff, which sits below 99% of edited copies' scores):
        an edited copy of an indexed photo still finds it at rank 1.
        """
        if k < 1:
            raise BadInputError("k must be at least 1")
        allowed = None
        if filters is not None and filters.active:
            allowed = self.store.ids_matching(filters)
            if exclude:
                allowed = allowed[~np.isin(allowed, np.fromiter(exclude, dtype=np.int64, count=len(exclude)))]
        xq = np.asarray(xq, dtype=np.float32).reshape(1, -1)
        if self.similarity is None:
            return self.describe(self._hits(xq, k, exclude, allowed))
        moved = self.similarity.queries(xq)
        nearest = self._hits(xq, 1, exclude, allowed)
        learned = self._hits(moved, k, exclude, allowed)
        # The nearest in appearance leads only as a good match: a weak one is no copy, and the learned order decides.
        good = nearest and (self.cutoff is None or nearest[0][1] >= self.cutoff)
        order = similarity.pinned_first([i for i, _ in learned], nearest[0][0] if good else None)[:k]
        found, xb = self.store.vectors(order)
        vector = dict(zip(found.tolist(), xb))
        order = [i for i in order if i in vector]  # ids removed since the search
        return self.describe([(i, float(vector[i] @ xq[0])) for i in order],
                             {i: float(vector[i] @ moved[0]) for i in order})

    @property
    def ranked_by(self) -> str:
        """How whole-image and region searches rank here: "learned" (storage/similarity.py) or "plain"."""
        return "learned" if self.similarity is not None else "plain"

    def _hits(self, xq: np.ndarray, k: int, exclude: set[int] | frozenset[int], allowed: np.ndarray | None
              ) -> list[tuple[int, float]]:
        """(id, score) of the k best for one query row, without `exclude`, among `allowed` (None: all)."""
        if allowed is None:
            scores, ids = self.knn(xq, min(self.index.ntotal, k + len(exclude)))
        else:
            scores, ids = faiss_index.search(self.index, xq, k, self.spec.rerank, self.store.vectors, allowed=allowed)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and int(i) not in exclude]
        return hits[:k]

    def search(self, query: int | str | os.PathLike, k: int = 10, filters: Filters | None = None,
               include_training: bool = False) -> QueryResult:
        """Neighbours of a record id (int) or an image file (path), best first, among those passing `filters`.

        The localizer's training datasets are left out unless `include_training` (see `scope`).
        """
        if k < 1:
            raise BadInputError("k must be at least 1")
        record = None
        seen = None
        if isinstance(query, (int, np.integer)):
            record = self.record(int(query))  # NotFoundError with its hint when the id is unknown
            xq = self.store.vectors([record.id])[1]
            described = {"id": record.id, "path": record.path, "sha256": record.sha256}
        else:
            path = _query_file(query)
            xq, fmap, size, tags = self.embed_file_tagged(path)
            described = {"path": str(path), "sha256": file_sha256(path)}
            seen = (fmap, size, tags)
        # The query itself (and byte-identical copies) is no answer to "images like this one".
        excluded = self.copies_of(described["sha256"])
        scoped, left_out = self.scope(filters, include_training)
        neighbours = self.search_vector(xq, k, excluded, scoped)
        indexed = record if record is not None else (self.record(min(excluded)) if excluded else None)
        self.explain_neighbours(neighbours, self.query_parts(indexed, xq))
        contents = QueryContents.of_record(indexed) if indexed is not None else self.contents_seen(*seen)
        contents.copies = self.known_copies(excluded, xq, record.id if record is not None else None)
        return QueryResult(described, neighbours, indexed, cutoff=self.cutoff, contents=contents, left_out=left_out,
                           ranked_by=self.ranked_by)

    # ------------------------------------------------------------ objects

    def objects_index(self):
        """(spec, index) of the objects index (every box's vector), opened on first use."""
        if self._objects_index is None:
            boxes = self.store.vector_set("boxes")
            spec = boxes.spec
            if spec is None or not boxes.count():
                raise NotFoundError(
                    f"{self.dir} has no objects to search: index images with boxes (VOC, box lists), or train a "
                    f"localizer and run simsearch localize --index {self.dir}; then search with --box or --objects")
            generation, index = layout.open_faiss(self.store, spec, "boxes")
            self._objects_index = (spec, index, generation)
            self.objects_calibration = calibration.load_boxes(self.store)
        return self._objects_index[:2]

    @property
    def objects_cutoff(self) -> float | None:
        """Object matches scoring below this are weak (the objects index's own calibration)."""
        self.objects_index()
        return self.objects_calibration.cutoff if self.objects_calibration else None

    def has_objects(self) -> bool:
        return self.store.vector_set("boxes").any()

    def search_objects(self, query: int | str | os.PathLike, k: int = 10,
                       box: tuple[float, float, float, float] | None = None,
                       filters: Filters | None = None, include_training: bool = False) -> QueryResult:
        """Images holding objects like the query's: one drawn `box` (pixels), else each of the query's own objects.

        Results are grouped per image: an image appears once, with its best-matching
        object, which each result names (its box, class and score). `filters` apply to
        each matched box itself (its class, area and score) and to its image's file.
        """
        if k < 1:
            raise BadInputError("k must be at least 1")
        described, record, whole, fmap, size, contents = self._query_input(query, need_map=box is not None)
        parts = self._parts(box, record, described, fmap, size, described["path"])
        excluded = self.copies_of(described["sha256"])
        by_id = int(query) if isinstance(query, (int, np.integer)) else None
        contents.copies = self.known_copies(excluded, whole, by_id)
        scoped, left_out = self.scope(filters, include_training)
        return QueryResult(described, self.search_parts(parts, k, excluded, scoped), record, parts,
                           cutoff=self.objects_cutoff, contents=contents, left_out=left_out)

    def search_objects_in_image(self, image: Image.Image, box: tuple[float, float, float, float] | None, k: int = 10,
                                exclude: set[int] | frozenset[int] = frozenset(), filters: Filters | None = None,
                                include_training: bool = False) -> QueryResult:
        """`search_objects` for decoded pixels (an upload): a `box` in the image's full-size pixels, else its own objects.

        `image` may be a reduced decode (`info["full_size"]`): the box is pooled from the
        map of the whole image, which covers the same frame at any decode scale. `exclude`
        is the records holding these bytes (the first of them lends its stored objects).
        """
        if k < 1:
            raise BadInputError("k must be at least 1")
        size = tuple(image.info.get("full_size", image.size))
        embedded = self.embedder.embed_images([image])
        fmap = embedded.maps[0]
        described: dict = {"path": "the image"}
        record = self.record(min(exclude)) if exclude else None
        parts = self._parts(box, record, described, fmap, size, image)
        contents = (QueryContents.of_record(record) if record is not None
                    else self.contents_seen(fmap, size, embedded.tags[0] if embedded.tags is not None else []))
        contents.copies = self.known_copies(set(exclude), embedded.vectors[:1])
        scoped, left_out = self.scope(filters, include_training)
        return QueryResult(described, self.search_parts(parts, k, exclude, scoped), record, parts,
                           cutoff=self.objects_cutoff, contents=contents, left_out=left_out)

    def search_parts(self, parts: list[QueryPart], k: int, exclude: set[int] | frozenset[int] = frozenset(),
                     filters: Filters | None = None) -> list[Neighbour]:
        """The k images whose objects best match any of `parts`, each with its best (object, part) pair.

        A filter is applied inside the search, as for images: FAISS scores only the boxes
        that pass, so k images come back whenever k images hold a passing box.
        """
        spec, index = self.objects_index()
        xq = np.stack([p.vector for p in parts]).astype(np.float32)
        boxes = self.store.vector_set("boxes")
        allowed = None
        if filters is not None and filters.active:
            allowed = self.store.box_ids_matching(filters, exclude)
        total = index.ntotal if allowed is None else len(allowed)
        if not total:
            return []
        depth = min(total, max(4 * k, 32))
        while True:
            scores, box_ids = faiss_index.search(index, xq, depth, spec.rerank, boxes.vectors, allowed=allowed)
            found = self.store.boxes([int(b) for b in np.unique(box_ids) if b >= 0])
            hits = [(found[int(b)].image_id, int(b), float(sc), q) for q in range(len(parts))
                    for b, sc in zip(box_ids[q], scores[q]) if b >= 0 and int(b) in found]
            best = best_per_image(hits, k, exclude)
            if len(best) >= k or depth >= total:
                break
            depth = min(total, depth * 4)  # images with many matching boxes crowded the list: look deeper
        records = self.store.records([h[0] for h in best])
        cutoff = self.objects_cutoff
        out = []
        for image_id, box_id, score, q in best:
            if image_id in records:
                why = Why(score, parts[q], found[box_id])
                out.append(Neighbour(len(out) + 1, round(score, 6), records[image_id], found[box_id], why,
                                     weak=cutoff is not None and score < cutoff))
        return out

    def _query_input(self, query: int | str | os.PathLike, need_map: bool):
        """(described, record or None, (1, D) vector, (C, H, W) map or None, (width, height), contents) of a query."""
        if isinstance(query, (int, np.integer)):
            record = self.record(int(query))
            described = {"id": record.id, "path": record.path, "sha256": record.sha256}
            whole = self.store.vectors([record.id])[1]
            fmap = None
            if need_map:
                if self.store.ids_with_feature_map([record.id]):
                    fmap = self.store.feature_maps([record.id])[0]
                else:
                    if not Path(record.path).is_file():
                        raise NotFoundError(f"{record.path}: the file of record {record.id} is gone, and its feature "
                                            "map was not kept; query with the image file instead")
                    whole, fmap, _ = self.embed_file(record.path)
            return described, record, whole, fmap, (record.width, record.height), QueryContents.of_record(record)
        path = _query_file(query)
        whole, fmap, size, tags = self.embed_file_tagged(path)
        sha = file_sha256(path)
        copies = sorted(self.copies_of(sha))
        record = self.record(copies[0]) if copies else None
        contents = QueryContents.of_record(record) if record is not None else self.contents_seen(fmap, size, tags)
        return {"path": str(path), "sha256": sha}, record, whole, fmap, size, contents

    def _parts(self, box: tuple[float, float, float, float] | None, record: Record | None, described: dict,
               fmap: np.ndarray | None, size: tuple[int, int], pixels: Image.Image | str | None = None
               ) -> list[QueryPart]:
        """What an object query searches with: the drawn box (noted in `described`), else the query's own objects.

        A drawn box is its vector pooled from the query's map plus, weighted CROP_WEIGHT,
        the vector of its own pixels (`pixels`: the decoded image or its file) embedded
        alone: the pooled vector carries the object's surroundings, the crop does not.
        """
        if box is None:
            return self._own_objects(record, described, fmap, size)
        from simsearch.pipeline.box_vectors import fractions, pool_one

        checked = _checked_box(box, size)
        described["box"] = list(checked)
        vector = pool_one(fmap, fractions([checked], *size))[0]
        seen = self._region_vector(pixels, checked, size) if pixels is not None else None
        if seen is not None:
            vector = vector + CROP_WEIGHT * seen
            vector = vector / np.linalg.norm(vector)
        return [QueryPart(vector.astype(np.float32), None, checked, "drawn")]

    def _region_vector(self, pixels: Image.Image | str, box: tuple[float, float, float, float],
                       size: tuple[int, int]) -> np.ndarray | None:
        """A box's pixels embedded on their own, or None when they cannot be read (a record whose file is gone)."""
        if not isinstance(pixels, Image.Image):
            side = self.spec.embedder.preprocess.size
            try:
                pixels = open_image(pixels, draft=lambda w, h: _box_draft(box, size, (w, h), side),
                                    max_pixels=self.max_pixels)
            except (OSError, SimsearchError) as e:
                log.info("the drawn box is searched by its pooled vector alone: %s", e)
                return None
        sx, sy = pixels.width / size[0], pixels.height / size[1]
        left, top = int(box[0] * sx), int(box[1] * sy)
        region = pixels.crop((left, top, max(left + 1, round(box[2] * sx)), max(top + 1, round(box[3] * sy))))
        return self.vector_of_image(region)[0]

    def _own_objects(self, record: Record | None, described: dict, fmap: np.ndarray | None,
                     size: tuple[int, int]) -> list[QueryPart]:
        """The query's own objects as search parts: its stored boxes when it is indexed, else the localizer's boxes
        (a dense head's every detection, as `localize` would store them)."""
        stored = self._stored_parts(record) if record is not None else []
        if stored:
            return stored
        localizer = self.localizer() if fmap is not None else None
        if localizer is not None:
            from simsearch.localizer.predict import detect

            found, vectors = detect(localizer, fmap[None], [size])
            return [QueryPart(v, p.label, (p.xmin, p.ymin, p.xmax, p.ymax), "predicted")
                    for v, p in zip(vectors[0], found[0])]
        where = described.get("id", described["path"])
        raise BadInputError(f"{where} has no objects to search with (no boxes, and no localizer in this index): "
                            "draw one with --box XMIN,YMIN,XMAX,YMAX (pixels)")

    def explain_neighbours(self, neighbours: list[Neighbour], parts: list[QueryPart]) -> None:
        """Give each neighbour its reason: the (query part, its object) pair that matched best, or the whole image."""
        if not neighbours or not self.has_objects():
            return
        boxes = self.store.boxes_of_images([n.id for n in neighbours])
        ids = [b.id for n in neighbours for b in boxes.get(n.id, [])]
        found, xb = self.store.vector_set("boxes").vectors(ids)
        row = {int(i): r for r, i in enumerate(found)}
        for n in neighbours:
            theirs = [b for b in boxes.get(n.id, []) if b.id in row]
            n.why = explain(parts, n.score, theirs, xb[[row[b.id] for b in theirs]] if theirs else np.zeros((0, 1)))

    def query_parts(self, record: Record | None, whole: np.ndarray) -> list[QueryPart]:
        """The whole query, and its stored objects when it is an indexed record: what "why similar" compares."""
        parts = [QueryPart(np.asarray(whole, dtype=np.float32).reshape(-1))]
        return parts + (self._stored_parts(record) if record is not None else [])

    def _stored_parts(self, record: Record) -> list[QueryPart]:
        """An indexed record's boxes with their stored vectors, as search parts."""
        boxes = self.store.boxes_of_images([record.id])[record.id]
        if not boxes:
            return []
        _, xb = self.store.vectors([b.id for b in boxes], "boxes")
        return [QueryPart(v, b.label, tuple(b.box), b.source) for b, v in zip(boxes, xb)]

    def copies_of(self, sha256: str) -> set[int]:
        """Records holding these very bytes: no answer to a query made of them (`known_copies` names them)."""
        return self.store.ids_with_sha256(sha256)

    def known_copies(self, exact: set[int] | frozenset[int], xq: np.ndarray, queried: int | None = None,
                     threshold: float = NEAR_DUPLICATE) -> Copies:
        """What the index already holds of a query: `exact` (records with its bytes) and files scoring >= threshold.

        The exact copies are left out of the neighbours, so the query says so instead.
        Near-duplicates come from one unfiltered search NEAR_SHOWN deep past the exact
        copies: a filter narrows the answers, never what the index holds. `queried` is
        the record searched by id, which is no copy of itself.
        """
        depth = min(self.index.ntotal, len(exact) + NEAR_SHOWN + 1)
        near: list[tuple[int, float]] = []
        if depth:
            scores, ids = self.knn(np.asarray(xq, dtype=np.float32).reshape(1, -1), depth)
            near = [(int(i), round(float(sc), 6)) for i, sc in zip(ids[0], scores[0])
                    if i >= 0 and sc >= threshold and int(i) not in exact and int(i) != queried]
        return Copies(sorted(set(exact) - {queried}), near[:NEAR_SHOWN], threshold, queried is not None)

    @property
    def cutoff(self) -> float | None:
        """Scores below this are weak matches in this index (None: too small to calibrate, or never was)."""
        return self.calibration.cutoff if self.calibration else None

    # ------------------------------------------------------------ records

    def describe(self, hits: list[tuple[int, float]], learned: dict[int, float] | None = None) -> list[Neighbour]:
        """(id, score) hits as ranked Neighbours with their records (ids removed since are dropped).

        `learned`: the learned similarity's scores, where it set the order of `hits`.
        """
        records = self.store.records([i for i, _ in hits])
        found = [(records[i], score) for i, score in hits if i in records]
        cutoff = self.cutoff
        learned = learned or {}
        return [Neighbour(rank, round(score, 6), record, weak=cutoff is not None and score < cutoff,
                          learned=round(learned[record.id], 6) if record.id in learned else None)
                for rank, (record, score) in enumerate(found, 1)]

    def record(self, image_id: int) -> Record:
        found = self.store.records([int(image_id)])
        if not found:
            from simsearch.storage.info import unknown_id

            raise unknown_id(self.store, image_id)
        return found[int(image_id)]


def _query_file(query: str | os.PathLike) -> Path:
    """The query's path, or a one-line error saying what it is instead: a folder is a build's input, not a query."""
    path = Path(query)
    if path.is_dir():
        raise BadInputError(f"{path}: is a folder; give one image file (build-index indexes a folder)")
    if not path.is_file():
        raise NotFoundError(f"{path}: no such image file")
    return path


def _box_draft(box: tuple[float, float, float, float], size: tuple[int, int], stored: tuple[int, int],
               side: int) -> tuple[int, int]:
    """JPEG draft target that keeps a box at least `side` pixels across (the model's input), else the full file."""
    across = max(1.0, ((box[2] - box[0]) * (box[3] - box[1])) ** 0.5)
    scale = min(1.0, side / across)
    return max(1, int(stored[0] * scale)), max(1, int(stored[1] * scale))


def _checked_box(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """A drawn box clipped to the image, or a clear error when it holds no pixels of it."""
    width, height = size
    xmin, ymin, xmax, ymax = (float(v) for v in box)
    clipped = (max(0.0, xmin), max(0.0, ymin), min(float(width), xmax), min(float(height), ymax))
    if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
        raise BadInputError(f"box {xmin:g},{ymin:g},{xmax:g},{ymax:g} holds no pixels of the {width}x{height} image: "
                            "give XMIN,YMIN,XMAX,YMAX in pixels, with XMIN < XMAX and YMIN < YMAX")
    return clipped


_OPEN: dict[str, Searcher] = {}


def search(index_dir: str | os.PathLike, image_or_id: int | str | os.PathLike, k: int = 10,
           filters: Filters | None = None, include_training: bool = False) -> QueryResult:
    """Neighbours of an image file or record id; the index stays open between calls."""
    key = str(Path(index_dir).resolve())
    searcher = _OPEN.get(key)
    if searcher is None:
        searcher = _OPEN[key] = Searcher(index_dir)
    searcher.refresh()  # a build may have changed the index since it was opened
    return searcher.search(image_or_id, k, filters, include_training)
