"""What an index holds and how it was built, for `simsearch info`."""
from __future__ import annotations

import os
from dataclasses import asdict

from simsearch.storage import faiss_index
from simsearch.storage.store import Store


def describe_index(index_dir: str | os.PathLike) -> dict:
    store = Store(index_dir)
    try:
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
            "faiss_up_to_date": faiss_index.saved_generation(index_dir) == store.generation,
            "skipped_files": store.skipped(),
        }
    finally:
        store.close()
