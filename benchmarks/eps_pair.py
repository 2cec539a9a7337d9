"""The eps pair: the draft's agreement against eps, and a simulated S=4 prediction.

The acceptance-controlled pair is `--target eps-pair` / `--draft eps-pair-draft`.

    python benchmarks/eps_pair.py [--quick] [--shapes 32x512,64x512] [--eps 0,0.01,...]
        [--choose EPS] [--stages 4] [--cores 6] [--profile FILE] [--full-profile]
        [--out benchmarks/results/eps_pair.txt]

1. agreement: for each shape LxH and eps, the draft's greedy top-1 agreement with the
   target: the fraction of positions along the target's greedy continuation of the prompts
   where the draft's argmax is the target's token (the trace recorder's `top1_agreement`,
   `benchmarks/fidelity.py`'s `record`, so the same prompts and ids as its real runs);
2. profile: `pipedec-real profile` of the pair at the chosen eps on this machine (fidelity's
   `measure_profile`; --quick grids unless --full-profile; --profile FILE reuses one);
3. predict: the simulator on the chosen eps's trace, PP (ar), tree-SD and PipeDec at S
   stages, with fidelity's knobs and the pipeline options of `pipedec-real run`: on
   `--cores` dedicated cores (the profile's core model told that the cores are not shared:
   `devices.shared_cores` = --cores, so up to that many busy processes run at once), each
   process a whole core (durations scaled by the share of a core the profiler got here)
   and with the durations as measured; then on this host as profiled (its cores shared).

The pair is a controlled experiment, not a language model (backends/torch/eps_pair.py).
The report goes to stdout and to --out, under a header naming the command, date, host and
load average.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fidelity  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from backends.torch import eps_pair  # noqa: E402
from pipedec_sim.inputs.profile import load_profile  # noqa: E402
from pipedec_sim.results.metrics import format_table, summarize  # noqa: E402

DEFAULT_SHAPES = "32x512,64x512"        # the default pair and one twice as deep
DEFAULT_EPS = "0,0.005,0.01,0.02,0.03,0.05,0.1,0.3,1"
QUICK = {"shapes": "32x512", "eps": "0,0.02,0.1,1", "max_requests": 2, "max_new_tokens": 16}
RESULT = ROOT / "benchmarks" / "results" / "eps_pair.txt"


def pair_specs(shape: str, eps: float) -> tuple[str, str]:
    """(target, draft) specs of one shape at one eps, the draft's depth the default."""
    target = eps_pair.parse(f"{eps_pair.TARGET}:{shape}:{eps!r}")
    assert target is not None
    return target.spec, target.draft_spec


def run_args(args, target: str, draft: str):
    """Fidelity's own arguments (its knobs and defaults) for one pair."""
    knobs = fidelity.build_parser().parse_args([])
    knobs.target, knobs.draft = target, draft
    knobs.max_requests, knobs.max_new_tokens = args.max_requests, args.max_new_tokens
    return knobs


def agreement_curve(args, prompts: Path, log) -> tuple[list[dict], dict]:
    """One row per (shape, eps): the draft's top-1 agreement; and the trace of each."""
    rows, traces = [], {}
    for shape in args.shapes:
        for eps in args.eps:
            t = time.perf_counter()
            target, draft = pair_specs(shape, eps)
            trace = fidelity.record(run_args(args, target, draft), prompts, lambda _: None)
            traces[(shape, eps)] = trace
            tokens = sum(len(r.output) for r in trace.requests)
            rows.append({"shape": shape, "eps": eps,
                         "agreement": trace.header.extra["top1_agreement"],
                         "positions": tokens})
            log(f"[eps-pair] {target} / {draft}: agreement {rows[-1]['agreement']:.3f} over "
                f"{tokens} positions ({time.perf_counter() - t:.0f} s)")
    return rows, traces


def format_curve(rows: list[dict]) -> str:
    """eps down the side, one agreement column per shape."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    cell = {(r["shape"], r["eps"]): r["agreement"] for r in rows}
    lines = ["eps      " + "  ".join(f"{s:>9}" for s in shapes)]
    for eps in dict.fromkeys(r["eps"] for r in rows):
        lines.append(f"{eps:<8g} " + "  ".join(
            f"{cell[(s, eps)]:9.3f}" if (s, eps) in cell else f"{'-':>9}" for s in shapes))
    return "\n".join(lines)


def core_models(profile, cores: int) -> list[tuple[str, object, tuple | None]]:
    """(label, profile, core share now) for each way the prediction is made: on `cores`
    dedicated cores (`devices.shared_cores` = cores: up to that many busy processes, S
    stages and the head, run at once), first with each process given a whole core (the
    simulator's "share now" table: 1.0 for every n, so durations scale by the profile's
    own share when it was measured, as fidelity.py's --share run does for foreign load),
    then with the durations as measured; last on this host as it was profiled."""
    mine = dataclasses.replace(profile, shared_cores=cores)
    out = []
    if profile.core_share:
        out.append((f"On {cores} dedicated cores, a whole core each (durations x the "
                    f"profile's own one-process share {profile.core_share[0]}):", mine,
                    (1.0,) * cores))
    out.append((f"On {cores} dedicated cores, durations as measured:",
                dataclasses.replace(mine, core_share=None), None))
    out.append((f"On this host as profiled (shared_cores={profile.shared_cores}, measured "
                f"share {list(profile.core_share or [])}):", profile, None))
    return out


def predict(cfg, trace, profile, share) -> str:
    """Simulated ar / tree-SD / PipeDec: the summary table (fidelity's simulation, which
    also checks that every strategy commits the trace's own output)."""
    df, _ = fidelity.simulate_requests(trace, profile, cfg, core_share=share)
    return format_table(summarize(df))


def profile_for(args, target: str, draft: str, work: Path, log):
    if args.profile:
        profile = load_profile(args.profile)
        fidelity.check_profile_host(profile, log)
        return profile, args.profile
    path = work / "profile.json"
    secs = fidelity.measure_profile(target, draft, path, quick=not args.full_profile, log=log)
    log(f"[eps-pair] profile measured in {secs:.0f} s")
    return load_profile(path), path


def header(argv: list[str]) -> list[str]:
    """Command, date, host (CPU model, cores) and load average: a CPU figure holds only
    for the machine and the load it was measured under."""
    return [f"# python benchmarks/eps_pair.py {' '.join(argv)}".rstrip(),
            f"# {datetime.datetime.now().isoformat(timespec='seconds')}; "
            f"{fidelity.host_line()}"]


def run_benchmark(args, argv: list[str], log=print) -> list[str]:
    t0 = time.perf_counter()
    out = header(argv)
    for line in out:
        log(line)
    work = Path(tempfile.mkdtemp(prefix="pipedec-eps-pair-"))
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(fidelity.DEFAULT_PROMPTS) + "\n")
    rows, traces = agreement_curve(args, prompts, log)
    n = rows[0]["positions"]
    report = ["", f"Draft top-1 agreement with the target ({n} positions per cell: "
                  f"{args.max_requests} prompts x {args.max_new_tokens} greedy tokens):",
              format_curve(rows)]
    shape, eps = args.shapes[0], args.choose
    target, draft = pair_specs(shape, eps)
    trace = traces.get((shape, eps)) or fidelity.record(run_args(args, target, draft),
                                                        prompts, lambda _: None)
    profile, path = profile_for(args, target, draft, work, log)
    cfg = fidelity.sim_config(run_args(args, target, draft), args.stages, fidelity.STRATEGIES)
    report += ["", f"Simulated {target} / {draft} (agreement "
                   f"{trace.header.extra['top1_agreement']:.3f}), S={args.stages}, profile "
                   f"{Path(path).name} measured here; knobs width {cfg.width}, topk "
                   f"{cfg.topk}, depth {cfg.depth}, tree_topk {cfg.tree_topk}, total "
                   f"{cfg.total}; prune {cfg.prune}, cancel {'on' if cfg.cancel else 'off'}"]
    for label, prof, share in core_models(profile, args.cores):
        report += ["", label, predict(cfg, trace, prof, share)]
    report += ["", f"({time.perf_counter() - t0:.0f} s in all; load average at the end "
                   f"{fidelity.load_avg()})"]
    for line in report:
        log(line)
    shutil.rmtree(work, ignore_errors=True)      # its profile too: measure one with
    # `pipedec-real profile` to keep it, and pass it as --profile
    return out + report


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"smaller: shapes {QUICK['shapes']}, eps {QUICK['eps']}, "
                         f"{QUICK['max_requests']} prompts x {QUICK['max_new_tokens']} tokens")
    ap.add_argument("--shapes", default=None,
                    help=f"LxH shapes, comma-separated; the first is predicted "
                         f"(default {DEFAULT_SHAPES})")
    ap.add_argument("--eps", default=None, help=f"eps values (default {DEFAULT_EPS})")
    ap.add_argument("--choose", type=float, default=eps_pair.DEFAULT_EPS,
                    help=f"the eps to profile and predict (default {eps_pair.DEFAULT_EPS}, "
                         "the spec's default)")
    ap.add_argument("--max-requests", type=int, default=None,
                    help="prompts (default 4 of fidelity's built-in prompts)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="(default 32)")
    ap.add_argument("--stages", type=int, default=4, help="S to predict (default 4)")
    ap.add_argument("--cores", type=int, default=6,
                    help="dedicated cores to predict on (default 6: S + 2 at S=4)")
    ap.add_argument("--profile", default=None, help="reuse this profile instead of measuring")
    ap.add_argument("--full-profile", action="store_true",
                    help="the profiler's full grids (default its --quick ones)")
    ap.add_argument("--out", type=Path, default=RESULT, help=f"report file (default {RESULT})")
    return ap


def parse_args(argv):
    args = build_parser().parse_args(argv)
    quick = QUICK if args.quick else {}
    args.shapes = (args.shapes or quick.get("shapes", DEFAULT_SHAPES)).split(",")
    args.eps = floats(args.eps or quick.get("eps", DEFAULT_EPS))
    args.max_requests = args.max_requests or quick.get("max_requests", 4)
    args.max_new_tokens = args.max_new_tokens or quick.get("max_new_tokens", 32)
    for shape in args.shapes:
        pair_specs(shape, args.choose)        # a bad shape or eps fails before any work
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from pipedec_sim.errors import InputError
    try:
        args = parse_args(argv)
    except InputError as e:
        print(f"eps_pair: error: {e}", file=sys.stderr)
        return 2
    lines = run_benchmark(args, argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
