"""Every object or the largest one: the dense head (`train-localizer --every`) against the single-object head.

Both heads are trained in one run on the same index, the same stored
efficientnet-lite0 maps and the same held-out images (the validation rule each
records), then scored on those images:

- mAP@0.5: VOC all-point AP per class over every non-difficult box, mean over the
  classes with a box there. `map50` is over the head's own classes (what `simsearch
  evaluate` prints); `map50_common` over the dense head's classes for both heads, so
  the two are compared on the same boxes. The single-object head's one box is its
  only detection, scored with its calibrated class score.
- accuracy and CorLoc: the class and box (IoU >= 0.5) of the head's best answer
  against the image's largest object, the single-object head's own measures.
- boxes/image: what `localize` stores (the dense head: every detection above its threshold).

Collections: the real indoor photos (`../shared/data/indoor-boxes`, 85 photos, ~8
boxes each, 30 classes, `--val-fraction 0.25`: 21 held out) and composites of real
object crops on real photos with several objects each (`simsearch synth --objects
4`, its own val split). Each head is trained with `--seeds` seeds; the table gives
the mean and the spread (min-max), since 21 held-out photos make one run noisy.

    python benchmarks/bench_detector.py --quick
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import NOISE_NOTE, SHARED_DATA, print_table, progress, write_result

from bench_objects import build, composites

INDOOR_VAL_FRACTION = 0.25


def measure(index_dir: Path, head_dir: Path) -> dict:
    """Score the head saved in `head_dir` on its own held-out images of `index_dir`."""
    from simsearch.localizer.evaluate import evaluate

    result = evaluate(index_dir, "val", head_dir)
    return {"map50": result.map50, "accuracy": result.accuracy, "corloc": result.corloc, "mean_iou": result.mean_iou,
            "ap": {row["label"]: row["ap"] for row in result.detection}, "val_images": result.n}


def common_map(index_dir: Path, head_dir: Path, classes: list[str]) -> tuple[float, float]:
    """(mAP@0.5 over `classes`, boxes stored per image) of the head in `head_dir` on its held-out images."""
    from simsearch.localizer.predict import open_localizer
    from simsearch.localizer.evaluate import evaluation_ids
    from simsearch.localizer.train import load_maps
    from simsearch.localizer.metrics import mean_average_precision
    from simsearch.localizer.train_dense import truths
    from simsearch.storage.store import Store

    with Store(index_dir) as store:
        localizer = open_localizer(store, head_dir)
        ids = evaluation_ids(store, localizer.spec, "val")
        truth = truths(store, ids)
        maps = load_maps(store, ids)
    found = localizer.detect_maps(maps, min_score=0.0)
    named = [([localizer.spec.classes[int(k)] for k in d.labels], d.scores, d.boxes) for d in found]
    stored = sum(len(d.labels) for d in localizer.detect_maps(maps)) / max(len(ids), 1)
    return mean_average_precision(named, truth, classes)[0], stored


def run(name: str, index_dir: Path, work: Path, seeds: list[int], epochs: int, val_fraction: float) -> list[dict]:
    """Train both heads with each seed; one row per (head, seed)."""
    from simsearch.localizer.train import TrainConfig, train

    rows = []
    for seed in seeds:
        base = TrainConfig(index_dir, epochs=epochs, val_fraction=val_fraction, seed=seed, quiet=True)
        heads = {}
        for head, config in (("dense", replace(base, target="every", patience=max(8, epochs // 4))),
                             ("single", base)):
            folder = work / f"{name}-{head}-{seed}"
            progress(f"{name}: training the {head} head, seed {seed}")
            started = time.perf_counter()
            report = train(replace(config, head_dir=folder))
            heads[head] = (folder, report, time.perf_counter() - started)
        classes = heads["dense"][1].classes
        for head, (folder, report, seconds) in heads.items():
            scores = measure(index_dir, folder)
            scores["map50_common"], scores["boxes_per_image"] = common_map(index_dir, folder, classes)
            rows.append({"collection": name, "head": head, "seed": seed, "classes": len(report.classes),
                         "epochs": f"{report.best_epoch}/{report.epochs_run}", "train_s": round(seconds, 1),
                         **scores})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over seeds of each (collection, head), with the min-max of mAP and CorLoc (each seed holds out its own
    images where the rule is a fraction: their counts are listed)."""
    out = []
    for key in dict.fromkeys((r["collection"], r["head"]) for r in rows):
        mine = [r for r in rows if (r["collection"], r["head"]) == key]
        mean = {m: statistics.fmean(r[m] for r in mine) for m in
                ("map50", "map50_common", "accuracy", "corloc", "boxes_per_image", "train_s")}
        spread = lambda m: f"{min(r[m] for r in mine):.3f}-{max(r[m] for r in mine):.3f}"  # noqa: E731
        out.append({"collection": key[0], "head": key[1], "seeds": len(mine), "classes": mine[0]["classes"],
                    "val_images": "/".join(str(r["val_images"]) for r in mine), **mean, "map50_range": spread("map50"),
                    "corloc_range": spread("corloc")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a run of a few minutes: one seed, fewer composites")
    parser.add_argument("--composites", type=int, help="composite images (default 150 quick, 300 full); 0: none")
    parser.add_argument("--objects", type=int, default=4, help="objects pasted per composite")
    parser.add_argument("--seeds", type=int, help="training seeds per head (default 1 quick, 3 full)")
    parser.add_argument("--epochs", type=int, default=60, help="at most this many epochs per head (early stopping)")
    parser.add_argument("--seed", type=int, default=0, help="the composites' seed")
    args = parser.parse_args()
    indoor = SHARED_DATA / "indoor-boxes"
    if not indoor.is_dir():
        raise SystemExit(f"skipped: {indoor} is absent (set SIMSEARCH_SHARED_DATA to the shared data folder)")
    n_comp = args.composites if args.composites is not None else (150 if args.quick else 300)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))

    work = Path(tempfile.mkdtemp(prefix="simsearch-bench-detector-"))
    collections = [("indoor-boxes", indoor, INDOOR_VAL_FRACTION)]
    rows, builds = [], {}
    try:
        if n_comp:
            progress(f"generating {n_comp} composites, {args.objects} objects each")
            collections.append((f"composites x{args.objects}", composites(work / "synth", n_comp, args.objects,
                                                                           args.seed), 0.2))
        for name, data, val_fraction in collections:
            index_dir = work / f"index-{len(builds)}"
            progress(f"building an efficientnet-lite0 index of {name}")
            builds[name] = build(data, index_dir)
            rows += run(name, index_dir, work, seeds, args.epochs, val_fraction)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = summarise(rows)
    notes = [NOISE_NOTE,
             "map50: VOC all-point AP at IoU 0.5 over every non-difficult box, mean over the head's own classes with "
             "a held-out box; map50_common: over the dense head's classes for both heads (the single head's one box "
             "is its only detection)",
             "accuracy, corloc: the best answer's class and box (IoU >= 0.5) against each image's largest object",
             "boxes_per_image: predicted boxes localize stores (dense: every detection above the val-F1 threshold)",
             f"means over {len(seeds)} training seed(s); ranges are min-max over them",
             "indoor-boxes: --val-fraction 0.25 (by image hash); composites: their own val split",
             "builds: " + "; ".join(f"{name}: {b['images']} images, {b['objects']} boxes, {b['build_s']} s"
                                    for name, b in builds.items())]
    print_table("detector: the dense head (every object) vs the single-object head (the largest), held-out images",
                summary, ["collection", "head", "seeds", "classes", "val_images", "map50", "map50_common",
                          "map50_range", "accuracy", "corloc", "corloc_range", "boxes_per_image", "train_s"], notes)
    write_result("detector", {"quick": args.quick, "composites": n_comp, "objects_per_composite": args.objects,
                              "epochs": args.epochs, "seeds": seeds, "builds": builds, "rows": summary, "runs": rows})


if __name__ == "__main__":
    main()
