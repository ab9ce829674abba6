"""CPU backends for the backbone, side by side: speed and fidelity to fp32 on the same images.

Variants (each skipped with its reason where its package is missing):
  torch fp32 / torch bf16   eager, channels_last (bf16 under autocast: the default before backends)
  compile bf16              torch.compile (inductor) with freezing, channels_last, autocast
  pt2e int8                 PT2E post-training quantization with the X86 inductor quantizer (torchao),
                            calibrated on real JPEGs, then torch.compile
  openvino bf16             the module converted in-process (simsearch's OpenVINORunner, dynamic shapes):
                            one stream a core, a few images a request
  openvino bf16 1req        the same model run as before streams: the whole batch as one request on
                            all threads (LATENCY hint)
  openvino int8             the same, quantized by NNCF, calibrated on real JPEGs

Fidelity: every variant embeds the real photos of ../shared/data (aspect-kept, several
input shapes) through `Embedder.embed_batch`; mean cosine of the pooled vectors to torch
fp32's, and the share of each image's 10 nearest neighbours (among those photos) that fp32
also finds. Speed: `embed_batch` on one 32 x 3 x 224 x 224 batch, the variants taking turns
for a few rounds (median), so a busy machine slows them alike. The batch is uint8 pixels, as
the decoders give them, so each variant's time includes turning them into the model's input. Calibration images are
re-encoded copies of the same photos (`common.replicated_jpegs`).

    python benchmarks/bench_backends.py --quick
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from common import NOISE_NOTE, print_table, progress, replicated_jpegs, source_photos, write_result

VARIANTS = ("torch-fp32", "torch-bf16", "compile-bf16", "pt2e-int8", "openvino-bf16", "openvino-bf16-1req",
            "openvino-int8")


class CompiledRunner:
    """torch.compile (inductor, freezing) of the module, bf16 autocast, channels_last."""

    name = "torch"

    def __init__(self, model, calibration):
        import torch
        import torch._inductor.config as inductor

        inductor.freezing = True  # constant-fold the weights into the graph: inference only
        self.model = torch.compile(model)

    def __call__(self, batches):
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [self.model(x.contiguous(memory_format=torch.channels_last)) for x in batches]


class PT2EInt8Runner:
    """PT2E INT8: export with dynamic sides, X86InductorQuantizer, calibrate, convert, compile."""

    name = "torch"

    def __init__(self, model, calibration):
        import torch
        import torch._inductor.config as inductor
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        inductor.freezing = True
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        side = torch.export.Dim
        # By position: the forward argument's name differs between backbones (x, input).
        dynamic = ({0: side("b", max=512), 2: side("h", min=1, max=14) * 32, 3: side("w", min=1, max=14) * 32},)
        exported = torch.export.export(model, (torch.zeros(2, 3, 224, 224),), dynamic_shapes=dynamic).module()
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for x in calibration:
                prepared(x[None])
        self.model = torch.compile(convert_pt2e(prepared))

    def __call__(self, batches):
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [self.model(x) for x in batches]


class OpenVINOInt8Runner:
    """OpenVINO with NNCF's post-training INT8 quantization (bias correction on), bf16 elsewhere."""

    name = "openvino"

    def __init__(self, model, calibration, backbone_name: str):
        import nncf
        import openvino as ov
        import torch

        from simsearch.pipeline.backends import IMAGES_PER_REQUEST, StreamedRequests

        converted = ov.convert_model(model, example_input=torch.zeros(1, 3, 224, 224), input=[(-1, 3, -1, -1)])
        quantized = nncf.quantize(converted, nncf.Dataset([x[None].numpy() for x in calibration]),
                                  subset_size=len(calibration))
        # Run as the bf16 runner runs: the same streams and images a request.
        self.compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "bf16",
                                                                  "PERFORMANCE_HINT": "THROUGHPUT",
                                                                  "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        self.streams = StreamedRequests(self.compiled, IMAGES_PER_REQUEST.get(backbone_name, 1))

    def __call__(self, batches):
        return self.streams(batches)


class OpenVINOOneRequestRunner:
    """The bf16 model as the runner ran it before streams: one request on all threads, shapes in turn
    (pixels normalised inside the model as with streams, so the two differ only in streams)."""

    name = "openvino"
    takes_uint8 = True

    def __init__(self, runner):
        self.run = runner.one_request(uint8=True)

    def __call__(self, batches):
        return self.run(batches)


def missing(variant: str) -> str | None:
    needs = {"pt2e-int8": "torchao", "openvino-bf16": "openvino", "openvino-bf16-1req": "openvino",
             "openvino-int8": "nncf"}.get(variant)
    if needs and importlib.util.find_spec(needs) is None:
        return f"skipped: pip install {needs}"
    return None


def make_embedder(variant: str, backbone, calibration):
    from simsearch.pipeline.embed import Embedder

    if variant == "torch-fp32":
        return Embedder(backbone, "cpu", "fp32", "torch")
    if variant.startswith("openvino-bf16"):
        embedder = Embedder(backbone, "cpu", "bf16", "openvino")
        if variant == "openvino-bf16-1req":
            embedder.runner = OpenVINOOneRequestRunner(embedder.runner)
        return embedder
    embedder = Embedder(backbone, "cpu", "bf16", "torch")
    if variant == "compile-bf16":
        embedder.runner = CompiledRunner(embedder.model, calibration)
    elif variant == "pt2e-int8":
        embedder.runner = PT2EInt8Runner(backbone.features.eval(), calibration)
    elif variant == "openvino-int8":
        embedder.runner = OpenVINOInt8Runner(backbone.features.eval(), calibration, backbone.spec.backbone)
    return embedder


def top10(vectors):
    import numpy as np

    s = vectors @ vectors.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1)[:, :10]


def fidelity(reference, vectors) -> dict:
    import numpy as np

    cosine = (reference * vectors).sum(axis=1)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top10(reference), top10(vectors))])
    return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()), "top10_overlap": float(overlap)}


def embed_all(embedder, tensors, batch_size: int = 32):
    import numpy as np

    return np.concatenate([embedder.embed_batch(tensors[i:i + batch_size]).vectors
                           for i in range(0, len(tensors), batch_size)])


def decoded(paths, pre) -> list:
    from simsearch.pipeline.embed import ImageFileDataset

    dataset = ImageFileDataset(paths, pre)
    return [d.tensor for d in (dataset[i] for i in range(len(dataset))) if d.tensor is not None]


def run_model(name: str, weights: str | None, variants: list[str], calibration_paths, rounds: int,
              seconds: float) -> list[dict]:
    import torch

    from simsearch.pipeline.decode import normalize
    from simsearch.pipeline.embed import load_backbone

    backbone = load_backbone(name, weights)
    pre = backbone.spec.preprocess
    images = decoded(source_photos(), pre)
    calibration = [normalize(x[None], pre)[0] for x in decoded(calibration_paths, pre)]
    rows, embedders = [], {}
    reference = None
    for variant in variants:
        row = {"model": name, "weights": weights or "ImageNet", "variant": variant}
        rows.append(row)
        if (why := missing(variant)):
            row["status"] = why
            continue
        progress(f"{name}: {variant} (setup, first pass, fidelity)")
        started = time.perf_counter()
        try:
            embedder = make_embedder(variant, backbone, calibration)
            embedder.embed_batch(torch.zeros(2, 3, 224, 224, dtype=torch.uint8))
        except Exception as e:  # noqa: BLE001 - a variant that cannot run here is reported, not fatal
            row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            continue
        row["setup_s"] = time.perf_counter() - started
        started = time.perf_counter()
        vectors = embed_all(embedder, images)
        row["first_pass_s"] = time.perf_counter() - started  # new shapes: compiles and kernel choices
        reference = vectors if variant == "torch-fp32" else reference
        if reference is not None:
            row.update(fidelity(reference, vectors))
        progress(f"{name}: {variant}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
        embedders[variant] = embedder
    x = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8)  # pixels, as the decoders hand them over
    rates: dict[str, list[float]] = {v: [] for v in embedders}
    for r in range(rounds):
        progress(f"{name}: speed round {r + 1}/{rounds}")
        for variant, embedder in embedders.items():
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                embedder.embed_batch(x)
                done += len(x)
            rates[variant].append(done / (time.perf_counter() - started))
    base = statistics.median(rates["torch-bf16"]) if rates.get("torch-bf16") else None
    for row in rows:
        if row["variant"] in rates:
            row["img_s"] = statistics.median(rates[row["variant"]])
            row["vs_torch_bf16"] = row["img_s"] / base if base else None
            row["round_img_s"] = [round(v, 1) for v in rates[row["variant"]]]
            if base:  # each round's ratio: the spread a busy machine leaves in the median's
                by_round = [v / b for v, b in zip(rates[row["variant"]], rates["torch-bf16"])]
                row["round_vs_torch_bf16"] = f"{min(by_round):.2f}-{max(by_round):.2f}"
            row["fidelity_ok"] = bool(row.get("mean_cosine", 1) >= 0.995 and row.get("top10_overlap", 1) >= 0.95)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calibration images, shorter timings")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--models", default="efficientnet-lite0,resnet50")
    parser.add_argument("--calibration", type=int, help="real JPEGs to calibrate INT8 on (default 100 quick, 300 full)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="backends", help="results/NAME.json (to keep runs of different subsets)")
    parser.add_argument("--seconds", type=float, help="per variant per round (default 2 quick, 5 full)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # tracing and export warn at length; the table is the output
    variants = ["torch-fp32", "torch-bf16"] + [v for v in args.variants.split(",") if v not in ("torch-fp32", "torch-bf16")]
    n_calibration = args.calibration or (100 if args.quick else 300)
    calibration_paths = sorted(replicated_jpegs(max(n_calibration, 300)).glob("*.jpg"))[:n_calibration]
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    import os

    os.environ.setdefault("SIMSEARCH_CACHE_DIR", tempfile.mkdtemp(prefix="simsearch-bench-cache-"))  # setup_s: a cold cache
    import torch

    rows = []
    for name in args.models.split(","):
        weights = "random" if name == "resnet50" else None  # no ResNet50 ImageNet weights offline: speed only
        rows += run_model(name, weights, variants, calibration_paths, args.rounds, seconds)
    notes = [NOISE_NOTE, f"torch threads {torch.get_num_threads()}; {len(source_photos())} real photos for fidelity, "
             f"{n_calibration} re-encoded copies for INT8 calibration; speed: batch 32 at 224x224, median of "
             f"{args.rounds} interleaved rounds",
             "fidelity against torch fp32 on the same photos; ResNet50 has random weights (a numerical check only)",
             "fidelity_ok: mean cosine >= 0.995 and top-10 overlap >= 0.95 (issue 16's bar)"]
    print_table("CPU backends: images/s and fidelity to fp32", rows,
                ["model", "variant", "img_s", "vs_torch_bf16", "round_vs_torch_bf16", "mean_cosine", "min_cosine", "top10_overlap",
                 "fidelity_ok", "setup_s", "first_pass_s", "status"], notes)
    write_result(args.name, {"quick": args.quick, "variants": variants, "rows": rows})


if __name__ == "__main__":
    main()
