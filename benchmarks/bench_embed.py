"""Embedding throughput: the model alone, decoding alone, and build-index end to end.

(a) model only: Embedder.embed_batch on random tensors (speed does not depend on
    the weight values, so ResNet50 runs with random weights here, where its
    ImageNet file cannot be downloaded; EfficientNet-Lite0 runs with its real ones);
(b) decode + preprocess only: the DataLoader path build-index uses, no model;
(c) build-index end to end on the same JPEGs (scan, hash, decode, embed, SQLite, FAISS).
The share of the bound is (c) / min(a, b). On a CPU, decoding and the model share
the same cores, so the bound they can reach together is lower still: 1 / (1/a + 1/b)
when each would use every core; both are printed.

    python benchmarks/bench_embed.py --quick
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import NOISE_NOTE, print_table, progress, rate, replicated_jpegs, write_result


def model_only(embedder, batch_size: int, seconds: float) -> float:
    import torch

    x = torch.randn(batch_size, 3, 224, 224)

    def step() -> int:
        embedder.embed_batch(x)
        return batch_size

    return rate(step, seconds)


def decode_only(paths: list[Path], pre, workers: int, batch_size: int) -> float:
    """Images/s through the same DataLoader build-index uses, with no model behind it."""
    from torch.utils.data import DataLoader

    from simsearch.pipeline.embed import ImageFileDataset, _collate, default_workers

    workers = default_workers() if workers < 0 else workers
    loader = DataLoader(ImageFileDataset(paths, pre), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, prefetch_factor=4 if workers else None)
    started = time.perf_counter()
    n = 0
    for items in loader:
        n += sum(d.tensor is not None for d in items)
    return n / (time.perf_counter() - started)


def end_to_end(folder: Path, model: str, weights: str | None, precision: str, device: str,
               workers: int, batch_size: int) -> dict:
    """build_index in a fresh process, as a user runs it.

    In one process, a bf16 build that followed an fp32 one ran at 52 img/s against
    64-73 img/s on its own (oneDNN and allocator state carry over), so each
    measurement gets its own interpreter.
    """
    args = json.dumps([str(folder), model, weights, precision, device, workers, batch_size])
    out = subprocess.run([sys.executable, __file__, "--e2e-child", args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _end_to_end_here(folder: Path, model: str, weights: str | None, precision: str, device: str,
                     workers: int, batch_size: int) -> dict:
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    index_dir = Path(tempfile.mkdtemp(prefix="simsearch-bench-index-"))
    try:
        embed = EmbedConfig(model, weights, device, precision, batch_size, workers, quiet=True)
        started = time.perf_counter()
        report = build_index(BuildConfig(folder, index_dir, embed))
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(index_dir, ignore_errors=True)
    return {"embed_loop_img_s": report.images_per_second, "wall_img_s": report.added / wall,
            "images": report.added, "index_type": report.index_type}


def cuda_rows(models: dict, batch_size: int, seconds: float) -> list[dict]:
    """fp16/bf16, channels_last, torch.compile on CUDA; one skipped row without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return [{"stage": "cuda variants", "status": "skipped: no CUDA GPU visible"}]
    from simsearch.pipeline.embed import Embedder

    rows = []
    x = torch.randn(batch_size, 3, 224, 224, device="cuda")
    for name, backbone in models.items():
        for precision in ("fp16", "bf16"):
            embedder = Embedder(backbone, "cuda", precision)
            for compiled in (False, True):
                if compiled:
                    embedder.model = torch.compile(embedder.model, mode="max-autotune-no-cudagraphs")

                def step() -> int:
                    embedder.embed_batch(x)
                    torch.cuda.synchronize()
                    return batch_size

                rows.append({"stage": "a: model only", "model": name, "device": torch.cuda.get_device_name(0),
                             "precision": precision + " channels_last" + (" compiled" if compiled else ""),
                             "img_s": rate(step, seconds, warmup=3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a run of a minute or two: fewer images, shorter timings")
    parser.add_argument("--images", type=int, help="JPEGs to replicate (default 300 quick, 3000 full)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=-1, help="decode processes (-1: build-index's default)")
    parser.add_argument("--seconds", type=float, help="time per model-only measurement (default 4 quick, 15 full)")
    parser.add_argument("--skip-resnet", action="store_true", help="only efficientnet-lite0")
    parser.add_argument("--e2e-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.e2e_child:
        folder, *rest = json.loads(args.e2e_child)
        print(json.dumps(_end_to_end_here(Path(folder), *rest)))
        return
    n_images = args.images or (300 if args.quick else 3000)
    seconds = args.seconds or (4.0 if args.quick else 15.0)

    import torch

    from simsearch.pipeline.embed import Embedder, cpu_has_bf16, load_backbone

    progress(f"replicating {n_images} real JPEGs")
    folder = replicated_jpegs(n_images)
    paths = sorted(folder.glob("*.jpg"))
    precisions = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    models = {"efficientnet-lite0": load_backbone("efficientnet-lite0")}  # real ImageNet weights
    if not args.skip_resnet:
        models["resnet50"] = load_backbone("resnet50", "random")  # speed only: weights' values do not matter
    rows: list[dict] = []

    model_rate: dict[tuple[str, str], float] = {}
    for name, backbone in models.items():
        for precision in precisions:
            progress(f"(a) model only: {name} {precision}")
            r = model_only(Embedder(backbone, "cpu", precision), args.batch_size, seconds)
            model_rate[name, precision] = r
            rows.append({"stage": "a: model only", "model": name, "device": "cpu", "precision": precision,
                         "img_s": r, "weights": "ImageNet" if name != "resnet50" else "random (speed only)"})

    progress("(b) decode + preprocess only")
    pre = models["efficientnet-lite0"].spec.preprocess
    decode = decode_only(paths, pre, args.workers, args.batch_size)
    decode_1 = decode_only(paths, pre, 0, args.batch_size)
    rows.append({"stage": "b: decode+preprocess", "device": "cpu", "precision": "-", "img_s": decode,
                 "workers": args.workers})
    rows.append({"stage": "b: decode+preprocess", "device": "cpu (main process)", "precision": "-",
                 "img_s": decode_1, "workers": 0})

    for precision in precisions:
        progress(f"(c) build-index end to end: efficientnet-lite0 {precision}")
        e2e = end_to_end(folder, "efficientnet-lite0", None, precision, "cpu", args.workers, args.batch_size)
        a = model_rate["efficientnet-lite0", precision]
        rows.append({"stage": "c: build-index", "model": "efficientnet-lite0", "device": "cpu",
                     "precision": precision, "img_s": e2e["embed_loop_img_s"], "wall_img_s": e2e["wall_img_s"],
                     "of_min_ab": e2e["embed_loop_img_s"] / min(a, decode),
                     "of_shared_bound": e2e["embed_loop_img_s"] * (1 / a + 1 / decode)})

    rows += cuda_rows(models, 256, seconds)
    speedups = {name: model_rate[name, "bf16"] / model_rate[name, "fp32"]
                for name in models if (name, "bf16") in model_rate}
    notes = [NOISE_NOTE,
             f"{len(paths)} real JPEGs (photos, VOC, indoor, re-encoded copies), batch {args.batch_size}, "
             f"torch threads {torch.get_num_threads()}",
             "of_min_ab = (c) / min(a, b); of_shared_bound = (c) / (1/(1/a + 1/b)): on a CPU decode and model share cores",
             "c: img_s is the embedding loop (decode, model, SQLite commit); wall_img_s adds scan, hashing, model load, FAISS"]
    notes += [f"bf16/fp32 model-only speed-up, {name}: {s:.2f}x" for name, s in speedups.items()]
    print_table("embed: images/s", rows,
                ["stage", "model", "device", "precision", "img_s", "wall_img_s", "of_min_ab", "of_shared_bound",
                 "status"], notes)
    write_result("embed", {"quick": args.quick, "images": len(paths), "batch_size": args.batch_size,
                           "rows": rows, "bf16_speedup": speedups})


if __name__ == "__main__":
    main()
