"""Shared helpers for the benchmark scripts: the machine, timing, real JPEGs, one table, one JSON.

Every benchmark measures its numbers side by side in one run and reports ratios,
because the machines these run on are shared and noisy (other jobs use the same
cores): an absolute images/s moves from run to run, a ratio taken minutes apart
on the same machine much less.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(os.environ.get("SIMSEARCH_SHARED_DATA", ROOT.parent / "shared" / "data"))
NOISE_NOTE = ("shared machine: other jobs may use the same cores while this runs; "
              "compare ratios measured in this run, not absolute figures across runs")

if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout, installed or not
    sys.path.insert(0, str(ROOT))


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    info["amx"] = bool(amx()) if amx else None
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rate(fn: Callable[[], int], min_seconds: float, warmup: int = 1, max_calls: int = 10_000) -> float:
    """Items per second of `fn` (which returns how many items it did), after warm-up calls."""
    for _ in range(warmup):
        fn()
    done, started = 0, time.perf_counter()
    calls = 0
    while True:
        done += fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds or calls >= max_calls:
            return done / elapsed


def latencies(fn: Callable[[int], object], n: int, warmup: int = 5) -> list[float]:
    """Seconds per call of fn(i) for i in range(n), after warm-up calls."""
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(n):
        started = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - started)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[pos]


def summarise_latency(values: Sequence[float]) -> dict:
    return {
        "p50_ms": round(percentile(values, 50) * 1e3, 3),
        "p99_ms": round(percentile(values, 99) * 1e3, 3),
        "mean_ms": round(statistics.fmean(values) * 1e3, 3),
        "qps": round(len(values) / sum(values), 1) if values else 0.0,
    }


def rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# ---------------------------------------------------------------- real JPEGs

def source_photos() -> list[Path]:
    """The real photographs in ../shared/data (photos, VOC, indoor boxes)."""
    if not SHARED_DATA.is_dir():
        raise SystemExit(f"skipped: {SHARED_DATA} is absent (set SIMSEARCH_SHARED_DATA to the shared data folder)")
    found = [p for p in sorted(SHARED_DATA.rglob("*"))
             if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.is_file()]
    if not found:
        raise SystemExit(f"skipped: no photos under {SHARED_DATA}")
    return found


def replicated_jpegs(n: int, cache: Path | None = None) -> Path:
    """A folder of `n` real JPEGs made from the shared photos, each file's bytes unique.

    Copies are re-encoded at varying JPEG quality with a one-pixel varying crop, so
    their sha256 differ (the build would otherwise see duplicates) while decode cost
    stays that of real photos of the original sizes (281x500 to 741x500). Cached by
    `n` in the temp folder, so the benchmarks in one run_all share them.
    """
    from PIL import Image

    folder = cache or Path(tempfile.gettempdir()) / "simsearch-bench" / f"jpegs-{n}"
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for path in source_photos():
        with Image.open(path) as im:
            sources.append((path.stem, im.convert("RGB")))
    for i in range(n):
        stem, im = sources[i % len(sources)]
        copy = i // len(sources)
        w, h = im.size
        cut = copy % 7  # a few pixels off the right edge: new pixels, new bytes
        variant = im.crop((0, 0, w - cut, h)) if cut else im
        variant.save(folder / f"{i:06d}_{stem}.jpg", "JPEG", quality=70 + (copy * 3) % 26)
    done.write_text(str(n))
    return folder


# ---------------------------------------------------------------- output

def print_table(title: str, rows: list[dict], columns: Sequence[str], notes: Sequence[str] = ()) -> None:
    """One plain-text table on stdout, with notes under it."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    table = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(columns)]
    print(f"\n## {title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))
    for note in notes:
        print(f"note: {note}")
    sys.stdout.flush()


def write_result(name: str, payload: dict) -> Path:
    """benchmarks/results/NAME.json, with the machine and the time it was measured."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "machine": machine(), "note": NOISE_NOTE, **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return path


def progress(message: str) -> None:
    """People-facing progress on stderr; stdout holds only the table."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def real_lite0_index(work: Path, parts: Sequence[str]):
    """An EfficientNet-Lite0 index over `parts` of ../shared/data, built in `work`: (embedder, ids, vectors, records).

    What the calibration and duplicates benchmarks both start from: real weights on real photos.
    """
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig, Embedder, load_backbone
    from simsearch.storage.store import Store

    data = work / "data"
    for part in parts:
        shutil.copytree(SHARED_DATA / part, data / part)
    progress("building the index (efficientnet-lite0, cpu)")
    build_index(BuildConfig(data, work / "index", EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)))
    embedder = Embedder(load_backbone("efficientnet-lite0"), device="cpu")
    with Store(work / "index") as store:
        ids, xb = store.vectors()
        records = store.records([int(i) for i in ids])
    return embedder, ids, xb, records
