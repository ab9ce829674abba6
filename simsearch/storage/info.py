"""What an index holds and how it was built, for `simsearch info`."""
from __future__ import annotations

import os
from dataclasses import asdict

from simsearch.storage import layout
from simsearch.storage.store import Store


def describe_index(index_dir: str | os.PathLike) -> dict:
    with Store(index_dir) as store:
        summary = store.summary()
        spec = store.spec
        emb = spec.embedder if spec else None
        return {
            "index": str(index_dir),
            **summary,
            "index_type": spec.index_type if spec else None,
            "backbone": emb.backbone if emb else None,
            "weights": emb.weights if emb else None,
            "dim": emb.dim if emb else None,
            "spec": asdict(spec) if spec else None,
            "faiss_up_to_date": layout.faiss_is_current(store),
            "writer": layout.writer(index_dir),  # who is writing to it now, if anyone
            "skipped_files": store.skipped(),
        }
