"""`pipedec-sim tune`: search PipeDec's width / top-k / floor for the lowest TBT.

A coarse grid over width and top-k (powers of two around the defaults) first, then a
local search: from the best point so far, try the neighbours along each knob (width and
top-k by a factor, floor one rung up or down a ladder), move while TBT drops, and halve
the step when nothing around is better. The default (PipeDecKnobs' width, topk and
floor) is always evaluated, so the answer is never worse than the default on the tuning
requests. The space is checked against the knobs' names and bounds (`check_space`).

Tuning on a few requests can over-fit them; `--holdout N` re-measures the best and the
default configurations on the next N requests of the trace (fewer, said so, if the trace
ends sooner; none left is an error, before any tuning).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipedec_sim.errors import InputError
from pipedec_sim.programs.flags import DEFAULT_ENGINE
from pipedec_sim.protocol.knobs import KNOBS, PipeDecKnobs, knobs_of

# The search space: three of PipeDec's knobs (a point is their values, in this order).
SPACE = ("width", "topk", "floor")
DEFAULT = tuple(getattr(PipeDecKnobs(), k) for k in SPACE)
FLOORS = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
COARSE_WIDTHS = (4, 8, 16, 32, 64)
COARSE_TOPKS = (4, 16)
MIN_WIDTH, MIN_TOPK = int(KNOBS["width"].lo), int(KNOBS["topk"].lo)   # the knobs' bounds
MAX_WIDTH, MAX_TOPK = 256, 64                                         # the search's caps


def check_space() -> None:
    """The search space lies within the knobs' bounds (ValueError naming the knob)."""
    names = {k.name for k in knobs_of(PipeDecKnobs)}
    if not set(SPACE) <= names:
        raise ValueError(f"tuner knobs {', '.join(sorted(set(SPACE) - names))} are not "
                         f"PipeDec knobs ({', '.join(sorted(names))})")
    for name, values in (("width", COARSE_WIDTHS + (MIN_WIDTH, MAX_WIDTH)),
                         ("topk", COARSE_TOPKS + (MIN_TOPK, MAX_TOPK)), ("floor", FLOORS)):
        for v in values:
            KNOBS[name].check(v)


check_space()


@dataclass
class Trial:
    width: int
    topk: int
    floor: float
    tbt_ms: float
    hit_rate: float
    wasted_per_token: float

    @property
    def key(self):
        return (self.width, self.topk, self.floor)


def _evaluate(point: tuple[int, int, float], common: dict, engine: str = DEFAULT_ENGINE,
              workers: int = 1) -> dict:
    """PipeDec at one point (its requests in `workers` processes). The worker entry point
    of a batch of points: module level, so it pickles under spawn."""
    from pipedec_sim.programs.sweep import POLICY_KNOBS, run_config
    from pipedec_sim.results.metrics import summarize
    w, k, f = point
    cfg = {**common, "strategy": common.get("strategy", "pipedec"),
           **{name: None for name in POLICY_KNOBS}, **dict(zip(SPACE, point)),
           "config_id": f"tune-{w}-{k}-{f}"}
    df = run_config(cfg, engine=engine, workers=workers)
    s = summarize(df[[c for c in df.columns if not c.startswith("cfg_") and c != "config_id"]])
    r = s.iloc[0]
    return {"point": point, "tbt_ms": float(r.tbt_ms), "hit_rate": float(r.hit_rate),
            "wasted_per_token": float(r.wasted_per_token)}


class Evaluator:
    """Evaluates batches of points with a cache and a budget: in parallel if workers > 1,
    a point per worker, or one point's requests across the workers when it is alone."""

    def __init__(self, common: dict, budget: int, workers: int = 1,
                 progress: Callable[[int, int], None] | None = None,
                 engine: str = DEFAULT_ENGINE):
        self.common, self.budget, self.workers, self.progress = common, budget, workers, progress
        self.engine = engine
        self.trials: dict[tuple, Trial] = {}
        self._pool = None

    def __enter__(self):
        if self.workers > 1:
            from pipedec_sim.programs.pool import WorkerPool
            self._pool = WorkerPool(self.workers)     # workers die with this process
        if self.progress:
            self.progress(0, self.budget)
        return self

    def __exit__(self, *exc):
        if self._pool:
            self._pool.shutdown(wait=exc[0] is None)

    @property
    def left(self) -> int:
        return self.budget - len(self.trials)

    def run(self, points) -> list[Trial]:
        new = list(dict.fromkeys(p for p in points if p not in self.trials))[:max(self.left, 0)]
        n = len(new)
        if self._pool and n > 1:
            results = list(self._pool.pool.map(_evaluate, new, [self.common] * n,
                                               [self.engine] * n))
        else:
            results = [_evaluate(p, self.common, self.engine, self.workers) for p in new]
        for r in results:
            t = Trial(*r["point"], r["tbt_ms"], r["hit_rate"], r["wasted_per_token"])
            self.trials[t.key] = t
        if self.progress and new:
            self.progress(min(len(self.trials), self.budget), self.budget)
        return [self.trials[p] for p in points if p in self.trials]

    def best(self) -> Trial:
        # ties: the cheaper tree (narrower, then fewer children, then a higher floor)
        return min(self.trials.values(), key=lambda t: (round(t.tbt_ms, 9), t.width, t.topk,
                                                         -t.floor))


def _neighbours(p: tuple[int, int, float], step: float) -> list[tuple[int, int, float]]:
    w, k, f = p
    out = []
    for nw in (round(w * step), round(w / step)):
        nw = min(max(nw, MIN_WIDTH), MAX_WIDTH)
        if nw != w:
            out.append((nw, k, f))
    for nk in (round(k * step), round(k / step)):
        nk = min(max(nk, MIN_TOPK), MAX_TOPK)
        if nk != k:
            out.append((w, nk, f))
    i = FLOORS.index(f) if f in FLOORS else 0
    for j in (i - 1, i + 1):
        if 0 <= j < len(FLOORS):
            out.append((w, k, FLOORS[j]))
    return out


def tune(common: dict, *, budget: int = 30, workers: int = 1,
         progress: Callable[[int, int], None] | None = None,
         engine: str = DEFAULT_ENGINE) -> tuple[Trial, Trial, list[Trial]]:
    """Returns (best, default, all trials sorted by TBT)."""
    if budget < 1:
        raise ValueError("budget must be >= 1")
    with Evaluator(common, budget, workers, progress, engine) as ev:
        coarse = [DEFAULT] + [(w, k, FLOORS[0]) for k in COARSE_TOPKS for w in COARSE_WIDTHS]
        ev.run(coarse)
        step = 2.0
        while ev.left > 0 and step > 1.05:
            best = ev.best()
            cand = [p for p in _neighbours(best.key, step) if p not in ev.trials]
            if not cand:
                step = math.sqrt(step)
                continue
            ev.run(cand)
            if ev.best().key == best.key:
                step = math.sqrt(step)
        trials = sorted(ev.trials.values(), key=lambda t: t.tbt_ms)
        return ev.best(), ev.trials[DEFAULT], trials


# --------------------------------------------------------------------------- CLI

def _requests(common: dict, n: int | None) -> int:
    """How many requests the workload has, of the first `n` (None: all)."""
    from pipedec_sim.programs.sweep import _trace
    return len(_trace({**common, "max_requests": n}).requests)


def _holdout(common: dict, tuned: int, asked: int) -> int:
    """The held-out requests there are after the `tuned` first ones, at most `asked`:
    InputError if there are none, a note on stderr if there are fewer."""
    there = _requests(common, tuned + asked) - tuned
    if there <= 0:
        raise InputError(f"the trace has only {tuned} requests, all used for tuning: none is "
                         "left to hold out (lower --max-requests or use a longer trace)",
                         file=common["trace"], field="--holdout")
    if there < asked:
        print(f"pipedec-sim: --holdout {asked}: the trace has only {there} requests after the "
              f"{tuned} tuned on; holding out those {there}", file=sys.stderr)
    return there


def add_parser(sub) -> None:
    from pipedec_sim.inputs.limits import MAX_OUTPUT_LEN, MAX_STAGES
    from pipedec_sim.programs.flags import (
        DEFAULT_PROFILE,
        DEFAULT_STAGES,
        add_engine_flag,
        add_link_flags,
        add_out_format_flag,
        add_pipeline_flags,
        add_workers_flag,
        file_path,
        number,
        positive,
        seed,
    )
    p = sub.add_parser("tune", help="search PipeDec width/top-k/floor for the lowest TBT",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, type=file_path,
                   help="speculation trace or prompt file")
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"calibration profile file or bundled name (default {DEFAULT_PROFILE})")
    p.add_argument("--stages", type=positive(hi=MAX_STAGES), default=DEFAULT_STAGES,
                   help=f"pipeline stages S (default {DEFAULT_STAGES})")
    p.add_argument("--budget", type=positive(), default=16,
                   help="most configurations to simulate (default 16: about 2 minutes at "
                        "S=14 on 8 requests with 2 workers)")
    p.add_argument("--max-requests", type=positive(), default=8,
                   help="tune on the first N requests; the file is read no further (default 8)")
    p.add_argument("--holdout", type=number(int, lo=0), default=0,
                   help="re-measure best and default on the next N requests (default 0: off)")
    p.add_argument("--tolerance", type=number(float, lo=0), default=0.02,
                   help="also show the cheapest tree (fewest wasted rows) within this fraction "
                        "of the best TBT (default 0.02)")
    add_link_flags(add_pipeline_flags(p), latency=False)
    p.add_argument("--max-new-tokens", type=positive(hi=MAX_OUTPUT_LEN), default=256,
                   help="output length for prompt files (default 256)")
    p.add_argument("--acceptance", type=file_path, default=None,
                   help="acceptance model JSON for prompt files (default: by data set)")
    p.add_argument("--seed", type=seed, default=0, help="seed (default 0)")
    add_workers_flag(p, "the tuner's points (a point alone: its requests)")
    add_engine_flag(p)
    p.add_argument("--out", type=file_path, default=None,
                   help="write every trial to this file (a table: see --out-format)")
    add_out_format_flag(p, "the --out table")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def cmd_tune(args) -> int:
    from pipedec_sim.atomic import check_output
    from pipedec_sim.programs.flags import progress_bar
    from pipedec_sim.programs.sweep import PIPELINE_KNOBS, POLICY_KNOBS, build_grid
    from pipedec_sim.results.tables import check_out_format
    if not 0 <= args.tolerance < 1:
        raise InputError("must be in [0, 1)", field="--tolerance")
    check_out_format(args.out_format)             # before any work
    check_output(args.out, "--out")
    overrides = {"trace": [str(args.trace)], "profile": [args.profile], "stages": [args.stages],
                 **{k: [getattr(args, k)] for k in PIPELINE_KNOBS},
                 "link_gbps": [args.link_gbps], "max_requests": [args.max_requests],
                 "max_new_tokens": [args.max_new_tokens], "seed": [args.seed],
                 "acceptance": [None if args.acceptance is None else str(args.acceptance)],
                 "strategies": ["pipedec"]}
    grid = build_grid(None, overrides)               # validates files and flags
    common = {k: v[0] for k, v in grid.axes.items() if k != "strategies"}
    for k in POLICY_KNOBS:
        common.pop(k, None)
    tuned = _requests(common, args.max_requests)
    holdout = _holdout(common, tuned, args.holdout) if args.holdout else 0
    t0 = time.perf_counter()
    with progress_bar("tuner trials:", args.quiet, unit="trial") as progress:
        best, default, trials = tune(common, budget=args.budget, workers=args.workers,
                                     progress=progress, engine=args.engine)
    ar = _evaluate(DEFAULT, {**common, "strategy": "ar"}, args.engine, args.workers)["tbt_ms"]
    took = time.perf_counter() - t0
    print(f"tuned PipeDec on {args.trace.name}, {tuned} requests, S={args.stages}, "
          f"profile {args.profile}: {len(trials)} configurations in {took:.0f}s")
    print(f"{'width':>5} {'topk':>4} {'floor':>7} {'tbt_ms':>8} {'vs PP':>6} {'hit':>6} "
          f"{'waste/tok':>9}")
    shown = trials[:8] + ([default] if default not in trials[:8] else [])
    for t in shown:
        tag = "  <- best" if t is best else ("  <- default" if t is default else "")
        print(f"{t.width:5d} {t.topk:4d} {t.floor:7.4g} {t.tbt_ms:8.2f} {ar / t.tbt_ms:5.2f}x "
              f"{t.hit_rate:6.3f} {t.wasted_per_token:9.2f}{tag}")
    margin = (default.tbt_ms - best.tbt_ms) / default.tbt_ms
    print(f"best: --width {best.width} --topk {best.topk} --floor {best.floor:g}: "
          f"TBT {best.tbt_ms:.2f} ms vs {default.tbt_ms:.2f} ms for the default "
          f"(W={DEFAULT[0]}, k={DEFAULT[1]}, floor={DEFAULT[2]:g}): {margin:.1%} lower, "
          f"{default.tbt_ms / best.tbt_ms:.3f}x")
    near = [t for t in trials if t.tbt_ms <= best.tbt_ms * (1 + args.tolerance)]
    cheap = min(near, key=lambda t: (t.wasted_per_token, t.tbt_ms))
    if cheap is not best:
        print(f"cheapest within {args.tolerance:.1%} of the best: --width {cheap.width} "
              f"--topk {cheap.topk} --floor {cheap.floor:g}: TBT {cheap.tbt_ms:.2f} ms, "
              f"{cheap.wasted_per_token:.1f} wasted rows/token vs {best.wasted_per_token:.1f}")
    if holdout:
        held = {**common, "max_requests": holdout, "first_request": tuned}
        hb = _evaluate(best.key, held, args.engine, args.workers)["tbt_ms"]
        hd = _evaluate(DEFAULT, held, args.engine, args.workers)["tbt_ms"]
        print(f"held-out requests {tuned}..{tuned + holdout - 1}: "
              f"best {hb:.2f} ms vs default {hd:.2f} ms ({(hd - hb) / hd:.1%} lower)")
    if args.out:
        _write_trials(args.out, args.out_format, trials, ar)
    return 0


def _write_trials(path: Path, out_format: str, trials: list[Trial], ar_tbt_ms: float) -> None:
    """Every trial, one row each, with its speedup over plain PP (temp file, rename)."""
    import pandas as pd

    from pipedec_sim.atomic import atomic_path
    from pipedec_sim.results.tables import write_table
    frame = pd.DataFrame([vars(t) for t in trials])
    frame["speedup_vs_ar"] = ar_tbt_ms / frame.tbt_ms
    with atomic_path(path) as tmp:
        write_table(frame, tmp, out_format)
    print(f"wrote {path}", file=sys.stderr)
