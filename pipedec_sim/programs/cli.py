"""`pipedec-sim`: simulate PipeDec, tree-based SD and plain PP on a calibrated pipeline.

Bad input (files, flags) prints one line naming the file, line and field and exits 2.
"""
from __future__ import annotations

import argparse
import sys

from pipedec_sim.errors import InputError, guarded
from pipedec_sim.inputs.limits import MAX_OUTPUT_LEN, MAX_STAGES
from pipedec_sim.inputs.prompts import WORKLOAD_FORMATS
from pipedec_sim.programs.flags import (
    DEFAULT_PROFILE,
    DEFAULT_STAGES,
    Parser,
    add_engine_flag,
    add_link_flags,
    add_out_format_flag,
    add_pipeline_flags,
    add_policy_flags,
    add_workers_flag,
    file_path,
    number,
    positive,
    progress_bar,
    seed,
    strategy_list,
)
from pipedec_sim.protocol.strategies import DEFAULT_STRATEGIES


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pipedec-sim", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = sub.add_parser("run", help="simulate strategies on a trace or prompt file",
                         description="Simulate each strategy on every request of a speculation "
                         "trace (or a prompt file, with a synthetic acceptance model) and print "
                         "one row per strategy.")
    run.add_argument("--trace", required=True, type=file_path,
                     help="speculation trace (.jsonl/.jsonl.gz) or a prompt file "
                          "(Alpaca, ShareGPT, MT-Bench, HumanEval, GSM8K, plain lines)")
    run.add_argument("--format", choices=WORKLOAD_FORMATS, default="auto",
                     help="what --trace is: a speculation trace or a prompt format "
                          "(default auto: told from the file's content)")
    run.add_argument("--stages", type=positive(hi=MAX_STAGES), default=DEFAULT_STAGES,
                     help=f"pipeline stages S (default {DEFAULT_STAGES}, as in the paper; "
                          f"at most {MAX_STAGES})")
    run.add_argument("--profile", default=DEFAULT_PROFILE,
                     help="calibration profile: a JSON file or a bundled name "
                          f"(default {DEFAULT_PROFILE})")
    run.add_argument("--strategies", type=strategy_list, default=DEFAULT_STRATEGIES,
                     help="comma-separated strategies: ar (plain PP), tree-sd, pipedec, "
                          "chain-sd (draft-model chain, --gamma) (default ar,tree-sd,pipedec)")
    add_policy_flags(run)
    add_link_flags(add_pipeline_flags(run))
    w = run.add_argument_group("workload and output")
    w.add_argument("--max-requests", type=positive(), default=None,
                   help="use the first N requests; the file is read no further (default all)")
    w.add_argument("--max-new-tokens", type=positive(hi=MAX_OUTPUT_LEN), default=256,
                   help="output length for prompt files without recorded outputs (default 256, "
                        f"at most {MAX_OUTPUT_LEN})")
    w.add_argument("--acceptance", default=None,
                   help="acceptance model for prompt files: a JSON file, a trace to fit, or a "
                        "bundled name (mtbench, humaneval, gsm8k, sharegpt: fitted on "
                        "SmolLM2 traces; llama70b-1b-proxy, llama8b-1b-proxy: proxies from "
                        "published figures; synthetic-default: hand-set). Default: the model "
                        "fitted on the prompt file's data set, else sharegpt")
    w.add_argument("--temperature", type=number(float, lo=0), default=None,
                   help="the target's sampling temperature for prompt files: picks the "
                        "bundled acceptance model fitted on traces sampled at it (mtbench-t0.7, "
                        "gsm8k-t0.7; default 0: greedy). A trace replays its own sampled "
                        "tokens (its header says how)")
    w.add_argument("--seed", type=seed, default=0,
                   help="seed for off-path proposals and synthesis (default 0)")
    w.add_argument("--out", type=file_path, default=None,
                   help="write summary.csv and requests.csv (or .parquet: --out-format) into "
                        "this folder")
    add_out_format_flag(w, "the --out tables (--format is the workload's input format)")
    w.add_argument("--timeline", type=file_path, default=None,
                   help="write a Chrome/Perfetto trace JSON of the first request per strategy")
    w.add_argument("--quiet", action="store_true", help="no progress on stderr")
    s = run.add_argument_group("speed")
    add_workers_flag(s, "the (strategy, request) runs")
    add_engine_flag(s)
    from pipedec_sim.programs import plot, sweep, tune  # exploration commands (issue 5)
    sweep.add_parser(sub)
    plot.add_parser(sub)
    tune.add_parser(sub)
    from pipedec_sim.programs import profile_cmd  # analytic profiles of any cluster (issue 14)
    profile_cmd.add_parser(sub)
    from pipedec_sim.programs import serve  # many requests under load (issue 12)
    serve.add_parser(sub)
    return parser


RUN_TABLES = ("summary", "requests")     # what run --out writes into its folder


def cmd_run(args) -> int:
    from pipedec_sim.atomic import check_distinct, check_output
    from pipedec_sim.inputs.acceptance import load_acceptance
    from pipedec_sim.inputs.profile import load_profile
    from pipedec_sim.inputs.prompts import load_workload
    from pipedec_sim.programs.simulate import SimConfig, simulate
    from pipedec_sim.protocol.knobs import values_of
    from pipedec_sim.results.metrics import format_table
    from pipedec_sim.results.tables import check_out_format, table_names

    check_out_format(args.out_format)                                # before any work
    check_output(args.out, "--out", folder=True, files=table_names(RUN_TABLES))
    check_output(args.timeline, "--timeline")
    check_distinct([*(("--out", args.out / f) for f in table_names(RUN_TABLES) if args.out),
                    ("--timeline", args.timeline)])
    profile = load_profile(args.profile)
    from pipedec_sim.inputs.host import warn_profile_host
    warn_profile_host(profile, "pipedec-sim")          # a CPU profile from another CPU model
    if args.link_gbps is not None or args.link_latency_ms is not None:
        profile = profile.with_link(bandwidth_gbps=args.link_gbps, latency_ms=args.link_latency_ms)
    try:
        profile.stage_layers(args.stages)
    except InputError as e:
        raise InputError(e.message, file=profile.source, field=e.field or "--stages") from None
    profile.check_topology(args.topology)
    acceptance = load_acceptance(args.acceptance) if args.acceptance else None
    trace, described = load_workload(args.trace, max_requests=args.max_requests,
                                     max_new_tokens=args.max_new_tokens, seed=args.seed,
                                     acceptance=acceptance, format=args.format,
                                     temperature=args.temperature)
    from pipedec_sim.inputs.targets import warn_target_mismatch
    warn_target_mismatch(profile, trace.header, acceptance, "pipedec-sim")   # 8B on a 70B?
    cfg = SimConfig(stages=args.stages, strategies=args.strategies, seed=args.seed,
                    engine=args.engine, **values_of(args))
    if not args.quiet:
        print(f"workload: {described}", file=sys.stderr)
        print(f"profile:  {profile.name} ({profile.provenance.get('kind')}, "
              f"{profile.provenance.get('device')}); stages {args.stages}: "
              f"layers {profile.stage_layers(args.stages)}", file=sys.stderr)
    with progress_bar("simulated request runs:", args.quiet, unit="run") as progress:
        result = simulate(trace, profile, cfg, workers=args.workers,
                          timeline_requests=1 if args.timeline else 0, progress=progress)
    print(format_table(result.summary))
    from pipedec_sim.programs.outputs import write_run_outputs
    write_run_outputs(args, result)
    return 0


def _lazy(module: str, name: str):
    def command(args):
        from importlib import import_module
        return getattr(import_module(f"pipedec_sim.programs.{module}"), name)(args)
    return command


COMMANDS = {"run": cmd_run,
            "sweep": _lazy("sweep", "cmd_sweep"),
            "plot": _lazy("plot", "cmd_plot"),
            "tune": _lazy("tune", "cmd_tune"),
            "profile": _lazy("profile_cmd", "cmd_profile"),
            "serve": _lazy("serve", "cmd_serve")}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return guarded("pipedec-sim", lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
