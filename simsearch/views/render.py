"""Pictures of records: box crops, cached thumbnails and box overlays.

A record's *box* is what a person would want to see of it: the localizer's
predicted box when it has one, else the largest ground-truth box, else the whole
image. Thumbnails and crops are small JPEGs cached under `INDEX/thumbs/`, keyed
by the file's sha256 and the box, so a changed file or a new prediction never
shows a stale picture.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from simsearch.pipeline.read import DEFAULT_MAX_PIXELS, open_image
from simsearch.records import GroundTruthObject, ObjectMatch, Prediction, Record
from simsearch.storage import layout

log = logging.getLogger(__name__)

THUMB_SIZE = 256  # longest side, pixels: sharp on a high-DPI card 128 px wide
JPEG_QUALITY = 85
GT_COLOUR = (220, 30, 30)  # ground truth: red, as in the seed's figures
PRED_COLOUR = (30, 90, 230)  # prediction: blue


@dataclass(frozen=True)
class Box:
    """A rectangle in image pixels, and where it came from."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float
    label: str = ""
    source: str = "image"  # "predicted", "ground truth" or "image" (the whole picture)

    @property
    def area(self) -> float:
        return max(0.0, self.xmax - self.xmin) * max(0.0, self.ymax - self.ymin)

    def clipped(self, width: int, height: int) -> "Box":
        x0, x1 = sorted((min(max(self.xmin, 0), width), min(max(self.xmax, 0), width)))
        y0, y1 = sorted((min(max(self.ymin, 0), height), min(max(self.ymax, 0), height)))
        return Box(x0, y0, x1, y1, self.label, self.source)


def _as_box(obj: GroundTruthObject | Prediction, source: str) -> Box:
    return Box(float(obj.xmin), float(obj.ymin), float(obj.xmax), float(obj.ymax), obj.label, source)


def record_box(record: Record) -> Box:
    """The box to show for a record: predicted, else largest ground truth, else the whole image."""
    if record.prediction is not None:
        box = _as_box(record.prediction, "predicted").clipped(record.width, record.height)
        if box.area > 0:
            return box
    boxes = [_as_box(o, "ground truth").clipped(record.width, record.height) for o in record.objects]
    boxes = [b for b in boxes if b.area > 0]
    if boxes:
        return max(boxes, key=lambda b: b.area)
    return Box(0, 0, record.width, record.height, "", "image")


def match_box(match: ObjectMatch, record: Record) -> Box:
    """The box an object search matched in `record`, clipped to it, named by its class (and its source)."""
    source = "ground truth" if match.source == "truth" else match.source
    box = Box(float(match.xmin), float(match.ymin), float(match.xmax), float(match.ymax), match.label or "", source)
    return box.clipped(record.width, record.height)


def record_class(record: Record) -> str:
    """One class name per record: the predicted label, else the largest ground-truth label, else ''."""
    if record.prediction is not None and record.prediction.label:
        return str(record.prediction.label)
    boxes = [_as_box(o, "ground truth") for o in record.objects]
    return max(boxes, key=lambda b: b.area).label if boxes else ""


def crop(image: Image.Image, box: Box, margin: float = 0.05) -> Image.Image:
    """The box's pixels with a little context around them (a tight crop hides the edges)."""
    w, h = image.size
    mx, my = (box.xmax - box.xmin) * margin, (box.ymax - box.ymin) * margin
    left, top = max(0, int(box.xmin - mx)), max(0, int(box.ymin - my))
    right, bottom = min(w, int(round(box.xmax + mx))), min(h, int(round(box.ymax + my)))
    if right - left < 1 or bottom - top < 1:
        return image.copy()
    return image.crop((left, top, right, bottom))


def thumbnail(image: Image.Image, size: int = THUMB_SIZE) -> Image.Image:
    im = image.copy()
    im.thumbnail((size, size), Image.BICUBIC, reducing_gap=3.0)
    return im


def jpeg_bytes(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def font(size: int):
    """A scalable font where Pillow has one: captions stay readable on large images."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def overlay(image: Image.Image, objects: Sequence[GroundTruthObject] = (), prediction: Prediction | None = None,
            width: int | None = None) -> Image.Image:
    """The image with ground-truth boxes in red and the predicted box in blue, each labelled.

    `image` may be a reduced decode: boxes (in full-size pixels) are scaled onto it.
    """
    im = image.convert("RGB").copy()
    draw = ImageDraw.Draw(im)
    line = width or max(2, round(max(im.size) / 250))
    label_font = font(max(12, round(max(im.size) / 40)))
    boxes = [(_as_box(o, "ground truth"), GT_COLOUR) for o in objects]
    if prediction is not None:
        label = f"{prediction.label} {prediction.score:.2f}".strip()
        boxes.append((replace(_as_box(prediction, "predicted"), label=label), PRED_COLOUR))
    full_w, full_h = im.info.get("full_size", im.size)
    sx, sy = im.width / full_w, im.height / full_h
    for box, colour in boxes:
        box = Box(box.xmin * sx, box.ymin * sy, box.xmax * sx, box.ymax * sy, box.label, box.source)
        if not all(math.isfinite(v) for v in (box.xmin, box.ymin, box.xmax, box.ymax)):
            continue  # nothing sensible to draw (and PIL would raise)
        box = box.clipped(*im.size)  # inverted or overshooting boxes from older indexes draw as what is visible
        if box.area <= 0:
            continue
        draw.rectangle((box.xmin, box.ymin, box.xmax, box.ymax), outline=colour, width=line)
        if box.label:
            x0, y0, x1, y1 = draw.textbbox((box.xmin + line, box.ymin + line), box.label, font=label_font)
            draw.rectangle((x0 - 2, y0 - 2, x1 + 2, y1 + 2), fill=colour)
            draw.text((box.xmin + line, box.ymin + line), box.label, fill=(255, 255, 255), font=label_font)
    return im


class Renderer:
    """Thumbnails and crops of one index's records, cached as JPEGs in INDEX/thumbs/.

    When the index folder is read-only the pictures are still made, just not kept.
    """

    def __init__(self, index_dir: str | os.PathLike, size: int = THUMB_SIZE,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.dir = Path(index_dir) / layout.THUMBS
        self.size = size
        self.max_pixels = max_pixels

    def _cached(self, name: str, make) -> bytes:
        path = self.dir / name
        try:
            return path.read_bytes()
        except OSError:
            pass
        data = jpeg_bytes(make())
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # readers never see half a file
        except OSError as e:
            log.debug("thumbnail cache not writable (%s); serving uncached", e)
        return data

    def thumb(self, record: Record) -> bytes:
        """The whole image, longest side `size` (JPEGs decode at a reduced scale that still covers it)."""
        key = record.sha256[:16]
        return self._cached(f"{record.id}-thumb{self.size}-{key}.jpg",
                            lambda: thumbnail(self.open(record, self._thumb_draft), self.size))

    def crop(self, record: Record, box: Box | None = None) -> bytes:
        """A box of the record (by default `record_box`), longest side `size`."""
        box = box or record_box(record)
        coords = f"{record.sha256}:{box.xmin:.1f},{box.ymin:.1f},{box.xmax:.1f},{box.ymax:.1f}"
        key = hashlib.sha1(coords.encode()).hexdigest()[:16]
        return self._cached(f"{record.id}-crop{self.size}-{key}.jpg",
                            lambda: thumbnail(crop(self.open(record), box), self.size))

    def open(self, record: Record, draft=None) -> Image.Image:
        """The record's file under the pixel limit; messages name the record and file, not its folder."""
        return open_image(record.path, draft=draft, max_pixels=self.max_pixels,
                          name=f"record {record.id} ({Path(record.path).name})")

    def _thumb_draft(self, width: int, height: int) -> tuple[int, int]:
        scale = self.size / max(width, height, 1)
        return max(1, int(width * scale)), max(1, int(height * scale))
