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


def copy_sample_photos(dest: str | os.PathLike) -> list[Path]:
    """Copy every sample photo that is installed here into `dest`; returns the copies."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for package, relative in SAMPLE_PHOTOS:
        root = _package_dir(package)
        source = root / relative if root else None
        if source is not None and source.is_file():
            target = dest / source.name
            if not target.exists():
                shutil.copyfile(source, target)
            copied.append(target)
    if not copied:
        raise NotFoundError(
            "no sample photos found: pip install scikit-image scikit-learn matplotlib (they ship real photos)"
        )
    return copied
