"""Object search against the two ways to search by a region without it: is a box's own vector worth keeping?

Every ground-truth box of a collection is a query, its own image excluded from the
results, and each of three methods returns 5 images:

- object search: `Searcher.search_objects(id, 5, box=the box)`, the box pooled from
  the stored feature map plus CROP_WEIGHT x its pixels' own vector, searched among
  every box's vector (objects.faiss);
  relevant when the matched object is of the query's class (strict), or when the
  image holds any object of that class (lenient: the same rule as the other two);
- crop and re-embed, what serve's `box` parameter does today: the box cut out of the
  image (tight, as serve cuts it; `--crop-margin 0.05` adds render.crop's margin),
  embedded as an image and searched among whole-image vectors;
- whole image: `Searcher.search(id, 5)`, the query's whole image.

For the last two a result is relevant when its image holds an object of the query's
class. Reported: precision@5, mean over queries and macro over classes, by box-size
tercile (a box's share of its image: the 7x7 map gives a small box few cells), and
p50 latency of each method. Only classes held by at least 6 images are queried: with
fewer, 5 other images of the class do not exist and no method could score 1 (each
result image is counted once); the skipped classes and their boxes are listed.

Collections: the real indoor photos (`../shared/data/indoor-boxes`, 85 photos, 686
boxes) and composites of real object crops on real photos with several objects each
(`simsearch.datasets.synth`, crops from all of `../shared/data`).

    python benchmarks/bench_objects.py --quick
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from common import NOISE_NOTE, SHARED_DATA, percentile, print_table, progress, write_result

K = 5
MIN_IMAGES = K + 1  # a class must be held by the query's image and K others
METHODS = ("object", "crop", "whole")


def build(data: Path, index_dir: Path) -> dict:
    """An efficientnet-lite0 index of `data` (boxes get their vectors as build-index gives them).

    Plain similarity: the whole-image searches compared here would otherwise be ranked by a
    similarity learned from the very labels that judge them (storage/similarity.py).
    """
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    started = time.perf_counter()
    report = build_index(BuildConfig(data, index_dir, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True),
                                     similarity="plain"))
    return {"images": report.ntotal, "objects": report.objects, "build_s": round(time.perf_counter() - started, 1)}


def composites(out: Path, n: int, objects: int, seed: int) -> Path:
    """n composites of `objects` real crops each (the largest the synth 'target', the others smaller)."""
    from simsearch.datasets.synth import SynthConfig, generate

    generate(SynthConfig(out / "VOCsynth", (SHARED_DATA,), n=n, seed=seed, top_classes=8, objects_per_image=objects),
             progress=False)
    return out


def queries(store, limit: int | None, seed: int) -> tuple[list[tuple], dict]:
    """(record, box, label, share of the image) for each box of an eligible class; and what was skipped."""
    records = store.records(store.ids())
    images_of: dict[str, set[int]] = defaultdict(set)
    boxes_of: dict[str, int] = defaultdict(int)
    for r in records.values():
        for o in r.objects:
            images_of[o.label].add(r.id)
            boxes_of[o.label] += 1
    eligible = {c for c, ids in images_of.items() if len(ids) >= MIN_IMAGES}
    others = len(records) - 1
    out = []
    for r in sorted(records.values(), key=lambda r: r.id):
        for o in r.objects:
            if o.label in eligible and o.xmax > o.xmin and o.ymax > o.ymin:
                share = (o.xmax - o.xmin) * (o.ymax - o.ymin) / (r.width * r.height)
                # What 5 images drawn at random score under the image-holds-the-class rule.
                chance = (len(images_of[o.label]) - 1) / others
                out.append((r, (o.xmin, o.ymin, o.xmax, o.ymax), o.label, share, chance))
    if limit and len(out) > limit:
        picked = np.random.default_rng(seed).choice(len(out), limit, replace=False)
        out = [out[i] for i in sorted(picked)]
    skipped = {c: {"boxes": boxes_of[c], "images": len(images_of[c])} for c in sorted(images_of) if c not in eligible}
    return out, skipped


def run_queries(searcher, qs: list[tuple], crop_margin: float = 0.0, methods: tuple[str, ...] = METHODS) -> list[dict]:
    """Each query's precision@5 under each of `methods`, and the seconds each took."""
    from simsearch.pipeline.read import open_image
    from simsearch.views.render import Box, crop

    out = []
    for n, (record, box, label, share, chance) in enumerate(qs):
        if n % 100 == 0:
            progress(f"query {n}/{len(qs)}")
        row = {"id": record.id, "label": label, "share": share, "chance": chance}

        if "object" in methods:
            t0 = time.perf_counter()
            found = searcher.search_objects(record.id, K, box=box).neighbours
            row["object_s"] = time.perf_counter() - t0
            row["object_strict"] = sum(nb.match is not None and nb.match.label == label for nb in found) / K
            row["object"] = sum(label in nb.record.classes for nb in found) / K
        if "crop" in methods:
            t0 = time.perf_counter()
            image = open_image(record.path, max_pixels=searcher.max_pixels)
            xq = searcher.vector_of_image(crop(image, Box(*box), margin=crop_margin))
            found = searcher.search_vector(xq, K, searcher.copies_of(record.sha256))
            row["crop_s"] = time.perf_counter() - t0
            row["crop"] = sum(label in nb.record.classes for nb in found) / K
        if "whole" in methods:
            t0 = time.perf_counter()
            found = searcher.search(record.id, K).neighbours
            row["whole_s"] = time.perf_counter() - t0
            row["whole"] = sum(label in nb.record.classes for nb in found) / K
        out.append(row)
    return out


def summarise(rows: list[dict], collection: str) -> tuple[dict, list[dict], dict]:
    """The collection's row (micro and macro precision@5, p50 ms), its size-tercile rows, and per-class means."""
    scores = ("object_strict", "object", "crop", "whole", "chance")
    by_class: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_class[r["label"]].append(r)
    summary = {"collection": collection, "queries": len(rows), "classes": len(by_class)}
    for s in scores:
        summary[f"p@5_{s}"] = statistics.fmean(r[s] for r in rows)
        summary[f"macro_{s}"] = statistics.fmean(statistics.fmean(r[s] for r in v) for v in by_class.values())
    for m in METHODS:
        summary[f"p50_ms_{m}"] = percentile([r[f"{m}_s"] for r in rows], 50) * 1e3
    cuts = np.quantile([r["share"] for r in rows], [1 / 3, 2 / 3])
    terciles = []
    for t, (low, high) in enumerate(zip([0.0, *cuts], [*cuts, 1.0])):
        inside = [r for r in rows if (low < r["share"] <= high) or (t == 0 and r["share"] <= high)]
        if inside:
            terciles.append({"collection": collection, "size": ("small", "medium", "large")[t],
                             "share": f"{low:.3f}-{high:.3f}", "queries": len(inside),
                             **{f"p@5_{s}": statistics.fmean(r[s] for r in inside) for s in scores}})
    per_class = {c: {"queries": len(v), **{s: round(statistics.fmean(r[s] for r in v), 4) for s in scores}}
                 for c, v in sorted(by_class.items())}
    return summary, terciles, per_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a run of a few minutes: fewer composites and queries")
    parser.add_argument("--composites", type=int, help="composite images (default 80 quick, 200 full); 0: none")
    parser.add_argument("--objects", type=int, default=4, help="objects pasted per composite")
    parser.add_argument("--max-queries", type=int, help="boxes queried per collection, a seeded sample (default 100 quick, 350 full): "
                        "crop + re-embed costs a forward pass each")
    parser.add_argument("--crop-margin", type=float, default=0.0,
                        help="margin around a cropped box, a fraction of its side (0: tight, as serve's box search)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    indoor = SHARED_DATA / "indoor-boxes"
    if not indoor.is_dir():
        raise SystemExit(f"skipped: {indoor} is absent (set SIMSEARCH_SHARED_DATA to the shared data folder)")
    n_comp = args.composites if args.composites is not None else (80 if args.quick else 200)
    limit = args.max_queries or (100 if args.quick else 350)

    from simsearch.retrieval.searcher import Searcher

    work = Path(tempfile.mkdtemp(prefix="simsearch-bench-objects-"))
    collections = [("indoor-boxes", indoor)]
    try:
        if n_comp:
            progress(f"generating {n_comp} composites, {args.objects} objects each")
            collections.append((f"composites x{args.objects}", composites(work / "synth", n_comp, args.objects,
                                                                           args.seed)))
        summaries, terciles, per_class, skipped, builds = [], [], {}, {}, {}
        for name, data in collections:
            index_dir = work / f"index-{len(builds)}"
            progress(f"building an efficientnet-lite0 index of {name}")
            builds[name] = build(data, index_dir)
            with Searcher(index_dir, device="cpu") as searcher:
                qs, skipped[name] = queries(searcher.store, limit, args.seed)
                progress(f"{name}: {len(qs)} box queries, 3 methods")
                rows = run_queries(searcher, qs, args.crop_margin)
            summary, tercile_rows, per_class[name] = summarise(rows, name)
            summaries.append(summary)
            terciles += tercile_rows
    finally:
        shutil.rmtree(work, ignore_errors=True)

    margin = f"{args.crop_margin:g} of each side" if args.crop_margin else "none (tight, as serve's box search)"
    notes = [NOISE_NOTE,
             "p@5: mean precision@5 over box queries, the query's own image excluded; macro: mean of per-class means",
             "object_strict: the matched box is of the query's class; object/crop/whole: the result image holds one",
             "chance: 5 other images drawn at random, under the image-holds-the-class rule",
             f"crop: the box cut out of the full-size image, margin {margin}, embedded, searched among whole images; "
             "its latency includes decoding the image",
             f"only classes held by >= {MIN_IMAGES} images are queried; skipped: "
             + "; ".join(f"{name}: " + (", ".join(f"{c} ({v['boxes']} boxes in {v['images']} images)"
                                                  for c, v in s.items()) or "none") for name, s in skipped.items()),
             "builds: " + "; ".join(f"{name}: {b['images']} images, {b['objects']} boxes, {b['build_s']} s"
                                    for name, b in builds.items())]
    print_table("objects: precision@5 of same-class objects, object search vs crop + re-embed vs whole image",
                summaries, ["collection", "queries", "classes", "p@5_object_strict", "p@5_object", "p@5_crop",
                            "p@5_whole", "p@5_chance", "macro_object_strict", "macro_object", "macro_crop", "macro_whole",
                            "p50_ms_object",
                            "p50_ms_crop", "p50_ms_whole"], notes)
    print_table("objects: precision@5 by box size (share of the image, terciles of the queries)", terciles,
                ["collection", "size", "share", "queries", "p@5_object_strict", "p@5_object", "p@5_crop", "p@5_whole",
                 "p@5_chance"])
    write_result("objects", {"quick": args.quick, "k": K, "min_images_per_class": MIN_IMAGES,
                             "crop_margin": args.crop_margin, "composites": n_comp, "objects_per_composite": args.objects,
                             "builds": builds, "skipped_classes": skipped, "rows": summaries, "by_size": terciles,
                             "per_class": per_class})


if __name__ == "__main__":
    main()
