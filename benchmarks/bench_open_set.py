"""How often the localizer says "unknown" for things it was never trained on: score threshold alone vs score + familiarity.

For each labelled collection (indoor-boxes, real photos; composites of real object
crops pasted on real photos, one object each), measured side by side in one run:

  (a) open set: a head trained without some classes (`evaluate --open-set`); the
      share of the held-out classes' images that come out "unknown", and what the
      thresholds cost the known classes' validation images;
  (b) other photos: a head trained on every class of the collection, applied to
      the shared photos and the VOC images whose objects are none of its classes
      (a cat, a rocket, coffee, aeroplanes, horses...): the share "unknown".

"score only" is the softmax threshold keeping 95% of the correct validation
predictions (what heads did before familiarity); "score + familiarity" is what
heads do now: unknown when the box is unlike its class's training boxes (k-th
nearest cosine, threshold keeping 95% of correct validation predictions) or when
the score is below the 99% threshold.

    python benchmarks/bench_open_set.py [--quick]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from common import SHARED_DATA, print_table, progress, write_result


def build(data: Path, index_dir: Path) -> None:
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    build_index(BuildConfig(data, index_dir, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True),
                            keep_maps=True))


def other_photos(far_index: Path, head_dir: Path) -> dict:
    """The head of `head_dir` on every image of `far_index` holding none of its classes."""
    from simsearch.localizer.predict import open_localizer
    from simsearch.storage.store import Store

    with Store(far_index) as store:
        localizer = open_localizer(store, head_dir)
        ids = store.ids()
        objects = store.objects(ids)
        keep = [i for i in ids if not ({o.label for o in objects.get(i, [])} & set(localizer.spec.classes))]
        maps = store.feature_maps(keep)
    out = localizer.predict(maps)
    score_only = localizer.spec.training["calibration"]["score_only_threshold"]
    return {"images": len(keep), "unknown_score_only": float(np.mean(out.scores < score_only)),
            "unknown_familiarity": float(np.mean(out.unknown))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer composites and epochs (a few minutes)")
    parser.add_argument("--composites", type=int, help="composites to generate (default 120 quick, 300 full)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    indoor = SHARED_DATA / "indoor-boxes"
    if not indoor.is_dir():
        raise SystemExit(f"skipped: {indoor} is absent (set SIMSEARCH_SHARED_DATA to the shared data folder)")
    from simsearch.datasets.synth import SynthConfig, generate
    from simsearch.localizer.evaluate import open_set
    from simsearch.localizer.train import TrainConfig, train

    n_comp = args.composites or (120 if args.quick else 300)
    epochs = 15 if args.quick else 30
    work = Path(tempfile.mkdtemp(prefix="simsearch-bench-open-set-"))
    rows = []
    try:
        progress("building the other-photos index (shared photos + voc-mini)")
        far = work / "far"
        for part in ("photos", "voc-mini"):
            shutil.copytree(SHARED_DATA / part, far / part)
        build(far, work / "far-index")
        progress(f"generating {n_comp} composites (4 classes, one object each)")
        generate(SynthConfig(work / "synth" / "VOCsynth", (SHARED_DATA,), n=n_comp, seed=args.seed, top_classes=4,
                             size_range=(224, 288)), progress=False)
        # (name, data, val fraction, classes held out in (a))
        collections = [("indoor-boxes", indoor, 0.25, ("cabinetry", "chair")),
                       ("composites x1", work / "synth", 0.2, ("chair",))]
        for name, data, fraction, hold in collections:
            index_dir = work / f"index-{name.split()[0]}"
            progress(f"{name}: building")
            build(data, index_dir)
            config = TrainConfig(index_dir=index_dir, epochs=epochs, quiet=True, val_fraction=fraction, seed=args.seed)
            progress(f"{name}: open set, holding out {', '.join(hold)}")
            started = time.perf_counter()
            report = open_set(config, hold)
            rows.append({"collection": name, "test": f"held-out {'+'.join(hold)}", "images": report.held_out_images,
                         "unknown_score_only": report.held_out_unknown_rate_score_only,
                         "unknown_familiarity": report.held_out_unknown_rate,
                         "known_unknown_score_only": report.known_unknown_rate_score_only,
                         "known_unknown_familiarity": report.known_unknown_rate,
                         "known_accuracy": report.known_accuracy, "known_kept": report.known_accuracy_kept,
                         "seconds": round(time.perf_counter() - started, 1)})
            progress(f"{name}: a head on every class, applied to the other photos")
            started = time.perf_counter()
            head_dir = work / f"head-{name.split()[0]}"
            trained = train(TrainConfig(index_dir=index_dir, epochs=epochs, quiet=True, val_fraction=fraction,
                                        seed=args.seed, head_dir=head_dir))
            far_result = other_photos(work / "far-index", head_dir)
            calibration = trained.calibration
            rows.append({"collection": name, "test": "other photos", "images": far_result["images"],
                         "unknown_score_only": far_result["unknown_score_only"],
                         "unknown_familiarity": far_result["unknown_familiarity"],
                         "known_unknown_score_only": float(calibration["unknown_share_score_only"]),
                         "known_unknown_familiarity": float(calibration["unknown_share"]),
                         "known_accuracy": trained.val_accuracy,
                         "known_kept": float(calibration["correct_kept"]) * trained.val_accuracy,
                         "seconds": round(time.perf_counter() - started, 1)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    notes = ["unknown_*: share of the test images called \"unknown\" (higher is better)",
             "known_unknown_*: share of the known classes' validation images called \"unknown\" (lower is better)",
             "known_kept: share of those validation images right and not \"unknown\" (score + familiarity)",
             "score_only: softmax threshold keeping 95% of correct validation predictions (the rule before familiarity)"]
    print_table("open set: \"unknown\" on classes the head never saw", rows,
                ["collection", "test", "images", "unknown_score_only", "unknown_familiarity",
                 "known_unknown_score_only", "known_unknown_familiarity", "known_accuracy", "known_kept", "seconds"],
                notes)
    write_result("open_set", {"quick": args.quick, "composites": n_comp, "epochs": epochs, "rows": rows})


if __name__ == "__main__":
    main()
