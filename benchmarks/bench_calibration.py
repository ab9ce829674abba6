"""Which score cutoff says "no good match": score distributions on the shared data, and flag rates per rule.

Builds one EfficientNet-Lite0 index over ../shared/data (photos, voc-mini,
indoor-boxes), embeds 4 edits of every image (crop to 75%, flip, JPEG q30, scale
25% and back), then measures, for two collections (all of it, and indoor-boxes
alone):

  (a) random pairs: every pair of stored vectors;
  (b) near-duplicates: each edit against its original;
  (c) same-class vs different-class pairs (class = the label of an image's largest
      box, voc-mini and indoor-boxes) and, for each annotated image, its best
      same-class match and its top-1 among the others (leave-one-out);
  (d) out-of-domain queries: the 13 photos against the indoor-boxes-only index,
      their top-1 and top-5 scores;

and for each candidate rule the fraction of (b), (c) and (d) it marks weak.

    python benchmarks/bench_calibration.py
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from common import real_lite0_index, SHARED_DATA, print_table, progress, write_result

RULES = [(0.75, 0.01), (0.90, 0.05), (0.95, 0.05), (0.99, 0.01), (0.995, 0.01)]  # (random quantile, near-duplicate cap quantile)


def main() -> None:
    from simsearch.pipeline.read import open_image
    from simsearch.storage import calibration as cal

    work = Path(tempfile.mkdtemp(prefix="bench-calibration-"))
    try:
        embedder, ids, xb, records = real_lite0_index(work, ("photos", "voc-mini", "indoor-boxes"))
        part_of = np.array([next(p for p in ("photos", "voc-mini", "indoor-boxes") if f"/{p}/" in records[int(i)].path)
                            for i in ids])
        main_class = np.array([max(r.objects, key=lambda o: (o.xmax - o.xmin) * (o.ymax - o.ymin)).label
                               if r.objects else "" for r in (records[int(i)] for i in ids)])
        progress(f"embedding 4 edits of {len(ids)} images")
        images = [open_image(records[int(i)].path, draft=embedder.spec.preprocess.input_size) for i in ids]
        import time

        started = time.perf_counter()
        dups = cal.near_duplicate_scores(xb, images, lambda ims: embedder.embed_images(ims).vectors)
        per_image = (time.perf_counter() - started) / len(ids)
        dups = dups.reshape(len(ids), len(cal.EDITS))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    collections = {"all shared data": np.ones(len(ids), bool), "indoor-boxes only": part_of == "indoor-boxes"}
    distributions, flags = [], []
    payload: dict = {"images": len(ids), "edits": list(cal.EDITS), "near_duplicate_seconds_per_image": per_image,
                     "collections": {}}
    for name, members in collections.items():
        x = xb[members]
        pairs = cal.random_pair_scores(x)
        nd = dups[members].ravel()
        gram = x @ x.T
        np.fill_diagonal(gram, -np.inf)
        cls = main_class[members]
        annotated = cls != ""
        same = (cls[:, None] == cls[None, :]) & annotated[:, None] & annotated[None, :]
        upper = np.triu(np.ones_like(same), k=1)
        diff = ~same & annotated[:, None] & annotated[None, :] & upper
        same_pairs, diff_pairs = gram[same & upper], gram[diff]
        best_same = np.array([gram[i][same[i]].max() for i in np.flatnonzero(annotated) if same[i].sum() > 1 or
                              (same[i].sum() == 1 and not same[i, i])])
        top1_in = gram[annotated].max(axis=1)
        measured = {"random pairs": pairs, "near-duplicates": nd, "same-class pairs": same_pairs,
                    "different-class pairs": diff_pairs, "best same-class match": best_same,
                    "in-domain top-1 (leave-one-out)": top1_in}
        if name == "indoor-boxes only":
            q = xb[part_of == "photos"] @ x.T
            top = -np.sort(-q, axis=1)
            measured["out-of-domain top-1 (photos)"] = top[:, 0]
            measured["out-of-domain top-5 (photos)"] = top[:, :5].ravel()
        entry = {"distributions": {k: cal.quantiles(v) | {"n": len(v)} for k, v in measured.items()}, "rules": {}}
        for e, edit in enumerate(cal.EDITS):
            measured_edit = dups[members][:, e]
            distributions.append({"collection": name, "scores": f"  near-duplicate: {edit}", "n": len(measured_edit),
                                  **cal.quantiles(measured_edit, (0.01, 0.05, 0.5, 0.95, 0.99))})
        for what, scores in measured.items():
            distributions.append({"collection": name, "scores": what, "n": len(scores),
                                  **cal.quantiles(scores, (0.01, 0.05, 0.5, 0.95, 0.99))})
        for rq, nq in RULES:
            cutoff = cal.cutoff_rule(pairs, nd, rq, nq)
            uncapped = cal.cutoff_rule(pairs, None, rq)
            row = {"collection": name, "rule": f"min(random q{rq * 100:g}, near-dup q{nq * 100:g})",
                   "random_q": round(uncapped, 4), "cutoff": cutoff}
            for what, scores in measured.items():
                if what not in ("random pairs", "different-class pairs"):
                    row[what] = round(float((scores < cutoff).mean()), 3)
            row["random pairs"] = round(float((pairs < cutoff).mean()), 3)
            row["different-class pairs"] = round(float((diff_pairs < cutoff).mean()), 3)
            flags.append(row)
            entry["rules"][row["rule"]] = row
        payload["collections"][name] = entry

    print_table("score quantiles (efficientnet-lite0, cosine)", distributions,
                ["collection", "scores", "n", "q01", "q05", "q50", "q95", "q99"])
    columns = ["collection", "rule", "random_q", "cutoff", "near-duplicates", "best same-class match",
               "in-domain top-1 (leave-one-out)", "same-class pairs", "different-class pairs",
               "out-of-domain top-1 (photos)", "out-of-domain top-5 (photos)"]
    print_table("fraction marked weak (score < cutoff)", flags, columns,
                [f"near-duplicates: {per_image:.3f} s an image for its 4 edits (decode excluded)"])
    write_result("calibration", payload)


if __name__ == "__main__":
    main()
