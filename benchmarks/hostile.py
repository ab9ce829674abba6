"""Generated inputs for the fault campaign: good images, box datasets, and a folder of hostile files.

Importable by tests and benchmarks alike (no simsearch import here): everything is
made with PIL, numpy and the standard library, offline, from a seed.

    from hostile import shape_folder, box_dataset, write_hostile_folder, bomb_png

`write_hostile_folder` returns one `Input` per hostile thing it wrote, each with
what a build must do with it (`expect`): be indexed exactly once, be skipped and
listed in `simsearch info`'s skipped files, either of the two, or (for
annotations) index the image and keep only finite boxes inside it.
"""
from __future__ import annotations

import functools
import os
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
SIZE = (224, 224)  # one input shape: the model compiles once per shape, so builds stay quick


# ---------------------------------------------------------------- good images

def shape_image(rng: random.Random, size: tuple[int, int] = SIZE, mode: str = "RGB"
                ) -> tuple[Image.Image, str, tuple[int, int, int, int]]:
    """A random background with clutter and one main shape: (image, its class, its box l, t, r, b)."""
    w, h = size
    im = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 6)):  # small clutter: every file's bytes differ
        x, y = rng.randint(0, w - 8), rng.randint(0, h - 8)
        draw.rectangle([x, y, x + rng.randint(3, 12), y + rng.randint(3, 12)],
                       fill=tuple(rng.randint(0, 255) for _ in range(3)))
    label = rng.choice(CLASSES)
    bw, bh = rng.randint(w // 4, w * 2 // 3), rng.randint(h // 4, h * 2 // 3)
    left, top = rng.randint(0, w - bw), rng.randint(0, h - bh)
    box = (left, top, left + bw, top + bh)
    colour = tuple(rng.randint(0, 255) for _ in range(3))
    if label == "circle":
        draw.ellipse(box, fill=colour)
    elif label == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(left, top + bh), (left + bw // 2, top), (left + bw, top + bh)], fill=colour)
    return (im.convert(mode) if mode != "RGB" else im), label, box


def shape_folder(folder: str | os.PathLike, n: int, seed: int = 0, prefix: str = "shape",
                 size: tuple[int, int] = SIZE) -> list[Path]:
    """`n` distinct JPEGs of random shapes in `folder` (a plain photo folder: no boxes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-{prefix}")
    paths = []
    for i in range(n):
        im, _, _ = shape_image(rng, size)
        path = folder / f"{prefix}_{i:04d}.jpg"
        im.save(path, "JPEG", quality=85)
        paths.append(path)
    return paths


def box_dataset(folder: str | os.PathLike, n: int, seed: int = 0, prefix: str = "box") -> list[Path]:
    """A box-list dataset: `folder/images/NAME.jpg` + `folder/ground-truth/NAME.txt` (`class l t r b`)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "ground-truth").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-{prefix}-boxes")
    paths = []
    for i in range(n):
        im, label, box = shape_image(rng)
        path = folder / "images" / f"{prefix}_{i:04d}.jpg"
        im.save(path, "JPEG", quality=85)
        (folder / "ground-truth" / f"{path.stem}.txt").write_text(f"{label} {box[0]} {box[1]} {box[2]} {box[3]}\n")
        paths.append(path)
    return paths


def image_files(folder: str | os.PathLike) -> set[str]:
    """Resolved paths of the regular image files under `folder` (what a build should index)."""
    found = set()
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(here) / name
            if path.suffix.lower() in (".jpg", ".jpeg", ".png") and path.is_file() and not path.is_symlink():
                found.add(str(path.resolve()))
    return found


# ---------------------------------------------------------------- hostile bytes

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB, nor lie about a size): `rows` yields raw rows."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    compressor = zlib.compressobj(6)
    idat = bytearray()
    for row in rows:
        assert len(row) == (width * channels * bit_depth + 7) // 8
        idat += compressor.compress(b"\x00" + row)  # filter type 0 (none) on every row
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", bytes(idat)) + _chunk(b"IEND", b"")


@functools.lru_cache(maxsize=4)
def bomb_png(width: int = 19000, height: int = 19000) -> bytes:
    """A complete, valid 8-bit grayscale PNG of `width` x `height` zeros: a few hundred KB that decode to
    width * height bytes (19000 x 19000: 361 MB as L, 1 GB as RGB). A decompression bomb."""
    row = bytes(width)

    def rows():
        for _ in range(height):
            yield row

    return png_bytes(width, height, 8, 0, rows())


def rgb16_png(size: tuple[int, int], seed: int = 0) -> bytes:
    """A 16-bit-per-channel RGB PNG with a gradient and noise."""
    w, h = size
    rng = np.random.default_rng(seed)
    pixels = (np.linspace(0, 65535, w, dtype=np.float64)[None, :, None] * np.ones((h, 1, 3))
              + rng.integers(0, 4000, (h, w, 3))).clip(0, 65535).astype(">u2")
    return png_bytes(w, h, 16, 2, (pixels[y].tobytes() for y in range(h)))


def jpeg_bytes(im: Image.Image, **save) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def with_corrupt_exif(jpeg: bytes) -> bytes:
    """The JPEG with an APP1 'Exif' segment whose TIFF header points its first IFD far past the end."""
    tiff = b"II*\x00" + struct.pack("<I", 0x7FFFFFF0) + bytes(range(256)) * 2
    payload = b"Exif\x00\x00" + tiff
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + segment + jpeg[2:]


def voc_xml(filename: str, size: tuple[int, int], objects: list[tuple[str, ...]]) -> str:
    """A VOC annotation; each object is (name, xmin, ymin, xmax, ymax) as the raw text to write."""
    parts = [f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>",
             f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"]
    for name, *box in objects:
        coords = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        parts.append(f"<object><name>{name}</name><difficult>0</difficult><bndbox>{coords}</bndbox></object>")
    return "".join(parts) + "</annotation>\n"


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<annotation><object><name>&lol9;</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object></annotation>
"""

GARBAGE_BOX_LINES = (
    b"\x00\xff\xfe garbage \x80\x81\n"       # binary junk, invalid UTF-8
    b"cat 1 2\n"                             # too few fields
    b"dog a b c d\n"                         # non-numeric
    b"cat nan 10 50 60\n"                    # NaN
    b"cat 10 10 inf 60\n"                    # infinite
    b"cat 1e400 10 50 60\n"                  # overflows to inf
    b"cat 150 150 20 20\n"                   # inverted
    b"cat 500 500 900 900\n"                 # wholly outside a 224x224 image
    b"big cat 10 20 100 120\n"               # valid, a class name with a space
    b"cat -20 -30 5000 5000\n"               # negative and past the edges: clipped to the image
    + b"x" * 5000 + b"\n"                    # one enormous token
)


# ---------------------------------------------------------------- the hostile folder

@dataclass
class Input:
    """One hostile input and what a build must do with it.

    expect: "indexed" (a decodable image: one record), "skipped" (not indexed, listed in
    the skipped files), "either", "walked" (a folder named like an image: not a record
    itself, the image inside it indexed once), "once" (a link or loop: the file it
    reaches indexed once, nothing under the link's own path), "annotation" (the image
    indexed once, `objects` finite boxes inside it kept, the annotation file listed as
    skipped when `reported`).
    """

    name: str
    path: str  # relative to the folder
    expect: str
    what: str
    target: str | None = None  # the image a link / annotation / folder refers to (relative)
    objects: int | None = None  # boxes that must survive, for annotations
    reported: bool = False  # the annotation file must appear in the skipped files
    note: str = ""
    extra: dict = field(default_factory=dict)


def write_hostile_folder(folder: str | os.PathLike, seed: int = 0, n_good: int = 12) -> tuple[list[Path], list[Input]]:
    """Write good images and every hostile input beside them. Returns (good image paths, inputs)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-hostile")
    good = shape_folder(folder, n_good, seed, prefix="good")
    inputs: list[Input] = []

    def image(mode: str = "RGB", size: tuple[int, int] = SIZE) -> Image.Image:
        return shape_image(rng, size, mode)[0]

    def add(name: str, path: str, expect: str, what: str, **kw) -> None:
        inputs.append(Input(name, path, expect, what, **kw))

    # --- files that are not what their name says
    noisy = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    whole = jpeg_bytes(noisy)
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    add("truncated JPEG", "truncated.jpg", "skipped", "first half of a 400x300 JPEG")
    (folder / "empty.jpg").write_bytes(b"")
    add("0-byte .jpg", "empty.jpg", "skipped", "empty file")
    (folder / "text.png").write_text("this is not a PNG, just text with an image's name\n")
    add("text named .png", "text.png", "skipped", "plain text")
    (folder / "bomb.png").write_bytes(bomb_png(19000, 19000))
    add("decompression bomb PNG", "bomb.png", "skipped", "valid PNG declaring 19000x19000 (361 MP), "
        f"{len(bomb_png(19000, 19000)) // 1024} KB on disk")

    # --- real images in unusual formats: decodable, so they must be indexed
    image("CMYK").save(folder / "cmyk.jpg", "JPEG", quality=90)
    add("CMYK JPEG", "cmyk.jpg", "indexed", "4-channel JPEG")
    gray16 = (np.linspace(0, 65535, SIZE[0])[None, :] * np.ones((SIZE[1], 1))).astype(np.uint16)
    gray16[50:120, 60:160] = 20000
    Image.fromarray(gray16).save(folder / "gray16.png")
    add("16-bit grayscale PNG", "gray16.png", "indexed", "mode I;16")
    (folder / "rgb16.png").write_bytes(rgb16_png(SIZE, seed))
    add("16-bit RGB PNG", "rgb16.png", "indexed", "48 bits per pixel")
    floats = np.random.default_rng(seed + 1).random(SIZE[::-1]).astype(np.float32) * 1000 - 500
    Image.fromarray(floats, mode="F").save(folder / "float.tif")
    add("float TIFF (mode F)", "float.tif", "either", "32-bit float pixels, -500..500")
    frames = [image("RGB") for _ in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("animated GIF", "animated.gif", "indexed", "3 frames")
    exif = Image.Exif()
    exif[0x0112] = 9  # orientations are 1..8
    image("RGB").save(folder / "exif_orientation9.jpg", "JPEG", quality=90, exif=exif.tobytes())
    add("JPEG, EXIF orientation 9", "exif_orientation9.jpg", "indexed", "orientation out of range")
    exif = Image.Exif()
    exif[0x0112] = 6
    image("RGB", (256, 192)).save(folder / "exif_rotate6.jpg", "JPEG", quality=90, exif=exif.tobytes())
    add("JPEG, EXIF rotate 90", "exif_rotate6.jpg", "indexed", "256x192 stored, 192x256 upright",
        extra={"upright_size": [192, 256]})
    (folder / "exif_corrupt.jpg").write_bytes(with_corrupt_exif(jpeg_bytes(image("RGB"))))
    add("JPEG, corrupt EXIF", "exif_corrupt.jpg", "either", "APP1 Exif whose IFD offset points past the end",
        note="its pixels decode: skipping it loses a usable photo")

    # --- things that are not regular files
    os.mkfifo(folder / "fifo.jpg")
    add("FIFO named .jpg", "fifo.jpg", "skipped", "opening it blocks until a writer comes")
    os.symlink("/dev/zero", folder / "zero.jpg")
    add("symlink to /dev/zero", "zero.jpg", "skipped", "reading it never ends")
    os.symlink(folder / "does-not-exist.jpg", folder / "broken_link.jpg")
    add("broken symlink", "broken_link.jpg", "skipped", "target missing")
    (folder / "dir.jpg").mkdir()
    image("RGB").save(folder / "dir.jpg" / "inside.jpg", "JPEG", quality=85)
    add("folder named dir.jpg", "dir.jpg", "walked", "a directory with one image inside", target="dir.jpg/inside.jpg")
    image("RGB").save(folder / "unreadable.jpg", "JPEG", quality=85)
    os.chmod(folder / "unreadable.jpg", 0)
    root = os.geteuid() == 0
    add("unreadable file (chmod 000)", "unreadable.jpg", "indexed" if root else "skipped", "mode 000",
        note="running as root: permissions are not enforced, so the file is readable and must be indexed"
        if root else "")
    os.symlink(".", folder / "loop")
    add("self-referencing folder link", "loop", "once", "loop -> .", target=good[0].name)
    os.symlink(good[1].name, folder / "link_to_good.jpg")
    add("second link to a good image", "link_to_good.jpg", "once", "link_to_good.jpg -> good_0001.jpg",
        target=good[1].name)

    # --- a VOC year folder with hostile annotations
    voc = folder / "voc" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    w, h = SIZE
    annotations = {
        "v_good": ([("dog", 10, 10, 100, 100)], 1, False, "a clean annotation (control)"),
        "v_nan": ([("dog", "nan", 10, 100, 100), ("cat", 5, 5, 50, 50), ("cow", 1, 1, "inf", 40),
                   ("owl", 1, 1, "1e400", 40)], 1, True, "<xmin>nan</xmin>, inf, 1e400 beside one good box"),
        "v_inverted": ([("dog", 150, 150, 20, 20), ("cat", 5, 5, 50, 50)], 1, True, "xmax < xmin beside a good box"),
        "v_outside": ([("dog", -40, -10, 60, 70), ("cat", 100, 100, 5000, 5000), ("cow", 900, 900, 1200, 1000)],
                      2, True, "negative, past the edges (clipped) and wholly outside (dropped)"),
        "v_empty_tags": ([("dog", "", "", "", "")], 0, True, "empty coordinate tags"),
    }
    ids = []
    for stem, (objects, kept, reported, what) in annotations.items():
        image("RGB").save(voc / "JPEGImages" / f"{stem}.jpg", "JPEG", quality=85)
        (voc / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", (w, h), objects))
        add(f"VOC: {what}", f"voc/VOC2007/Annotations/{stem}.xml", "annotation", what,
            target=f"voc/VOC2007/JPEGImages/{stem}.jpg", objects=kept, reported=reported)
        ids.append(stem)
    image("RGB").save(voc / "JPEGImages" / "v_broken.jpg", "JPEG", quality=85)
    (voc / "Annotations" / "v_broken.xml").write_text("<annotation><object><name>dog</name><bndbox><xmin>1")
    add("VOC: broken XML", "voc/VOC2007/Annotations/v_broken.xml", "annotation", "XML cut off mid-tag",
        target="voc/VOC2007/JPEGImages/v_broken.jpg", objects=0, reported=True)
    image("RGB").save(voc / "JPEGImages" / "v_laughs.jpg", "JPEG", quality=85)
    (voc / "Annotations" / "v_laughs.xml").write_text(BILLION_LAUGHS)
    add("VOC: billion-laughs XML", "voc/VOC2007/Annotations/v_laughs.xml", "annotation",
        "entity expansion to 10^9 'lol's", target="voc/VOC2007/JPEGImages/v_laughs.jpg", objects=0, reported=True)
    ids += ["v_broken", "v_laughs"]
    (voc / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids) + "\n\x00\xff garbage line\n",
                                                           errors="surrogateescape")

    # --- a box-list dataset with a garbage annotation and an annotation that is a FIFO
    boxes = folder / "boxes"
    box_dataset(boxes, 2, seed, prefix="b_good")
    image("RGB").save(boxes / "images" / "b_garbage.jpg", "JPEG", quality=85)
    (boxes / "ground-truth" / "b_garbage.txt").write_bytes(GARBAGE_BOX_LINES)
    add("box list: garbage lines", "boxes/ground-truth/b_garbage.txt", "annotation",
        "junk bytes, short, non-numeric, NaN, inf, inverted, outside, huge token; 2 usable lines",
        target="boxes/images/b_garbage.jpg", objects=2, reported=True)
    image("RGB").save(boxes / "images" / "b_fifo.jpg", "JPEG", quality=85)
    os.mkfifo(boxes / "ground-truth" / "b_fifo.txt")
    add("box list: annotation is a FIFO", "boxes/ground-truth/b_fifo.txt", "annotation",
        "reading it would block forever", target="boxes/images/b_fifo.jpg", objects=0, reported=True)
    return good, inputs


def good_images(folder: str | os.PathLike, inputs: list[Input], good: list[Path]) -> list[Path]:
    """Every image in the hostile folder that must be indexed: the good ones, the dataset images, the decodable."""
    folder = Path(folder)
    must = list(good)
    must += [folder / i.path for i in inputs if i.expect == "indexed"]
    must += [folder / i.target for i in inputs if i.expect in ("annotation", "walked") and i.target]
    must += sorted((folder / "boxes" / "images").glob("b_good_*.jpg"))
    return must
