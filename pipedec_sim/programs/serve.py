"""`pipedec-sim serve`: many requests arriving at a simulated pipeline.

Every serving strategy (`pipedec_sim.protocol.serve`: pp, tree-sd, chain-sd, pipedec-db)
serves the same requests with the same arrivals, one run per (strategy, load point); the
summary has one row per strategy and load point (`--rate` or `--concurrency` may list
several: a rate sweep). Runs go to worker processes, one task per run; the tables are
the same for any number of workers.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from pipedec_sim.errors import InputError
from pipedec_sim.programs.simulate import SimConfig, prompt_tokens
from pipedec_sim.protocol.knobs import ServeKnobs, values_of
from pipedec_sim.protocol.serve import SERVE_STRATEGIES, SINGLE

SERVE_TABLES = ("summary", "requests")
DEFAULT_SERVE_STAGES = 8        # SpecPipe-DB's pipeline (`sweep` serving grids default to it)


@dataclass(frozen=True)
class ServeConfig(SimConfig, ServeKnobs):
    """SimConfig (every strategy and pipeline knob, S, the seed) plus the serving knobs;
    `strategies` are serving strategies."""
    strategies: tuple[str, ...] = SERVE_STRATEGIES

    def __post_init__(self):
        super().__post_init__()
        bad = [s for s in self.strategies if s not in SERVE_STRATEGIES]
        if bad:
            raise ValueError(f"unknown serving strategy {', '.join(bad)} "
                             f"(choose from {', '.join(SERVE_STRATEGIES)})")

    def serve_knobs(self) -> ServeKnobs:
        return ServeKnobs(**values_of(self, (ServeKnobs,)))


@dataclass
class ServeResult:
    requests: object            # pandas frames: per request, and per (strategy, load)
    summary: object


def serve_once(profile, cfg: ServeConfig, name: str, workload, *, compute_of=None,
               core_share=None):
    """Serve `workload` (inputs.arrivals.ServeWorkload) with strategy `name` on the
    simulated pipeline: (ServeRun, {r: strategy}). compute_of(r): request r's compute
    (default: trace replay); core_share: the cores' share now (`Pipeline`)."""
    from backends.simulated.oracle import TraceOracle
    from backends.simulated.pipeline import Pipeline, Replay
    from backends.simulated.serve import ServeSim
    from pipedec_sim.protocol.serve import make_server
    from pipedec_sim.protocol.strategies import make_strategy
    reqs = workload.requests
    knobs = cfg.knobs()
    strategies: dict = {}

    def make(r: int):
        req = reqs[r]
        s = strategies[r] = make_strategy(SINGLE[name], prompt_tokens(req), len(req.output),
                                          pooled=name == "pipedec-db", **knobs)
        return s

    def server_of(backend):
        return make_server(name, make, backend, stages=cfg.stages, serve=cfg.serve_knobs(),
                           prune=cfg.prune, window=knobs["window"])

    pipe = Pipeline(profile, cfg.stages, topology=cfg.topology, prune=cfg.prune,
                    cancel=cfg.cancel, core_share=core_share)
    compute_of = compute_of or (lambda r: Replay(TraceOracle(reqs[r], seed=cfg.seed)))
    run = ServeSim(pipe, server_of, compute_of, len(reqs), arrivals_ms=workload.arrivals_ms,
                   concurrency=workload.concurrency, duration_ms=workload.duration_ms).run()
    return run, strategies


def serve_task(profile, cfg: ServeConfig, name: str, workload, load: dict, *,
               core_share=None) -> list[dict]:
    """One strategy at one load point, a row per served request (a worker's task here and
    in `sweep`'s serving grids; `load` becomes cfg_ columns)."""
    from pipedec_sim.results.serving import served_row
    run, strategies = serve_once(profile, cfg, name, workload, core_share=core_share)
    rows = []
    busy = sum(v for k, v in run.pipeline.busy_ms.items() if k.startswith("stage"))
    extra = {"stages": cfg.stages, **{f"cfg_{k}": v for k, v in load.items()},
             "steps": run.pipeline.batches, "parts": run.parts, "stage_busy_ms": busy,
             "run_ms": run.end_ms}
    for r, served in run.requests.items():
        req = workload.requests[r]
        if strategies[r].output != list(req.output):   # lossless, or a bug: never hide it
            raise RuntimeError(f"{name} committed a different output for request {req.id}")
        rows.append(served_row(name, req.id, arrival_ms=served.arrival_ms,
                               commits=served.commits, end_ms=served.end_ms,
                               prompt_len=req.prompt_len, **extra))
    return rows


def serve(trace_requests, profile, cfg: ServeConfig, loads: list[dict], workload_of: Callable,
          *, workers: int = 1, slo_tbt_ms=None, slo_ttft_ms=None,
          progress: Callable[[int, int], None] | None = None) -> ServeResult:
    """Every (load point, strategy) run. `loads` are {"rate": R} or {"concurrency": N}
    dicts; workload_of(load) builds that point's ServeWorkload (the same requests and
    arrivals for every strategy)."""
    from pipedec_sim.results.serving import served_frame
    workloads = [workload_of(load) for load in loads]
    tasks = [(profile, cfg, name, w, load) for load, w in zip(loads, workloads)
             for name in cfg.strategies]
    results = _run_tasks(tasks, workers, progress)
    df = served_frame([row for rows in results for row in rows])
    return ServeResult(df, summarize_serving(df, slo_tbt_ms=slo_tbt_ms, slo_ttft_ms=slo_ttft_ms))


def _run_tasks(tasks, workers: int, progress) -> list:
    done = [0]

    def finished(_task, _result) -> None:
        done[0] += 1
        if progress:
            progress(done[0], len(tasks))

    if progress:
        progress(0, len(tasks))
    if workers <= 1 or len(tasks) <= 1:
        out = []
        for task in tasks:
            out.append(serve_task(*task))
            finished(task, out[-1])
        return out
    from pipedec_sim.programs.pool import WorkerPool, results_in_order
    with WorkerPool(min(workers, len(tasks))) as wp:
        return results_in_order(wp, serve_task, tasks, finished)


def summarize_serving(df, *, slo_tbt_ms=None, slo_ttft_ms=None):
    """The serving summary (results.serving) plus what the pipeline did: steps, requests
    per step, stage utilisation, and throughput against pp at the same load point."""
    from pipedec_sim.results.serving import serving_summary
    out = serving_summary(df, slo_tbt_ms=slo_tbt_ms, slo_ttft_ms=slo_ttft_ms)
    loads = [c for c in out.columns if c.startswith("cfg_")]
    per_run = df.groupby(["strategy", *loads], sort=False, dropna=False).first()
    at = [tuple(row) for row in out[["strategy", *loads]].itertuples(index=False)]
    runs = per_run.loc[at] if loads else per_run.loc[out.strategy]
    out["steps"] = runs.steps.to_numpy()
    out["parts_per_step"] = (runs.parts / runs.steps).to_numpy()
    out["utilization"] = (runs.stage_busy_ms / (runs.stages * runs.run_ms)).to_numpy()
    out["throughput_vs_pp"] = float("nan")
    for _, g in out.groupby(loads, dropna=False) if loads else [(None, out)]:
        pp = g[g.strategy == "pp"]
        if len(pp):
            out.loc[g.index, "throughput_vs_pp"] = (g.throughput_tok_s
                                                    / pp.throughput_tok_s.iloc[0])
    return out


# ---------------------------------------------------------------------------- the command

def add_parser(sub) -> None:
    from pipedec_sim.inputs.limits import MAX_OUTPUT_LEN, MAX_STAGES
    from pipedec_sim.inputs.profile.model import BATCHING
    from pipedec_sim.inputs.prompts import WORKLOAD_FORMATS
    from pipedec_sim.programs.flags import (
        DEFAULT_PROFILE,
        add_knob_flags,
        add_out_format_flag,
        add_pipeline_flags,
        add_policy_flags,
        add_workers_flag,
        file_path,
        number,
        positive,
        seed,
    )
    p = sub.add_parser("serve", help="simulate many requests arriving (throughput, latency)",
                       description="Serve a workload of many requests on the simulated pipeline "
                       "with each serving strategy (pp: vLLM-style micro-batches; tree-sd and "
                       "chain-sd: speculation per request in micro-batches; pipedec-db: "
                       "SpecPipe-DB, one mixed tree layer per step) and print throughput and "
                       "latency percentiles, one row per strategy and load point.")
    p.add_argument("--trace", required=True, type=file_path,
                   help="speculation trace or prompt file (as for `run`); requests beyond its "
                        "count are drawn from it again (seeded)")
    p.add_argument("--format", choices=WORKLOAD_FORMATS, default="auto",
                   help="what --trace is (default auto)")
    p.add_argument("--stages", type=positive(hi=MAX_STAGES), default=DEFAULT_SERVE_STAGES,
                   help=f"pipeline stages S (default {DEFAULT_SERVE_STAGES}, SpecPipe-DB's; "
                        f"at most {MAX_STAGES})")
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"calibration profile: a JSON file or a bundled name (default "
                        f"{DEFAULT_PROFILE})")
    p.add_argument("--batching", choices=BATCHING, default=None,
                   help="how a step over several requests' rows is priced: sequential (one "
                        "forward per request), requests (one forward: the weights once, each "
                        "request's own attention from the profile's context grid, as the "
                        "torch backend's serving computes it), flat (one forward; all rows "
                        "as one sequence over their mean context, as a paged-attention "
                        "kernel). Default: the "
                        "profile's (latency.batching; requests where it says nothing)")
    p.add_argument("--strategies", type=serve_list, default=SERVE_STRATEGIES,
                   help="comma-separated serving strategies (default pp,tree-sd,chain-sd,"
                        "pipedec-db)")
    load = p.add_argument_group("load (one of --rate, --concurrency, --arrivals)")
    load.add_argument("--rate", type=_numbers(float), default=None,
                      help="Poisson arrivals at R requests/s (seeded); a comma-separated list "
                           "is a rate sweep, e.g. 0.5,1,2,4")
    load.add_argument("--concurrency", type=_numbers(int), default=None,
                      help="closed loop: N requests outstanding, the next sent when one "
                           "finishes; a comma-separated list sweeps it")
    load.add_argument("--arrivals", type=file_path, default=None,
                      help="arrival times in seconds, one per line (or a CSV with an "
                           "arrival_s column), one per request in file order")
    load.add_argument("--requests", type=positive(), default=None,
                      help="requests to serve (default: the file's count)")
    load.add_argument("--duration", type=positive(float), default=None,
                      help="seconds: no request arrives (or is sent) after this")
    slo = p.add_argument_group("service level")
    slo.add_argument("--slo-tbt-ms", type=positive(float), default=None,
                     help="goodput counts the tokens of requests whose TBT is at most this "
                          "(default: no SLO)")
    slo.add_argument("--slo-ttft-ms", type=positive(float), default=None,
                     help="and whose time to first token is at most this (default: no SLO)")
    add_knob_flags(p, "serving", ServeKnobs)
    add_policy_flags(p)
    add_pipeline_flags(p)
    w = p.add_argument_group("workload and output")
    w.add_argument("--max-new-tokens", type=positive(hi=MAX_OUTPUT_LEN), default=256,
                   help="output length for prompt files without recorded outputs (default 256)")
    w.add_argument("--acceptance", default=None,
                   help="acceptance model for prompt files (as for `run`)")
    w.add_argument("--temperature", type=number(float, lo=0), default=None,
                   help="the target's sampling temperature for prompt files (as for `run`)")
    w.add_argument("--seed", type=seed, default=0,
                   help="seed for arrivals, repeated requests and synthesis (default 0)")
    w.add_argument("--out", type=file_path, default=None,
                   help="write summary.csv and requests.csv (or .parquet) into this folder")
    add_out_format_flag(w, "the --out tables")
    w.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_workers_flag(w, "the (strategy, load point) runs")


def serve_list(text: str) -> tuple[str, ...]:
    from pipedec_sim.programs.flags import name_list
    return name_list(text, SERVE_STRATEGIES, "serving strategy")


def _numbers(kind):
    """A comma-separated list of positive numbers (one or more load points)."""
    import argparse

    from pipedec_sim.programs.flags import positive
    one = positive(kind)

    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected one or more numbers, got {text!r}")
        return tuple(one(t) for t in items)
    parse.__name__ = kind.__name__
    return parse


def cmd_serve(args) -> int:
    from pipedec_sim.atomic import check_output
    from pipedec_sim.inputs.acceptance import load_acceptance
    from pipedec_sim.inputs.arrivals import serve_workload
    from pipedec_sim.inputs.profile import load_profile
    from pipedec_sim.inputs.prompts import load_workload
    from pipedec_sim.programs.flags import progress_bar
    from pipedec_sim.programs.outputs import write_run_outputs
    from pipedec_sim.protocol.knobs import PipeDecKnobs, PipelineKnobs, TreeSDKnobs
    from pipedec_sim.results.serving import format_serving
    from pipedec_sim.results.tables import check_out_format, table_names

    check_out_format(args.out_format)
    check_output(args.out, "--out", folder=True, files=table_names(SERVE_TABLES))
    given = [f for f, v in (("--rate", args.rate), ("--concurrency", args.concurrency),
                            ("--arrivals", args.arrivals)) if v is not None]
    if len(given) != 1:
        raise InputError("give exactly one of --rate, --concurrency and --arrivals"
                         + (f" (got {' and '.join(given)})" if given else ""), field="--rate")
    profile = load_profile(args.profile).with_batching(args.batching)
    from pipedec_sim.inputs.host import warn_profile_host
    warn_profile_host(profile, "pipedec-sim")
    try:
        profile.stage_layers(args.stages)
    except InputError as e:
        raise InputError(e.message, file=profile.source, field=e.field or "--stages") from None
    profile.check_topology(args.topology)
    acceptance = load_acceptance(args.acceptance) if args.acceptance else None
    trace, described = load_workload(args.trace, max_new_tokens=args.max_new_tokens,
                                     seed=args.seed, acceptance=acceptance, format=args.format,
                                     temperature=args.temperature)
    groups = (PipeDecKnobs, TreeSDKnobs, PipelineKnobs, ServeKnobs)
    cfg = ServeConfig(stages=args.stages, strategies=args.strategies, seed=args.seed,
                      engine="reference", **values_of(args, groups))
    key = "rate" if args.rate else "concurrency" if args.concurrency else "arrivals"
    points = args.rate or args.concurrency or (str(args.arrivals),)
    loads = [{key: v} for v in points]

    def workload_of(load: dict):
        return serve_workload(trace.requests, n=args.requests, rate=load.get("rate"),
                              concurrency=load.get("concurrency"),
                              arrivals_file=args.arrivals, duration_s=args.duration,
                              seed=args.seed)
    first = workload_of(loads[0])               # bad flags or files: before any work
    if not args.quiet:
        print(f"workload: {described}; {first.describe}", file=sys.stderr)
        print(f"profile:  {profile.name}; stages {args.stages}: "
              f"layers {profile.stage_layers(args.stages)}", file=sys.stderr)
    with progress_bar("serving runs:", args.quiet, unit="run") as progress:
        result = serve(trace.requests, profile, cfg, loads, workload_of, workers=args.workers,
                       slo_tbt_ms=args.slo_tbt_ms, slo_ttft_ms=args.slo_ttft_ms,
                       progress=progress)
    print(format_serving(result.summary))
    args.timeline = None                        # `run`'s writer; serve has no timeline
    write_run_outputs(args, result)
    return 0


__all__ = ["DEFAULT_SERVE_STAGES", "ServeConfig", "add_parser", "cmd_serve", "serve", "serve_once",
           "serve_task"]
