"""Serving fidelity: the real distributed serving pipeline vs the simulator's prediction.

    python benchmarks/serve_fidelity.py [--target tiny] [--draft tiny-noisy] [--stages 2,4]
        [--concurrency 4] [--requests 8] [--max-new-tokens 24] [--profile FILE]
        [--strategies pp,tree-sd,chain-sd,pipedec-db] [--work DIR] [--quick-profile]

For each stage count S and serving strategy:
  1. profile:  `pipedec-real profile` on this machine, every time (a CPU profile holds only
               on the host that measured it); --profile FILE reuses one, with a warning if
               it was measured on another CPU model (as benchmarks/fidelity.py);
  2. trace:    the same target and draft on the same prompt ids (`fidelity.record`: the
               target's tokens and the draft's top-k at every position), which the
               simulator replays;
  3. real:     `pipedec-real serve` on the distributed runtime (one process per stage, the
               head running the serving scheduler, wall-clock times), closed loop at
               --concurrency, every strategy on one process group per S; the share of a
               core n busy processes get is measured right before and after (other users'
               load changes it);
  4. simulate: the serving simulator (`backends.simulated.serve.ServeSim`, what
               `pipedec_sim.programs.serve.serve_once` runs) on that trace and profile with
               the same requests, knobs and pipeline options, and the measured core share;
then print throughput (output tokens/s of the whole run) and the median TBT over requests,
real vs simulated, with the relative error sim/real - 1, plus the decisions behind them
(steps, parts per step, hit rate) and the stages' compute per output token. The report
names this machine's CPU model and the load average before and after.

The real stages compute a step's parts in one forward over their requests, and the head
a draft pass over several requests in one (`backends/torch/batch.py`): what the profile's
default `latency.batching = "requests"` prices, with a message (and a head event) per
part, as the runtime sends them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import fidelity as fid  # noqa: E402  (benchmarks/fidelity.py: profile, trace, host helpers)

from pipedec_sim.inputs.profile import load_profile  # noqa: E402
from pipedec_sim.protocol.serve import SERVE_STRATEGIES  # noqa: E402

DEFAULT_PROMPTS = fid.DEFAULT_PROMPTS


# ---- the steps ------------------------------------------------------------------------

def knob_flags(args) -> list[str]:
    return ["--width", str(args.width), "--topk", str(args.topk), "--depth", str(args.depth),
            "--tree-topk", str(args.tree_topk), "--total", str(args.total)]


def real_serve(args, stages: int, prompts: Path, out: Path, log) -> float:
    """`pipedec-real serve` (distributed) into `out`; its wall time, start-up included."""
    cmd = [sys.executable, "-m", "backends.torch.cli", "serve", "--target", args.target,
           "--draft", args.draft, "--stages", str(stages), "--prompts", str(prompts),
           "--strategies", ",".join(args.strategies), "--concurrency", str(args.concurrency),
           "--requests", str(args.requests), "--max-new-tokens", str(args.max_new_tokens),
           "--out", str(out), "--quiet", "--timeout", "300", *knob_flags(args)]
    return fid._run(cmd, f"real serve S={stages}", 3600, log)


def serve_config(args, stages: int):
    """The simulator's side: the real run's knobs; topology A and the shared pipeline
    defaults (prune broadcast, cancel), which `pipedec-real serve` runs without flags."""
    from pipedec_sim.programs.serve import ServeConfig
    return ServeConfig(stages=stages, strategies=tuple(args.strategies), width=args.width,
                       topk=args.topk, depth=args.depth, tree_topk=args.tree_topk,
                       total=args.total, topology="A", engine="reference")


def workload(args, trace):
    """The requests the real run served: `serve_workload` draws them from the prompts the
    same way (same count, seed 0), so ids and order match."""
    from pipedec_sim.inputs.arrivals import serve_workload
    return serve_workload(trace.requests, n=args.requests, rate=None,
                          concurrency=args.concurrency, duration_s=None, seed=0)


def simulate(profile, cfg, name: str, w, core_share) -> list[dict]:
    """One strategy on the serving simulator with the cores' share measured around the
    real run: a served_row per request (`programs.serve.serve_task`)."""
    from pipedec_sim.programs.serve import serve_task
    return serve_task(profile, cfg, name, w, {}, core_share=core_share)


def compare(real: pd.DataFrame, sim: pd.DataFrame, stages: int) -> list[dict]:
    """Per strategy: throughput, median TBT and the decisions, real vs simulated."""
    cells = []
    for _, r in real.iterrows():
        s = sim[sim.strategy == r.strategy].iloc[0]
        cells.append({"stages": stages, "strategy": r.strategy,
                      "real_tok_s": r.throughput_tok_s, "sim_tok_s": s.throughput_tok_s,
                      "tok_s_err": s.throughput_tok_s / r.throughput_tok_s - 1,
                      "real_tbt_ms": r.tbt_p50_ms, "sim_tbt_ms": s.tbt_p50_ms,
                      "tbt_err": s.tbt_p50_ms / r.tbt_p50_ms - 1,
                      "real_steps": r.steps, "sim_steps": s.steps,
                      "real_parts": r.parts_per_step, "sim_parts": s.parts_per_step,
                      "real_hit": r.hit_rate, "sim_hit": s.hit_rate,
                      "real_stage_ms": r.stage_ms_per_token, "sim_stage_ms": s.stage_ms_per_token})
    return cells


def with_stage_ms(summary: pd.DataFrame, requests: pd.DataFrame) -> pd.DataFrame:
    """Add the stages' compute per output token (all stages together)."""
    per_run = requests.groupby("strategy", sort=False).agg(busy=("stage_busy_ms", "first"),
                                                           tokens=("tokens", "sum"))
    summary = summary.copy()
    summary["stage_ms_per_token"] = (per_run.busy / per_run.tokens).loc[summary.strategy].values
    return summary


def format_cells(cells: list[dict]) -> str:
    df = pd.DataFrame(cells)
    show = pd.DataFrame({
        "S": df.stages, "strategy": df.strategy,
        "real tok/s": df.real_tok_s.map("{:.1f}".format),
        "sim tok/s": df.sim_tok_s.map("{:.1f}".format),
        "error": df.tok_s_err.map("{:+.1%}".format),
        "real TBT p50 ms": df.real_tbt_ms.map("{:.2f}".format),
        "sim TBT p50 ms": df.sim_tbt_ms.map("{:.2f}".format),
        "error ": df.tbt_err.map("{:+.1%}".format),
        "steps real/sim": [f"{a}/{b}" for a, b in zip(df.real_steps, df.sim_steps)],
        "parts/step real/sim": [f"{a:.2f}/{b:.2f}" for a, b in zip(df.real_parts,
                                                                   df.sim_parts)],
        "hit real/sim": [f"{a:.3f}/{b:.3f}" for a, b in zip(df.real_hit, df.sim_hit)],
        "stage ms/tok real/sim": [f"{a:.2f}/{b:.2f}" for a, b in zip(df.real_stage_ms,
                                                                     df.sim_stage_ms)]})
    tok, tbt = df.tok_s_err.abs(), df.tbt_err.abs()
    return "\n".join([show.to_string(index=False),
                      f"throughput: median |error| {tok.median():.1%}, worst {tok.max():.1%}; "
                      f"TBT p50: median |error| {tbt.median():.1%}, worst {tbt.max():.1%}"])


# ---- the whole benchmark --------------------------------------------------------------

def run_benchmark(args, log=print) -> dict:
    from pipedec_sim.inputs.traces import write_trace
    from pipedec_sim.programs.serve import summarize_serving
    from pipedec_sim.results.serving import served_frame
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pipedec-serve-fid-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts = Path(args.prompts) if args.prompts else work / "prompts.txt"
    if not args.prompts:
        prompts.write_text("\n".join(DEFAULT_PROMPTS) + "\n")
    args.max_requests = None                   # fid.record reads the whole prompt file
    t0 = time.perf_counter()
    log(f"[serve-fidelity] target {args.target}, draft {args.draft}, stages {args.stages}, "
        f"{args.requests} requests x {args.max_new_tokens} tokens, closed loop at "
        f"{args.concurrency}; {fid.host_line()}")
    if args.profile:
        profile_path = Path(args.profile)
    else:
        profile_path = work / "profile.json"
        secs = fid.measure_profile(args.target, args.draft, profile_path,
                                   quick=args.quick_profile, log=log)
        log(f"[serve-fidelity] profile measured in {secs:.0f} s")
    profile = load_profile(profile_path)
    fid.check_profile_host(profile, log)
    trace = fid.record(args, prompts, log)
    write_trace(trace, work / "trace.jsonl")
    w = workload(args, trace)
    cells = []
    for S in args.stages:
        out = work / f"real-S{S}"
        before = fid.core_share()
        wall = real_serve(args, S, prompts, out, log)
        after = fid.core_share()
        share = tuple(round((a + b) / 2, 3) for a, b in zip(before, after))
        log(f"[serve-fidelity] S={S}: real serving {wall:.0f} s (incl. start-up); core share "
            f"of n = 1..5 busy processes before {before}, after {after}; load average "
            f"{fid.load_avg()}")
        real_req = pd.read_csv(out / "requests.csv", dtype={"request": str})
        check_outputs(out, w, log)
        real = with_stage_ms(pd.read_csv(out / "summary.csv"), real_req)
        cfg = serve_config(args, S)
        rows = [row for name in args.strategies
                for row in simulate(profile, cfg, name, w, share)]
        sim_req = served_frame(rows)
        sim = with_stage_ms(summarize_serving(sim_req), sim_req)
        cells += compare(real, sim, S)
    table = format_cells(cells)
    log("")
    log(f"Serving fidelity: {args.target} / draft {args.draft}, {args.requests} requests x "
        f"{args.max_new_tokens} tokens, closed loop at concurrency {args.concurrency}; "
        f"profile {profile_path.name} measured on "
        f"{fid.describe(profile.host) if profile.host else 'an unrecorded host'}")
    log(f"This machine: {fid.host_line()} (now); {time.perf_counter() - t0:.0f} s in all")
    log("Pipeline: topology A, prune broadcast, cancel on (both sides' defaults); error = "
        "sim/real - 1")
    log(table)
    if args.csv:
        pd.DataFrame(cells).to_csv(args.csv, index=False)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return {"cells": cells, "table": table}


def check_outputs(out: Path, w, log) -> None:
    """The real outputs are the trace's (the target's own greedy tokens)."""
    by_id = {r.id: r.output for r in w.requests}
    bad = [(o["strategy"], o["id"]) for o in map(json.loads,
                                                 (out / "outputs.jsonl").read_text().splitlines())
           if o["output_ids"] != list(by_id[o["id"]])]
    if bad:
        log(f"[serve-fidelity] warning: real outputs differ from the trace for {bad}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="tiny")
    ap.add_argument("--draft", default="tiny-noisy")
    ap.add_argument("--stages", default=[2, 4], type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--strategies", default=SERVE_STRATEGIES,
                    type=lambda s: tuple(s.split(",")))
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--prompts", default=None, help="prompt file (default: 6 built-in prompts)")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--tree-topk", type=int, default=4)
    ap.add_argument("--total", type=int, default=16)
    ap.add_argument("--profile", default=None,
                    help="reuse this profile instead of measuring one on this machine")
    ap.add_argument("--quick-profile", action="store_true")
    ap.add_argument("--work", default=None, help="keep intermediate files here")
    ap.add_argument("--csv", default=None, help="write the cells as CSV")
    return ap


def main(argv=None) -> int:
    run_benchmark(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
