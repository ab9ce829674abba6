"""Figures: a grid of images with the actual box in red and the predicted box in blue (the seed's Figure 3).

Drawn with PIL rather than matplotlib so the colours are exact pixels: a test can
check that the boxes are really there.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from simsearch.errors import BadInputError
from simsearch.pipeline.read import open_image
from simsearch.views.output import output_folder
from simsearch.views.render import font
from simsearch.storage.store import Store

log = logging.getLogger(__name__)

ACTUAL = (255, 0, 0)  # red
PREDICTED = (0, 0, 255)  # blue
CAPTION_HEIGHT = 34  # two caption lines


@dataclass
class PlotReport:
    path: str
    images: int
    width: int
    height: int


def plot_boxes(index_dir: str | os.PathLike, out_dir: str | os.PathLike, n: int = 16, split: str = "val",
               seed: int = 0, tile: int = 256, columns: int | None = None,
               head_dir: str | os.PathLike | None = None) -> PlotReport:
    """Write boxes.png: `n` images of `split` (chosen by `seed`), each captioned actual vs predicted."""
    from simsearch.localizer.predict import open_localizer
    from simsearch.localizer.evaluate import evaluation_ids
    from simsearch.localizer.train import examples, load_maps

    if n < 1:
        raise BadInputError("--n must be at least 1")
    with Store(index_dir) as store:
        localizer = open_localizer(store, head_dir)
        ids = evaluation_ids(store, localizer.spec, split)
        ids = sorted(random.Random(seed).sample(ids, min(n, len(ids))))
        truth = examples(store, ids, localizer.spec.target)
        out = localizer.predict(load_maps(store, truth.ids))
        labels, scores, boxes = out.classes, out.scores, out.boxes
        paths = store.images(truth.ids)
    if not truth.ids:
        raise BadInputError(f"no images with ground truth in split {split!r} of {index_dir}")
    columns = columns or min(4, len(truth.ids))
    rows = -(-len(truth.ids) // columns)
    grid = Image.new("RGB", (columns * tile, rows * (tile + CAPTION_HEIGHT)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    caption_font = font(12)
    for k, image_id in enumerate(truth.ids):
        x0, y0 = (k % columns) * tile, (k // columns) * (tile + CAPTION_HEIGHT)
        # Stretched to a square tile: boxes are normalised to the whole image, so they map straight on.
        grid.paste(open_image(paths[image_id]["path"]).resize((tile, tile), Image.BILINEAR), (x0, y0))
        for box, colour in ((truth.boxes[k], ACTUAL), (boxes[k], PREDICTED)):
            x1, y1, x2, y2 = (float(v) * (tile - 1) for v in box)
            draw.rectangle((x0 + x1, y0 + y1, x0 + x2, y0 + y2), outline=colour, width=3)
        predicted = localizer.label_of(labels[k], out.unknown[k])
        draw.text((x0 + 4, y0 + tile + 2), f"actual: {truth.labels[k]}", fill=ACTUAL, font=caption_font)
        draw.text((x0 + 4, y0 + tile + 17), f"predicted: {predicted} ({scores[k]:.2f})", fill=PREDICTED, font=caption_font)
    out = Path(out_dir)
    output_folder(out)
    path = out / "boxes.png"
    grid.save(path)
    log.info("wrote %s (%d images)", path, len(truth.ids))
    return PlotReport(str(path), len(truth.ids), grid.width, grid.height)
