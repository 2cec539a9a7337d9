"""`pipedec-sim`: simulate PipeDec, tree-based SD and plain PP on a calibrated pipeline.

Bad input (files, flags) prints one line naming the file, line and field and exits 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import InputError, guarded

DEFAULT_PROFILE = "analytic-llama70b-1b"
STRATEGY_NAMES = ("ar", "tree-sd", "pipedec")


class Parser(argparse.ArgumentParser):
    def error(self, message):            # argparse's own errors: same one-line shape, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(kind=int):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}")
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return v
    return parse


def _fraction(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return v


def _coverage(text):
    v = _positive(float)(text)
    if v > 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return v


def _strategies(text):
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [n for n in names if n not in STRATEGY_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {', '.join(bad) or text!r}; choose from {', '.join(STRATEGY_NAMES)}")
    return names


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tree policies")
    g.add_argument("--width", type=_positive(), default=16,
                   help="PipeDec: nodes per tree layer, W (default 16)")
    g.add_argument("--topk", type=_positive(), default=16,
                   help="PipeDec: children considered per frontier node, k (default 16)")
    g.add_argument("--floor", type=_fraction, default=0.0,
                   help="PipeDec: drop nodes whose path probability is below this (default 0)")
    g.add_argument("--coverage", type=_coverage, default=None,
                   help="PipeDec adaptive width: stop a layer once it holds this fraction of "
                        "the frontier's probability (default off)")
    g.add_argument("--depth", type=_positive(), default=6,
                   help="tree-SD (EAGLE-2): draft passes per tree (default 6)")
    g.add_argument("--tree-topk", type=_positive(), default=10,
                   help="tree-SD: nodes expanded per level and children per node (default 10)")
    g.add_argument("--total", type=_positive(), default=60,
                   help="tree-SD: nodes kept in the verified tree, total_token (default 60)")


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
    run.add_argument("--stages", type=_positive(), default=14,
                     help="pipeline stages S (default 14, as in the paper)")
    run.add_argument("--profile", default=DEFAULT_PROFILE,
                     help=f"calibration profile: a JSON file or a bundled name (default {DEFAULT_PROFILE})")
    run.add_argument("--strategies", type=_strategies, default=STRATEGY_NAMES,
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
    g.add_argument("--link-gbps", type=_positive(float), default=None,
                   help="override the profile's link bandwidth (Gbit/s)")
    g.add_argument("--link-latency-ms", type=float, default=None,
                   help="override the profile's per-hop latency (ms)")
    w = run.add_argument_group("workload and output")
    w.add_argument("--max-requests", type=_positive(), default=None, help="use the first N requests")
    w.add_argument("--max-new-tokens", type=_positive(), default=256,
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
    from . import plotting_cli, sweep, tune        # exploration commands (issue 5)
    sweep.add_parser(sub)
    plotting_cli.add_parser(sub)
    tune.add_parser(sub)
    return parser


def progress_printer(label: str, quiet: bool = False):
    """A progress line on stderr: redrawn on a terminal, every 10% otherwise."""
    if quiet:
        return None
    tty = sys.stderr.isatty()
    shown = [-1]

    def show(done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tty:
            end = "\n" if done == total else ""
            print(f"\r{label} {done}/{total}", end=end, file=sys.stderr, flush=True)
        elif tenth != shown[0]:
            shown[0] = tenth
            print(f"{label} {done}/{total}", file=sys.stderr, flush=True)
    return show


def cmd_run(args) -> int:
    from .acceptance import load_acceptance
    from .calibration import load_profile
    from .metrics import format_table
    from .prompts import load_workload
    from .simulate import SimConfig, simulate

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
        from .atomic import atomic_path
        for name, frame in (("summary.csv", result.summary), ("requests.csv", result.requests)):
            with atomic_path(args.out / name) as tmp:
                frame.to_csv(tmp, index=False)
        print(f"wrote {args.out / 'summary.csv'} and {args.out / 'requests.csv'}", file=sys.stderr)
    if args.timeline:
        from .timeline import write_chrome_trace
        write_chrome_trace(args.timeline, {f"{s} / request {r}": evs
                                           for (s, r), evs in result.timelines.items()})
        print(f"wrote {args.timeline} (open in ui.perfetto.dev or chrome://tracing)",
              file=sys.stderr)
    return 0


def _lazy(module: str, name: str):
    def command(args):
        from importlib import import_module
        return getattr(import_module(f"pipedec_sim.{module}"), name)(args)
    return command


COMMANDS = {"run": cmd_run,
            "sweep": _lazy("sweep", "cmd_sweep"),
            "plot": _lazy("plotting_cli", "cmd_plot"),
            "tune": _lazy("tune", "cmd_tune")}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return guarded("pipedec-sim", lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
