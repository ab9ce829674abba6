"""Embedding on a CUDA GPU: the model alone, JPEG decode on CPU workers vs on the GPU, build-index end to end.

(a) model only, on random input already on the GPU:
    - the backbone's forward pass alone, eager fp16/bf16 channels_last, torch.compile
      (inductor) and torch.compile with CUDA graphs ("reduce-overhead");
    - Embedder.embed_batch, which adds pooling, normalising and copying the vector and
      the 7x7 map back to the host (what build-index pays per batch).
(b) decode + preprocess to the model's input:
    - the DataLoader path build-index uses (Pillow with JPEG draft, one process per spare core);
    - nvJPEG through torchvision.io.decode_jpeg(device="cuda"), resized on the GPU;
    and, with real Lite0 weights, the cosine between vectors of the same files decoded both ways.
(c) build-index end to end on the GPU (scan, hash, decode, embed, SQLite, FAISS), in a fresh process.

Without a CUDA GPU it prints one skipped row and exits 0.

    python benchmarks/bench_gpu.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import NOISE_NOTE, print_table, progress, rate, replicated_jpegs, write_result


def forward_rows(name: str, backbone, batch_size: int, seconds: float, compile_modes: list[str]) -> list[dict]:
    import torch

    from simsearch.pipeline.embed import Embedder

    rows = []
    x = torch.randn(batch_size, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model = backbone.features.to("cuda", memory_format=torch.channels_last).eval()
        variants = [("eager", model)] + [(mode, torch.compile(model, mode=None if mode == "default" else mode))
                                         for mode in compile_modes]
        for label, net in variants:
            @torch.inference_mode()
            def step() -> int:
                with torch.autocast("cuda", dtype=dtype):
                    net(x)
                torch.cuda.synchronize()
                return batch_size

            progress(f"(a) {name} forward {precision} {label}")
            started = time.perf_counter()
            step()  # compiles here, if it compiles
            first = time.perf_counter() - started
            rows.append({"stage": "a: forward only", "model": name, "precision": f"{precision} channels_last",
                         "variant": label, "batch": batch_size, "img_s": rate(step, seconds, warmup=3),
                         "first_call_s": first})
        embedder = Embedder(backbone, "cuda", precision)

        def embed_step() -> int:
            embedder.embed_batch(x)
            return batch_size

        progress(f"(a) {name} embed_batch {precision}")
        rows.append({"stage": "a: embed_batch", "model": name, "precision": f"{precision} channels_last",
                     "variant": "eager + pool + copy to host", "batch": batch_size,
                     "img_s": rate(embed_step, seconds, warmup=3)})
    return rows


def _images(batch) -> list:
    """A `DecodedBatch`'s good images, one (3, H, W) tensor each, in file order."""
    out: list = [None] * len(batch.good)
    for members, stacked in batch.groups:
        for j, i in enumerate(members):
            out[i] = stacked[j]
    return out


def mixed_shape_rows(paths: list[Path], models: dict, batch_size: int, workers: int) -> list[dict]:
    """embed_batch on real decoded batches, whose aspect-kept inputs come in several shapes and group sizes.

    "ragged" runs each shape group at its own size, as before padding; "padded" pads
    each group to a power of two (what Embedder does on CUDA); "re-formed" first regroups
    the same images into full batches of one shape (`ShapeBins`, what build-index does
    since), padded as well. The first pass over the batches meets every shape for the first
    time; the second shows the steady state.
    """
    import torch
    from torch.utils.data import DataLoader

    from simsearch.pipeline.embed import Embedder, ImageFileDataset, _collate
    from simsearch.pipeline.shape_bins import ShapeBins

    rows = []
    for name, backbone in models.items():
        loader = DataLoader(ImageFileDataset(paths[:8 * batch_size], backbone.spec.preprocess), batch_size=batch_size,
                            num_workers=workers, collate_fn=_collate)
        decoded = list(loader)
        bins = ShapeBins(batch_size)
        reformed = [stacked for batch in decoded for _, stacked in bins.add(batch)]
        reformed += [stacked for _, stacked in bins.drain()]
        by_label = {"ragged": [_images(b) for b in decoded], "re-formed": reformed}
        by_label["padded"] = by_label["ragged"]
        for label in ("ragged", "padded", "re-formed"):
            batches = by_label[label]
            embedder = Embedder(backbone, "cuda", "bf16")
            if label == "ragged":
                embedder._padded_size = lambda n: n
            for attempt in ("first pass", "second pass"):
                progress(f"(a) {name} embed_batch on real mixed shapes, {label}, {attempt}")
                started = time.perf_counter()
                for batch in batches:
                    embedder.embed_batch(batch)
                torch.cuda.synchronize()
                rows.append({"stage": "a: embed_batch, real shapes", "model": name, "precision": "bf16 channels_last",
                             "variant": f"{label}, {attempt}", "batch": batch_size,
                             "img_s": sum(map(len, batches)) / (time.perf_counter() - started)})
    return rows


def gpu_decode(paths: list[Path], pre, batch_size: int):
    """nvJPEG decode and GPU resize into the same normalised tensors `preprocess` makes on the CPU."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    mean = torch.tensor(pre.mean, device="cuda").view(3, 1, 1)
    std = torch.tensor(pre.std, device="cuda").view(3, 1, 1)
    for start in range(0, len(paths), batch_size):
        data = [read_file(str(p)) for p in paths[start:start + batch_size]]
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
        out = []
        for im in images:
            w, h = pre.input_size(im.shape[2], im.shape[1])
            x = torch.nn.functional.interpolate(im[None].float(), size=(h, w), mode=pre.interpolation,
                                                antialias=True, align_corners=False)[0]
            out.append((x.clamp_(0, 255).div_(255.0) - mean) / std)
        yield out


def decode_rows(paths: list[Path], backbone, batch_size: int, workers: int) -> tuple[list[dict], dict]:
    import torch
    from torch.utils.data import DataLoader

    from simsearch.pipeline.embed import Embedder, ImageFileDataset, _collate

    pre = backbone.spec.preprocess
    loader = DataLoader(ImageFileDataset(paths, pre), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, prefetch_factor=4)
    progress(f"(b) CPU decode, {workers} workers")
    started = time.perf_counter()
    n = sum(len(b.good) for b in loader)
    cpu = n / (time.perf_counter() - started)
    progress("(b) GPU decode (nvJPEG)")
    for _ in gpu_decode(paths[:batch_size], pre, batch_size):  # warm-up: nvJPEG handles, kernels
        pass
    torch.cuda.synchronize()
    started = time.perf_counter()
    n = 0
    for batch in gpu_decode(paths, pre, batch_size):
        n += len(batch)
    torch.cuda.synchronize()
    gpu = n / (time.perf_counter() - started)
    rows = [{"stage": "b: decode+preprocess", "variant": f"Pillow draft, {workers} CPU workers", "img_s": cpu},
            {"stage": "b: decode+preprocess", "variant": "nvJPEG decode_jpeg(cuda) + GPU resize", "img_s": gpu}]

    progress("(b) fidelity: the same files decoded both ways, embedded with real Lite0 weights")
    sample = paths[:512]
    embedder = Embedder(backbone, "cuda", "fp32")
    cpu_images = [t for b in DataLoader(ImageFileDataset(sample, pre), batch_size=64, num_workers=workers,
                                        collate_fn=_collate) for t in _images(b)]
    a = embedder.embed_batch(cpu_images).vectors
    b = embedder.embed_batch([t for batch in gpu_decode(sample, pre, 64) for t in batch]).vectors
    cos = (a * b).sum(axis=1)
    fidelity = {"images": len(sample), "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
    return rows, fidelity


def end_to_end(folder: Path, model: str, weights: str | None, precision: str, workers: int, batch_size: int) -> dict:
    here = Path(__file__).resolve().parent
    args = json.dumps([str(folder), model, weights, precision, "cuda", workers, batch_size])
    out = subprocess.run([sys.executable, str(here / "bench_embed.py"), "--e2e-child", args],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images, shorter timings, no CUDA graphs")
    parser.add_argument("--images", type=int, help="JPEGs to replicate (default 2000 quick, 20000 full)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, help="time per model-only measurement (default 3 quick, 10 full)")
    parser.add_argument("--workers", type=int, default=-1, help="CPU decode processes (-1: cores - 1)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print_table("gpu: images/s", [{"stage": "all", "status": "skipped: no CUDA GPU visible"}], ["stage", "status"])
        return
    from simsearch.pipeline.embed import load_backbone

    torch.backends.cudnn.benchmark = True
    n_images = args.images or (2000 if args.quick else 20000)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    workers = max(1, (os.cpu_count() or 2) - 1) if args.workers < 0 else args.workers
    compile_modes = ["default"] if args.quick else ["default", "reduce-overhead"]
    rows: list[dict] = []
    models = {"resnet50": load_backbone("resnet50", "random"),  # speed only: weights' values do not matter
              "efficientnet-lite0": load_backbone("efficientnet-lite0")}
    for name, backbone in models.items():
        rows += forward_rows(name, backbone, args.batch_size, seconds, compile_modes)

    progress(f"replicating {n_images} real JPEGs")
    folder = replicated_jpegs(n_images)
    paths = sorted(folder.glob("*.jpg"))
    rows += mixed_shape_rows(paths, models, args.batch_size, workers)
    decoded, fidelity = decode_rows(paths, models["efficientnet-lite0"], args.batch_size, workers)
    rows += decoded

    for name, weights in (("efficientnet-lite0", None), ("resnet50", "random")):
        progress(f"(c) build-index end to end: {name} on cuda")
        e2e = end_to_end(folder, name, weights, "auto", workers, args.batch_size)
        rows.append({"stage": "c: build-index", "model": name, "precision": "auto", "variant": f"{workers} decode workers",
                     "batch": args.batch_size, "img_s": e2e["embed_loop_img_s"], "wall_img_s": e2e["wall_img_s"]})

    gpu = torch.cuda.get_device_name(0)
    notes = [NOISE_NOTE, f"GPU: {gpu}; torch {torch.__version__}; {os.cpu_count()} CPU cores; {len(paths)} real JPEGs "
             "(281x500 to 741x500, re-encoded copies of ../shared/data photos)",
             f"GPU vs CPU decode, Lite0 fp32 vectors of the same {fidelity['images']} files: mean cosine "
             f"{fidelity['mean_cosine']:.4f}, min {fidelity['min_cosine']:.4f}",
             "c: img_s is the embedding loop (decode, model, SQLite commit); wall_img_s adds scan, hashing, "
             "model load, FAISS"]
    print_table("gpu: images/s", rows, ["stage", "model", "precision", "variant", "batch", "img_s", "wall_img_s",
                                        "first_call_s"], notes)
    write_result("gpu", {"quick": args.quick, "gpu": gpu, "images": len(paths), "rows": rows,
                         "decode_fidelity": fidelity})


if __name__ == "__main__":
    main()
