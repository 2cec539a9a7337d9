"""Configurations per minute of `pipedec-sim sweep` with 1 and 2 worker processes.

A fixed small grid on the bundled synthetic trace: S=6, PipeDec at widths 4/8/16/32 and
top-k 4/16, plus tree SD and plain PP (10 configurations, 4 requests each). Each run
starts from an empty results folder, so worker start-up is included. Prints one line per
worker count and the parallel speed-up; not a timed test.

    python benchmarks/sweep_speed.py [--workers 1,2] [--requests 4] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from pipedec_sim.programs.sweep import build_grid, run_sweep

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--requests", type=int, default=4, help="requests per configuration")
    ap.add_argument("--repeat", type=int, default=3, help="runs per worker count (best kept)")
    args = ap.parse_args()
    grid = build_grid(None, {"trace": [str(REPO / "traces" / "synthetic-llama70b.jsonl")],
                             "stages": [6], "width": [4, 8, 16, 32], "topk": [4, 16],
                             "max_requests": [args.requests]})
    configs = grid.configs()
    print(f"grid: {len(configs)} configurations x {args.requests} requests, S=6; "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"load average {os.getloadavg()[0]:.2f}")
    counts = [int(x) for x in args.workers.split(",")]
    best = {w: float("inf") for w in counts}
    for _ in range(args.repeat):              # interleaved, so load from others hits both
        for w in counts:
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                res = run_sweep(configs, Path(d), workers=w)
                best[w] = min(best[w], time.perf_counter() - t0)
                assert not res["failed"] and res["ran"] == len(configs)
    rates = {}
    for w in counts:
        rates[w] = len(configs) / best[w] * 60
        print(f"workers={w}: {len(configs)} configurations in {best[w]:.2f} s (best of "
              f"{args.repeat}) = {rates[w]:.0f} configurations/minute")
    if 1 in rates and len(rates) > 1:
        for w, r in rates.items():
            if w != 1:
                print(f"speed-up with {w} workers: {r / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
