"""A small local web app to browse an index: upload or pick an image, see its neighbours.

`create_app(index_dir)` returns a FastAPI app: one plain HTML+JS page at `/`
(no build step) over a JSON API under `/api` (documented at `/docs`). Files are
only ever served by record id, from paths the index itself recorded; nothing the
client sends is used as a path. Uploads are capped in bytes and in pixels (413
above either cap); at most `decode_slots` images decode at once. No response
carries an absolute filesystem path. With `ServeConfig.token` set, every request
must carry the token (see `_TokenGate`); `run` binds the port before loading
anything, so a port in use is one clear error.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import io
import ipaddress
import logging
import math
import mimetypes
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from simsearch.storage import faiss_index
from simsearch.errors import (BadInputError, ImageTooLargeError, IndexBusyError, IndexDamagedError, NotFoundError,
                               SimsearchError)
from simsearch.search.searcher import Neighbour, Searcher
from simsearch.pipeline.read import DEFAULT_MAX_PIXELS, open_image
from simsearch.views.render import Renderer, jpeg_bytes, overlay, record_box
from simsearch.views.serve_ui import PAGE

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024  # bytes: a large phone photo, far below anything abusive
FILTER_POOL = 500  # neighbours fetched before a class filter is applied, so filtered lists still fill up
# A region search decodes JPEGs at a reduced scale that still leaves this many pixels a side (or the
# whole file when smaller): a box drawn on a 24 MP photo stays sharp at ~1/4 of the decode cost.
REGION_DECODE_SIDE = 2048
MAX_ID = 2**63 - 1  # SQLite's integer range: larger ids are refused by validation (422), never an overflow
TOKEN_COOKIE = "simsearch_token"


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
    # Shared secret required on every request when set (Bearer header, or ?token= on the page URL,
    # which sets a cookie for the page's own requests). The app has no other authentication: set
    # it whenever the app is reachable from other machines (a --host other than loopback).
    token: str | None = None


class _UploadCap:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413.

    A declared Content-Length over the limit is refused before anything is read;
    a body streamed without one is counted as it arrives and cut off at the limit.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen, over, started = 0, False, False

        async def counting_receive():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            nonlocal started
            if over:
                return  # the app's own error response is replaced by the 413 below
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            pass
        if over and not started:
            await self._refuse(send)

    async def _refuse(self, send):
        body = (f'{{"detail": "upload too large: the limit is {self.limit // (1024 * 1024)} MB; '
                f'send a smaller image"}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class Browser:
    """The library side of the app: searches and pictures, safe to call from worker threads."""

    def __init__(self, index_dir: str | os.PathLike, config: ServeConfig = ServeConfig()):
        self.index_dir = Path(index_dir)
        self.config = config
        self._lock = threading.RLock()  # one SQLite connection and one model, shared by request threads
        # Taken before `_lock` (never while holding it) around every full decode: with N slots, at
        # most N decoded images (each up to max_pixels) are in memory whatever the request rate.
        self._decode_slots = threading.BoundedSemaphore(max(1, config.decode_slots))
        self.searcher = self._open_searcher()
        self.renderer = Renderer(index_dir)

    def _open_searcher(self) -> Searcher:
        return Searcher(self.index_dir, device=self.config.device, weights=self.config.weights,
                        max_pixels=self.config.max_pixels)

    def _fresh(self) -> Searcher:
        """The searcher, reopened if a build changed the index since it was loaded."""
        if self.searcher.store.generation != self.searcher.loaded_generation:
            self.searcher.close()
            self.searcher = self._open_searcher()
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
            store = self._fresh().store
            summary = store.summary()
            spec = store.spec
            labels = dict(summary["labels"])
            if store.db["predictions"].exists():
                for r in store.db.query("SELECT label, count(*) AS n FROM predictions GROUP BY label"):
                    labels.setdefault(r["label"], 0)
            return {"index": self.name, "images": summary["images"], "objects": summary["objects"],
                    "labels": sorted(labels), "backbone": spec.embedder.backbone, "index_type": spec.index_type,
                    "max_upload_bytes": self.config.max_upload_bytes, "max_pixels": self.config.max_pixels}

    def record(self, image_id: int) -> dict:
        with self._lock:
            searcher = self._fresh()
            searcher.store.image(image_id)  # NotFoundError with its hint when the id is unknown
            neighbour = searcher.describe([(image_id, 1.0)])[0]
        return self._public(neighbour)

    def records(self, label: str | None = None, offset: int = 0, limit: int = 60) -> dict:
        """A page of records (id order), optionally only those of one class."""
        with self._lock:
            searcher = self._fresh()
            if label:
                ids = sorted(searcher.store.ids_with_label(label))
            else:
                ids = [r[0] for r in searcher.store.db.execute("SELECT id FROM images ORDER BY id")]
            page = ids[offset:offset + limit]
            described = searcher.describe([(i, 1.0) for i in page])
        return {"total": len(ids), "offset": offset, "records": [self._public(n) for n in described]}

    def _row(self, image_id: int) -> dict:
        with self._lock:
            return self._fresh().store.image(image_id)

    def image_file(self, image_id: int) -> Path:
        """The record's own file: the only way a path reaches the client's response."""
        path = Path(self._row(image_id)["path"])
        if not path.is_file():
            raise NotFoundError(f"record {image_id}: its file {path.name} is gone; rebuild with --prune")
        return path

    def overlay_jpeg(self, image_id: int) -> bytes:
        neighbour = self._describe_one(image_id)
        path = self.image_file(image_id)
        with self._decode_slots:
            image = self._open_record_file(image_id, path)
            return jpeg_bytes(overlay(image, neighbour.objects, neighbour.prediction))

    def _open_record_file(self, image_id: int, path: Path, draft=None) -> Image.Image:
        """An index file decoded under the pixel limit; messages name the record, not the file's folder."""
        try:
            with _named({"id": image_id, "path": str(path)}):
                return open_image(path, draft=draft, max_pixels=self.config.max_pixels)
        except ImageTooLargeError as e:
            raise ImageTooLargeError(_too_large(e, "serve --max-pixels is below this index's images")) from None

    def thumb(self, image_id: int) -> bytes:
        row = self._row(image_id)
        with self._decode_slots, _named(row):
            return self.renderer.thumb(row)

    def crop(self, image_id: int) -> bytes:
        row = self._row(image_id)
        n = self._describe_one(image_id)
        with self._decode_slots, _named(row):
            return self.renderer.crop(row, record_box(n.objects, n.prediction, row["width"], row["height"]))

    def _describe_one(self, image_id: int) -> Neighbour:
        with self._lock:
            found = self._fresh().describe([(image_id, 1.0)])
        if not found:
            raise NotFoundError(f"no record with id {image_id}")
        return found[0]

    # ------------------------------------------------------------ search

    def search_id(self, image_id: int, k: int, label: str | None = None, box: str | None = None) -> dict:
        """Neighbours of a record, or of a region of it when `box` is given."""
        row = self._row(image_id)
        query = {"id": image_id, "path_name": Path(row["path"]).name, "width": row["width"], "height": row["height"]}
        if box:
            path = self.image_file(image_id)
            with self._decode_slots:
                image = self._open_record_file(image_id, path, draft=_region_draft)
                region, image = _crop_region(image, box)
                query["box"] = list(region)
                xq = self._embed(image)
            exclude: set[int] = set()  # a region's best match may well be its own image: keep it
        else:
            with self._lock:
                _, xq = self._fresh().store.vectors([image_id])
            exclude = self._same_file(row["sha256"])
        return {"query": query, "neighbours": self._neighbours(xq, k, label, exclude)}

    def search_upload(self, data: bytes, k: int, label: str | None = None, box: str | None = None,
                      name: str | None = None) -> dict:
        """Neighbours of an uploaded image, or of a region of it (`box` in the image's full-size pixels).

        `name` (the upload's file name) is what error messages call it. JPEGs decode at the
        smallest scale the search needs: the model's input for a whole image, a sharp
        REGION_DECODE_SIDE for a region.
        """
        name = _upload_name(name)
        if len(data) > self.config.max_upload_bytes:
            raise _UploadTooLarge(self.config.max_upload_bytes)
        if not data:
            raise BadInputError(f"{name}: the upload is empty; choose an image file")
        exclude = self._same_file(hashlib.sha256(data).hexdigest())  # the same file is no answer to itself
        with self._lock:
            whole = self._fresh().spec.embedder.preprocess.input_size
        with self._decode_slots:
            try:
                image = open_image(_NamedBytes(data, name), draft=_region_draft if box else whole,
                                   max_pixels=self.config.max_pixels, name=name)
            except ImageTooLargeError as e:
                raise ImageTooLargeError(_too_large(e, "send a smaller image")) from None
            width, height = image.info.get("full_size", image.size)
            query: dict = {"upload": True, "width": width, "height": height}
            if box:
                region, image = _crop_region(image, box)
                query["box"] = list(region)
                exclude = set()  # a region's best match may well be the uploaded file itself
            xq = self._embed(image)
            del image  # the decoded pixels go before the slot is given back
        return {"query": query, "neighbours": self._neighbours(xq, k, label, exclude)}

    def _embed(self, image: Image.Image) -> np.ndarray:
        with self._lock:
            return self._fresh().embedder.embed_images([image]).vectors[:1]

    def _same_file(self, sha256: str) -> set[int]:
        with self._lock:
            return self._fresh().store.ids_with_sha256(sha256)

    def _neighbours(self, xq: np.ndarray, k: int, label: str | None, exclude: set[int]) -> list[dict]:
        k = max(1, min(int(k), self.config.max_k))
        with self._lock:
            searcher = self._fresh()
            ntotal = searcher.index.ntotal
            wanted = min(ntotal, (max(FILTER_POOL, k * 20) if label else k) + len(exclude))
            scores, ids = faiss_index.search(searcher.index, np.ascontiguousarray(xq, dtype=np.float32), wanted)
            hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and int(i) not in exclude]
            if label:  # filter ids first: only the k kept are described
                keep = searcher.store.ids_with_label(label)
                hits = [h for h in hits if h[0] in keep]
            described = searcher.describe(hits[:k])
        return [self._public(n) for n in described]

    @staticmethod
    def _public(n: Neighbour) -> dict:
        """What the client sees of a record: no filesystem path beyond the file's name."""
        box = record_box(n.objects, n.prediction, n.width, n.height)
        return {
            "rank": n.rank, "id": n.id, "name": Path(n.path).name, "score": n.score,
            "width": n.width, "height": n.height, "split": n.split, "dataset": n.dataset,
            "classes": sorted({o["label"] for o in n.objects}), "objects": n.objects, "prediction": n.prediction,
            "box": {"xmin": box.xmin, "ymin": box.ymin, "xmax": box.xmax, "ymax": box.ymax,
                    "label": box.label, "source": box.source},
            "thumb_url": f"/api/records/{n.id}/thumb", "crop_url": f"/api/records/{n.id}/crop",
            "image_url": f"/api/records/{n.id}/image", "overlay_url": f"/api/records/{n.id}/image?overlay=true",
        }


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


class _named:
    """Context: errors from decoding a record's file name the record and file, never the file's folder."""

    def __init__(self, row: dict):
        self.row = row

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, SimsearchError) and self.row["path"] in str(error):
            name = f"record {self.row['id']} ({Path(self.row['path']).name})"
            message = str(error).replace(self.row["path"], name)
            try:
                renamed = type(error)(message)
            except TypeError:  # an error type with another constructor: keep its meaning as best we can
                renamed = NotFoundError(message) if isinstance(error, NotFoundError) else BadInputError(message)
            raise renamed from None
        return False


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


def _error_status(exc: SimsearchError) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, (_UploadTooLarge, ImageTooLargeError)):
        return 413
    if isinstance(exc, IndexBusyError):
        return 503
    if isinstance(exc, IndexDamagedError):
        return 500
    return 400


def create_app(index_dir: str | os.PathLike, config: ServeConfig = ServeConfig()):
    """The FastAPI app for one index (raises NotFoundError now if there is no index there)."""
    browser = Browser(index_dir, config)
    app = FastAPI(
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

    @app.get("/api/info", summary="What the index holds: counts, classes, backbone")
    def info() -> dict:
        return browser.info()

    @app.get("/api/records", summary="A page of records, optionally of one class")
    def records(label: Optional[str] = None, offset: int = Query(0, ge=0, le=MAX_ID),
                limit: int = Query(60, ge=1, le=500)) -> dict:
        return browser.records(label or None, offset, limit)

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

    @app.get("/api/search", summary="Neighbours of a record (or of a region of it)")
    def search(id: int = Query(..., ge=0, le=MAX_ID, description="record id"),
               k: int = Query(config.default_k, ge=1, le=config.max_k),
               label: Optional[str] = Query(None, description="keep only neighbours of this class"),
               box: Optional[str] = Query(None, description="xmin,ymin,xmax,ymax in the record's pixels")) -> dict:
        return browser.search_id(id, k, label or None, box or None)

    @app.post("/api/search", summary="Neighbours of an uploaded image (or of a region of it)")
    async def search_upload(file: UploadFile = File(..., description="an image file"),
                            k: int = Form(config.default_k, ge=1, le=config.max_k),
                            label: Optional[str] = Form(None),
                            box: Optional[str] = Form(None, description="xmin,ymin,xmax,ymax in the image's pixels")) -> dict:
        data = await file.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            raise HTTPException(413, f"upload too large: the limit is {config.max_upload_bytes // (1024 * 1024)} MB")
        return await run_in_threadpool(browser.search_upload, data, k, label or None, box or None, file.filename)

    # Oversized bodies are refused before FastAPI parses (and spools) them.
    app.add_middleware(_UploadCap, limit=config.max_upload_bytes)
    if config.token:
        app.add_middleware(_TokenGate, token=config.token)  # outermost: nothing is read before the token is checked
    return app


class _TokenGate:
    """ASGI middleware: every request must carry the token, else 401 JSON.

    Accepted as `Authorization: Bearer TOKEN` (scripts), as `?token=TOKEN` on any URL
    (the page's address: the response then sets an HttpOnly, SameSite=Strict cookie so
    the page's own fetches and <img> loads carry it), or as that cookie. The cookie holds
    an HMAC of the token, not the token. Comparisons take constant time.
    """

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()
        self.cookie = hmac.new(self.token, b"simsearch serve cookie", "sha256").hexdigest().encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        bearer = headers.get(b"authorization", b"")
        if bearer[:7].lower() == b"bearer " and hmac.compare_digest(bearer[7:].strip(), self.token):
            return await self.app(scope, receive, send)
        if hmac.compare_digest(_cookie(headers.get(b"cookie", b""), TOKEN_COOKIE.encode()), self.cookie):
            return await self.app(scope, receive, send)
        given = _query_token(scope.get("query_string", b""))
        if given is not None and hmac.compare_digest(given, self.token):
            cookie = (f"{TOKEN_COOKIE}={self.cookie.decode()}; Path=/; HttpOnly; SameSite=Strict").encode()

            async def send_with_cookie(message):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
                await send(message)

            return await self.app(scope, receive, send_with_cookie)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = (b'{"detail": "a token is required: open the page as /?token=TOKEN, or send the header '
                b'Authorization: Bearer TOKEN"}')
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def _cookie(header: bytes, name: bytes) -> bytes:
    for part in header.split(b";"):
        key, _, value = part.strip().partition(b"=")
        if key == name:
            return value.strip()
    return b""


def _query_token(query_string: bytes) -> bytes | None:
    from urllib.parse import parse_qs

    values = parse_qs(query_string.decode("latin-1")).get("token")
    return values[-1].encode() if values else None


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def exposure_warning(host: str, token: str | None) -> str | None:
    """What to tell the user who binds beyond loopback (None when `host` is loopback)."""
    if is_loopback(host):
        return None
    if token:
        return (f"warning: {host} is reachable from other machines; requests must carry the token, "
                "but it travels unencrypted (plain HTTP): use this on a trusted network only")
    return (f"warning: {host} is reachable from other machines and the app has no authentication: anyone who "
            "can reach the port can browse the index and its images; pass --token TOKEN "
            "(or set SIMSEARCH_TOKEN) to require one, or bind to 127.0.0.1")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn: a port in use is one clear BadInputError, before any loading."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # IPv4 first for a name such as localhost, as uvicorn binds it; an IPv6 literal finds only IPv6.
        family, kind, proto, _, address = sorted(found, key=lambda info: info[0] != socket.AF_INET)[0]
    except socket.gaierror as e:
        raise BadInputError(f"cannot listen on {host}: unknown host ({e.strerror}); pass --host") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse the port
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise BadInputError(f"port {port} on {host} is in use; pass --port") from None
        if e.errno == errno.EACCES:
            raise BadInputError(f"port {port} on {host} needs privileges this user lacks; pass --port above 1023") from None
        raise BadInputError(f"cannot listen on {host} port {port} ({e.strerror}); pass --host or --port") from None
    return sock


def run(index_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
        config: ServeConfig = ServeConfig(), log_level: str = "warning", sock: socket.socket | None = None) -> None:
    """Serve the app with uvicorn until interrupted (localhost only unless `host` says otherwise).

    The port is bound first (or `sock`, from `bind`, is used): a port in use fails at once.
    """
    import uvicorn

    sock = sock or bind(host, port)
    try:
        app = create_app(index_dir, config)
        log.info("serving %s on http://%s:%d", index_dir, host, port)
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()
