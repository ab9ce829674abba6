"""Offline demo data: real photographs that installed Python packages already ship."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from simsearch.errors import NotFoundError

# (package, path inside it): photographs, not charts or synthetic patterns.
SAMPLE_PHOTOS = [
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/motorcycle_right.png"),
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/camera.png"),
    ("skimage", "data/coins.png"),
    ("skimage", "data/horse.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/retina.jpg"),
    ("skimage", "data/brick.png"),
    ("skimage", "data/grass.png"),
    ("skimage", "data/gravel.png"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
]


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


# Boxes drawn by hand on the photos above (pixels: left, top, right, bottom), so the
# offline demo shows what real data shows: classes, box crops and a class filter.
SAMPLE_BOXES: dict[str, list[tuple[str, int, int, int, int]]] = {
    "motorcycle_left.png": [("motorbike", 92, 10, 688, 452)],
    "motorcycle_right.png": [("motorbike", 48, 15, 630, 450)],
    "astronaut.png": [("person", 20, 15, 370, 512), ("helmet", 275, 342, 512, 512)],
    "chelsea.png": [("cat", 0, 0, 451, 300)],
    "coffee.png": [("cup", 170, 15, 415, 300)],
    "rocket.jpg": [("rocket", 300, 125, 345, 410)],
    "camera.png": [("person", 0, 62, 330, 512), ("camera", 255, 138, 325, 190)],
    "horse.png": [("horse", 18, 8, 390, 308)],
    "grace_hopper.jpg": [("person", 15, 22, 512, 600)],
    "flower.jpg": [("flower", 168, 85, 448, 360)],
}


def copy_sample_photos(dest: str | os.PathLike) -> list[Path]:
    """Copy every sample photo installed here into `dest`/images, with its boxes in `dest`/ground-truth.

    The layout is the box-list format `read` understands (`class left top right
    bottom` a line), so `build-index dest` stores the objects. Returns the copies.
    """
    dest = Path(dest)
    images, truth = dest / "images", dest / "ground-truth"
    images.mkdir(parents=True, exist_ok=True)
    truth.mkdir(exist_ok=True)
    copied = []
    for package, relative in SAMPLE_PHOTOS:
        root = _package_dir(package)
        source = root / relative if root else None
        if source is not None and source.is_file():
            target = images / source.name
            if not target.exists():
                shutil.copyfile(source, target)
            boxes = SAMPLE_BOXES.get(source.name)
            if boxes:
                (truth / f"{target.stem}.txt").write_text("".join(f"{label} {x0} {y0} {x1} {y1}\n"
                                                                  for label, x0, y0, x1, y1 in boxes))
            copied.append(target)
    if not copied:
        raise NotFoundError(
            "no sample photos found: pip install scikit-image scikit-learn matplotlib (they ship real photos)"
        )
    return copied
