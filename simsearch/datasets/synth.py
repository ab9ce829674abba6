"""Composite generator: real object crops pasted onto real photos, written as a VOC folder with exact boxes.

With no internet there is no full VOC here, yet the localizer must be trained and
measured on real pixels. Crops come from every annotated box found under the
sources (VOC XML or box lists), backgrounds from the images there that carry no
boxes. Train and val composites use crops from disjoint source photos, so the
val score measures objects the head has never seen, not memorised crops.
Everything is drawn from one seeded generator: the same seed writes the same bytes.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from simsearch.errors import BadInputError
from simsearch.pipeline.read import open_image, scan
from simsearch.records import GroundTruthObject

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthConfig:
    """What to generate and from what."""

    out: Path  # VOC year folder to write (JPEGImages/, Annotations/, ImageSets/Main/)
    sources: tuple[Path, ...]  # folders scanned for annotated boxes (crops) and box-less photos (backgrounds)
    backgrounds: tuple[Path, ...] = ()  # folders of background photos; default: the box-less images in sources
    n: int = 2000  # composites to write
    seed: int = 0
    classes: tuple[str, ...] = ()  # classes to paste; default: the `top_classes` with most crops
    top_classes: int = 8
    min_crop_side: int = 24  # smaller boxes are too blurry once enlarged
    val_fraction: float = 0.2  # share of composites (and of each class's source photos) held out as val
    objects_per_image: int = 1  # >1 adds smaller distractor objects; the largest stays the target
    size_range: tuple[int, int] = (256, 384)  # output width range; height follows a random aspect
    scale_range: tuple[float, float] = (0.3, 0.85)  # target's longer side / image's matching side
    quality: int = 90  # JPEG quality


@dataclass
class Crop:
    label: str
    source: Path
    box: tuple[int, int, int, int]  # pixels of the source image


@dataclass
class SynthReport:
    out: str
    images: int
    train: int
    val: int
    classes: dict[str, int] = field(default_factory=dict)  # target class -> composites
    crops: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> {"train": n, "val": n} crops
    backgrounds: int = 0


def find_crops(sources: tuple[Path, ...], min_side: int) -> tuple[list[Crop], list[Path]]:
    """Every usable annotated box, and every box-less image (a background candidate)."""
    crops: list[Crop] = []
    plain: list[Path] = []
    for source in sources:
        result = scan(source)
        for record in result.records:
            if not record.objects:
                plain.append(record.path)
            for o in record.objects:
                box = _int_box(o)
                if not o.difficult and min(box[2] - box[0], box[3] - box[1]) >= min_side:
                    crops.append(Crop(o.label, record.path, box))
    return crops, plain


def _int_box(o: GroundTruthObject) -> tuple[int, int, int, int]:
    return int(round(o.xmin)), int(round(o.ymin)), int(round(o.xmax)), int(round(o.ymax))


def split_crops(crops: list[Crop], val_fraction: float, seed: int) -> dict[str, dict[str, list[Crop]]]:
    """Per class, hold out whole source photos until about val_fraction of its crops are val."""
    by_class: dict[str, dict[Path, list[Crop]]] = defaultdict(lambda: defaultdict(list))
    for crop in crops:
        by_class[crop.label][crop.source].append(crop)
    split: dict[str, dict[str, list[Crop]]] = {}
    for label in sorted(by_class):
        photos = sorted(by_class[label], key=lambda p: _stable_hash(f"{seed}:{label}:{p.name}"))
        total = sum(len(v) for v in by_class[label].values())
        val: list[Crop] = []
        train: list[Crop] = []
        for photo in photos:
            # At least one photo goes each way when a class has two or more photos.
            if (not val or len(val) < val_fraction * total) and len(photos) > 1 and photo != photos[-1]:
                val += by_class[label][photo]
            else:
                train += by_class[label][photo]
        split[label] = {"train": train, "val": val}
    return split


def _stable_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def generate(config: SynthConfig, progress: bool = True) -> SynthReport:
    """Write `config.n` composites under `config.out` and return what was made."""
    from tqdm import tqdm

    if config.n < 1:
        raise BadInputError("--n must be at least 1")
    if not 0 <= config.val_fraction < 1:
        raise BadInputError("--val-fraction must be in [0, 1)")
    crops, plain = find_crops(config.sources, config.min_crop_side)
    if not crops:
        raise BadInputError(
            f"no annotated boxes of at least {config.min_crop_side}px found under {', '.join(map(str, config.sources))}; "
            "give --sources folders holding VOC or box-list datasets")
    background_paths = sorted(_images_under(config.backgrounds)) if config.backgrounds else sorted(plain)
    if not background_paths:
        raise BadInputError("no background photos: give --backgrounds DIR, or sources with plain (box-less) photos")
    counts = Counter(c.label for c in crops)
    classes = list(config.classes) or [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:config.top_classes]
    unknown = [c for c in classes if c not in counts]
    if unknown:
        raise BadInputError(f"no crops of class {unknown}; classes with crops: {', '.join(sorted(counts))}")
    split = split_crops([c for c in crops if c.label in classes], config.val_fraction, config.seed)
    for label in classes:
        if not split[label]["val"] and config.val_fraction > 0:
            log.warning("class %s has crops from one photo only: its val composites reuse train crops", label)
            split[label]["val"] = split[label]["train"]

    out = Path(config.out)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    images: dict[Path, Image.Image] = {}  # sources decoded once, even for thousands of composites

    def load(path: Path) -> Image.Image:
        if path not in images:
            images[path] = open_image(path)
        return images[path]

    n_val = int(round(config.n * config.val_fraction))
    names = {"train": [], "val": []}
    made: Counter = Counter()
    for i in tqdm(range(config.n), desc="composites", unit="img", disable=not progress, dynamic_ncols=True):
        subset = "val" if i >= config.n - n_val else "train"
        name = f"{i:06d}"
        canvas, objects = _composite(rng, classes, split, subset, background_paths, load, config)
        tmp = out / "JPEGImages" / f".{name}.jpg.tmp"
        canvas.save(tmp, format="JPEG", quality=config.quality)
        os.replace(tmp, out / "JPEGImages" / f"{name}.jpg")
        _write_xml(out / "Annotations" / f"{name}.xml", name, canvas.size, objects, out.name)
        names[subset].append(name)
        made[objects[-1][0]] += 1
    for subset, listed in names.items():
        (out / "ImageSets" / "Main" / f"{subset}.txt").write_text("".join(f"{n}\n" for n in listed))
    return SynthReport(
        str(out), config.n, len(names["train"]), len(names["val"]), dict(sorted(made.items())),
        {c: {"train": len(split[c]["train"]), "val": len(split[c]["val"])} for c in classes},
        len(background_paths),
    )


def _images_under(folders: tuple[Path, ...]) -> list[Path]:
    found = []
    for folder in folders:
        found += [r.path for r in scan(folder).records]
    return found


def _composite(rng: random.Random, classes: list[str], split, subset: str, backgrounds: list[Path], load,
               config: SynthConfig) -> tuple[Image.Image, list[tuple[str, tuple[int, int, int, int]]]]:
    """One composite: distractors first, the target (largest, listed last) pasted on top."""
    width = rng.randint(*config.size_range)
    height = int(round(width * rng.uniform(0.7, 1.0)))
    canvas = _background(rng, load(rng.choice(backgrounds)), width, height)
    objects = []
    count = config.objects_per_image
    for k in range(count):
        target = k == count - 1
        label = rng.choice(classes)
        crop = rng.choice(split[label][subset])
        low, high = config.scale_range
        scale = rng.uniform(low, high) if target else rng.uniform(low * 0.4, low * 0.9)
        objects.append((label, _paste(rng, canvas, load(crop.source).crop(crop.box), scale)))
    return canvas, objects


def _background(rng: random.Random, photo: Image.Image, width: int, height: int) -> Image.Image:
    """A random region (at least half of each side) of a photo, maybe mirrored, resized to width x height."""
    w, h = photo.size
    cw = rng.randint(max(1, w // 2), w)
    ch = min(h, max(1, int(round(cw * height / width))))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    region = photo.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        region = region.transpose(Image.FLIP_LEFT_RIGHT)
    return region.resize((width, height), Image.BILINEAR)


def _paste(rng: random.Random, canvas: Image.Image, crop: Image.Image, scale: float) -> tuple[int, int, int, int]:
    """Paste `crop` so its longer side spans `scale` of the canvas; return its exact box."""
    cw, ch = crop.size
    W, H = canvas.size
    factor = scale / max(cw / W, ch / H)  # scale < 1, so the piece always fits
    w, h = max(1, int(round(cw * factor))), max(1, int(round(ch * factor)))
    piece = crop.resize((w, h), Image.BILINEAR)
    if rng.random() < 0.5:
        piece = piece.transpose(Image.FLIP_LEFT_RIGHT)
    x, y = rng.randint(0, W - w), rng.randint(0, H - h)
    canvas.paste(piece, (x, y))
    return x, y, x + w, y + h


def _write_xml(path: Path, name: str, size: tuple[int, int], objects, folder: str) -> None:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = f"{name}.jpg"
    ET.SubElement(root, "source").text = "simsearch.datasets.synth"
    s = ET.SubElement(root, "size")
    for tag, value in zip(("width", "height", "depth"), (*size, 3)):
        ET.SubElement(s, tag).text = str(value)
    for label, box in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = label
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        b = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(b, tag).text = str(value)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="unicode")
