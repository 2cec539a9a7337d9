"""Greedy against sampled targets: the same prompts recorded at T = 0 and T = 0.7.

    python benchmarks/sampling_table.py [--stages 14] [--profile analytic-llama70b-1b]

For each bundled SmolLM2 trace pair (traces/real-<set>.jsonl.gz, greedy, and
traces/real-<set>-t0.7.jsonl.gz, sampled at temperature 0.7 by `pipedec-real trace
--temperature 0.7 --seed 0`), simulates PP, tree-SD and PipeDec and prints the draft's
top-1 agreement, PipeDec's hit rate and mean accepted run, tree-SD's mean accepted tokens,
and PipeDec's speedup over PP and over tree-SD. Everything else is as `pipedec-sim run`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipedec_sim.inputs.profile import load_profile
from pipedec_sim.inputs.traces import read_trace, trace_sampling
from pipedec_sim.programs.simulate import SimConfig, simulate

ROOT = Path(__file__).resolve().parent.parent
SETS = ("mtbench", "gsm8k")


def row(path: Path, profile, stages: int, workers: int) -> dict:
    trace = read_trace(path)
    res = simulate(trace, profile, SimConfig(stages=stages), workers=workers)
    s = res.summary.set_index("strategy")
    top1 = trace.header.extra.get("top1_agreement", float("nan"))
    return {"trace": path.name, "T": trace_sampling(trace.header).temperature, "top1": top1,
            "hit": s.loc["pipedec", "hit_rate"],
            "pd_acc": s.loc["pipedec", "mean_accepted"],
            "sd_acc": s.loc["tree-sd", "mean_accepted"],
            "vs_pp": s.loc["ar", "tbt_ms"] / s.loc["pipedec", "tbt_ms"],
            "vs_sd": s.loc["tree-sd", "tbt_ms"] / s.loc["pipedec", "tbt_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=14, help="pipeline stages (default 14)")
    ap.add_argument("--profile", default="analytic-llama70b-1b",
                    help="calibration profile (default analytic-llama70b-1b)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    print(f"profile {profile.name}, S={args.stages}, default knobs\n")
    print(f"{'trace':<30} {'T':>4} {'top-1':>6} {'PD hit':>7} {'PD run':>7} {'SD acc':>7} "
          f"{'PD/PP':>6} {'PD/SD':>6}")
    for name in SETS:
        for suffix in ("", "-t0.7"):
            r = row(ROOT / "traces" / f"real-{name}{suffix}.jsonl.gz", profile, args.stages,
                    args.workers)
            print(f"{r['trace']:<30} {r['T']:>4g} {r['top1']:>6.3f} {r['hit']:>7.3f} "
                  f"{r['pd_acc']:>7.2f} {r['sd_acc']:>7.2f} {r['vs_pp']:>5.2f}x "
                  f"{r['vs_sd']:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
