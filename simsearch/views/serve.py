"""A small local web app to browse an index: upload or pick an image, see its neighbours.

`create_app(index_dir)` returns a FastAPI app: one plain HTML+JS page at `/`
(no build step) over a JSON API under `/api` (documented at `/docs`, which works
offline), including `/api/export`, a search's neighbours as a ZIP of their files. Files are
only ever served by record id (or by the id of a box, which names its record), from
paths the index itself recorded; nothing the client sends is used as a path. Uploads are capped in bytes and in pixels (413
above either cap); at most `decode_slots` images decode at once. No response
carries an absolute filesystem path. With `ServeConfig.token` set, every request
must carry the token (see `http_guards.TokenGate`); `run` binds the port before loading
anything, so a port in use is one clear error.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import mimetypes
import os
import socket
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Iterator
from typing import Callable, Optional

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from simsearch.errors import (BadInputError, ExportTooLargeError, ImageTooLargeError, IndexBusyError, IndexDamagedError,
                               NotFoundError,
                               SimsearchError)
from simsearch.retrieval.contents import QueryContents
from simsearch.retrieval.filters import ORIENTATIONS, Filters
from simsearch.retrieval.library import Folders, folders_of
from simsearch.retrieval.scope import LeftOut
from simsearch.retrieval.searcher import Neighbour, QueryResult, Searcher
from simsearch.pipeline.read import DEFAULT_MAX_PIXELS, open_image
from simsearch.records import Record
from simsearch.views.http_guards import TokenGate, UploadCap, bind
from simsearch.views.export import export_items, zip_results
from simsearch.views.render import Renderer, jpeg_bytes, match_box, overlay, record_box
from simsearch.views.serve_ui import PAGE

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024  # bytes: a large phone photo, far below anything abusive
# A region search decodes JPEGs at a reduced scale that still leaves this many pixels a side (or the
# whole file when smaller): a box drawn on a 24 MP photo stays sharp at ~1/4 of the decode cost.
REGION_DECODE_SIDE = 2048
MAX_ID = 2**63 - 1  # SQLite's integer range: larger ids are refused by validation (422), never an overflow


@dataclass(frozen=True)
class ServeConfig:
    """How the app answers; the CLI's options map onto these fields."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD  # larger request bodies get 413
    default_k: int = 12  # neighbours per search when the client does not say
    max_k: int = 200  # a ceiling on k so one request cannot ask for the whole index
    device: str = "auto"  # for embedding uploaded images and regions
    weights: str | None = None  # the weights file the index was built with, if not the default
    # Largest image decoded, uploads and index files alike (JPEGs count their reduced decode):
    # a few-hundred-KB PNG declaring 19000x19000 pixels is refused (413) from its header.
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    decode_slots: int = 2  # images decoded (and embedded) at once, so concurrent big uploads cannot add up
    # A ZIP of results (their original files and results.csv) larger than this is refused (413) before a
    # byte is sent: k is capped by max_k, but 200 camera originals could still be gigabytes.
    max_export_bytes: int = 512 * 1024 * 1024
    picker_page: int = 60  # records per page of the app's picker (it pages through the whole library)
    # Shared secret required on every request when set (Bearer header, or ?token= on the page URL,
    # which sets a cookie for the page's own requests). The app has no other authentication: set
    # it whenever the app is reachable from other machines (a --host other than loopback).
    token: str | None = None


class Browser:
    """The library side of the app: searches and pictures, safe to call from worker threads.

    Every search goes through the one `Searcher` (and its `refresh`); this class only
    adds decoding limits and the client's view of a record.
    """

    def __init__(self, index_dir: str | os.PathLike, config: ServeConfig = ServeConfig()):
        self.index_dir = Path(index_dir)
        self.config = config
        self._lock = threading.RLock()  # one SQLite connection and one model, shared by request threads
        # Taken before `_lock` (never while holding it) around every full decode: with N slots, at
        # most N decoded images (each up to max_pixels) are in memory whatever the request rate.
        self._decode_slots = threading.BoundedSemaphore(max(1, config.decode_slots))
        self.searcher = Searcher(self.index_dir, device=config.device, weights=config.weights,
                                 max_pixels=config.max_pixels)
        self.renderer = Renderer(index_dir, max_pixels=config.max_pixels)

    def _fresh(self) -> Searcher:
        """The searcher, reopened if a build changed the index since it was loaded (call under `_lock`)."""
        self.searcher.refresh()
        return self.searcher

    @property
    def name(self) -> str:
        """The index folder's name: all the client learns of where the index lives."""
        return self.index_dir.name or self.index_dir.resolve().name

    def scrub(self, message: str) -> str:
        """`message` with the index folder's absolute path (as given and resolved) replaced by its name."""
        spellings = {str(self.index_dir.resolve()), str(self.index_dir.absolute())}
        if self.index_dir.is_absolute():
            spellings.add(str(self.index_dir))
        for spelling in sorted(spellings, key=len, reverse=True):  # a longer spelling may contain a shorter
            message = message.replace(spelling, self.name)
        return message

    # ------------------------------------------------------------ records

    def info(self) -> dict:
        with self._lock:
            searcher = self._fresh()
            summary = searcher.store.summary()
            labels = set(summary["labels"]) | set(searcher.store.predicted_labels())
            return {"index": self.name, "images": summary["images"], "objects": summary["objects"],
                    "labels": sorted(labels), "datasets": sorted(searcher.store.datasets()), "backbone": searcher.spec.embedder.backbone,
                    "index_type": searcher.spec.index_type, "max_upload_bytes": self.config.max_upload_bytes,
                    "max_pixels": self.config.max_pixels, "object_search": searcher.has_objects(),
                    "score_cutoff": searcher.cutoff, "tags": list(searcher.store.tag_labels()),
                    "training_datasets": list(searcher.training_datasets()),
                    "folders": self._folders(searcher).listed(), "orientations": list(ORIENTATIONS),
                    "picker_page": self.config.picker_page}

    @staticmethod
    def _folders(searcher: Searcher) -> Folders:
        """The library's folders, relative to the one holding them all (call under `_lock`)."""
        return folders_of(searcher.store.folders())

    def _on_server(self, filters: Filters | None) -> Filters | None:
        """`under`/`not_under` as the folder menu names them (relative to the library), or as server paths.

        The app lists folders relative to the one holding them all and never shows server
        paths, so a folder typed as listed must work; an absolute path still does.
        """
        if filters is None or not any(n.startswith(LIBRARY_PREFIX) for n in filters.under + filters.not_under):
            return filters
        with self._lock:
            folders = self._folders(self._fresh())

        def resolved(names: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(folders.under(n[len(LIBRARY_PREFIX):]) if n.startswith(LIBRARY_PREFIX) else n for n in names)

        return replace(filters, under=resolved(filters.under), not_under=resolved(filters.not_under))

    def _record(self, image_id: int) -> Record:
        with self._lock:
            return self._fresh().record(image_id)

    def record(self, image_id: int) -> dict:
        return self._public(Neighbour(1, 1.0, self._record(image_id)))

    def records(self, filters: Filters | None = None, offset: int = 0, limit: int = 60,
                folder: str | None = None) -> dict:
        """A page of records (id order), optionally only those passing `filters` and in `folder` (or below it).

        `folder` is relative to the library's root, as `info()["folders"]` names it: it
        narrows whatever `filters.under` allows rather than adding one more folder to it.
        """
        filters = self._on_server(filters)
        with self._lock:
            searcher = self._fresh()
            store = searcher.store
            ids = store.ids_matching(filters) if filters and filters.active else np.asarray(store.ids(), dtype=np.int64)
            if folder:
                inside = store.ids_matching(Filters(under=(self._folders(searcher).under(folder),)))
                ids = np.intersect1d(ids, inside)
            ids = ids.tolist()
            described = searcher.describe([(i, 1.0) for i in ids[offset:offset + limit]])
        page = [self._public(n) for n in described]
        for position, row in enumerate(page, offset + 1):  # a listing, not a search: no score to rank by
            row.update(rank=position, score=None, learned=None, weak=False)
        return {"total": len(ids), "offset": offset, "limit": limit, "records": page}

    def image_file(self, image_id: int) -> Path:
        """The record's own file: the only way a path reaches the client's response."""
        return _existing_file(self._record(image_id))

    def overlay_jpeg(self, image_id: int) -> bytes:
        record = self._record(image_id)
        with self._decode_slots:
            image = self._open_record_file(record, draft=_region_draft)
            return jpeg_bytes(overlay(image, record.objects, record.prediction))

    def _open_record_file(self, record: Record, draft=None) -> Image.Image:
        """An index file decoded under the pixel limit (by the renderer, which names the record in messages)."""
        _existing_file(record)
        try:
            return self.renderer.open(record, draft)
        except ImageTooLargeError as e:
            raise ImageTooLargeError(_too_large(e, "serve --max-pixels is below this index's images")) from None

    def thumb(self, image_id: int) -> bytes:
        record = self._record(image_id)
        with self._decode_slots:
            return self.renderer.thumb(record)

    def crop(self, image_id: int) -> bytes:
        record = self._record(image_id)
        with self._decode_slots:
            return self.renderer.crop(record)

    def box_crop(self, box_id: int) -> bytes:
        """The crop of one box of the objects index (what an object search matched), by its id."""
        with self._lock:
            searcher = self._fresh()
            match = searcher.store.boxes([box_id]).get(box_id)
            if match is None:
                raise NotFoundError(f"no box {box_id} in this index; it was removed, or never existed")
            record = searcher.record(match.image_id)
        with self._decode_slots:
            return self.renderer.crop(record, match_box(match, record))

    # ------------------------------------------------------------ search

    def search_id(self, image_id: int, k: int, filters: Filters | None = None, box: str | None = None,
                  objects: bool = False, include_training: bool = False) -> dict:
        """Neighbours of a record, or of a region of it when `box` is given.

        A box searches the objects index when the index has one ("mode": "objects"), else
        its pixels are cropped and embedded ("mode": "crop"); `objects` searches with the
        record's own objects. "query" says what the engine sees in the query (`_with_contents`).
        """
        k = self._k(k)
        filters = self._on_server(filters)
        if objects or (box and self._has_objects()):
            return self._search_objects_id(image_id, k, filters, box, include_training)
        if not box:
            with self._lock:
                result = self._fresh().search(image_id, k, filters, include_training)
            query = _with_contents(_query_of(result.record), result.contents, result.left_out)
            return _answer(query, "image", [self._public(n) for n in result.neighbours], result.cutoff,
                           result.ranked_by)
        record = self._record(image_id)
        query = _query_of(record)
        with self._decode_slots:
            image = self._open_record_file(record, draft=_region_draft)
            region, image = _crop_region(image, box)
            query["box"] = list(region)
            xq, contents = self._look(image)  # what is in the region, from the pass that embeds it
        # A region's best match may well be its own image: nothing is excluded.
        neighbours, left_out, ranked_by = self._neighbours(xq, k, filters, set(), include_training)
        return _answer(_with_contents(query, contents, left_out), "crop", neighbours, self._cutoff(), ranked_by)

    def _search_objects_id(self, image_id: int, k: int, filters: Filters | None, box: str | None,
                           include_training: bool = False) -> dict:
        """Images holding objects like the record's box (or its own objects): the objects index, grouped per image."""
        record = self._record(image_id)
        region = parse_box(box, (record.width, record.height)) if box else None
        with self._decode_slots:  # a record whose map was not kept is decoded again
            with self._lock:
                result = self._fresh().search_objects(image_id, k, region, filters, include_training)
        return self._objects_response(_query_of(record), result)

    def _objects_response(self, query: dict, result: QueryResult) -> dict:
        if "box" in result.query:
            query["box"] = [round(v) for v in result.query["box"]]
        query["parts"] = [p.to_json() for p in result.parts]
        return {"query": _with_contents(query, result.contents, result.left_out), "mode": "objects",
                "cutoff": result.cutoff, "neighbours": [self._public(n) for n in result.neighbours]}

    def _has_objects(self) -> bool:
        with self._lock:
            return self._fresh().has_objects()

    def search_upload(self, data: bytes, k: int, filters: Filters | None = None, box: str | None = None,
                      name: str | None = None, objects: bool = False, include_training: bool = False) -> dict:
        """Neighbours of an uploaded image, or of a region of it (`box` in the image's full-size pixels).

        A box searches the objects index when there is one, as `search_id`; `objects`
        searches with the upload's own objects (those of its indexed copy, else the
        localizer's box). `name` (the upload's file name) is what error messages call it.
        JPEGs decode at the smallest scale the search needs: the model's input for a whole
        image or an object search (boxes are pooled from the whole image's map), a sharp
        REGION_DECODE_SIDE for a cropped region.
        """
        name = _upload_name(name)
        filters = self._on_server(filters)
        if len(data) > self.config.max_upload_bytes:
            raise _UploadTooLarge(self.config.max_upload_bytes)
        if not data:
            raise BadInputError(f"{name}: the upload is empty; choose an image file")
        with self._lock:
            searcher = self._fresh()
            whole = searcher.spec.embedder.preprocess.input_size
            exclude = searcher.copies_of(hashlib.sha256(data).hexdigest())  # the same file is no answer to itself
            by_objects = objects or (bool(box) and searcher.has_objects())
        with self._decode_slots:
            try:
                image = open_image(_NamedBytes(data, name), draft=_region_draft if box else whole,
                                   max_pixels=self.config.max_pixels, name=name)
            except ImageTooLargeError as e:
                raise ImageTooLargeError(_too_large(e, "send a smaller image")) from None
            width, height = image.info.get("full_size", image.size)
            query: dict = {"upload": True, "width": width, "height": height}
            if by_objects:
                region = parse_box(box, (width, height)) if box else None
                with self._lock:
                    result = self._fresh().search_objects_in_image(image, region, self._k(k), exclude, filters,
                                                                   include_training)
                del image
                return self._objects_response(query, result)
            if box:
                region, image = _crop_region(image, box)
                query["box"] = list(region)
                exclude = set()  # a region's best match may well be the uploaded file itself
            xq, contents = self._look(image)
            del image  # the decoded pixels go before the slot is given back
        if exclude:  # an indexed file: what the index stored for it, as a query by its id shows
            contents = QueryContents.of_record(self._record(min(exclude)))
        if not box:  # the upload's own copies in the index, exact and near, as the CLI names them
            with self._lock:
                contents.copies = self._fresh().known_copies(exclude, xq)
        neighbours, left_out, ranked_by = self._neighbours(xq, self._k(k), filters, exclude, include_training)
        return _answer(_with_contents(query, contents, left_out), "crop" if box else "image", neighbours,
                       self._cutoff(), ranked_by)

    def export(self, result: dict, asked: dict | None = None) -> Iterator[bytes]:
        """A search's result (as `search_id` or `search_upload` returned it) as a ZIP: the neighbours' own files,
        results.csv and query.json, refused (413) before anything is sent when the files exceed max_export_bytes.

        `asked`, the request's own parameters (k, filters, an upload's file name), goes into query.json
        so the archive says how it was searched as well as what came back."""
        with self._lock:
            records = self._fresh().store.records([n["id"] for n in result["neighbours"]])
        files = [Path(records[n["id"]].path) if n["id"] in records else None for n in result["neighbours"]]
        items = export_items(result["neighbours"], files, self.config.max_export_bytes)
        query = {key: result[key] for key in ("query", "mode", "cutoff", "ranked_by") if key in result}
        if asked:
            query["asked"] = asked
        return zip_results(query, items)

    def _k(self, k: int) -> int:
        return max(1, min(int(k), self.config.max_k))

    def _look(self, image: Image.Image) -> tuple[np.ndarray, QueryContents]:
        """The pixels' vector and what the same pass sees in them (tags, the localizer's prediction)."""
        with self._lock:
            return self._fresh().look(image)

    def _cutoff(self) -> float | None:
        """The index's score cutoff: neighbours below it are weak (None: not calibrated)."""
        with self._lock:
            return self._fresh().cutoff

    def _neighbours(self, xq: np.ndarray, k: int, filters: Filters | None, exclude: set[int],
                    include_training: bool = False) -> tuple[list[dict], LeftOut | None, str]:
        """The neighbours of a vector as the client sees them, the training images left out (as `search`), and
        how they were ranked ("learned" or "plain"), all from one look at the index."""
        with self._lock:
            scoped, left_out = self._fresh().scope(filters, include_training)
            neighbours = self.searcher.search_vector(xq, k, exclude, scoped)
            # Why each is similar, as `search` says it: an upload of an indexed file lends that record's objects.
            indexed = self.searcher.record(min(exclude)) if exclude else None
            self.searcher.explain_neighbours(neighbours, self.searcher.query_parts(indexed, xq))
            ranked_by = self.searcher.ranked_by
        return [self._public(n) for n in neighbours], left_out, ranked_by

    @staticmethod
    def _public(n: Neighbour) -> dict:
        """What the client sees of a record: no filesystem path beyond the file's name."""
        record = n.record
        box = record_box(record)
        # The object that matched (object search), or the one the reason names (whole-image search).
        matched = n.match if n.match is not None else (n.why.match if n.why is not None else None)
        shown = record.to_json()
        return {
            "rank": n.rank, "id": record.id, "name": Path(record.path).name, "score": n.score, "learned": n.learned,
            "weak": n.weak,
            "width": record.width, "height": record.height, "split": record.split, "dataset": record.dataset,
            "classes": record.classes, "objects": shown["objects"], "prediction": shown["prediction"],
            "tags": shown["tags"],
            "box": {"xmin": box.xmin, "ymin": box.ymin, "xmax": box.xmax, "ymax": box.ymax,
                    "label": box.label, "source": box.source},
            "thumb_url": f"/api/records/{record.id}/thumb", "crop_url": f"/api/records/{record.id}/crop",
            "image_url": f"/api/records/{record.id}/image",
            "overlay_url": f"/api/records/{record.id}/image?overlay=true",
            "match": n.match.to_json() if n.match is not None else None,
            "why": n.why.to_json() if n.why is not None else None,
            "match_crop_url": f"/api/boxes/{matched.id}/crop" if matched is not None else None,
        }


def _answer(query: dict, mode: str, neighbours: list[dict], cutoff: float | None, ranked_by: str) -> dict:
    """A whole-image or region search's response: `ranked_by` in its query (where the CLI's first JSON
    line has it) and beside the results."""
    return {"query": {**query, "ranked_by": ranked_by}, "mode": mode, "neighbours": neighbours, "cutoff": cutoff,
            "ranked_by": ranked_by}


class _UploadTooLarge(SimsearchError):
    def __init__(self, limit: int):
        super().__init__(f"upload too large: the limit is {limit // (1024 * 1024)} MB; send a smaller image")


class _NamedBytes(io.BytesIO):
    """An upload in memory whose repr (which PIL puts in its messages) is its file name, not an address."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self._name = name

    def __repr__(self) -> str:
        return repr(self._name)


def _upload_name(filename: str | None) -> str:
    """The client's file name, without any folder it sent, shortened: what messages call the upload."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return (name[:80] + "...") if len(name) > 80 else (name or "the upload")


def _too_large(error: ImageTooLargeError, advice: str) -> str:
    """open_image's message for the client: 'image too large: NAME: WxH pixels ... limit ...; ADVICE'."""
    message = str(error).split("; pass --max-pixels", 1)[0]  # that advice is for whoever runs the server
    return f"image too large: {message}; {advice}"


def _existing_file(record: Record) -> Path:
    path = Path(record.path)
    if not path.is_file():
        raise NotFoundError(f"record {record.id}: its file {path.name} is gone; rebuild with --prune")
    return path


def _query_of(record: Record) -> dict:
    """What the client sees of a query record."""
    return {"id": record.id, "path_name": Path(record.path).name, "width": record.width, "height": record.height}


def _with_contents(query: dict, contents: QueryContents | None, left_out: LeftOut | None) -> dict:
    """`query` with what the engine sees in it (prediction(s), ImageNet tags, drawn boxes; as `simsearch query`'s
    JSON first line) and the training images the search left out."""
    query.update((contents or QueryContents()).to_json())
    query["left_out"] = left_out.to_json() if left_out is not None else None
    return query


def _asked(fields) -> dict:
    """A request's parameters as query.json records them: repeated ones as lists, empty ones and the token left out."""
    asked: dict = {}
    for key, value in fields:
        if key == "token" or value in ("", None):
            continue
        asked.setdefault(key, []).append(value)
    return {key: values[0] if len(values) == 1 else values for key, values in asked.items()}


def _region_draft(width: int, height: int) -> tuple[int, int]:
    """JPEG draft target for a region search: REGION_DECODE_SIDE a side, or the whole file if smaller."""
    return min(width, REGION_DECODE_SIDE), min(height, REGION_DECODE_SIDE)


def _crop_region(image: Image.Image, text: str) -> tuple[tuple[int, int, int, int], Image.Image]:
    """(the box in full-size pixels, its pixels) for a box given in the full-size image's pixels.

    `image` may be a reduced decode (`image.info["full_size"]` is the file's upright size):
    the box is parsed and clipped against the full size, then scaled onto the decoded pixels.
    """
    full_w, full_h = image.info.get("full_size", image.size)
    region = parse_box(text, (full_w, full_h))
    sx, sy = image.width / full_w, image.height / full_h
    scaled = (max(0, math.floor(region[0] * sx)), max(0, math.floor(region[1] * sy)),
              min(image.width, math.ceil(region[2] * sx)), min(image.height, math.ceil(region[3] * sy)))
    return region, image.crop(scaled)


def parse_box(text: str, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """'xmin,ymin,xmax,ymax' in image pixels -> an integer box clipped to the image."""
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise BadInputError(f"box must be 'xmin,ymin,xmax,ymax' in pixels, got {text!r}") from None
    w, h = size
    x0, x1 = sorted((max(0, min(w, x0)), max(0, min(w, x1))))
    y0, y1 = sorted((max(0, min(h, y0)), max(0, min(h, y1))))
    box = (int(x0), int(y0), int(round(x1)), int(round(y1)))
    if box[2] - box[0] < 8 or box[3] - box[1] < 8:
        raise BadInputError("the box is smaller than 8x8 pixels inside the image; draw a larger one")
    return box


FILTER_HELP = {
    "label": "only images with a box of this class (drawn or predicted)",
    "min_box_area": "only images with a box covering at least this fraction (0..1) of the image",
    "min_score": "only images with a box of at least this confidence (0..1; drawn boxes count 1.0)",
    "under": "only files under this folder: as /api/info's folders name it (relative to the library) or a server "
             "path (repeatable: any of them)",
    "not_under": "no files under this folder, named as for under (repeatable)",
    "dataset": "only images of this dataset (repeatable: any of them)",
    "not_dataset": "no images of this dataset (repeatable)",
    "tag": "only images holding this ImageNet tag (any case), e.g. espresso",
    "name": "only files whose name (not folder) contains this text, in any case",
    "orientation": "only landscape, portrait or square images",
}


INCLUDE_TRAINING_HELP = ("also answer with the images the index's localizer trained on (left out by default when "
                         "the index holds other images too; a dataset filter overrides)")


# A folder named as the app lists it (relative to the library) travels inside Filters under this
# prefix, since Filters makes relative paths absolute against the server's working folder;
# `Browser._on_server` turns it into the library folder it names.
LIBRARY_PREFIX = "/@library/"


def _in_library(folder: str) -> str:
    return folder if os.path.isabs(folder) else LIBRARY_PREFIX + folder.strip().strip("/")


def _filters(label, min_box_area, min_score, under, not_under, dataset, not_dataset, tag=None, name=None,
             orientation=None) -> Filters:
    """The request's filters; empty fields (what a form sends for "any") do not filter.

    Folders are only compared with the paths the index recorded, never opened or listed.
    """
    return Filters(label=label or None, min_box_area=min_box_area, min_score=min_score,
                   under=tuple(_in_library(f) for f in under if f),
                   not_under=tuple(_in_library(f) for f in not_under if f),
                   dataset=tuple(d for d in dataset if d), not_dataset=tuple(d for d in not_dataset if d),
                   tag=tag or None, name=name or None, orientation=orientation or None)


def _query_filters(label: Optional[str] = Query(None, description=FILTER_HELP["label"]),
                   min_box_area: Optional[float] = Query(None, description=FILTER_HELP["min_box_area"]),
                   min_score: Optional[float] = Query(None, description=FILTER_HELP["min_score"]),
                   under: list[str] = Query([], description=FILTER_HELP["under"]),
                   not_under: list[str] = Query([], description=FILTER_HELP["not_under"]),
                   dataset: list[str] = Query([], description=FILTER_HELP["dataset"]),
                   not_dataset: list[str] = Query([], description=FILTER_HELP["not_dataset"]),
                   tag: Optional[str] = Query(None, description=FILTER_HELP["tag"]),
                   name: Optional[str] = Query(None, description=FILTER_HELP["name"]),
                   orientation: Optional[str] = Query(None, description=FILTER_HELP["orientation"])) -> Filters:
    return _filters(label, min_box_area, min_score, under, not_under, dataset, not_dataset, tag, name, orientation)


def _error_status(exc: SimsearchError) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, (_UploadTooLarge, ImageTooLargeError, ExportTooLargeError)):
        return 413
    if isinstance(exc, IndexBusyError):
        return 503
    if isinstance(exc, IndexDamagedError):
        return 500
    return 400


def _app_with_docs(**kwargs) -> FastAPI:
    """A FastAPI app whose docs (/docs, /redoc) load Swagger UI and ReDoc from files fastapi-offline ships, not
    from a CDN: they work with no internet, behind the token like every other page.

    An install that predates the `serve` extra's fastapi-offline still serves, with CDN docs and a warning.
    """
    try:
        from fastapi_offline import FastAPIOffline
    except ImportError:
        log.warning("the API docs at /docs need the internet here: pip install fastapi-offline to serve them locally")
        return FastAPI(**kwargs)
    return FastAPIOffline(**kwargs)


def create_app(index_dir: str | os.PathLike, config: ServeConfig = ServeConfig()):
    """The FastAPI app for one index (raises NotFoundError now if there is no index there)."""
    browser = Browser(index_dir, config)
    app = _app_with_docs(
        title="simsearch",
        summary="Browse an image-similarity index: neighbours with box crops and scores.",
        version=__import__("simsearch").__version__,
    )
    app.state.browser = browser

    @app.exception_handler(SimsearchError)
    async def _simsearch_error(request: Request, exc: SimsearchError):
        # Library messages name files for a terminal; the client gets them without the index's location.
        return JSONResponse({"detail": browser.scrub(str(exc))}, status_code=_error_status(exc))

    jpeg = {"media_type": "image/jpeg", "headers": {"Cache-Control": "max-age=300"}}
    # Every id the client sends is bounded to SQLite's integer range: 422 above it, never an overflow.
    record_id = PathParam(..., ge=0, le=MAX_ID, description="record id")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        """No icon: an empty answer, so the browser's automatic request logs no 404 on every visit."""
        return Response(status_code=204)

    @app.get("/api/info", summary="What the index holds: counts, classes, backbone")
    def info() -> dict:
        return browser.info()

    @app.get("/api/records", summary="A page of records, optionally only those passing the filters")
    def records(filters: Filters = Depends(_query_filters), offset: int = Query(0, ge=0, le=MAX_ID),
                limit: int = Query(60, ge=1, le=500),
                folder: Optional[str] = Query(None, description="only files in this folder or below it, named as "
                                              "/api/info's folders name it (relative to the library's root)")) -> dict:
        return browser.records(filters, offset, limit, folder or None)

    @app.get("/api/records/{image_id}", summary="One record: classes, boxes, prediction")
    def record(image_id: int = record_id) -> dict:
        return browser.record(image_id)

    @app.get("/api/records/{image_id}/image", summary="The record's full image (optionally with its boxes drawn)")
    def image(image_id: int = record_id, overlay: bool = False):
        if overlay:
            return Response(browser.overlay_jpeg(image_id), **jpeg)
        path = browser.image_file(image_id)
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    @app.get("/api/records/{image_id}/thumb", summary="Thumbnail of the whole image (JPEG)")
    def thumb(image_id: int = record_id):
        return Response(browser.thumb(image_id), **jpeg)

    @app.get("/api/records/{image_id}/crop", summary="Crop of the record's box: predicted, else ground truth (JPEG)")
    def crop_(image_id: int = record_id):
        return Response(browser.crop(image_id), **jpeg)

    @app.get("/api/boxes/{box_id}/crop", summary="Crop of one box of the objects index: what an object search matched (JPEG)")
    def box_crop(box_id: int = PathParam(..., ge=0, le=MAX_ID, description="box id (a match's object_id)")):
        return Response(browser.box_crop(box_id), **jpeg)

    def searched_by_id(id: int = Query(..., ge=0, le=MAX_ID, description="record id"),
                       k: int = Query(config.default_k, ge=1, le=config.max_k),
                       filters: Filters = Depends(_query_filters),
                       box: Optional[str] = Query(None, description="xmin,ymin,xmax,ymax in the record's pixels: "
                                                  "searches the objects index when it has objects (mode objects), "
                                                  "else the crop (mode crop)"),
                       objects: bool = Query(False, description="search with the record's own objects"),
                       include_training: bool = Query(False, description=INCLUDE_TRAINING_HELP)) -> dict:
        return browser.search_id(id, k, filters, box or None, objects, include_training)

    async def searched_upload(file: UploadFile = File(..., description="an image file"),
                              k: int = Form(config.default_k, ge=1, le=config.max_k),
                              label: Optional[str] = Form(None, description=FILTER_HELP["label"]),
                              min_box_area: Optional[float] = Form(None, description=FILTER_HELP["min_box_area"]),
                              min_score: Optional[float] = Form(None, description=FILTER_HELP["min_score"]),
                              under: list[str] = Form([], description=FILTER_HELP["under"]),
                              not_under: list[str] = Form([], description=FILTER_HELP["not_under"]),
                              dataset: list[str] = Form([], description=FILTER_HELP["dataset"]),
                              not_dataset: list[str] = Form([], description=FILTER_HELP["not_dataset"]),
                              tag: Optional[str] = Form(None, description=FILTER_HELP["tag"]),
                              name: Optional[str] = Form(None, description=FILTER_HELP["name"]),
                              orientation: Optional[str] = Form(None, description=FILTER_HELP["orientation"]),
                              box: Optional[str] = Form(None, description="xmin,ymin,xmax,ymax in the image's pixels"),
                              objects: bool = Form(False, description="search with the image's own objects"),
                              include_training: bool = Form(False, description=INCLUDE_TRAINING_HELP)) -> dict:
        filters = _filters(label, min_box_area, min_score, under, not_under, dataset, not_dataset, tag, name,
                           orientation)
        data = await file.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            raise HTTPException(413, f"upload too large: the limit is {config.max_upload_bytes // (1024 * 1024)} MB")
        return await run_in_threadpool(browser.search_upload, data, k, filters, box or None, file.filename, objects,
                                       include_training)

    @app.get("/api/search", summary="Neighbours of a record (or of a region of it)")
    def search(result: dict = Depends(searched_by_id)) -> dict:
        return result

    @app.post("/api/search", summary="Neighbours of an uploaded image (or of a region of it)")
    async def search_upload(result: dict = Depends(searched_upload)) -> dict:
        return result

    def zipped(result: dict, name: str, asked: dict) -> StreamingResponse:
        return StreamingResponse(browser.export(result, asked), media_type="application/zip",
                                 headers={"Content-Disposition": f'attachment; filename="{name}"',
                                          "Cache-Control": "no-store"})

    @app.get("/api/export", summary="The neighbours of a record as a ZIP: their image files and results.csv",
             response_class=StreamingResponse)
    def export(request: Request, result: dict = Depends(searched_by_id)):
        return zipped(result, f"simsearch-id{result['query']['id']}.zip", _asked(request.query_params.multi_items()))

    @app.post("/api/export", summary="The neighbours of an uploaded image as a ZIP: their image files and results.csv",
              response_class=StreamingResponse)
    async def export_upload(request: Request, result: dict = Depends(searched_upload)):
        form = await request.form()  # parsed once already for the search; Starlette keeps it
        fields = [(key, value if isinstance(value, str) else getattr(value, "filename", "") or "")
                  for key, value in form.multi_items()]
        return zipped(result, "simsearch-results.zip", _asked(fields))

    # Oversized bodies are refused before FastAPI parses (and spools) them.
    app.add_middleware(UploadCap, limit=config.max_upload_bytes)
    if config.token:
        app.add_middleware(TokenGate, token=config.token)  # outermost: nothing is read before the token is checked
    return app


def run(index_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
        config: ServeConfig = ServeConfig(), log_level: str = "warning", sock: socket.socket | None = None,
        announce: Callable[[], None] | None = None) -> None:
    """Serve the app with uvicorn until interrupted (localhost only unless `host` says otherwise).

    The port is bound first (or `sock`, from `bind`, is used): a port in use fails at once.
    `announce` runs once the index has opened, so "serving ..." is never said of a folder that fails.
    """
    import uvicorn

    sock = sock or bind(host, port)
    try:
        app = create_app(index_dir, config)
        if announce is not None:
            announce()
        log.info("serving %s on http://%s:%d", index_dir, host, port)
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()
