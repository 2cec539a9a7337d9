"""Regenerate docs/REPRODUCTION.md: the paper's setup in the simulator, every bundled trace.

    python benchmarks/reproduction.py [--max-requests 20] [--out docs/REPRODUCTION.md]

For each bundled trace, each stage count (14 as in v1, 8 as in v2) and each link
(10 GbE, 100 GbE; plus any measured GPU profile in pipedec_sim/profiles/ whose target
is 70B-shaped), simulate plain PP, tree-SD (EAGLE-2 defaults) and PipeDec (W=16, k=16)
and set the speedups beside the paper's ranges. Every figure in the file comes from this
run; the prose only states comparisons that the figures decide.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipedec_sim.atomic import write_text  # noqa: E402
from pipedec_sim.inputs.profile import bundled_profiles, load_profile  # noqa: E402
from pipedec_sim.inputs.traces import read_trace  # noqa: E402
from pipedec_sim.programs.simulate import SimConfig, simulate  # noqa: E402
from pipedec_sim.results.metrics import ideal_speedup  # noqa: E402

PAPER = {  # (vs PP low, high, vs tree-SD low, high), stages
    "v1 PipeDec": (4.46, 7.79, 2.2, 2.69, 14),
    "v2 SpecPipe": (4.19, 5.53, 2.08, 2.38, 8),
}


def profiles() -> list:
    out = [load_profile("analytic-llama70b-1b"), load_profile("analytic-llama70b-1b-100gbe")]
    for _name, path in sorted(bundled_profiles().items()):
        p = load_profile(path)
        if (p.provenance.get("kind") == "measured" and p.device_kind == "gpu"
                and p.target.layers == 80 and p.target.hidden == 8192):
            out.append(p)
    return out


def traces() -> list[Path]:
    return sorted(p for p in (ROOT / "traces").iterdir()
                  if p.name.endswith((".jsonl", ".jsonl.gz")))


def run(max_requests: int) -> pd.DataFrame:
    rows = []
    for path in traces():
        trace = read_trace(path, max_requests=max_requests)
        for prof in profiles():
            for stages in (14, 8):
                t0 = time.perf_counter()
                res = simulate(trace, prof, SimConfig(stages=stages))
                s = res.summary.set_index("strategy")
                rows.append({
                    "trace": path.name, "source": trace.header.source,
                    "dataset": trace.header.dataset, "profile": prof.name,
                    "link_gbps": prof.link.bandwidth_gbps, "stages": stages,
                    "requests": int(s.loc["ar", "requests"]),
                    "pp_tbt_ms": s.loc["ar", "tbt_ms"],
                    "treesd_tbt_ms": s.loc["tree-sd", "tbt_ms"],
                    "pipedec_tbt_ms": s.loc["pipedec", "tbt_ms"],
                    "pipedec_vs_pp": s.loc["pipedec", "speedup_vs_ar"],
                    "treesd_vs_pp": s.loc["tree-sd", "speedup_vs_ar"],
                    "pipedec_vs_treesd": s.loc["tree-sd", "tbt_ms"] / s.loc["pipedec", "tbt_ms"],
                    "pipedec_hit_rate": s.loc["pipedec", "hit_rate"],
                    "pipedec_stall_rate": s.loc["pipedec", "stall_rate"],
                    "treesd_accept_len": s.loc["tree-sd", "mean_accepted"],
                    "pipedec_util": s.loc["pipedec", "utilization"],
                })
                print(f"{path.name} {prof.name} S={stages}: "
                      f"PipeDec/PP {rows[-1]['pipedec_vs_pp']:.2f}x, "
                      f"PipeDec/tree-SD {rows[-1]['pipedec_vs_treesd']:.2f}x "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def bernoulli_control(p: float, stages: int, profile) -> float:
    """PipeDec/PP on a trace where the draft's top-1 is right with probability p and the
    truth is otherwise absent: no 'late hits', so the gap to S/(p+(1-p)S) is step cost."""
    import random

    from pipedec_sim.inputs.traces import Trace, TraceHeader, TraceRequest
    rng = random.Random(0)
    reqs = []
    for r in range(4):
        out = [rng.randrange(1000) for _ in range(256)]
        ids = [[t] + rng.sample(range(1000, 9999), 15) if rng.random() < p
               else rng.sample(range(1000, 9999), 16) for t in out]
        probs = [[0.5 ** (i + 1) for i in range(16)] for _ in out]
        reqs.append(TraceRequest(str(r), 300, out, ids, probs))
    head = TraceHeader("synthetic", "-", "-", "-", "bernoulli", 16, "control", "2026-01-01")
    res = simulate(Trace(head, reqs), profile,
                   SimConfig(stages=stages, strategies=("ar", "pipedec")))
    s = res.summary.set_index("strategy").loc["pipedec"]
    h = s.hit_rate
    return s.speedup_vs_ar / ideal_speedup(h, stages)


def verdict(x: float, lo: float, hi: float) -> str:
    return "within" if lo <= x <= hi else ("below" if x < lo else "above")


def render(df: pd.DataFrame, command: str, max_requests: int) -> str:
    out = ["# Reproducing the paper's setup in the simulator", "",
           f"Generated by `{command}` on {dt.date.today().isoformat()}; do not edit by hand.",
           "", "Setup: Llama-3.1-70B target (80 layers, bf16) split over S stages like vLLM, "
           "Llama-3.2-1B draft on the head node (topology A), greedy decoding, PipeDec "
           "W=16, k=16; tree-SD with EAGLE-2 defaults (depth 6, top_k 10, 60 nodes). "
           "Stage and draft times come from the profile named in each row (the analytic "
           "profiles model a 24 GB consumer GPU by a roofline; the h100 profiles were "
           "measured on one H100 80GB with random-weight bf16 layers of the 70B and 1B "
           "shapes, `-kernels` as summed GPU kernel time (what CUDA-graph replay approaches), "
           "the other as eager wall time through this project's backend, host launch "
           "overhead included; their link is 10 GbE, not measured; see their provenance). "
           "Acceptance comes from each trace: a synthetic trace uses a hand-set acceptance "
           "model, a recorded trace the agreement of the model pair that recorded it "
           "(SmolLM2-135M and its trained draft, not Llama-3.1-70B and Llama-3.2-1B). "
           f"Each row uses the first {max_requests} requests of its trace (the README's "
           "`pipedec-sim run` uses all 40 MT-Bench requests, so its figures differ).", ""]
    out += ["## Paper", "", "| version | stages | PipeDec vs PP | PipeDec vs tree-SD |",
            "|---|---|---|---|"]
    for name, (a, b, c, d, s) in PAPER.items():
        out.append(f"| {name} | {s} | {a}x - {b}x | {c}x - {d}x |")
    out += ["", "## Simulated", "",
            "| trace | profile | S | PP TBT ms | tree-SD TBT ms | PipeDec TBT ms | "
            "PipeDec vs PP | tree-SD vs PP | PipeDec vs tree-SD | PipeDec hit rate | "
            "PipeDec stall rate | tree-SD tokens/pass |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples():
        out.append(f"| {r.trace} | {r.profile} | {r.stages} | {r.pp_tbt_ms:.1f} | "
                   f"{r.treesd_tbt_ms:.1f} | {r.pipedec_tbt_ms:.1f} | {r.pipedec_vs_pp:.2f}x | "
                   f"{r.treesd_vs_pp:.2f}x | {r.pipedec_vs_treesd:.2f}x | "
                   f"{r.pipedec_hit_rate:.3f} | {r.pipedec_stall_rate:.3f} | "
                   f"{r.treesd_accept_len:.2f} |")
    out += ["", "## Against the paper's ranges", ""]
    for name, (a, b, c, d, s) in PAPER.items():
        sub = df[df.stages == s]
        if sub.empty:
            continue
        n_pp = sub.pipedec_vs_pp.apply(lambda x: verdict(x, a, b)).value_counts().to_dict()
        n_sd = sub.pipedec_vs_treesd.apply(lambda x: verdict(x, c, d)).value_counts().to_dict()
        out.append(f"* {name} (S={s}): PipeDec vs PP spans "
                   f"{sub.pipedec_vs_pp.min():.2f}x - {sub.pipedec_vs_pp.max():.2f}x over "
                   f"{len(sub)} runs ({_counts(n_pp)} the paper's {a}x - {b}x); "
                   f"PipeDec vs tree-SD spans {sub.pipedec_vs_treesd.min():.2f}x - "
                   f"{sub.pipedec_vs_treesd.max():.2f}x ({_counts(n_sd)} {c}x - {d}x).")
    # The analytic closed form S / (p + (1 - p) S) with the realised hit rate: how much
    # of the gap to the ideal is step cost (W tokens, draft, links) rather than misses.
    df = df.assign(ideal=ideal_speedup(df.pipedec_hit_rate, df.stages),
                   ideal_stalls=ideal_speedup(df.pipedec_hit_rate - df.pipedec_stall_rate,
                                              df.stages))
    worst = df.loc[(df.pipedec_vs_pp / df.ideal).idxmin()]
    control = bernoulli_control(worst.pipedec_hit_rate, int(worst.stages),
                                load_profile(worst.profile))
    frac, frac_s = df.pipedec_vs_pp / df.ideal, df.pipedec_vs_pp / df.ideal_stalls
    rec, syn = df[df.source == "recorded"], df[df.source == "synthetic"]
    out += ["", "## Where and why the numbers differ", "",
            f"* Misses, stalls and step cost: with the realised hit rate p, an ideal PipeDec "
            f"(one stage time per step, a full pipeline trip per miss) would reach "
            f"S/(p+(1-p)S). The simulated speedups reach {100 * frac.min():.0f}% - "
            f"{100 * frac.max():.0f}% of that bound (lowest: {worst.trace} on "
            f"{worst.profile}, S={worst.stages}: {worst.pipedec_vs_pp:.2f}x of "
            f"{worst.ideal:.2f}x). Most of the gap is *stalls* (stall rate "
            f"{df.pipedec_stall_rate.min():.3f} - {df.pipedec_stall_rate.max():.3f} of "
            "tokens): hits on a child that was not in the batch right behind the old root, "
            "because likelier siblings had crowded its branch out of the layers in flight and "
            "it regrew later; the next token then waits for the steps in between. A stall "
            "costs less than a miss's full trip, so S/(p'+(1-p')S) with p' = hit rate - stall "
            f"rate is a lower reference: the simulated speedups lie at "
            f"{100 * frac_s.min():.0f}% - {100 * frac_s.max():.0f}% of it. A control run on "
            f"the same profile with a Bernoulli draft (top-1 right with probability "
            f"{worst.pipedec_hit_rate:.3f}, else the truth absent, so no stalls) reaches "
            f"{100 * control:.0f}% of its bound: that much is the cost of a step beyond one "
            "PP stage (W tokens per layer, the draft and LM head sharing the head's GPU, "
            "link hops).",
            f"* Tree-SD baseline strength: the simulated EAGLE-2 baseline commits "
            f"{df.treesd_accept_len.min():.2f} - {df.treesd_accept_len.max():.2f} tokens per "
            "verification pass. On a memory-bound GPU a 61-token tree costs little more than "
            "one token per stage, so a strong draft makes tree-SD close to PipeDec; the "
            "paper's 2.2x - 2.69x over tree-SD implies a weaker tree-SD baseline, a costlier "
            "tree verification on its hardware, or both (its baseline settings are not public).",
            f"* Draft quality: PipeDec's bound S/(p+(1-p)S) needs a high hit rate. The "
            f"recorded traces reach p = {rec.pipedec_hit_rate.min():.2f} - "
            f"{rec.pipedec_hit_rate.max():.2f} with the draft distilled for SmolLM2 on a CPU "
            f"(top-1 agreement about 0.25), which caps PipeDec near "
            f"{ideal_speedup(rec.pipedec_hit_rate.max(), 14):.1f}x at S=14 whatever the hardware; "
            "the paper's 4.46x - 7.79x imply p >= 0.84, like the synthetic trace "
            f"(p = {syn.pipedec_hit_rate.max():.2f}), which lands inside the paper's ranges "
            "against PP." if len(rec) and len(syn) else "* Draft quality: see the hit rates.",
            f"* Link: going from 10 GbE to 100 GbE changes PipeDec's TBT by "
            f"{_pct(df, 'pipedec_tbt_ms')} and tree-SD's by {_pct(df, 'treesd_tbt_ms')} (mean "
            "over matching rows): a PipeDec step moves one layer of W hidden states per hop, "
            "a tree-SD pass moves 61 rows per hop, so the link matters more to tree-SD.",
            _draft_bullet(df),
            "* Unknowns in the paper (draft placement, W/k, prefill, hardware) are parameters "
            "here; the table uses the defaults stated at the top."]
    return "\n".join(out) + "\n"


def _draft_bullet(df: pd.DataFrame) -> str:
    """How long one draft step takes against one stage's compute, per profile: PipeDec runs
    the draft once per pipeline step, so a ratio near or above 1 makes the draft the clock."""
    parts = []
    for name in df.profile.unique():
        p = load_profile(name)
        stage = max(p.stage_layers(14)) * p.layer(16, 512)
        parts.append(f"{name} {p.draft_step(16, 512) / stage:.2f}")
    text = ("* Draft cost against a stage (one draft step of 16 rows over one S=14 stage's "
            "layers, context 512): " + ", ".join(parts) + ".")
    if not any(n.startswith("h100") for n in df.profile.unique()):
        return text
    return (text + " On the H100 a 70B stage is "
            "short (6 memory-bound layers), so the 1B draft on the head weighs more than on "
            "the analytic consumer GPU; with the eager profile (host launch overhead, no CUDA "
            "graphs) the draft step is longer than a stage and paces PipeDec, and tree-SD, "
            "which drafts depth-6 trees step by step, loses to plain PP.")


def _pct(df: pd.DataFrame, col: str) -> str:
    """Mean relative change of `col` from the 10 GbE to the 100 GbE rows."""
    df = df[df.profile.str.startswith("analytic")]        # the one profile pair per link
    slow = df[df.link_gbps == 10].set_index(["trace", "stages"])[col]
    fast = df[df.link_gbps == 100].set_index(["trace", "stages"])[col]
    both = slow.index.intersection(fast.index)
    if not len(both):
        return "n/a"
    return f"{100 * (fast[both] / slow[both] - 1).mean():+.1f}%"


def _counts(d: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(d.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-requests", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "REPRODUCTION.md")
    args = ap.parse_args()
    df = run(args.max_requests)
    command = "python benchmarks/reproduction.py" + (
        f" --max-requests {args.max_requests}" if args.max_requests != 20 else "")
    write_text(args.out, render(df, command, args.max_requests))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
