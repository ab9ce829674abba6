"""Which cosine score says "near-duplicate": Copydays edits of real photos against distinct images.

Builds one EfficientNet-Lite0 index over ../shared/data (photos, voc-mini,
indoor-boxes), embeds the 10 Copydays edits of every image (`pipeline/edits.COPYDAYS`,
seeded: crops to 50% and 75% of the area, 40% of a side cut, rotation, JPEG q10-50,
scale to 25% and back, mirror, colour, caption), then measures:

  (a) each edit's cosine to its original (quantiles per edit);
  (b) distinct images: every pair of stored records with different bytes, and each
      record's best distinct neighbour (what a duplicates report would claim);

and, for candidate thresholds, the share of edited copies at or above it (recall)
against the distinct pairs and records at or above it (false near-duplicates), for
all of the data and for indoor-boxes alone (sequences of one room: the hard case).

    python benchmarks/bench_duplicates.py            # all 114 images
    python benchmarks/bench_duplicates.py --quick    # the 13 photos only
    python benchmarks/bench_duplicates.py --scale 20000   # instead: `duplicates` on 20,000 synthetic
                                                          # 1280-d vectors, Flat and IVF-PQ indexes
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from common import real_lite0_index, SHARED_DATA, print_table, progress, write_result

THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.95)
PARTS = ("photos", "voc-mini", "indoor-boxes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 13 photos only (a smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="fixes every edit's strength")
    parser.add_argument("--scale", type=int, default=0,
                        help="instead, time `duplicates` on this many synthetic vectors (1%% with planted copies)")
    args = parser.parse_args()
    if args.scale:
        return scale(args.scale, args.seed)

    from simsearch.pipeline.edits import COPYDAYS, edit_rng
    from simsearch.pipeline.read import open_image
    from simsearch.storage import calibration as cal

    parts = PARTS[:1] if args.quick else PARTS
    work = Path(tempfile.mkdtemp(prefix="bench-duplicates-"))
    try:
        embedder, ids, xb, records = real_lite0_index(work, parts)
        names = [n for n in COPYDAYS if n != "none"]
        progress(f"embedding {len(names)} edits of {len(ids)} images")
        started = time.perf_counter()
        scores = np.zeros((len(ids), len(names)), dtype=np.float32)
        for row, image_id in enumerate(ids.tolist()):
            image = open_image(records[image_id].path, draft=lambda w, h: (1024, 1024))
            image.thumbnail((1024, 1024))
            edited = [COPYDAYS[n](image, edit_rng(args.seed, image_id, n)) for n in names]
            scores[row] = embedder.embed_images(edited).vectors @ xb[row]
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)

    part_of = np.array([next(p for p in PARTS if f"/{p}/" in records[int(i)].path) for i in ids])
    sha = np.array([records[int(i)].sha256 for i in ids])
    collections = {"all shared data": np.ones(len(ids), bool)}
    if not args.quick:
        collections["indoor-boxes only"] = part_of == "indoor-boxes"
    rows, sweep, payload = [], [], {"images": len(ids), "edits": names, "seed": args.seed,
                                    "edit_seconds_per_image": round(seconds / len(ids), 3), "collections": {}}
    for cname, members in collections.items():
        x, s, sc = xb[members], sha[members], scores[members]
        gram = x @ x.T
        distinct = s[:, None] != s[None, :]
        upper = np.triu(np.ones_like(distinct), k=1)
        pairs = gram[distinct & upper]
        best = np.where(distinct, gram, -np.inf).max(axis=1)
        measured = {f"edit: {n}": sc[:, e] for e, n in enumerate(names)}
        measured["all edits"] = sc.ravel()
        measured["distinct pairs"] = pairs
        measured["best distinct neighbour"] = best
        for what, v in measured.items():
            rows.append({"collection": cname, "scores": what, "n": len(v),
                         **cal.quantiles(v, (0.01, 0.05, 0.5, 0.95, 0.99)), "max": round(float(v.max()), 4)})
        entry = {"quantiles": {k: cal.quantiles(v) | {"n": len(v), "max": round(float(v.max()), 4)}
                               for k, v in measured.items()}, "thresholds": {}}
        order = np.argsort(-pairs)
        i_idx, j_idx = np.nonzero(distinct & upper)
        member_ids = ids[members]
        entry["top distinct pairs"] = [
            {"score": round(float(pairs[k]), 4), "a": Path(records[int(member_ids[i_idx[k]])].path).name,
             "b": Path(records[int(member_ids[j_idx[k]])].path).name} for k in order[:8]]
        for t in THRESHOLDS:
            row = {"collection": cname, "threshold": t, "copies found": round(float((sc >= t).mean()), 3)}
            for e, n in enumerate(names):
                row[n] = round(float((sc[:, e] >= t).mean()), 2)
            row["distinct pairs >= t"] = int((pairs >= t).sum())
            row["records with one"] = round(float((best >= t).mean()), 3)
            sweep.append(row)
            entry["thresholds"][str(t)] = row
        payload["collections"][cname] = entry
    print_table("cosine quantiles (efficientnet-lite0)", rows,
                ["collection", "scores", "n", "q01", "q05", "q50", "q95", "q99", "max"])
    print_table("at each threshold: edited copies found, distinct images claimed", sweep,
                ["collection", "threshold", "copies found", *names, "distinct pairs >= t", "records with one"],
                [f"{seconds / len(ids):.2f} s an image for its {len(names)} edits"])
    for cname, entry in payload["collections"].items():
        print(f"\n{cname}: the most similar distinct pairs")
        for p in entry["top distinct pairs"]:
            print(f"  {p['score']:.4f}  {p['a']}  {p['b']}")
    write_result("duplicates", payload)


def scale(n: int, seed: int) -> None:
    """Time find_duplicates on n synthetic 1280-d vectors through the real store, Flat then IVF-PQ (same vectors)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from vectors import add_synthetic, clustered_vectors

    from simsearch.retrieval.duplicates import find_duplicates
    from simsearch.spec import EmbedderSpec
    from simsearch.storage import faiss_index, layout
    from simsearch.storage.store import Store

    dim = 1280
    spec = EmbedderSpec("synthetic", "none", "0" * 64, dim, (1, 1, 1))
    rng = np.random.default_rng(seed)
    xb = clustered_vectors(n, dim, seed=seed + 1, clusters=200)
    planted = 0
    for i in range(0, n - 4, 100):  # every 100th vector gets 1-3 near copies
        for j in range(1, 1 + int(rng.integers(1, 4))):
            v = xb[i] + 0.01 * rng.standard_normal(dim).astype(np.float32)
            xb[i + j] = v / np.linalg.norm(v)
            planted += 1
    rows = []
    for factory in ("Flat", f"IVF{faiss_index.ivf_lists(n)},PQ320x4fs"):  # the lists a build would choose
        work = Path(tempfile.mkdtemp(prefix="bench-duplicates-scale-"))
        try:
            with Store(work / "idx", create=True) as store:
                for start in range(0, n, 5000):
                    add_synthetic(store, xb[start:start + 5000], start, spec)
                built = layout.sync_faiss(store, spec, factory)
            progress(f"{built.spec.index_type}: searching for duplicates")
            started = time.perf_counter()
            report = find_duplicates(work / "idx")
            rows.append({"index": built.spec.index_type, "records": n, "planted copies": planted,
                         "copies found": report.redundant, "groups": len(report.groups),
                         "deepest k": report.searched_depth, "seconds": round(time.perf_counter() - started, 1)})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print_table("duplicates on synthetic vectors", rows, list(rows[0]))
    write_result("duplicates_scale", {"rows": rows})


if __name__ == "__main__":
    main()
