"""simsearch: image-similarity search over Pascal VOC and folders of photos.

The library does the work; `simsearch.cli` is a thin typer layer over it.
"""
from __future__ import annotations

from simsearch.errors import (
    BadInputError,
    NotFoundError,
    SimsearchError,
    SpecMismatchError,
    WeightsUnavailableError,
)

__version__ = "0.1.0"

__all__ = [
    "BadInputError",
    "NotFoundError",
    "SimsearchError",
    "SpecMismatchError",
    "WeightsUnavailableError",
    "Filters",
    "build_index",
    "search",
    "__version__",
]


def __getattr__(name: str):
    # Lazy so that `import simsearch` (and `simsearch --help`) does not pay for torch.
    if name == "build_index":
        from simsearch.pipeline.build import build_index

        return build_index
    if name == "Filters":
        from simsearch.retrieval.filters import Filters

        return Filters
    if name == "search":
        from simsearch.retrieval.searcher import search

        return search
    raise AttributeError(name)
