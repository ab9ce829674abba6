"""Feature maps of indexed records, from the store where kept, else from the backbone again.

Maps are kept for records with boxes (or all, with `build-index --keep-maps`); what
needs the map of another record later (a localizer trained after the build, box
vectors of an index made before them) gets it by embedding the file once more.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

from simsearch.errors import NotFoundError
from simsearch.pipeline.embed import EmbedConfig, Embedder, iter_file_batches, load_backbone_for
from simsearch.storage.store import Store

log = logging.getLogger(__name__)


def iter_maps(store: Store, ids: Sequence[int], chunk: int = 2048
              ) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, int]]]]:
    """(ids, (n, C, H, W) maps, (width, height) of each) for records `ids`, a chunk at a time.

    Kept maps are read first; the others are embedded again from their files. A
    record whose file is gone (or no longer decodes) by then is left out, and said so
    in the log.
    """
    kept = store.ids_with_feature_map(ids)
    stored = [int(i) for i in ids if int(i) in kept]
    for start in range(0, len(stored), chunk):
        part = stored[start:start + chunk]
        sizes = store.sizes(part)
        yield part, store.feature_maps(part), [sizes[i] for i in part]
    again = [int(i) for i in ids if int(i) not in kept]
    if again:
        yield from _maps_from_files(store, again)


def _maps_from_files(store: Store, ids: list[int]) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, int]]]]:
    spec = store.spec
    if spec is None:
        raise NotFoundError(f"{store.dir}: index has no spec; rebuild it")
    log.info("embedding %d images again for their feature maps (not kept: build with --keep-maps to keep them)",
             len(ids))
    embedder = Embedder(load_backbone_for(spec.embedder, None, store.get_meta("weights_path")))
    records = store.records(ids)
    order = [i for i in ids if i in records]
    for batch in iter_file_batches([records[i].path for i in order], embedder, EmbedConfig(quiet=True)):
        for position, reason in batch.failures:
            log.warning("%s: cannot read its feature map (%s)", records[order[position]].path, reason)
        if batch.embedded is None:
            continue
        yield [order[position] for position in batch.indices], batch.embedded.maps, batch.sizes
