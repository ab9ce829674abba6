"""Run every benchmark, one after the other, each printing its table.

    python benchmarks/run_all.py --quick     # a few minutes, offline
    python benchmarks/run_all.py             # the full sizes (1M vectors: tens of minutes)

Each script runs in its own process, so one's memory and threads do not colour the
next one's numbers; a failing script is reported and the others still run.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("bench_embed", "bench_backends", "bench_decode", "bench_gpu", "bench_compare", "bench_query", "bench_faiss_update", "bench_scale", "bench_map",
           "bench_faults", "bench_engines", "bench_objects",
           "bench_filters", "bench_open_set", "bench_detector", "bench_cold_query", "bench_duplicates",
           "bench_map_scale", "bench_descriptors")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs of every benchmark")
    parser.add_argument("--only", help="comma-separated subset, e.g. embed,query")
    parser.add_argument("--baseline", help="a checkout of the code before a change: bench_embed runs its build-index too")
    args = parser.parse_args()
    wanted = [f"bench_{name}" for name in args.only.split(",")] if args.only else list(SCRIPTS)
    failed = []
    for name in wanted:
        started = time.perf_counter()
        command = [sys.executable, str(HERE / f"{name}.py")] + (["--quick"] if args.quick else [])
        if name == "bench_embed" and args.baseline:
            command += ["--baseline", str(Path(args.baseline).resolve())]
        print(f"[run_all] {name}", file=sys.stderr, flush=True)
        if subprocess.run(command, cwd=HERE).returncode != 0:
            failed.append(name)
        print(f"[run_all] {name} took {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    if failed:
        print(f"[run_all] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
