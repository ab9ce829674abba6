"""Embedding throughput: the model alone, decoding alone, and build-index end to end.

(a) model only: Embedder.embed_batch on random uint8 pixels, as the decoders hand them over
    (so the conversion to the model's input counts as the model's; speed does not depend on
    the weight values, so ResNet50 runs with random weights here, where its
    ImageNet file cannot be downloaded; EfficientNet-Lite0 runs with its real ones);
    and once more on the JPEGs below, decoded beforehand, in the shape groups a build
    forms (the bar's bound uses the first; the second says what the photos' shapes cost);
(b) decode + preprocess only: the decoding build-index runs (on a CPU by default threads in its own
    process, between forward passes), no model; a decode process (--workers 1) beside it;
(c) build-index end to end on the same JPEGs (scan, hash, decode, embed, SQLite, FAISS).
The share of the bound is (c) / min(a, b). On a CPU, decoding and the model share
the same cores, so the bound they can reach together is lower still: 1 / (1/a + 1/b)
when each would use every core; both are printed. With --rounds N, each round measures
(a) and (b) again just before its build, since this CPU's speed moves from minute to minute.

(a) and (c) run each backend (torch, and openvino where installed) at bf16 (fp32 without
bf16 units). `--baseline DIR` adds (c) rows run with the simsearch of another checkout (say
the code before a change, `git worktree add ../before main`), in the same run, so the
speed-up is a ratio of side-by-side figures.

    python benchmarks/bench_embed.py --quick
    python benchmarks/bench_embed.py --quick --baseline ../before
    python benchmarks/bench_embed.py --images 1000 --rounds 3 --skip-resnet   # the share of the bound, 3 times
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import NOISE_NOTE, print_table, progress, rate, replicated_jpegs, write_result


def model_only(embedder, batch_size: int, seconds: float) -> float:
    import torch

    x = torch.randint(0, 256, (batch_size, 3, 224, 224), dtype=torch.uint8)  # pixels, as the decoders give them

    def step() -> int:
        embedder.embed_batch(x)
        return batch_size

    return rate(step, seconds)


def decode_only(paths: list[Path], pre, workers: int, batch_size: int) -> float:
    """Images/s through the decoding build-index runs (`workers` as its --workers), with no model behind it."""
    import torch

    from simsearch.pipeline.embed import ImageFileDataset, _decoded_batches, decode_workers

    started = time.perf_counter()
    n = 0
    for batch in _decoded_batches(ImageFileDataset(paths, pre), batch_size,
                                  decode_workers(workers, torch.device("cpu")), pin_memory=False):
        n += len(batch.good)
    return n / (time.perf_counter() - started)


def model_on_images(embedder, batches: list) -> float:
    """Images/s of the model alone over a build's own batches, decoded beforehand.

    The same images in the same shape groups a build feeds it, every shape new to the freshly
    made embedder as in a build; against one warm 224 x 224 batch (model_only) this shows what
    the photos' mixed shapes cost the model itself, apart from the pipeline around it.
    """
    started, n = time.perf_counter(), 0
    for batch in batches:
        if batch.good:
            embedder.embed_groups(len(batch.good), batch.groups)
            n += len(batch.good)
    return n / (time.perf_counter() - started)


def _decoding(workers: int) -> str:
    """How --workers N decodes on a CPU, in words."""
    import torch

    from simsearch.pipeline.embed import decode_workers

    n = decode_workers(workers, torch.device("cpu"))
    return f"{n} process{'es' if n > 1 else ''}" if n else f"{torch.get_num_threads()} threads, in process"


def end_to_end(folder: Path, model: str, weights: str | None, precision: str, device: str,
               workers: int, batch_size: int, backend: str | None = None, code: Path | None = None) -> dict:
    """build_index in a fresh process, as a user runs it.

    In one process, a bf16 build that followed an fp32 one ran at 52 img/s against
    64-73 img/s on its own (oneDNN and allocator state carry over), so each
    measurement gets its own interpreter.
    """
    args = json.dumps([str(folder), model, weights, precision, device, workers, batch_size, backend])
    env = {**os.environ, "SIMSEARCH_BENCH_CODE": str(Path(code).resolve())} if code else None  # --baseline
    out = subprocess.run([sys.executable, __file__, "--e2e-child", args], check=True, capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _end_to_end_here(folder: Path, model: str, weights: str | None, precision: str, device: str,
                     workers: int, batch_size: int, backend: str | None) -> dict:
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    index_dir = Path(tempfile.mkdtemp(prefix="simsearch-bench-index-"))
    try:
        chosen = {"backend": backend} if backend else {}  # a baseline checkout may predate backends
        embed = EmbedConfig(model=model, weights=weights, device=device, precision=precision, batch_size=batch_size,
                            workers=workers, quiet=True, **chosen)
        started = time.perf_counter()
        report = build_index(BuildConfig(folder, index_dir, embed))
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(index_dir, ignore_errors=True)
    return {"embed_loop_img_s": report.images_per_second, "wall_img_s": report.added / wall,
            "images": report.added, "index_type": report.index_type, "backend": getattr(report, "backend", "torch")}


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
                    embedder.runner.model = torch.compile(embedder.model, mode="max-autotune-no-cudagraphs")

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
    parser.add_argument("--workers", type=int, default=-1,
                        help="decode processes, as build-index's --workers (-1: its default)")
    parser.add_argument("--seconds", type=float, help="time per model-only measurement (default 4 quick, 15 full)")
    parser.add_argument("--skip-resnet", action="store_true", help="only efficientnet-lite0")
    parser.add_argument("--baseline", type=Path, help="another checkout whose build-index runs beside this one's (c)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="build each way this many times, taking turns, each after its own model-only and "
                             "decode-only timings; medians, and the range of the share of the bound (this CPU's "
                             "speed moves from minute to minute)")
    parser.add_argument("--e2e-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.e2e_child:
        if os.environ.get("SIMSEARCH_BENCH_CODE"):  # ahead of this checkout, which common.py put first
            sys.path.insert(0, os.environ["SIMSEARCH_BENCH_CODE"])
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

    from simsearch.pipeline.backends import openvino_installed

    backends = ["torch", "openvino"] if openvino_installed() else ["torch"]
    fast = precisions[-1]  # bf16 where the CPU has it
    model_rate: dict[tuple[str, str, str], float] = {}
    for name, backbone in models.items():
        for backend in backends:
            for precision in precisions if backend == "torch" else [fast]:
                progress(f"(a) model only: {name} {backend} {precision}")
                r = model_only(Embedder(backbone, "cpu", precision, backend), args.batch_size, seconds)
                model_rate[name, backend, precision] = r
                rows.append({"stage": "a: model only", "model": name, "backend": backend, "precision": precision,
                             "img_s": r, "weights": "ImageNet" if name != "resnet50" else "random (speed only)"})

    progress("(b) decode + preprocess only")
    pre = models["efficientnet-lite0"].spec.preprocess
    decode = decode_only(paths, pre, args.workers, args.batch_size)  # what build-index runs: the bound's (b)
    rows.append({"stage": "b: decode+preprocess", "backend": _decoding(args.workers), "precision": "-",
                 "img_s": decode, "workers": args.workers})
    for other in (0, 1):
        if other != args.workers and not (args.workers < 0 and other == 0):
            rows.append({"stage": "b: decode+preprocess", "backend": _decoding(other), "precision": "-",
                         "img_s": decode_only(paths, pre, other, args.batch_size), "workers": other})

    from simsearch.pipeline.embed import ImageFileDataset, _decoded_batches

    decoded = list(_decoded_batches(ImageFileDataset(paths, pre), args.batch_size, 0, pin_memory=False))
    images_rate: dict[tuple[str, str], float] = {}
    for name, backbone in models.items():
        for backend in backends:
            progress(f"(a) model only on these images' shape groups: {name} {backend} {fast}")
            images_rate[name, backend] = model_on_images(Embedder(backbone, "cpu", fast, backend), decoded)
            rows.append({"stage": "a: model only, these images", "model": name, "backend": backend,
                         "precision": fast, "img_s": images_rate[name, backend]})

    weights_of = {"efficientnet-lite0": None, "resnet50": "random"}
    baseline_rate: dict[str, float] = {}
    for name, backbone in models.items():
        runs = [(backend, None) for backend in backends] + ([("baseline", args.baseline)] if args.baseline else [])
        measured: dict[str, list[tuple[float, ...]]] = {backend: [] for backend, _ in runs}
        for r in range(args.rounds):
            for backend, code in runs:
                a, a_images = model_rate.get((name, backend, fast), 0.0), images_rate.get((name, backend), 0.0)
                b = decode
                if args.rounds > 1 and not code:  # this round's bound, taken just before its build
                    progress(f"(a, b) model only and decode only, round {r + 1}: {name} {backend} {fast}")
                    a = model_only(Embedder(backbone, "cpu", fast, backend), args.batch_size, seconds)
                    a_images = model_on_images(Embedder(backbone, "cpu", fast, backend), decoded)
                    b = decode_only(paths, pre, args.workers, args.batch_size)
                progress(f"(c) build-index end to end{f', round {r + 1}' if args.rounds > 1 else ''}: "
                         f"{name} {backend} {fast}")
                e2e = end_to_end(folder, name, weights_of[name], fast, "cpu", args.workers, args.batch_size,
                                 None if code else backend, code)
                measured[backend].append((e2e["embed_loop_img_s"], e2e["wall_img_s"], a, a_images, b))
                if code:
                    baseline_backend = e2e["backend"]
        for backend, code in runs:
            loops, walls, models_a, images_a, decodes = zip(*measured[backend])
            row = {"stage": "c: build-index", "model": name, "precision": fast, "img_s": statistics.median(loops),
                   "wall_img_s": statistics.median(walls)}
            if code:
                row["backend"] = f"baseline ({Path(code).name}, {baseline_backend})"
                baseline_rate[name] = row["img_s"]
            else:
                shares = [c * (1 / a + 1 / b) for c, a, b in zip(loops, models_a, decodes)]
                row.update(backend=backend,
                           of_min_ab=statistics.median(c / min(a, b) for c, a, b in zip(loops, models_a, decodes)),
                           of_shared_bound=statistics.median(shares),
                           of_bound_these_images=statistics.median(c * (1 / a + 1 / b)
                                                                   for c, a, b in zip(loops, images_a, decodes)))
                if args.rounds > 1:
                    row["bound_share_range"] = f"{min(shares):.2f}-{max(shares):.2f}"
                    row["rounds_img_s"] = [round(c, 1) for c in loops]
                    row["rounds_model_decode_img_s"] = [(round(a), round(b)) for a, b in zip(models_a, decodes)]
            rows.append(row)
        for row in rows:
            if row["stage"] == "c: build-index" and row["model"] == name and name in baseline_rate:
                row["vs_baseline"] = row["img_s"] / baseline_rate[name]

    rows += cuda_rows(models, 256, seconds)
    speedups = {name: model_rate[name, "torch", "bf16"] / model_rate[name, "torch", "fp32"]
                for name in models if (name, "torch", "bf16") in model_rate}
    speedups |= {f"{name} openvino": model_rate[name, "openvino", fast] / model_rate[name, "torch", fast]
                 for name in models if (name, "openvino", fast) in model_rate}
    notes = [NOISE_NOTE,
             f"{len(paths)} real JPEGs (photos, VOC, indoor, re-encoded copies), batch {args.batch_size}, "
             f"torch threads {torch.get_num_threads()}",
             "of_min_ab = (c) / min(a, b); of_shared_bound = (c) / (1/(1/a + 1/b)): on a CPU decode and model share cores",
             "of_bound_these_images: the same with (a) the model alone on these images' shape groups (a fresh model, "
             "so each shape is new as in a build) instead of one warm 224 x 224 batch",
             "c: img_s is the embedding loop (decode, model, SQLite commit); wall_img_s adds scan, hashing, model load, FAISS"]
    notes += [f"model-only speed-up, {name}: {s:.2f}x ({'openvino/torch ' + fast if 'openvino' in name else 'bf16/fp32'})"
              for name, s in speedups.items()]
    print_table("embed: images/s", rows,
                ["stage", "model", "backend", "precision", "img_s", "wall_img_s", "of_min_ab", "of_shared_bound",
                 "bound_share_range", "of_bound_these_images", "vs_baseline", "status"], notes)
    write_result("embed", {"quick": args.quick, "images": len(paths), "batch_size": args.batch_size,
                           "rows": rows, "bf16_speedup": speedups})


if __name__ == "__main__":
    main()
