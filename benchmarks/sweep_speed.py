"""Configurations per minute of `pipedec-sim sweep` with 1 and 2 worker processes, and
with Ray tasks on a local Ray instance of 2 CPUs (`--executor ray`; skipped without ray).

A fixed small grid on the bundled synthetic trace: S=6, PipeDec at widths 4/8/16/32 and
top-k 4/16, plus tree SD and plain PP (10 configurations, 4 requests each). Each run
starts from an empty results folder, so worker start-up is included for the process pool;
the Ray instance starts once before the timed runs (its start-up is printed on its own
line) and its workers are reused, as on a cluster. Prints one line per executor and the
speed-ups over 1 worker; not a timed test.

    python benchmarks/sweep_speed.py [--workers 1,2] [--ray-workers 2] [--requests 4]
                                     [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from pipedec_sim.programs.sweep import Execution, build_grid, run_sweep

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--requests", type=int, default=4, help="requests per configuration")
    ap.add_argument("--repeat", type=int, default=3, help="runs per worker count (best kept)")
    ap.add_argument("--ray-workers", type=int, default=2,
                    help="CPUs of the local Ray instance (0: no Ray run)")
    args = ap.parse_args()
    grid = build_grid(None, {"trace": [str(REPO / "traces" / "synthetic-llama70b.jsonl")],
                             "stages": [6], "width": [4, 8, 16, 32], "topk": [4, 16],
                             "max_requests": [args.requests]})
    configs = grid.configs()
    print(f"grid: {len(configs)} configurations x {args.requests} requests, S=6; "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"load average {os.getloadavg()[0]:.2f}")
    runs = {f"workers={w}": Execution(workers=int(w)) for w in args.workers.split(",")}
    if args.ray_workers and _start_ray(args.ray_workers):
        runs[f"ray, {args.ray_workers} local workers"] = Execution(workers=args.ray_workers,
                                                                   executor="ray")
    best = {name: float("inf") for name in runs}
    for _ in range(args.repeat):              # interleaved, so load from others hits all
        for name, ex in runs.items():
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                res = run_sweep(configs, Path(d), execution=ex)
                best[name] = min(best[name], time.perf_counter() - t0)
                assert not res["failed"] and res["ran"] == len(configs)
    rates = {}
    for name in runs:
        rates[name] = len(configs) / best[name] * 60
        print(f"{name}: {len(configs)} configurations in {best[name]:.2f} s (best of "
              f"{args.repeat}) = {rates[name]:.0f} configurations/minute")
    if "workers=1" in rates:
        for name, r in rates.items():
            if name != "workers=1":
                print(f"speed-up of {name} over 1 worker: {r / rates['workers=1']:.2f}x")


def _start_ray(cpus: int) -> bool:
    """A local Ray instance for the Ray runs (False, said so, without ray)."""
    try:
        from pipedec_sim.programs.ray_tasks import init_ray
        t0 = time.perf_counter()
        init_ray(cpus)
    except Exception as e:  # noqa: BLE001 (ray missing: the other figures still count)
        print(f"no Ray run: {e}")
        return False
    print(f"local Ray instance ({cpus} CPUs) started in {time.perf_counter() - t0:.1f} s")
    return True


if __name__ == "__main__":
    main()
