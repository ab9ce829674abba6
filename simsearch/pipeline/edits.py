"""Near-duplicate edits of an image (the Copydays attacks): what calibration and evaluate-retrieval embed.

A near-duplicate is the same photo after what the web does to it: cropped,
rotated, re-compressed, shrunk, mirrored, recoloured, captioned. Calibration embeds
a few fixed ones to learn what a true copy scores in an index; `evaluate-retrieval`
embeds all of them to measure whether the copy still finds its original. Both take
them from here, so "a JPEG at quality 30" means the same pixels in both.

Edits with a random strength (rotation angle, JPEG quality, colour factors, where
the text goes) draw it from the `rng` they are given, so a seed fixes every pixel.
"""
from __future__ import annotations

from io import BytesIO
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

Edit = Callable[[Image.Image, np.random.Generator], Image.Image]


# ------------------------------------------------------------ the primitives


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """The image saved as a JPEG at `quality` and decoded again."""
    buffer = BytesIO()
    image.save(buffer, "JPEG", quality=int(quality))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def centre_crop(image: Image.Image, keep_side: float) -> Image.Image:
    """The centre of the image keeping `keep_side` of each side (keep_side**2 of the area)."""
    w, h = image.size
    cw, ch = max(1, round(w * keep_side)), max(1, round(h * keep_side))
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def side_crop(image: Image.Image, keep: float, side: str) -> Image.Image:
    """The image with one side cut away: `keep` of its width (side left/right) or height (top/bottom) stays."""
    w, h = image.size
    if side in ("left", "right"):
        cw = max(1, round(w * keep))
        return image.crop((w - cw, 0, w, h) if side == "left" else (0, 0, cw, h))
    ch = max(1, round(h * keep))
    return image.crop((0, h - ch, w, h) if side == "top" else (0, 0, w, ch))


def rescaled(image: Image.Image, factor: float) -> Image.Image:
    """Shrunk to `factor` of each side and enlarged back: the detail a thumbnail loses."""
    w, h = image.size
    small = image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BILINEAR)
    return small.resize((w, h), Image.BILINEAR)


def rotated(image: Image.Image, degrees: float) -> Image.Image:
    """Rotated about its centre, same size, the uncovered corners black (as a rotated scan or photo)."""
    return image.rotate(degrees, resample=Image.BICUBIC, expand=False, fillcolor=(0, 0, 0))


def recoloured(image: Image.Image, brightness: float, contrast: float, saturation: float) -> Image.Image:
    """Brightness, contrast and saturation scaled by these factors (1.0: unchanged)."""
    image = ImageEnhance.Brightness(image).enhance(brightness)
    image = ImageEnhance.Contrast(image).enhance(contrast)
    return ImageEnhance.Color(image).enhance(saturation)


CAPTIONS = ("SALE 50% OFF", "(c) simsearch 2026", "holiday pics", "DO NOT COPY", "www.example.com")


def captioned(image: Image.Image, text: str, x: float, y: float, height: float = 0.12) -> Image.Image:
    """`text` overlaid in white with a black outline, its line `height` of the image tall, left edge at (x, y)."""
    out = image.copy()
    w, h = out.size
    size = max(8, round(h * height))
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(out)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=max(1, size // 12))
    px = int(x * max(1, w - (right - left)))
    py = int(y * max(1, h - (bottom - top)))
    draw.text((px, py), text, font=font, fill=(255, 255, 255), stroke_width=max(1, size // 12), stroke_fill=(0, 0, 0))
    return out


# ------------------------------------------------------------ the Copydays set

SIDES = ("left", "right", "top", "bottom")


def _caption(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return captioned(image, CAPTIONS[int(rng.integers(len(CAPTIONS)))], float(rng.random()), float(rng.random()))


# name -> edit; each says what it does and how strong it is, since the name is what a report shows.
COPYDAYS: dict[str, Edit] = {
    "none": lambda im, rng: im,  # control: the original embedded again (any miss here is a pipeline mismatch)
    "crop50": lambda im, rng: centre_crop(im, 0.5 ** 0.5),  # centre crop keeping 50% of the area
    "crop75": lambda im, rng: centre_crop(im, 0.75 ** 0.5),  # centre crop keeping 75% of the area
    "crop_side": lambda im, rng: side_crop(im, 0.6, SIDES[int(rng.integers(4))]),  # 40% of one side cut away
    "rotate": lambda im, rng: rotated(im, float(rng.uniform(5, 15)) * (1 if rng.random() < 0.5 else -1)),  # 5-15 deg
    "jpeg": lambda im, rng: jpeg(im, int(rng.integers(10, 51))),  # quality 10-50
    "scale25": lambda im, rng: rescaled(im, 0.25),  # each side to 25% and back
    "flip": lambda im, rng: ImageOps.mirror(im),  # left-right mirror
    "colour": lambda im, rng: recoloured(im, *rng.uniform(0.6, 1.4, size=3)),  # brightness, contrast, saturation x0.6-1.4
    "text": _caption,  # a caption a tenth of the image tall, anywhere on it
}


def edit_rng(seed: int, image_id: int, edit: str) -> np.random.Generator:
    """The generator of one (image, edit): the same seed gives the same pixels whatever else is sampled."""
    return np.random.default_rng([seed, image_id, sorted(COPYDAYS).index(edit) if edit in COPYDAYS else 0])
