"""`pipedec-sim`: simulate PipeDec, tree-based SD and plain PP on a calibrated pipeline.

Bad input (files, flags) prints one line naming the file, line and field and exits 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipedec_sim.errors import InputError, guarded
from pipedec_sim.programs.flags import (
    DEFAULT_PROFILE,
    STRATEGY_NAMES,
    Parser,
    add_policy_flags,
    positive,
    progress_printer,
    strategy_list,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pipedec-sim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = sub.add_parser("run", help="simulate strategies on a trace or prompt file",
                         description="Simulate each strategy on every request of a speculation "
                         "trace (or a prompt file, with a synthetic acceptance model) and print "
                         "one row per strategy.")
    run.add_argument("--trace", required=True, type=Path,
                     help="speculation trace (.jsonl/.jsonl.gz) or a prompt file "
                          "(Alpaca, ShareGPT, MT-Bench, HumanEval, GSM8K, plain lines)")
    run.add_argument("--stages", type=positive(), default=14,
                     help="pipeline stages S (default 14, as in the paper)")
    run.add_argument("--profile", default=DEFAULT_PROFILE,
                     help=f"calibration profile: a JSON file or a bundled name (default {DEFAULT_PROFILE})")
    run.add_argument("--strategies", type=strategy_list, default=STRATEGY_NAMES,
                     help="comma-separated subset of ar,tree-sd,pipedec (default all)")
    add_policy_flags(run)
    g = run.add_argument_group("pipeline")
    g.add_argument("--topology", choices=("A", "B"), default="A",
                   help="A: draft + LM head on a head node before stage 1 (ring); "
                        "B: draft on stage 1's device, LM head on the last stage (default A)")
    g.add_argument("--prune", choices=("broadcast", "piggyback"), default="broadcast",
                   help="prune notices go straight to every stage, or ride the next batch")
    g.add_argument("--no-cancel", action="store_true",
                   help="stages finish batches whose rows all died instead of abandoning "
                        "them at the next layer boundary")
    g.add_argument("--link-gbps", type=positive(float), default=None,
                   help="override the profile's link bandwidth (Gbit/s)")
    g.add_argument("--link-latency-ms", type=float, default=None,
                   help="override the profile's per-hop latency (ms)")
    w = run.add_argument_group("workload and output")
    w.add_argument("--max-requests", type=positive(), default=None, help="use the first N requests")
    w.add_argument("--max-new-tokens", type=positive(), default=256,
                   help="output length for prompt files without recorded outputs (default 256)")
    w.add_argument("--acceptance", default=None,
                   help="acceptance model for prompt files: a JSON file, a trace to fit, or a "
                        "bundled name (mtbench, humaneval, gsm8k, sharegpt: fitted on "
                        "SmolLM2 traces; synthetic-default: hand-set). Default: the model "
                        "fitted on the prompt file's data set, else sharegpt")
    w.add_argument("--seed", type=int, default=0, help="seed for off-path proposals and synthesis")
    w.add_argument("--out", type=Path, default=None,
                   help="write summary.csv and requests.csv into this folder")
    w.add_argument("--timeline", type=Path, default=None,
                   help="write a Chrome/Perfetto trace JSON of the first request per strategy")
    w.add_argument("--quiet", action="store_true", help="no progress on stderr")
    from pipedec_sim.programs import plot, sweep, tune  # exploration commands (issue 5)
    sweep.add_parser(sub)
    plot.add_parser(sub)
    tune.add_parser(sub)
    return parser


def cmd_run(args) -> int:
    from pipedec_sim.inputs.acceptance import load_acceptance
    from pipedec_sim.inputs.profile import load_profile
    from pipedec_sim.inputs.prompts import load_workload
    from pipedec_sim.programs.simulate import SimConfig, simulate
    from pipedec_sim.results.metrics import format_table

    if args.link_latency_ms is not None and args.link_latency_ms < 0:
        raise InputError("must be >= 0", field="--link-latency-ms")
    profile = load_profile(args.profile)
    if args.link_gbps is not None or args.link_latency_ms is not None:
        profile = profile.with_link(bandwidth_gbps=args.link_gbps, latency_ms=args.link_latency_ms)
    try:
        profile.stage_layers(args.stages)
    except InputError as e:
        raise InputError(e.message, file=profile.source, field=e.field or "--stages") from None
    acceptance = load_acceptance(args.acceptance) if args.acceptance else None
    trace, described = load_workload(args.trace, max_requests=args.max_requests,
                                     max_new_tokens=args.max_new_tokens, seed=args.seed,
                                     acceptance=acceptance)
    cfg = SimConfig(stages=args.stages, strategies=args.strategies, width=args.width,
                    topk=args.topk, floor=args.floor, coverage=args.coverage, depth=args.depth,
                    tree_topk=args.tree_topk, total=args.total, topology=args.topology,
                    prune=args.prune, cancel=not args.no_cancel, seed=args.seed)
    if not args.quiet:
        print(f"workload: {described}", file=sys.stderr)
        print(f"profile:  {profile.name} ({profile.provenance.get('kind')}, "
              f"{profile.provenance.get('device')}); stages {args.stages}: "
              f"layers {profile.stage_layers(args.stages)}", file=sys.stderr)
    result = simulate(trace, profile, cfg, timeline_requests=1 if args.timeline else 0,
                      progress=progress_printer("simulated request runs:", args.quiet))
    print(format_table(result.summary))
    if args.out:
        from pipedec_sim.atomic import atomic_path
        for name, frame in (("summary.csv", result.summary), ("requests.csv", result.requests)):
            with atomic_path(args.out / name) as tmp:
                frame.to_csv(tmp, index=False)
        print(f"wrote {args.out / 'summary.csv'} and {args.out / 'requests.csv'}", file=sys.stderr)
    if args.timeline:
        from pipedec_sim.results.timeline import write_chrome_trace
        write_chrome_trace(args.timeline, {f"{s} / request {r}": evs
                                           for (s, r), evs in result.timelines.items()})
        print(f"wrote {args.timeline} (open in ui.perfetto.dev or chrome://tracing)",
              file=sys.stderr)
    return 0


def _lazy(module: str, name: str):
    def command(args):
        from importlib import import_module
        return getattr(import_module(f"pipedec_sim.programs.{module}"), name)(args)
    return command


COMMANDS = {"run": cmd_run,
            "sweep": _lazy("sweep", "cmd_sweep"),
            "plot": _lazy("plot", "cmd_plot"),
            "tune": _lazy("tune", "cmd_tune")}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return guarded("pipedec-sim", lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
