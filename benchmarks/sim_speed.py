"""Simulator speed: simulated tokens per wall-clock second, fast engine against reference.

    python benchmarks/sim_speed.py [--requests 100] [--tokens 256] [--quick]

Prints, in one run on one core:
  1. PipeDec tokens/s of the fast and the reference engine, side by side, for (S, W) in
     {4, 8, 14, 28} x {4, 16, 64} (100 requests x 256 tokens, synthetic trace), and their
     ratio; every point checks that both engines gave the same summary;
  2. cost growth: fast-engine tokens/s at 1x, 4x and 16x the requests (S=14, W=16);
  3. where the fast engine's time goes (cProfile, by part: SimPy's calendar, the engine,
     the strategy and tree, the trace oracle, the profile lookups), and what bounds it:
     the CPU per token both engines spend in the same strategy and oracle code, which no
     engine can shed, and the ceilings that follow (tokens/s and ratio with an engine
     that cost nothing);
  4. with --main-job, the wall time of `pipedec-sim run --stages 14 --trace
     traces/real-mtbench.jsonl.gz` on the fast engine with 1 and 2 workers and on the
     reference engine, and whether their tables are identical.
Times are wall-clock on a possibly busy machine: compare the figures of one run.
"""
from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from backends.simulated.replay import Replay
from pipedec_sim.inputs.acceptance import synthetic_trace
from pipedec_sim.inputs.host import cpu_model
from pipedec_sim.inputs.profile import load_profile
from pipedec_sim.programs.simulate import SimConfig, simulate
from pipedec_sim.protocol.pacing import Pacer

ROOT = Path(__file__).resolve().parent.parent
GRID_S = (4, 8, 14, 28)
GRID_W = (4, 16, 64)


def measure(trace, profile, stages: int, width: int, engine: str):
    """(tokens/s, wall s, summary) of PipeDec on one engine, one worker."""
    cfg = SimConfig(stages=stages, strategies=("pipedec",), width=width, topk=16, engine=engine)
    t0 = time.perf_counter()
    res = simulate(trace, profile, cfg)
    wall = time.perf_counter() - t0
    return int(res.summary.tokens.iloc[0]) / wall, wall, res.summary


def grid(trace, profile, points) -> None:
    print(f"{'S':>3} {'W':>3} {'fast tok/s':>11} {'ref tok/s':>10} {'ratio':>6} "
          f"{'same':>5} {'hit rate':>8}")
    for stages, width in points:
        ref, _, ref_sum = measure(trace, profile, stages, width, "reference")
        fast, _, fast_sum = measure(trace, profile, stages, width, "fast")
        same = "yes" if fast_sum.equals(ref_sum) else "NO"
        print(f"{stages:>3} {width:>3} {fast:>11.0f} {ref:>10.0f} {fast / ref:>6.2f} "
              f"{same:>5} {float(fast_sum.hit_rate.iloc[0]):>8.3f}", flush=True)


def growth(args, profile) -> None:
    print("\ncost growth (fast engine, S=14, W=16): tokens/s should stay flat")
    for scale in (1, 4, 16):
        n = max(1, args.requests // 16) * scale
        trace = synthetic_trace(requests=n, output_len=args.tokens, prompt_len=(64, 512), seed=1)
        rate, wall, _ = measure(trace, profile, 14, 16, "fast")
        print(f"  {scale:>2}x: {n:>4} requests x {args.tokens} tokens: {rate:>7.0f} tok/s "
              f"({wall:.1f} s)", flush=True)


PARTS = (("simpy/", "SimPy calendar"), ("backends/simulated/", "fast engine + ledger"),
         ("oracle.py", "trace oracle"), ("protocol/", "strategy, tree, policy, pacing"),
         ("inputs/profile/", "profile lookups"))


def where(args, profile) -> None:
    small = synthetic_trace(requests=10, output_len=args.tokens, prompt_len=(64, 512), seed=1)
    prof = cProfile.Profile()
    prof.runcall(measure, small, profile, 14, 16, "fast")
    stats = pstats.Stats(prof)
    own: dict[str, float] = defaultdict(float)
    for (file, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        part = next((label for key, label in PARTS if key in file), "other (Python, pandas)")
        own[part] += tottime
    total = sum(own.values())
    print("\nwhere the fast engine's time goes (S=14, W=16, 10 requests; cProfile own time):")
    for part, t in sorted(own.items(), key=lambda kv: -kv[1]):
        print(f"  {part:<34} {100 * t / total:5.1f}%")
    print("top functions by own time:")
    stats.sort_stats("tottime").print_stats(10)


# The code both engines run alike: the strategy (through its pacer) and the trace oracle.
SHARED = ((Pacer, ("start", "feed")), (Replay, ("observe", "draft", "verify")))


def _timed(fn, spent: list):
    """fn, adding the time inside it to spent[0] and counting the call in spent[1]."""
    def call(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += 1
    return call


def _wrapper_cost() -> float:
    """Seconds a _timed wrapper adds to each call (subtracted from the shared time)."""
    n, spent = 200_000, [0.0, 0]
    bare, timed = (lambda: None), _timed(lambda: None, spent)
    t0 = time.perf_counter()
    for _ in range(n):
        bare()
    t1 = time.perf_counter()
    for _ in range(n):
        timed()
    t2 = time.perf_counter()
    return max(0.0, ((t2 - t1) - (t1 - t0)) / n - spent[0] / n)


@contextmanager
def timing_shared():
    """Accumulate the time spent inside the SHARED calls and count them (a few calls per
    token, so the wrappers add little; `bound` subtracts what they add)."""
    spent = [0.0, 0]
    saved = [(cls, name, getattr(cls, name)) for cls, names in SHARED for name in names]
    for cls, name, fn in saved:
        setattr(cls, name, _timed(fn, spent))
    try:
        yield spent
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def bound(args, profile) -> None:
    """Time per token of each engine, and of the shared code inside it."""
    small = synthetic_trace(requests=10, output_len=args.tokens, prompt_len=(64, 512), seed=1)
    print("\nwhat bounds it (S=14, W=16, 10 requests; wall time per committed token):")
    overhead = _wrapper_cost()
    per_token = {}
    for engine in ("reference", "fast"):
        with timing_shared() as spent:
            t0 = time.perf_counter()
            _, _, summary = measure(small, profile, 14, 16, engine)
            total = time.perf_counter() - t0 - spent[1] * overhead
        tokens = int(summary.tokens.iloc[0])
        shared = spent[0] - spent[1] * overhead
        per_token[engine] = (total / tokens, shared / tokens)
        print(f"  {engine:<9} {1e6 * total / tokens:7.0f} us, of which strategy + oracle "
              f"{1e6 * shared / tokens:5.0f} us ({100 * shared / total:.0f}%)")
    ref_total, _ = per_token["reference"]
    _, shared = per_token["fast"]
    print(f"  an engine that cost nothing: {1 / shared:,.0f} tok/s, "
          f"{ref_total / shared:.1f}x the reference")


def main_job() -> None:
    trace = ROOT / "traces" / "real-mtbench.jsonl.gz"
    base = [sys.executable, "-m", "pipedec_sim.programs.cli", "run", "--stages", "14",
            "--trace", str(trace), "--quiet"]
    print("\nmain job: pipedec-sim run --stages 14 --trace traces/real-mtbench.jsonl.gz")
    tables = {}
    for label, extra in (("fast, 1 worker", ["--engine", "fast", "--workers", "1"]),
                         ("fast, 2 workers", ["--engine", "fast", "--workers", "2"]),
                         ("reference, 1 worker", ["--engine", "reference", "--workers", "1"])):
        t0 = time.perf_counter()
        out = subprocess.run(base + extra, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            print(f"  {label}: failed ({out.stderr.strip().splitlines()[-1:]})")
            continue
        tables[label] = out.stdout
        print(f"  {label:<20} {wall:6.1f} s", flush=True)
    if len(set(tables.values())) == 1 and len(tables) == 3:
        print("  tables: identical")
    else:
        print("  tables: DIFFER")
        for label, table in tables.items():
            print(f"--- {label}\n{table}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100, help="requests per point (default 100)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per request (default 256)")
    ap.add_argument("--profile", default="analytic-llama70b-1b",
                    help="calibration profile (default analytic-llama70b-1b)")
    ap.add_argument("--quick", action="store_true",
                    help="the S=14, W=16 point only, and no cost-growth series")
    ap.add_argument("--main-job", action="store_true",
                    help="also time the README's main job on 1 and 2 workers")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    print(f"host: {cpu_model()} ({platform.python_implementation()} "
          f"{platform.python_version()}); profile {profile.name}")
    print(f"trace: {args.requests} requests x {args.tokens} tokens (synthetic, seed 1)\n")
    trace = synthetic_trace(requests=args.requests, output_len=args.tokens,
                            prompt_len=(64, 512), seed=1)
    points = [(14, 16)] if args.quick else [(s, w) for s in GRID_S for w in GRID_W]
    grid(trace, profile, points)
    if not args.quick:
        growth(args, profile)
    where(args, profile)
    bound(args, profile)
    if args.main_job:
        main_job()


if __name__ == "__main__":
    main()
