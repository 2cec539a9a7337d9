"""A real speedup, predicted before the run: the eps pair on dedicated cores.

    python benchmarks/speedup.py [--stages 4,8] [--shape 32x512] [--eps 0.02]
        [--max-requests 3] [--max-new-tokens 48] [--full-profile] [--out FILE] [--force]

Issue 16's check for a host with at least S + 2 free cores (one per stage, two for the head's
threads; the GPU machine's 16 CPU cores), on the acceptance-controlled pair
(`--target eps-pair --draft eps-pair-draft`, backends/torch/eps_pair.py):

  1. profile  `pipedec-real profile` of the pair on this host (quick grids unless
              --full-profile; a CPU profile holds only for the host that measured it);
  2. trace    the pair's speculation trace on the same prompts (fidelity's `record`);
  3. predict  PP (ar), tree-SD and PipeDec at every S, simulated from that profile and
              trace alone (the profile's own core model), printed and written to --out
              *before* any real run;
  4. real     `pipedec-real run` at every S, the three strategies, stage processes;
  5. report   per S and strategy the real and the predicted time per token (TBT), then the
              speedups PipeDec / PP and PipeDec / tree-SD, real against predicted.

The pipeline options are those both backends default to (fidelity's `pipeline_options`).
The report goes to stdout and to --out under a header naming the command, date, host and
load average. On a host with fewer cores it refuses (exit 2) unless --force (a smoke run).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import fidelity  # noqa: E402

from backends.torch import eps_pair  # noqa: E402
from pipedec_sim.inputs.profile import load_profile  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "speedup.txt"
STRATEGIES = ("ar", "tree-sd", "pipedec")


def free_cores() -> int:
    """Cores this process may run on (a container or taskset may give fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # not Linux
        return os.cpu_count() or 1


def knobs(args):
    """Fidelity's arguments (its knobs and defaults) for the pair at this shape and eps."""
    target = eps_pair.parse(f"{eps_pair.TARGET}:{args.shape}:{args.eps!r}")
    assert target is not None
    k = fidelity.build_parser().parse_args([])
    k.target, k.draft = target.spec, target.draft_spec
    k.stages, k.strategies = args.stages, STRATEGIES
    k.max_requests, k.max_new_tokens = args.max_requests, args.max_new_tokens
    return k


def tbt(df) -> dict[str, float]:
    """Time per output token (decode ms / decode tokens) of each strategy."""
    out = {}
    for name, part in df.groupby("strategy"):
        out[name] = part.decode_ms.sum() / max(int(part.decode_tokens.sum()), 1)
    return out


def predict(k, trace, profile, opts) -> dict[int, dict[str, float]]:
    """Simulated TBT per S and strategy (fidelity's simulation: it also checks that every
    strategy commits the trace's own output)."""
    out = {}
    for S in k.stages:
        df, _ = fidelity.simulate_requests(trace, profile,
                                           fidelity.sim_config(k, S, STRATEGIES, opts))
        out[S] = tbt(df)
    return out


def speedups(t: dict[str, float]) -> tuple[float, float]:
    """(PipeDec over PP, PipeDec over tree-SD): ratios of time per token."""
    return t["ar"] / t["pipedec"], t["tree-sd"] / t["pipedec"]


def format_prediction(pred: dict[int, dict[str, float]]) -> list[str]:
    lines = [f"{'S':>2}  {'ar ms/tok':>9}  {'tree-sd':>8}  {'pipedec':>8}  "
             f"{'pipedec/pp':>10}  {'pipedec/tree-sd':>15}"]
    for S, t in pred.items():
        pp, sd = speedups(t)
        lines.append(f"{S:>2}  {t['ar']:9.2f}  {t['tree-sd']:8.2f}  {t['pipedec']:8.2f}  "
                     f"{pp:9.2f}x  {sd:14.2f}x")
    return lines


def format_report(pred, real) -> list[str]:
    lines = [f"{'S':>2}  {'strategy':<8}  {'real ms/tok':>11}  {'predicted':>9}  {'error':>7}"]
    for S in pred:
        for name in STRATEGIES:
            r, p = real[S][name], pred[S][name]
            lines.append(f"{S:>2}  {name:<8}  {r:11.2f}  {p:9.2f}  {p / r - 1:+7.1%}")
    lines += ["", f"{'S':>2}  {'speedup':<18}  {'real':>6}  {'predicted':>9}  {'error':>7}"]
    for S in pred:
        for label, r, p in zip(("pipedec / pp", "pipedec / tree-sd"), speedups(real[S]),
                               speedups(pred[S])):
            lines.append(f"{S:>2}  {label:<18}  {r:5.2f}x  {p:8.2f}x  {p / r - 1:+7.1%}")
    return lines


def header(argv: list[str]) -> list[str]:
    return [f"# python benchmarks/speedup.py {' '.join(argv)}".rstrip(),
            f"# {datetime.datetime.now().isoformat(timespec='seconds')}; "
            f"{fidelity.host_line()}; {free_cores()} cores free to this process"]


def run_benchmark(args, argv: list[str], log=print) -> list[str]:
    t0 = time.perf_counter()
    out = header(argv)
    for line in out:
        log(line)
    k = knobs(args)
    opts = fidelity.pipeline_options(k)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pipedec-speedup-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(fidelity.DEFAULT_PROMPTS) + "\n")
    path = work / "profile.json"
    secs = fidelity.measure_profile(k.target, k.draft, path, quick=not args.full_profile,
                                    log=log)
    profile = load_profile(path)
    trace = fidelity.record(k, prompts, log)
    pred = predict(k, trace, profile, opts)
    part = ["", f"Prediction ({k.target} / {k.draft}, top-1 agreement "
                f"{trace.header.extra['top1_agreement']:.3f}; profile measured here in "
                f"{secs:.0f} s; prune {opts['prune']}, cancel {'on' if opts['cancel'] else 'off'}"
                f"; {args.max_requests} prompts x {args.max_new_tokens} tokens), made "
                f"{datetime.datetime.now().isoformat(timespec='seconds')}, before the real runs:"]
    part += format_prediction(pred)
    for line in part:
        log(line)
    out += part
    _write(args.out, out)                   # the prediction is on disk before any real run
    real = {}
    for S in k.stages:
        df, _, wall = fidelity.real_run(k, S, prompts, work / f"real-S{S}", log, opts)
        real[S] = tbt(df)
        log(f"[speedup] real S={S}: {wall:.0f} s; load average {fidelity.load_avg()}")
    part = ["", "Real against predicted:"] + format_report(pred, real)
    part += ["", f"({time.perf_counter() - t0:.0f} s in all; load average at the end "
                 f"{fidelity.load_avg()}; work folder {work})"]
    for line in part:
        log(line)
    out += part
    _write(args.out, out)
    return out


def _write(path: Path, lines: list[str]) -> None:
    """Replace the report whole (a temporary file renamed: never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def stage_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of stage counts: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"stage counts must be >= 1: {text!r}")
    return counts


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=stage_counts, default=[4, 8],
                    help="stage counts, comma-separated (default 4,8)")
    ap.add_argument("--shape", default="32x512", help="the pair's LxH (default 32x512)")
    ap.add_argument("--eps", type=float, default=eps_pair.DEFAULT_EPS,
                    help=f"the target's eps (default {eps_pair.DEFAULT_EPS}: agreement about "
                         "0.87, benchmarks/results/eps_pair.txt)")
    ap.add_argument("--max-requests", type=int, default=3, help="prompts (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=48,
                    help="tokens per prompt (default 48)")
    ap.add_argument("--full-profile", action="store_true",
                    help="the profiler's full grids (default its --quick ones)")
    ap.add_argument("--work", default=None, help="keep the profile, trace and runs here")
    ap.add_argument("--out", type=Path, default=RESULT, help=f"report file (default {RESULT})")
    ap.add_argument("--force", action="store_true",
                    help="run even with fewer than max(S) + 2 free cores (a smoke run: the "
                         "processes then share cores and the figures mean little)")
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    need = max(args.stages) + 2
    if free_cores() < need and not args.force:
        print(f"speedup: error: S={max(args.stages)} needs {need} free cores (a stage "
              f"each, and the head's two threads); this process has {free_cores()} "
              f"(--force runs anyway)", file=sys.stderr)
        return 2
    from pipedec_sim.errors import InputError
    try:
        knobs(args)                       # a bad shape or eps fails before any work
    except InputError as e:
        print(f"speedup: error: {e}", file=sys.stderr)
        return 2
    run_benchmark(args, argv)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
