"""Stage 1, read: find the images under a folder and their ground-truth boxes.

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
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps

from simsearch.errors import BadInputError, NotFoundError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VOC_SPLITS = ("train", "val", "test")  # preferred over "trainval", which only says "not test"
# Guards against decompression bombs without refusing real large photos.
Image.MAX_IMAGE_PIXELS = 200_000_000


def file_sha256(path: str | os.PathLike) -> str:
    """Content identity: what incremental builds and query self-exclusion compare."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class GroundTruthObject:
    """One annotated box, in pixels of the (EXIF-upright) image."""

    label: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: bool = False
    truncated: bool = False

    @property
    def area(self) -> float:
        return max(0.0, self.xmax - self.xmin) * max(0.0, self.ymax - self.ymin)


@dataclass
class ImageRecord:
    """An image found on disk, with whatever its dataset says about it."""

    path: Path
    source: str  # "voc", "boxes" or "folder"
    dataset: str  # e.g. "VOC2007", "indoor-boxes", or the scanned folder's name
    split: str | None = None
    objects: list[GroundTruthObject] = field(default_factory=list)


@dataclass(frozen=True)
class Skipped:
    """A file that could not be used, and why (recorded, reported, never fatal)."""

    path: Path
    reason: str


@dataclass
class ScanResult:
    records: list[ImageRecord]
    skipped: list[Skipped]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def open_image(path: str | os.PathLike, draft: Callable[[int, int], tuple[int, int]] | None = None) -> Image.Image:
    """Decode an image as upright 8-bit RGB, whatever its mode or EXIF orientation.

    Raises BadInputError for files PIL cannot fully decode (truncated, not an image),
    so callers can skip them without catching PIL's many exception types.

    `draft` maps the file's stored (width, height) to the smallest size the caller
    needs; JPEGs then decode at 1/2, 1/4 or 1/8 scale when that still covers it,
    several times faster than a full decode that is shrunk anyway. The image is then
    smaller than the file: `image.info["full_size"]` always holds the full upright size.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            rotated = im.format in ("JPEG", "MPO", "TIFF", "WEBP") and im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            full_size = (height, width) if rotated else (width, height)
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", draft(width, height))
            im.load()  # force the full decode now: truncated files fail here, not later
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            im.info["full_size"] = full_size
            return im
    except FileNotFoundError as e:
        raise NotFoundError(f"{path}: no such image file") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadInputError(f"{path}: cannot decode image ({e})") from e


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
    """Find every usable image below `root`, reading VOC and box-list annotations."""
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

    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        here = Path(dirpath)
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

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if here.resolve() in claimed:
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = here / name
            if is_image_file(path) and not name.startswith("."):
                records.append(ImageRecord(path.resolve(), "folder", root.resolve().name))

    records.sort(key=lambda r: str(r.path))
    log.info("scanned %s: %d images, %d skipped", root, len(records), len(skipped))
    return ScanResult(records, skipped)


def _is_voc_year(folder: Path) -> bool:
    return (folder / "JPEGImages").is_dir() and (folder / "Annotations").is_dir()


def _is_box_dataset(folder: Path) -> bool:
    return (folder / "images").is_dir() and (folder / "ground-truth").is_dir()


def read_voc_year(folder: str | os.PathLike) -> ScanResult:
    """Read one VOC year folder: every JPEG, its XML objects and its split."""
    folder = Path(folder)
    splits = _voc_splits(folder)
    records: list[ImageRecord] = []
    skipped: list[Skipped] = []
    for path in sorted((folder / "JPEGImages").iterdir()):
        if not is_image_file(path):
            continue
        xml = folder / "Annotations" / f"{path.stem}.xml"
        objects: list[GroundTruthObject] = []
        if xml.exists():
            try:
                objects = parse_voc_xml(xml)
            except BadInputError as e:
                # The image is still worth indexing; only its boxes are lost, and that is reported.
                skipped.append(Skipped(xml.resolve(), str(e)))
        records.append(ImageRecord(path.resolve(), "voc", folder.name, splits.get(path.stem), objects))
    return ScanResult(records, skipped)


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


def parse_voc_xml(path: str | os.PathLike) -> list[GroundTruthObject]:
    """Parse a VOC annotation, tolerating empty tags and float coordinates."""
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as e:
        raise BadInputError(f"{path}: broken VOC XML ({e})") from e
    objects = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            continue
        try:
            coords = [float((box.findtext(tag) or "").strip()) for tag in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as e:
            raise BadInputError(f"{path}: object {name!r} has a non-numeric box ({e})") from e
        objects.append(
            GroundTruthObject(name, *coords, difficult=_flag(obj, "difficult"), truncated=_flag(obj, "truncated"))
        )
    return objects


def _flag(obj: ET.Element, tag: str) -> bool:
    text = (obj.findtext(tag) or "").strip()
    try:
        return bool(int(float(text)))
    except ValueError:
        return False  # empty tag (<truncated/>) means "not marked"


def read_box_dataset(folder: str | os.PathLike) -> ScanResult:
    """Read an `images/` + `ground-truth/NAME.txt` dataset (`class left top right bottom`)."""
    folder = Path(folder)
    records: list[ImageRecord] = []
    skipped: list[Skipped] = []
    for path in sorted((folder / "images").iterdir()):
        if not is_image_file(path):
            continue
        listing = folder / "ground-truth" / f"{path.stem}.txt"
        objects: list[GroundTruthObject] = []
        if listing.exists():
            try:
                objects = parse_box_list(listing)
            except BadInputError as e:
                skipped.append(Skipped(listing.resolve(), str(e)))
        records.append(ImageRecord(path.resolve(), "boxes", folder.name, None, objects))
    return ScanResult(records, skipped)


def parse_box_list(path: str | os.PathLike) -> list[GroundTruthObject]:
    """Parse `class left top right bottom` lines; class names may contain spaces."""
    objects = []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 5:
            raise BadInputError(f"{path}:{number}: expected 'class left top right bottom', got {line!r}")
        try:
            coords = [float(v) for v in parts[-4:]]
        except ValueError as e:
            raise BadInputError(f"{path}:{number}: non-numeric box in {line!r}") from e
        objects.append(GroundTruthObject(" ".join(parts[:-4]), *coords))
    return objects
