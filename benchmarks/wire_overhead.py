"""The real pipeline's CPU outside its compute: per stage message, per prune notice, per
head event; and a real run's time per token. This checkout against another, side by side.

    python benchmarks/wire_overhead.py [--baseline REF] [--rounds 3] [--cycles 100]
        [--target tiny] [--draft tiny-noisy] [--stages 4] [--out FILE]

What is measured (each in a fresh subprocess whose working directory is the checkout, so
its imports are that checkout's code):
  quiet          `profiler.measure_stage_overhead`: 2 real stage processes (gloo) fed by
                 a hand-made head one batch at a time; per stage, process CPU outside
                 `run_stage` per batch message (stage_message_ms) and per prune notice
                 (stage_notice_ms), and the head's wire CPU per inbound event
                 (head_event_ms)
  oversubscribed the same with 2 streaming processes beside them (5 busy processes on
                 this machine's cores)
  ring4          4 stages with 5 batches in flight back to back (every process runnable)
  head           `profiler.measure_head_overhead`: the real strategy's work per event,
                 turning actions into wire tensors, and the reader-thread hand-off
  run            `pipedec-real run` (distributed, --stages S) of ar and pipedec on the
                 tiny models: wall ms per token (TBT)
With --baseline REF the same is measured on a temporary git worktree at REF, alternating
the two checkouts round by round (this machine's load drifts), and the medians and
their ratios are printed; without, only this checkout. The output names the CPU model
and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipedec_sim.inputs.host import describe, host_record  # noqa: E402

PROBE = """
import json, sys
from backends.torch import profiler
kind, target, cycles = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "head":
    ms, d = profiler.measure_head_overhead(400)
    print(json.dumps({"head_overhead_ms": ms, **d}))
else:
    kw = {"quiet": {}, "oversubscribed": {"background": 2},
          "ring4": {"stages": 4, "window": 5}}[kind]
    f, _ = profiler.measure_stage_overhead(target, cycles=cycles, **kw)
    print(json.dumps(f))
"""
PROMPTS = ["Hello, world! This is a test.", "The quick brown fox jumps", "Once upon a time"]
KINDS = ("quiet", "oversubscribed", "ring4", "head")


def probe(tree: Path, kind: str, args) -> dict:
    """One measurement in a subprocess running `tree`'s code."""
    res = subprocess.run([sys.executable, "-c", PROBE, kind, args.target, str(args.cycles)],
                         cwd=tree, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(tree)})
    if res.returncode:
        raise SystemExit(f"wire_overhead: {kind} on {tree} failed: {res.stderr.strip()[-400:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def real_run(tree: Path, args, work: Path) -> dict:
    """ms per token of a distributed `pipedec-real run` of ar and pipedec, `tree`'s code."""
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = work / f"run-{tree.name}"
    cmd = [sys.executable, "-m", "backends.torch.cli", "run", "--target", args.target,
           "--draft", args.draft, "--stages", str(args.stages), "--strategies", "ar,pipedec",
           "--prompts", str(prompts), "--max-new-tokens", "32", "--quiet", "--out", str(out)]
    res = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(tree)})
    if res.returncode:
        raise SystemExit(f"wire_overhead: run on {tree} failed: {res.stderr.strip()[-400:]}")
    import pandas as pd
    summary = pd.read_csv(out / "summary.csv")
    return {f"{s}_tbt_ms": float(t) for s, t in zip(summary.strategy, summary.tbt_ms)}


def measure(tree: Path, args, work: Path) -> dict:
    row: dict = {}
    for kind in KINDS:
        for k, v in probe(tree, kind, args).items():
            if isinstance(v, (int, float)):
                row[f"{kind}.{k}"] = v
    row.update({f"run.{k}": v for k, v in real_run(tree, args, work).items()})
    return row


FIELDS = [("quiet.stage_message_ms", "stage CPU per message, quiet"),
          ("quiet.stage_notice_ms", "stage CPU per notice, quiet"),
          ("quiet.head_event_ms", "head wire CPU per event, quiet"),
          ("oversubscribed.stage_message_ms", "stage CPU per message, 5 busy processes"),
          ("oversubscribed.stage_notice_ms", "stage CPU per notice, 5 busy processes"),
          ("oversubscribed.head_event_ms", "head wire CPU per event, 5 busy processes"),
          ("ring4.stage_message_ms", "stage CPU per message, saturated 4-stage ring"),
          ("head.head_overhead_ms", "head per event (strategy + wire + hand-off)"),
          ("head.strategy_and_wire_ms", "  of which strategy + wire tensors"),
          ("head.thread_handoff_ms", "  of which reader-thread hand-off"),
          ("run.ar_tbt_ms", "real run, ar: ms per token"),
          ("run.pipedec_tbt_ms", "real run, pipedec: ms per token")]


def table(rows: dict[str, list[dict]], names: list[str]) -> list[str]:
    med = {n: {k: statistics.median(r[k] for r in rows[n]) for k, _ in FIELDS} for n in names}
    head = f"{'median over rounds (ms)':48s}" + "".join(f"{n:>12s}" for n in names)
    lines = [head + ("   after/before" if len(names) == 2 else "")]
    for k, label in FIELDS:
        vals = [med[n][k] for n in names]
        line = f"{label:48s}" + "".join(f"{v:12.3f}" for v in vals)
        if len(names) == 2 and vals[0]:
            line += f"   {vals[1] / vals[0]:12.2f}x"
        lines.append(line)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default=None,
                    help="a git ref to measure beside this checkout (default: none)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per checkout (default 3)")
    ap.add_argument("--cycles", type=int, default=100,
                    help="batches per overhead measurement (default 100)")
    ap.add_argument("--target", default="tiny", help="model spec (default tiny)")
    ap.add_argument("--draft", default="tiny-noisy", help="draft spec (default tiny-noisy)")
    ap.add_argument("--stages", type=int, default=4, help="stages of the real run (default 4)")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    lines = [f"# python benchmarks/wire_overhead.py {' '.join(argv or sys.argv[1:])}",
             f"# host: {describe(host_record())}; load average before {os.getloadavg()}"]
    with tempfile.TemporaryDirectory(prefix="wire-overhead-") as tmp:
        work = Path(tmp)
        trees = {"this": ROOT}
        if args.baseline:
            base = work / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                            str(base), args.baseline], check=True)
            trees = {args.baseline: base, "this": ROOT}
        try:
            rows: dict[str, list[dict]] = {n: [] for n in trees}
            for r in range(args.rounds):
                for name, tree in trees.items():
                    print(f"[wire-overhead] round {r + 1}/{args.rounds}: {name}",
                          file=sys.stderr, flush=True)
                    rows[name].append(measure(tree, args, work))
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(work / "baseline")], check=False)
    lines += table(rows, list(trees))
    lines.append(f"# load average after {os.getloadavg()}; {args.rounds} rounds, "
                 f"{args.cycles} batches per overhead measurement")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
