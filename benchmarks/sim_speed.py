"""Simulator speed: simulated PipeDec tokens per wall-clock second.

    python benchmarks/sim_speed.py [--requests 100] [--tokens 256]

Runs PipeDec at S=14, W=16 on a synthetic trace (100 requests x 256 tokens by default),
then scales S (4, 8, 14, 28) and W (4, 16, 64). Prints one line per configuration and
the profile of the slowest parts, so it is clear what bounds the speed.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from pipedec_sim.inputs.acceptance import synthetic_trace
from pipedec_sim.inputs.profile import load_profile
from pipedec_sim.programs.simulate import SimConfig, simulate


def measure(trace, profile, stages: int, width: int) -> tuple[float, float, float]:
    cfg = SimConfig(stages=stages, strategies=("pipedec",), width=width, topk=16)
    t0 = time.perf_counter()
    res = simulate(trace, profile, cfg)
    wall = time.perf_counter() - t0
    tokens = int(res.summary.tokens.iloc[0])
    return tokens / wall, wall, float(res.summary.hit_rate.iloc[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--profile", default="analytic-llama70b-1b")
    args = ap.parse_args()
    trace = synthetic_trace(requests=args.requests, output_len=args.tokens,
                            prompt_len=(64, 512), seed=1)
    profile = load_profile(args.profile)
    print(f"trace: {args.requests} requests x {args.tokens} tokens (synthetic); "
          f"profile {profile.name}")
    print(f"{'stages':>6} {'width':>5} {'tokens/s':>10} {'wall s':>8} {'hit rate':>8}")
    for stages, width in [(14, 16), (4, 16), (8, 16), (28, 16), (14, 4), (14, 64)]:
        rate, wall, hit = measure(trace, profile, stages, width)
        print(f"{stages:>6} {width:>5} {rate:>10.0f} {wall:>8.2f} {hit:>8.3f}", flush=True)
    small = synthetic_trace(requests=10, output_len=args.tokens, prompt_len=(64, 512), seed=1)
    prof = cProfile.Profile()
    prof.runcall(measure, small, profile, 14, 16)
    print("\nwhere the time goes (S=14, W=16, 10 requests), top functions by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()
