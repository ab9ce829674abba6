"""Cold start of `simsearch query`: wall time of a fresh process, by id and by image, against its floors.

A new user's first query pays for every import before the first result: a query by
`--id` needs no backbone, so it must not import torch; a query by image must
import it and load the backbone once. Each row runs the command in a new process
(page cache warm, one untimed run first) and reports the median; `x_cli` is that
over the median of `simsearch --help` (the interpreter, typer and the command
modules) measured in the same rounds, interleaved, so a busy machine moves
numerator and denominator together. `torch` says whether the command imported it
(one extra run under `python -X importtime`).

The index is EfficientNet-Lite0 over ../shared/data/photos (13 photos), or over the
demo photos installed packages ship when ../shared is absent.

    python benchmarks/bench_cold_query.py --quick     # 3 rounds
    python benchmarks/bench_cold_query.py             # 7 rounds
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import NOISE_NOTE, ROOT, SHARED_DATA, print_table, progress, write_result


def _photos(work: Path) -> Path:
    if (SHARED_DATA / "photos").is_dir():
        return SHARED_DATA / "photos"
    from simsearch.datasets.demo import copy_sample_photos

    copy_sample_photos(work / "demo")
    return work / "demo"


def _run(args: list[str], flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ran = subprocess.run([sys.executable, *flags, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if ran.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {ran.stderr.strip()[-500:]}")
    return ran


def _timed(args: list[str]) -> float:
    started = time.perf_counter()
    _run(args)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    parser.add_argument("--rounds", type=int, help="timed runs of each command")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)

    work = Path(tempfile.mkdtemp(prefix="simsearch-bench-cold-"))
    try:
        photos = _photos(work)
        described = f"{photos.name} ({sum(1 for _ in photos.iterdir())} files)"
        index = work / "index"
        progress(f"indexing {photos} with efficientnet-lite0")
        _run(["-m", "simsearch.cli", "build-index", str(photos), "--index", str(index), "--model",
              "efficientnet-lite0", "--quiet"])
        image = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".png"))[0]
        commands = {
            "simsearch --help": ["-m", "simsearch.cli", "--help"],
            "query --id 1": ["-m", "simsearch.cli", "query", "--id", "1", "--index", str(index)],
            f"query {image.name}": ["-m", "simsearch.cli", "query", str(image), "--index", str(index)],
            "python -c 'import torch'": ["-c", "import torch"],
        }
        for command in commands.values():
            _run(command)  # warm the page cache and the .pyc files
        times: dict[str, list[float]] = {name: [] for name in commands}
        for r in range(rounds):
            progress(f"  round {r + 1} of {rounds}")
            for name, command in commands.items():
                times[name].append(_timed(command))
        floor = statistics.median(times["simsearch --help"])
        rows = []
        for name, command in commands.items():
            imports = _run(command, ("-X", "importtime")).stderr
            median = statistics.median(times[name])
            rows.append({"command": name, "median_s": round(median, 3), "min_s": round(min(times[name]), 3),
                         "max_s": round(max(times[name]), 3), "x_cli": round(median / floor, 2),
                         "torch": "yes" if re.search(r"\|\s+torch$", imports, re.MULTILINE) else "no"})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    notes = [f"fresh process per run, median of {rounds}, commands interleaved; index: efficientnet-lite0 over "
             f"{described}",
             "x_cli: median over the median of `simsearch --help` (interpreter + typer + command modules), same rounds",
             NOISE_NOTE]
    print_table("Cold query", rows, ["command", "median_s", "min_s", "max_s", "x_cli", "torch"], notes)
    write_result("cold_query", {"rounds": rounds, "rows": rows})


if __name__ == "__main__":
    main()
