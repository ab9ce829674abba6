"""Read: find the images under a folder and their ground-truth boxes.

Three layouts are understood, and one folder may mix them:
- Pascal VOC year folders (`JPEGImages/`, `Annotations/*.xml`, `ImageSets/Main/*.txt`),
  alone or under a `VOCdevkit/`;
- box-list datasets (`images/` beside `ground-truth/NAME.txt`, one
  `class left top right bottom` a line: the export format of many labelling tools);
- any other image, read as a plain photo with no boxes.

Reading never stops on a bad file: broken annotations are returned as `Skipped`
entries so the build can record and report them.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import stat
import threading
import warnings
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass, replace
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from simsearch.errors import BadInputError, ImageTooLargeError, NotFoundError, SimsearchError
from simsearch.records import GroundTruthObject, ImageRecord, Skipped

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VOC_SPLITS = ("train", "val", "test")  # preferred over "trainval", which only says "not test"
# Pixels decoded at most for one image: a 64 MP photo (a 61 MP full-frame camera's) decodes to
# ~190 MB of RGB; a few-hundred-KB PNG declaring 19000x19000 would cost gigabytes, and is refused
# from its header before a pixel is decoded. JPEGs count the pixels of their draft (reduced) decode.
DEFAULT_MAX_PIXELS = 64_000_000
# open_image checks every header against its own `max_pixels`, which users may raise; PIL's
# global guard would overrule them, so it is off.
Image.MAX_IMAGE_PIXELS = None


def file_sha256(path: str | os.PathLike) -> str:
    """Content identity: what incremental builds and query self-exclusion compare."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ScanResult:
    records: list[ImageRecord]
    skipped: list[Skipped]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def unreadable_reason(path: Path) -> str | None:
    """Why `path` cannot be read as an image file (None: a regular file we may open).

    Only regular files are ever opened: a FIFO blocks a reader forever, a link to
    /dev/zero never ends, and a folder named `x.jpg` is not a file at all.
    """
    try:
        info = os.stat(path)  # follows links: a link to a regular file is fine
    except FileNotFoundError:
        return "broken link (its target does not exist)" if os.path.islink(path) else "vanished while scanning"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISDIR(info.st_mode):
        return "a folder, not an image file"
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode) or \
            stat.S_ISBLK(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "not a regular file"
        return f"{kind}, not an image file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def fit_box(coords: Sequence[float], width: float | None = None, height: float | None = None
            ) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """A box clipped to the image, or (None, why) when nothing usable is left of it.

    Negative and out-of-image coordinates are clipped (labelling tools overshoot by a
    pixel or two); NaN, infinite, inverted and empty boxes are dropped with a reason.
    """
    x0, y0, x1, y1 = (float(v) for v in coords)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None, "a coordinate is not a finite number"
    if x1 < x0 or y1 < y0:
        return None, "inverted box (max < min)"
    x0, y0 = max(0.0, x0), max(0.0, y0)
    if width is not None and height is not None:
        x1, y1 = min(float(width), x1), min(float(height), y1)
    if x1 <= x0 or y1 <= y0:
        return None, "empty box, or no part of it inside the image"
    return (x0, y0, x1, y1), None


def fit_objects(objects: Sequence[GroundTruthObject], width: float | None = None, height: float | None = None
                ) -> tuple[list[GroundTruthObject], list[str]]:
    """`objects` with each box fitted to the image (see `fit_box`), and why any were dropped."""
    kept: list[GroundTruthObject] = []
    problems: list[str] = []
    for obj in objects:
        box, why = fit_box((obj.xmin, obj.ymin, obj.xmax, obj.ymax), width, height)
        if box is None:
            coords = ", ".join(f"{v:g}" for v in (obj.xmin, obj.ymin, obj.xmax, obj.ymax))
            problems.append(f"box {obj.label!r} ({coords}) dropped: {why}")
        elif box != (obj.xmin, obj.ymin, obj.xmax, obj.ymax):
            kept.append(replace(obj, xmin=box[0], ymin=box[1], xmax=box[2], ymax=box[3]))
        else:
            kept.append(obj)
    return kept, problems


def open_image(path: str | os.PathLike | BinaryIO,
               draft: Callable[[int, int], tuple[int, int]] | None = None,
               max_pixels: int | None = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> Image.Image:
    """Decode an image as upright 8-bit RGB, whatever its mode or EXIF orientation.

    Raises BadInputError for anything that is not a fully decodable image (truncated,
    not an image, a decompression bomb, a plugin choking on hostile bytes), so a bad
    file is one skipped item for the caller, never a crash.

    `draft` maps the file's stored (width, height) to the smallest size the caller
    needs; JPEGs then decode at 1/2, 1/4 or 1/8 scale when that still covers it,
    several times faster than a full decode that is shrunk anyway. The image is then
    smaller than the file: `image.info["full_size"]` always holds the full upright size.

    `max_pixels` is checked against the header before any pixel is decoded (after the
    draft scale, so a large JPEG that decodes small is fine): memory stays bounded
    whatever the file claims. `name` names an in-memory file in messages.
    """
    label = name or path
    try:
        with _quiet(), Image.open(path) as im:
            width, height = im.size
            rotated = im.format in ("JPEG", "MPO", "TIFF", "WEBP") and im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            full_size = (height, width) if rotated else (width, height)
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", draft(width, height))
            if max_pixels and im.size[0] * im.size[1] > max_pixels:
                raise ImageTooLargeError(
                    f"{label}: {width}x{height} pixels ({width * height / 1e6:.0f} MP) is over the limit of "
                    f"{max_pixels / 1e6:.0f} MP; pass --max-pixels to allow larger images")
            im.load()  # force the full decode now: truncated files fail here, not later
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            im.info["full_size"] = full_size
            return im
    except SimsearchError:
        raise
    except FileNotFoundError as e:
        raise NotFoundError(f"{label}: no such image file") from e
    except MemoryError as e:
        raise BadInputError(f"{label}: not enough memory to decode this image") from e
    except UnidentifiedImageError as e:
        raise BadInputError(f"{label}: cannot decode image (not an image, or a format Pillow cannot read)") from e
    except Exception as e:  # noqa: BLE001 - PIL's plugins raise many types on hostile bytes; all mean "unusable"
        detail = str(e).replace(str(path), str(label)) if isinstance(path, (str, os.PathLike)) else str(e)
        raise BadInputError(f"{label}: cannot decode image ({type(e).__name__}: {detail})") from e


@contextmanager
def _quiet() -> Iterator[None]:
    """PIL warns on stderr about odd EXIF and the like while opening: never the user's business.

    `catch_warnings` swaps the process's filter list, which is not safe from several threads at
    once (decode threads, the app's request threads): one could restore another's "ignore" for
    good. Off the main thread only Pillow's own warnings are silenced, by the filter below.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# Set once on import, so that every thread's catch_warnings saves and restores it with the rest.
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent areas become white, as a viewer would show them, not black.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode == "I;16" or im.mode == "I":
        return im.point(lambda v: v / 256).convert("L").convert("RGB")
    return im.convert("RGB")


def scan(root: str | os.PathLike) -> ScanResult:
    """Find every usable image below `root`, reading VOC and box-list annotations.

    Links are followed, but each real folder is read once (a link back to a parent
    would otherwise loop forever) and each file is listed once however many links
    reach it. Anything that is not a regular file is reported as skipped, not opened.
    """
    root = Path(root)
    if not root.exists():
        raise NotFoundError(f"{root}: no such folder. Give a VOC year folder, a VOCdevkit/ or a folder of images.")
    if root.is_file():
        if is_image_file(root):
            return ScanResult([ImageRecord(root.resolve(), "folder", root.parent.name)], [])
        raise BadInputError(f"{root}: not a folder or an image. Give a folder of images or a VOC folder.")

    records: list[ImageRecord] = []
    skipped: list[Skipped] = []
    claimed: set[Path] = set()  # dataset folders whose images were read with their annotations

    for here, dirnames, _ in _walk(root, skipped):
        if _is_voc_year(here):
            result = read_voc_year(here)
        elif _is_box_dataset(here):
            result = read_box_dataset(here)
        else:
            continue
        records += result.records
        skipped += result.skipped
        claimed.add(here.resolve())
        dirnames[:] = []  # a dataset's own subfolders (segmentation masks etc.) are not photos

    for here, dirnames, filenames in _walk(root, None):
        if here.resolve() in claimed:
            dirnames[:] = []
            continue
        for name in sorted(filenames):
            path = here / name
            if not is_image_file(path) or name.startswith("."):
                continue
            why = unreadable_reason(path)
            if why:
                skipped.append(Skipped(path.absolute(), why))
            else:
                records.append(ImageRecord(path.resolve(), "folder", root.resolve().name))

    records = _one_per_file(records)
    records.sort(key=lambda r: str(r.path))
    log.info("scanned %s: %d images, %d skipped", root, len(records), len(skipped))
    return ScanResult(records, skipped)


def _walk(root: Path, skipped: list[Skipped] | None) -> Iterator[tuple[Path, list[str], list[str]]]:
    """os.walk following links, each real folder once; unreadable folders go to `skipped`."""
    seen: set[tuple[int, int]] = set()

    def failed(error: OSError) -> None:
        if skipped is not None and error.filename:
            skipped.append(Skipped(Path(error.filename).absolute(), f"folder cannot be read ({error.strerror})"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=failed):
        try:
            info = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen:  # reached again through a link: already read
            dirnames[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield Path(dirpath), dirnames, filenames


def _one_per_file(records: list[ImageRecord]) -> list[ImageRecord]:
    """The first record of each resolved path: two links to one file are one image."""
    seen: set[Path] = set()
    unique = []
    for record in records:
        if record.path not in seen:
            seen.add(record.path)
            unique.append(record)
    return unique


def _is_voc_year(folder: Path) -> bool:
    return (folder / "JPEGImages").is_dir() and (folder / "Annotations").is_dir()


def _is_box_dataset(folder: Path) -> bool:
    return (folder / "images").is_dir() and (folder / "ground-truth").is_dir()


def read_voc_year(folder: str | os.PathLike) -> ScanResult:
    """Read one VOC year folder: every JPEG, its XML objects and its split."""
    folder = Path(folder)
    splits = _voc_splits(folder)
    return _read_dataset(folder / "JPEGImages", lambda stem: folder / "Annotations" / f"{stem}.xml",
                         parse_voc_xml, "voc", folder.name, splits)


def _read_dataset(images: Path, annotation_of: Callable[[str], Path],
                  parse: Callable[..., list[GroundTruthObject]], source: str, dataset: str,
                  splits: dict[str, str]) -> ScanResult:
    """Every image file of `images` with the objects of its annotation file.

    A broken annotation costs only its boxes (the image is still indexed), a bad box
    only itself; both are reported, without repeating the path in the reason.
    """
    records: list[ImageRecord] = []
    skipped: list[Skipped] = []
    try:
        entries = sorted(images.iterdir())
    except OSError as e:
        return ScanResult([], [Skipped(images.absolute(), f"folder cannot be read ({e.strerror or e})")])
    for path in entries:
        if not is_image_file(path) or path.name.startswith("."):
            continue
        why = unreadable_reason(path)
        if why:
            skipped.append(Skipped(path.absolute(), why))
            continue
        listing = annotation_of(path.stem)
        objects: list[GroundTruthObject] = []
        problems: list[str] = []
        if os.path.lexists(listing):
            why = unreadable_reason(listing)
            try:
                if why:
                    raise BadInputError(f"{listing}: {why}")
                objects = parse(listing, problems)
            except BadInputError as e:
                # The image is still worth indexing; only its boxes are lost, and that is reported.
                problems = [_without_path(str(e), listing)]
        if problems:
            skipped.append(Skipped(listing.absolute(), "; ".join(problems)))
        records.append(ImageRecord(path.resolve(), source, dataset, splits.get(path.stem), objects,
                                   listing.absolute() if objects or problems else None))
    return ScanResult(records, skipped)


def _without_path(message: str, path: Path) -> str:
    """A reason as printed beside its path: without the path a second time."""
    return message.removeprefix(f"{path}: ")


def _voc_splits(folder: Path) -> dict[str, str]:
    """Map image id -> split, from ImageSets/Main; absent files simply mean unknown split."""
    main = folder / "ImageSets" / "Main"
    splits: dict[str, str] = {}
    for split in ("trainval", *VOC_SPLITS):  # specific splits override "trainval"
        listing = main / f"{split}.txt"
        if listing.is_file():
            for line in listing.read_text(errors="replace").splitlines():
                parts = line.split()
                if parts:
                    splits[parts[0]] = split
    return splits


def parse_voc_xml(path: str | os.PathLike, problems: list[str] | None = None) -> list[GroundTruthObject]:
    """Parse a VOC annotation, tolerating empty tags and float coordinates.

    An object with a bad box (non-numeric, NaN, inverted) is left out and described
    in `problems` when given; only an unreadable or malformed file raises.
    """
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError, ValueError) as e:
        raise BadInputError(f"{path}: broken VOC XML ({e})") from e
    objects = []
    for number, obj in enumerate(tree.getroot().iter("object"), 1):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            continue
        values = [box.findtext(tag) or "" for tag in ("xmin", "ymin", "xmax", "ymax")]
        fitted = _box_or_problem(values, f"object {number} ({name!r})", problems)
        if fitted is None:
            continue
        objects.append(
            GroundTruthObject(name, *fitted, difficult=_flag(obj, "difficult"), truncated=_flag(obj, "truncated"))
        )
    return objects


def _box_or_problem(values: Sequence[str], where: str, problems: list[str] | None
                    ) -> tuple[float, float, float, float] | None:
    """The box these four texts give, fitted (see `fit_box`), or None with the reason added to `problems`."""
    try:
        coords = [float(v.strip()) for v in values]
    except ValueError:
        _problem(problems, f"{where} dropped: non-numeric box {[v[:20] for v in values]!r}")
        return None
    fitted, why = fit_box(coords)
    if fitted is None:
        _problem(problems, f"{where} dropped: {why}")
    return fitted


def _problem(problems: list[str] | None, text: str) -> None:
    if problems is not None:
        problems.append(text)
    log.info(text)


def _flag(obj: ET.Element, tag: str) -> bool:
    text = (obj.findtext(tag) or "").strip()
    try:
        return bool(int(float(text)))
    except ValueError:
        return False  # empty tag (<truncated/>) means "not marked"


def read_box_dataset(folder: str | os.PathLike) -> ScanResult:
    """Read an `images/` + `ground-truth/NAME.txt` dataset (`class left top right bottom`)."""
    folder = Path(folder)
    return _read_dataset(folder / "images", lambda stem: folder / "ground-truth" / f"{stem}.txt",
                         parse_box_list, "boxes", folder.name, {})


def parse_box_list(path: str | os.PathLike, problems: list[str] | None = None) -> list[GroundTruthObject]:
    """Parse `class left top right bottom` lines; class names may contain spaces.

    A bad line (too short, non-numeric, NaN, inverted box) is left out and described
    in `problems` when given; the other lines still count.
    """
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        raise BadInputError(f"{path}: cannot read box list ({e.strerror or e})") from e
    objects = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 5:
            _problem(problems, f"line {number} dropped: expected 'class left top right bottom', got {line[:80]!r}")
            continue
        fitted = _box_or_problem(parts[-4:], f"line {number}", problems)
        if fitted is None:
            continue
        objects.append(GroundTruthObject(" ".join(parts[:-4]), *fitted))
    return objects
