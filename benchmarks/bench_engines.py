"""build-index's engines on one machine: local (DataLoader decode workers) against ray (a Ray actor pool).

The same folder of real JPEGs is indexed with `--engine local` and `--engine ray`
(a private local Ray instance, as a user without a cluster gets), alternating, each a
fresh index, each command in its own process as a user runs it. Rows: images/s the
build reports (embedding, Ray's start included), wall seconds, and for Ray the steady
rate once its actors run (from its log). The ratio says what Ray costs where there is
one machine; it pays where there are several machines or GPUs.

    python benchmarks/bench_engines.py --quick     # 200 images, one round each
    python benchmarks/bench_engines.py             # 1000 images, two rounds each
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import NOISE_NOTE, print_table, progress, replicated_jpegs, write_result

MODEL = "efficientnet-lite0"


def simsearch() -> list[str]:
    script = Path(sys.executable).parent / "simsearch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "simsearch.cli"]


def build(folder: Path, index: Path, engine: str) -> dict:
    shutil.rmtree(index, ignore_errors=True)
    command = simsearch() + ["-v", "build-index", str(folder), "--index", str(index), "--model", MODEL,
                             "--device", "cpu", "--engine", engine, "--quiet"]
    started = time.perf_counter()
    ran = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if ran.returncode != 0:
        raise SystemExit(f"{engine} build failed: {ran.stderr[-1500:]}")
    report = json.loads(ran.stdout.splitlines()[0])
    steady = re.search(r"ray: (\d+) images in ([\d.]+)s", ran.stderr)
    return {"engine": engine, "images": report["added"], "img_s": report["images_per_second"], "wall_s": wall,
            "steady_img_s": int(steady[1]) / float(steady[2]) if steady else None,
            "pool": (re.search(r"ray: (\d+ \w+ actors?, \d+ CPUs each)", ran.stderr) or [None, None])[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 images, one round of each engine")
    parser.add_argument("--images", type=int, help="folder size (default 1000; 200 with --quick)")
    parser.add_argument("--rounds", type=int, help="builds per engine, alternating (default 2; 1 with --quick)")
    args = parser.parse_args()
    try:
        import ray  # noqa: F401
    except ImportError:
        print("skipped: ray is not installed (pip install 'simsearch[ray]')")
        return
    n = args.images or (200 if args.quick else 1000)
    rounds = args.rounds or (1 if args.quick else 2)
    folder = replicated_jpegs(n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for engine in ("local", "ray"):
                progress(f"round {r + 1}/{rounds}: {engine}, {n} images")
                rows.append({"round": r + 1, **build(folder, Path(tmp) / engine, engine)})
    local = statistics.median(r["img_s"] for r in rows if r["engine"] == "local")
    for row in rows:
        row["vs_local"] = row["img_s"] / local
    print_table(f"build-index engines on one machine ({n} JPEGs, {MODEL}, CPU)", rows,
                ["round", "engine", "images", "img_s", "vs_local", "wall_s", "steady_img_s", "pool"],
                notes=["img_s: embedding rate the build reports (Ray's start and actor start included)",
                       "steady_img_s: Ray's rate once its actors run", NOISE_NOTE])
    write_result("engines", {"images": n, "rounds": rounds, "rows": rows})


if __name__ == "__main__":
    main()
