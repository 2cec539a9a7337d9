"""`pipedec-real`: run PipeDec, tree-based SD and plain PP on real models, one process per stage.

Bad input (files, flags, output paths: all checked before any work) prints one line naming
the file, line and field and exits 2; a stage failure prints one line naming the stage and
exits 1; SIGINT / SIGTERM stop the run with one line and exit 130 / 143. Either way the
request runs finished so far are written.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from contextlib import contextmanager

from pipedec_sim.errors import InputError, guarded
from pipedec_sim.programs.flags import (
    Parser,
    add_pipeline_flags,
    add_policy_flags,
    add_prompt_format_flag,
    add_sampling_flags,
    file_path,
    positive,
    sampling_of,
    strategy_list,
)
from pipedec_sim.protocol.strategies import DEFAULT_STRATEGIES

DTYPES = ("float32", "bfloat16", "float16")
NO_PROGRESS_S = 20.0     # --timeout's default, as worker.StageConfig's: a hang is an error
                         # within 30 s (the head's clean-up after the deadline is bounded)
RESULT_FILES = ("summary.csv", "requests.csv", "busy.csv", "outputs.jsonl")    # in --out


def check_device(device: str, flag: str = "--device") -> None:
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise InputError("CUDA is not available on this machine (torch "
                             f"{torch.__version__})", field=flag)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pipedec-real", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = sub.add_parser("run", help="run strategies on real models over a prompt file")
    run.add_argument("--target", required=True,
                     help="tiny | smollm2 | eps-pair[:LxH[:EPS[:K]]] (a controlled-acceptance "
                          "pair, not a language model) | an HF Llama-family folder (required)")
    run.add_argument("--draft", default=None,
                     help="tiny-draft | tiny-noisy | tiny | smollm2 | smollm2-draft (the distilled "
                          "draft in traces/) | eps-pair-draft[:LxH[:K]] (eps-pair's) | a folder "
                          "(needed unless --strategies ar; default none)")
    run.add_argument("--stages", type=positive(), default=2,
                     help="pipeline stages S (default 2)")
    run.add_argument("--prompts", required=True, type=file_path,
                     help="prompt file: plain lines, Alpaca, ShareGPT, MT-Bench, HumanEval, GSM8K "
                          "(required)")
    add_prompt_format_flag(run)
    run.add_argument("--strategies", type=strategy_list, default=DEFAULT_STRATEGIES,
                     help="comma-separated strategies: ar (plain PP), tree-sd, pipedec, "
                          "chain-sd (draft-model chain, --gamma) (default ar,tree-sd,pipedec)")
    add_policy_flags(run)             # the knobs of pipedec-sim: same flags, help and checks
    g = add_pipeline_flags(run)
    g.add_argument("--transport", choices=("auto", "gloo", "nccl"), default="auto",
                   help="activations between stages: nccl (GPU to GPU; needs one GPU per "
                        "stage), gloo (through host memory), auto: nccl where it can "
                        "(default auto)")
    g.add_argument("--inline", action="store_true",
                   help="all stages in this process, on the simulator's clock: deterministic, "
                        "the simulator's decisions with real models; times are simulated "
                        "(default off)")
    g.add_argument("--timeout", type=positive(float), default=NO_PROGRESS_S,
                   help="seconds without progress before a run is declared failed "
                        f"(default {NO_PROGRESS_S:g})")
    w = run.add_argument_group("models, workload and output")
    w.add_argument("--max-new-tokens", type=positive(), default=64,
                   help="tokens generated per prompt at most (default 64)")
    w.add_argument("--max-requests", type=positive(), default=None,
                   help="use the first N prompts (default all)")
    w.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the models run (default cpu)")
    w.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and activations (bfloat16 for large models on GPUs; "
                        "greedy output then matches the target only up to rounding: a tree "
                        "batch sums in another order than one token at a time; default float32)")
    add_cuda_graphs_flag(w)
    w.add_argument("--out", type=file_path, default=None,
                   help="write summary.csv, requests.csv and outputs.jsonl here (default: "
                        "print the table only)")
    w.add_argument("--timeline", type=file_path, default=None,
                   help="Chrome/Perfetto JSON: commits, draft and LM-head work, and every "
                        "batch and prune each stage computed (stages on the head's host; "
                        "default none)")
    w.add_argument("--record-events", type=file_path, default=None,
                   help="JSONL of every event fed to the strategy and the actions returned "
                        "(default none)")
    w.add_argument("--quiet", action="store_true", help="no progress on stderr (default off)")
    add_sampling_flags(run)
    sub.add_parser("trace", add_help=False,
                   help="record a speculation trace (pipedec-real trace --help)")
    sub.add_parser("distill-draft", add_help=False,
                   help="train a draft model for a target (pipedec-real distill-draft --help)")
    add_serve_parser(sub)
    prof = sub.add_parser("profile", help="measure a calibration profile for pipedec-sim",
                          description="Measure a pipedec-profile/1 profile on this machine: "
                          "a checkpoint's layers (--target/--draft), or random-weight layers "
                          "of a model's shape (--target-shape/--draft-shape: a preset name "
                          "such as llama-3.1-70b, or an HF config.json; no checkpoint needed).")
    tgt = prof.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--target",
                     help="tiny | smollm2 | eps-pair[:LxH[:EPS[:K]]] | an HF Llama-family "
                          "folder (required: this or --target-shape; no default)")
    tgt.add_argument("--target-shape", metavar="NAME|CONFIG",
                     help="time random-weight layers of this shape instead of a checkpoint: a "
                          "preset (pipedec-sim profile list) or an HF config.json; the profile "
                          "keeps the model's full layer count (required: this or --target; "
                          "no default)")
    drf = prof.add_mutually_exclusive_group(required=True)
    drf.add_argument("--draft",
                     help="the draft model, as for pipedec-real run --draft (required: this "
                          "or --draft-shape; no default)")
    drf.add_argument("--draft-shape", metavar="NAME|CONFIG",
                     help="the draft as random weights of this shape, as --target-shape "
                          "(required: this or --draft; no default)")
    prof.add_argument("--stage-layers", type=int, default=None, metavar="N",
                      help="--target-shape: decoder layers to build and time in sequence, the "
                           "layer grid being their mean (default 6, one stage of 80 over 14; "
                           "fewer for a large shape on a small GPU)")
    prof.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                      help="dtype of the random-weight shape models (default bf16 on cuda, "
                           "fp32 on cpu); checkpoints load in float32 as before")
    prof.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                      help="where to measure (default cpu)")
    add_cuda_graphs_flag(prof)
    prof.add_argument("--out", required=True, type=file_path,
                      help="profile JSON to write, for pipedec-sim run --profile (required)")
    prof.add_argument("--quick", action="store_true",
                      help="smaller grids, fewer repeats (default off)")
    prof.add_argument("--quiet", action="store_true",
                      help="no progress on stderr (default off: a bar on a terminal, a line "
                           "per phase in a log)")
    return parser


def add_cuda_graphs_flag(group) -> None:
    group.add_argument("--cuda-graphs", choices=("on", "off"), default="off",
                       help="on: stages and the draft compute on static buffers (rows padded "
                            "to 1, 2, 4, ..., 64; KV preallocated), each shape captured once "
                            "as a CUDA graph and replayed; larger batches (prompts) run "
                            "eagerly; cancel is checked after a whole batch. Without CUDA the "
                            "static path runs eagerly (default off)")


def cuda_graphs(args) -> bool:
    """--cuda-graphs on (a command without the flag: off)."""
    return getattr(args, "cuda_graphs", "off") == "on"


def say_if_graphs_run_eagerly(args) -> None:
    """--cuda-graphs on without a CUDA device: say once that the static path runs eagerly."""
    if cuda_graphs(args) and args.device != "cuda" and not args.quiet:
        print("pipedec-real: --cuda-graphs on: no CUDA device, the static-buffer path runs "
              "eagerly (nothing captured)", file=sys.stderr)


# ---- run ---------------------------------------------------------------------------------

def _load(spec: str, flag: str):
    """models.load, its errors naming the flag too."""
    from backends.torch.models import load
    try:
        return load(spec)
    except InputError as e:
        raise InputError(e.message, file=e.file, line=e.line, field=flag) from None


def _requests(args, target):
    from backends.torch.head import Request
    from pipedec_sim.inputs.prompts import read_prompts
    prompts = read_prompts(args.prompts, format=args.format, max_requests=args.max_requests)
    reqs = [Request(p.id, target.encode(p.text), args.max_new_tokens) for p in prompts]
    _check_context(args, target, [(r.id, r.prompt_ids) for r in reqs])
    return reqs


def _check_context(args, target, prompts) -> None:
    """Each (id, token ids) prompt and its --max-new-tokens within the target's positions
    (past them a model's positions wrap or fail, and a long prefill looks like a hang)."""
    limit = getattr(target.config, "max_position_embeddings", None)
    for pid, ids in prompts:
        if limit is not None and len(ids) + args.max_new_tokens > limit:
            raise InputError(f"prompt {pid} is {len(ids)} tokens: with --max-new-tokens "
                             f"{args.max_new_tokens} past the target's {limit} positions",
                             file=args.prompts)


def _check_outputs(args) -> None:
    """Every output path of `run`, before anything is loaded (the head's: under torchrun
    only rank 0 writes)."""
    from pipedec_sim.atomic import check_distinct, check_output
    check_output(args.out, "--out", folder=True, files=RESULT_FILES)
    check_output(args.timeline, "--timeline")
    check_output(args.record_events, "--record-events")
    check_distinct([*(("--out", args.out / f) for f in RESULT_FILES if args.out),
                    ("--timeline", args.timeline), ("--record-events", args.record_events)])


def _check(args, target):
    from backends.torch.models import check_pair
    from pipedec_sim.inputs.profile import split_layers
    if args.device == "cuda":
        import torch
        n_gpu = torch.cuda.device_count()
        if (args.transport == "nccl" and args.stages > n_gpu and not args.inline
                and "RANK" not in os.environ):
            raise InputError(f"NCCL needs one GPU per stage: {args.stages} stages, {n_gpu} "
                             "GPU(s) here (use --transport auto or gloo)", field="--transport")
    elif args.transport == "nccl":
        raise InputError("NCCL carries GPU activations: use it with --device cuda",
                         field="--transport")
    try:
        split_layers(target.config.num_hidden_layers, args.stages)
    except InputError as e:
        raise InputError(e.message, field="--stages") from None
    needs_draft = any(s != "ar" for s in args.strategies)
    if needs_draft and not args.draft:
        raise InputError("tree-sd and pipedec need a draft model", field="--draft")
    if needs_draft:
        check_pair(target, _load(args.draft, "--draft"))


def _knobs(args) -> dict:
    """make_strategy's knobs from the flags, the window resolved (default stages + 1)."""
    from pipedec_sim.protocol.knobs import STRATEGY_GROUPS, values_of
    from pipedec_sim.protocol.pacing import window_for
    knobs = values_of(args, STRATEGY_GROUPS)
    knobs["window"] = window_for(args.stages, args.window)
    return knobs


def _stage_config(args):
    import dataclasses

    from backends.torch.worker import StageConfig
    sampling = sampling_of(args)
    return StageConfig(target=args.target, stages=args.stages, topology=args.topology,
                       device=args.device, timeout_s=args.timeout, transport=args.transport,
                       dtype=args.dtype, prune=args.prune, cancel=args.cancel,
                       sampling=None if sampling.greedy else dataclasses.asdict(sampling),
                       cuda_graphs=cuda_graphs(args))


def _pipeline(args, recorder):
    import torch

    from backends.torch.inline import InlinePipeline
    from backends.torch.models import load
    from backends.torch.runtime import DistributedPipeline
    draft = args.draft if any(s != "ar" for s in args.strategies) else None
    if args.inline:
        return InlinePipeline(load(args.target), load(draft) if draft else None, args.stages,
                              topology=args.topology, prune=args.prune, cancel=args.cancel,
                              recorder=recorder, knobs=_knobs(args), device=args.device,
                              dtype=getattr(torch, args.dtype), sampling=sampling_of(args),
                              cuda_graphs=cuda_graphs(args))
    return DistributedPipeline(_stage_config(args), draft, knobs=_knobs(args), recorder=recorder,
                               torchrun="RANK" in os.environ).start()


def _run_all(args, pipe, requests, runs: list) -> None:
    """Every (strategy, request) run into `runs`: a progress bar on a terminal, a line per
    run in a log (runs take seconds each); the bar ends before any error line."""
    from pipedec_sim.programs.flags import progress_bar
    total = len(args.strategies) * len(requests)
    with progress_bar("real request runs:", args.quiet, unit="run", lines=None) as bar:
        bar(0, total)
        for name in args.strategies:
            for req in requests:
                runs.append(pipe.run(name, req))
                bar(len(runs), total)


def _write(args, runs) -> None:
    import pandas as pd

    from pipedec_sim.atomic import atomic_path
    from pipedec_sim.results.metrics import (
        format_table,
        request_metrics,
        requests_frame,
        summarize,
    )
    if not runs:
        return
    items = [request_metrics(r.strategy, r.request.id, args.stages, r.commits, r.end_ms,
                             r.busy_ms, r.rows, r.batches,
                             prompt_len=len(r.request.prompt_ids)) for r in runs]
    df = requests_frame(items)
    summary = summarize(df)
    print(format_table(summary))
    if args.out:
        for name, frame in (("summary.csv", summary), ("requests.csv", df)):
            with atomic_path(args.out / name) as tmp:
                frame.to_csv(tmp, index=False)
        busy = pd.DataFrame([{"strategy": r.strategy, "request": r.request.id,
                              "end_ms": r.end_ms, **{f"busy_{k}": v for k, v in
                                                     sorted(r.busy_ms.items())},
                              **{f"rows_{k}": v for k, v in sorted(r.rows.items())}}
                             for r in runs])
        with atomic_path(args.out / "busy.csv") as tmp:
            busy.to_csv(tmp, index=False)
        with atomic_path(args.out / "outputs.jsonl") as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                for r in runs:
                    fh.write(json.dumps({"id": r.request.id, "strategy": r.strategy,
                                         "prompt_ids": r.request.prompt_ids,
                                         "output_ids": r.output}) + "\n")
        print(f"wrote {args.out}/summary.csv, requests.csv, busy.csv, outputs.jsonl",
              file=sys.stderr)
    if args.timeline:
        from pipedec_sim.results.timeline import write_chrome_trace
        write_chrome_trace(args.timeline, {f"{r.strategy} / request {r.request.id}":
                                           _timeline(r) for r in runs})


def _timeline(run) -> list[dict]:
    """A run's commits (instants on the head track) and compute slices, in the simulator's
    timeline format (`pipedec_sim.results.timeline`)."""
    commits = [{"name": outcome, "ph": "i", "s": "t", "ts": t * 1e3, "pid": 0, "tid": "head",
                "args": {"tokens": n}} for t, n, _, outcome in run.commits]
    work = [{"name": label, "ph": "X", "ts": start * 1e3, "dur": ms * 1e3, "pid": 0,
             "tid": actor, "args": {"rows": rows}} for actor, start, ms, label, rows in run.slices]
    return commits + work


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM to the head: the run stops, keeps its finished request runs, and
    the head exits with `code` after one line (a KeyboardInterrupt, so that `guarded`
    still makes it one line should it come outside the run)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@contextmanager
def _signals_stop_the_run(torchrun: bool):
    """SIGINT and SIGTERM become `Stopped` in the main thread; a second one of the same
    kind ends the head at once (its default action). torchrun ends a job by SIGTERM to every
    rank: a rank or node failed, the node hosting the c10d rendezvous store died (its agent
    loses the store and stops its workers before the head can see a broken link), or the
    job was cancelled: in the head that is a failure, exit 1 (torchrun waits 30 s before
    SIGKILL)."""
    def stop(signum, frame):
        signal.signal(signum, signal.SIG_DFL)
        name = signal.Signals(signum).name
        if torchrun and signum == signal.SIGTERM:
            raise Stopped(f"stopped by torchrun ({name}): a rank or node of the job failed "
                          "or lost the rendezvous, or the job was cancelled; see the "
                          "torchrun logs of every node", 1)
        what = "interrupted" if signum == signal.SIGINT else "stopped"
        raise Stopped(f"{what} by {name}", 128 + signum)
    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def cmd_run(args) -> int:
    torchrun = "RANK" in os.environ
    if torchrun:
        _torchrun_world(args)           # every rank, the head too, before loading anything
        if int(os.environ["RANK"]) > 0:
            return _torchrun_stage(args)
    _check_outputs(args)
    check_device(args.device)
    say_if_graphs_run_eagerly(args)
    sampling = sampling_of(args)                  # a bad combination: one line, exit 2
    if not args.quiet and not sampling.greedy:
        print(f"target tokens: {sampling.describe()}", file=sys.stderr)
    runs: list = []
    with _signals_stop_the_run(torchrun):
        failure = _run(args, runs)
    _write(args, runs)
    if failure is None:
        return 0
    print(f"pipedec-real: error: {failure} (kept {len(runs)} finished request runs)",
          file=sys.stderr, flush=True)
    return getattr(failure, "code", 1)


def _run(args, runs: list):
    """Load, start the pipeline and run every request into `runs`. A stage failure or a
    stop signal ends it early: returned, not raised, once the stages are gone."""
    import torch

    from backends.torch.runtime import StageFailed
    torch.set_num_threads(1)
    try:
        target = _load(args.target, "--target")
        _check(args, target)
        requests = _requests(args, target)
        with _event_record(args.record_events, runs) as recorder:
            return _run_pipeline(args, recorder, requests, runs)
    except (StageFailed, Stopped) as e:          # while loading
        return e


def _run_pipeline(args, recorder, requests, runs: list):
    """Start the pipeline and run every request into `runs`; a stage failure or a stop
    signal is returned once the stages are gone."""
    from backends.torch.runtime import StageFailed
    pipe = None
    try:
        pipe = _pipeline(args, recorder)
        _run_all(args, pipe, requests, runs)
        if hasattr(pipe, "close"):
            pipe.close()
        pipe = None
        return None
    except (StageFailed, Stopped) as e:
        return e
    finally:
        if pipe is not None:
            _close_failed(pipe)


class _NoRecord(Exception):
    """No request run finished: the old --record-events file stays as it was."""


@contextmanager
def _event_record(path, runs: list):
    """A Recorder for --record-events (None: one that records nothing). The file is written
    beside its place and put there at the end, holding the finished request runs' records:
    a failed run's unfinished request is cut, and with none finished nothing changes."""
    from backends.torch.eventlog import Recorder
    from pipedec_sim.atomic import atomic_path
    if path is None:
        yield Recorder()
        return
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                recorder = Recorder(fh)
                yield recorder
                recorder.keep(len(runs))
            if not runs:
                raise _NoRecord
    except _NoRecord:
        pass


def _close_failed(pipe) -> None:
    """Close the pipeline of a run that failed or stopped (bounded: a stage that does not
    stop is killed). A stop signal that comes meanwhile must not replace the failure
    already known: under torchrun the head's agent SIGTERMs it once the node's stages
    failed on the same lost link, often while the head is closing. The close is finished
    instead (`close` may be called again) and the signal is dropped: the run ends anyway."""
    if not hasattr(pipe, "close"):
        return
    try:
        pipe.close(clean=False)
    except Stopped:
        pipe.close(clean=False)


def _torchrun_world(args) -> None:
    """Under torchrun: the world must be the head + one rank per stage. Checked by every
    rank, so the head names the problem too (instead of being torn down by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world != args.stages + 1:
        raise InputError(f"torchrun started {world} ranks; --stages {args.stages} needs "
                         f"{args.stages + 1} (the head + one per stage)", field="--stages")
    if args.inline:
        raise InputError("--inline runs every stage in one process: do not use it under "
                         "torchrun", field="--inline")


def _torchrun_stage(args) -> int:
    """A torchrun rank > 0: serve as that pipeline stage until the head says stop."""
    from backends.torch.worker import stage_main
    world = int(os.environ["WORLD_SIZE"])
    stage_main(_stage_config(args), int(os.environ["RANK"]), world, "env://", "")
    return 0


def cmd_profile(args) -> int:
    from pipedec_sim.atomic import check_output
    check_output(args.out, "--out")                  # before minutes of measuring
    check_device(args.device)
    from backends.torch import models
    from backends.torch.profiler import SHAPE_PREFIX
    from pipedec_sim.inputs.model_shapes import resolve_model
    shapes = {}
    for value, flag, key in ((args.target_shape, "--target-shape", "target"),
                             (args.draft_shape, "--draft-shape", "draft")):
        if value is not None:                    # a bad name exits 2 listing the presets
            shapes[key] = resolve_model(value, flag=flag)
            setattr(args, key, SHAPE_PREFIX + value)
    if len(shapes) == 2 and shapes["target"].vocab != shapes["draft"].vocab:
        raise InputError(f"draft vocab {shapes['draft'].vocab} differs from target vocab "
                         f"{shapes['target'].vocab}: they must share a tokenizer",
                         field="--draft-shape")
    if args.stage_layers is not None and (args.stage_layers < 1 or "target" not in shapes):
        raise InputError("needs --target-shape and a positive layer count", field="--stage-layers")
    if args.dtype is not None and not shapes:
        raise InputError("sets the dtype of --target-shape/--draft-shape models only",
                         field="--dtype")
    for spec, flag in ((args.target, "--target"), (args.draft, "--draft")):
        if spec.startswith(SHAPE_PREFIX):
            continue
        try:
            if not models.is_seeded(spec):
                models.resolve_path(spec)         # a folder: config and safetensors weights
        except InputError as e:
            raise InputError(e.message, file=e.file, field=flag) from None
    say_if_graphs_run_eagerly(args)
    from backends.torch.profiler import profile_main
    return profile_main(args)


# ---- serve -------------------------------------------------------------------------------
# Many requests at once on one pipeline: the serving strategies of pipedec_sim.protocol.serve
# (as `pipedec-sim serve`) on real models: the distributed runtime (serve_runtime.py: stage
# processes, wall-clock times) or, with --inline, the inline serving driver (serve.py: the
# simulator's clock).

SERVE_FILES = ("summary.csv", "requests.csv", "outputs.jsonl")     # in --out


def add_serve_parser(sub) -> None:
    from pipedec_sim.programs.flags import add_knob_flags
    from pipedec_sim.programs.serve import serve_list
    from pipedec_sim.protocol.knobs import ServeKnobs
    from pipedec_sim.protocol.serve import SERVE_STRATEGIES
    p = sub.add_parser("serve", help="serve many requests at once on real models (throughput, "
                       "latency)", description="Serve a prompt file's requests arriving at a "
                       "real pipeline with each serving strategy (pp: vLLM-style micro-batches; "
                       "tree-sd and chain-sd: speculation per request in micro-batches; "
                       "pipedec-db: SpecPipe-DB, one mixed tree layer per step) and print "
                       "throughput and latency percentiles, one row per strategy.")
    p.add_argument("--target", required=True,
                   help="tiny | smollm2 | eps-pair[:LxH[:EPS[:K]]] | an HF Llama-family folder "
                        "(required)")
    p.add_argument("--draft", default=None,
                   help="the draft model, as for `run` (needed unless --strategies pp; "
                        "default none)")
    p.add_argument("--stages", type=positive(), default=2, help="pipeline stages S (default 2)")
    p.add_argument("--prompts", required=True, type=file_path,
                   help="prompt file, as for `run` (required); requests beyond its count are "
                        "drawn from it again (seeded)")
    add_prompt_format_flag(p)
    p.add_argument("--strategies", type=serve_list, default=SERVE_STRATEGIES,
                   help="comma-separated serving strategies (default pp,tree-sd,chain-sd,"
                        "pipedec-db)")
    load = p.add_argument_group("load (one of --concurrency, --rate)")
    how = load.add_mutually_exclusive_group(required=True)
    how.add_argument("--concurrency", type=positive(), default=None,
                     help="closed loop: N requests outstanding, the next sent when one "
                          "finishes (required: this or --rate; no default)")
    how.add_argument("--rate", type=positive(float), default=None,
                     help="open loop: Poisson arrivals at R requests/s from the run's start, "
                          "seeded by --seed (required: this or --concurrency; no default)")
    load.add_argument("--requests", type=positive(), default=None,
                      help="requests to serve (default: the prompt file's count)")
    add_knob_flags(p, "serving", ServeKnobs)
    add_policy_flags(p)
    g = add_pipeline_flags(p)
    g.add_argument("--transport", choices=("auto", "gloo", "nccl"), default="auto",
                   help="activations between stages, as for `run` (default auto)")
    g.add_argument("--inline", action="store_true",
                   help="all stages in this process on the simulator's clock (times are "
                        "simulated; default off: one process per stage, wall-clock times)")
    g.add_argument("--batched-forward", action="store_true",
                   help="with --inline: a stage computes a step's parts of several requests "
                        "in one forward, and a draft pass over several requests too (default "
                        "off: one forward per request). The distributed runtime always does")
    g.add_argument("--timeout", type=positive(float), default=NO_PROGRESS_S,
                   help="seconds without progress before a run is declared failed "
                        f"(default {NO_PROGRESS_S:g})")
    w = p.add_argument_group("models, workload and output")
    w.add_argument("--max-new-tokens", type=positive(), default=64,
                   help="tokens generated per request at most (default 64)")
    w.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the models run (default cpu)")
    w.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and activations, as for `run` (default float32)")
    w.add_argument("--out", type=file_path, default=None,
                   help="write summary.csv, requests.csv and outputs.jsonl here (default: "
                        "print the table only)")
    w.add_argument("--timeline", type=file_path, default=None,
                   help="Chrome/Perfetto JSON, one process per strategy: commits, the head's "
                        "draft and LM-head work, and every step and prune each stage "
                        "computed (stages on the head's host; default none)")
    w.add_argument("--quiet", action="store_true", help="no progress on stderr (default off)")
    sampling = add_sampling_flags(p)
    sampling.description = ("--seed also seeds the Poisson arrivals and the requests drawn "
                            "beyond the file's count")


def cmd_serve(args) -> int:
    from pipedec_sim.atomic import check_distinct, check_output
    torchrun = "RANK" in os.environ
    if torchrun:
        _torchrun_world(args)           # every rank, the head too, before loading anything
        if int(os.environ["RANK"]) > 0:
            return _torchrun_serve_stage(args)
    check_output(args.out, "--out", folder=True, files=SERVE_FILES)
    check_output(args.timeline, "--timeline")
    check_distinct([*(("--out", args.out / f) for f in SERVE_FILES if args.out),
                    ("--timeline", args.timeline)])
    if args.batched_forward and not args.inline:
        raise InputError("only changes --inline runs (the distributed runtime always batches)",
                         field="--batched-forward")
    check_device(args.device)
    sampling = sampling_of(args)                  # a bad combination: one line, exit 2
    if not args.quiet and not sampling.greedy:
        print(f"target tokens: {sampling.describe()}", file=sys.stderr)
    served: dict = {}                              # strategy -> (ServeRun, outputs)
    workload: list = []
    with _signals_stop_the_run(torchrun):
        failure = _serve(args, workload, served)
    if served:
        _write_serving(args, workload[0], served)
        _write_serving_timeline(args, served)
    if failure is None:
        return 0
    print(f"pipedec-real: error: {failure} (kept {len(served)} finished serving runs)",
          file=sys.stderr, flush=True)
    return getattr(failure, "code", 1)


def _serve(args, workload: list, served: dict):
    """Load, start the server and serve the workload with every strategy into `served`.
    A stage failure or a stop signal ends it early: returned, not raised, once the stages
    are gone (as `_run`)."""
    import torch

    from backends.torch.runtime import StageFailed
    torch.set_num_threads(1)
    pipe = None
    try:
        target = _load(args.target, "--target")
        if not args.draft and any(s != "pp" for s in args.strategies):
            raise InputError("tree-sd, chain-sd and pipedec-db need a draft model",
                             field="--draft")
        _check(_single_request_view(args), target)
        workload.append(_serve_workload(args, target))
        requests, w = workload[0]
        pipe = _server(args)
        for name in args.strategies:
            if not args.quiet:
                print(f"serving: {name}, {w.describe}", file=sys.stderr, flush=True)
            served[name] = pipe.serve(name, requests, arrivals_ms=w.arrivals_ms,
                                      concurrency=w.concurrency)
        if hasattr(pipe, "close"):
            pipe.close()
        pipe = None
        return None
    except (StageFailed, Stopped) as e:
        return e
    finally:
        if pipe is not None:
            _close_failed(pipe)


def _single_request_view(args):
    """`args` as `_check` reads them: each serving strategy's single-request strategy."""
    from pipedec_sim.protocol.serve import SINGLE
    return argparse.Namespace(**{**vars(args), "strategies": tuple(SINGLE[s] for s in
                                                                   args.strategies)})


def _serve_workload(args, target):
    """(requests, ServeWorkload): the prompts as requests, the arrivals as the flags say
    (`inputs.arrivals.serve_workload`, as pipedec-sim serve draws them)."""
    from backends.torch.head import Request
    from pipedec_sim.inputs.arrivals import serve_workload
    from pipedec_sim.inputs.prompts import read_prompts
    from pipedec_sim.inputs.traces import TraceRequest
    prompts = [TraceRequest(p.id, 0, [], [], [], prompt_ids=target.encode(p.text))
               for p in read_prompts(args.prompts, format=args.format)]
    _check_context(args, target, [(r.id, r.prompt_ids) for r in prompts])
    w = serve_workload(prompts, n=args.requests, rate=args.rate, concurrency=args.concurrency,
                       duration_s=None, seed=args.seed)
    return [Request(r.id, r.prompt_ids, args.max_new_tokens) for r in w.requests], w


def _server(args):
    """The inline serving driver, or the distributed one (started)."""
    import torch

    from backends.torch.models import load
    from pipedec_sim.protocol.knobs import ServeKnobs, values_of
    serve_knobs = values_of(args, (ServeKnobs,))
    draft = args.draft if any(s != "pp" for s in args.strategies) else None
    if args.inline:
        from backends.torch.serve import InlineServer
        return InlineServer(load(args.target), load(draft) if draft else None, args.stages,
                            topology=args.topology, prune=args.prune, cancel=args.cancel,
                            knobs=_knobs(args), serve_knobs=serve_knobs, device=args.device,
                            dtype=getattr(torch, args.dtype), sampling=sampling_of(args),
                            batched=args.batched_forward, timeline=bool(args.timeline))
    from backends.torch.serve_runtime import DistributedServer
    return DistributedServer(_stage_config(args), draft, knobs=_knobs(args),
                             serve_knobs=serve_knobs, torchrun="RANK" in os.environ,
                             timeline=bool(args.timeline)).start()


def _write_serving(args, workload, served: dict) -> None:
    """The serving table (one row per strategy), and with --out its tables and every
    request's output, all or none. A request whose output differs between strategies
    (they are all lossless: a bug, or bf16 rounding) is named in one warning line."""
    from pipedec_sim.atomic import atomic_paths
    from pipedec_sim.programs.serve import summarize_serving
    from pipedec_sim.results.serving import format_serving, served_frame
    requests, _ = workload
    rows = []
    for name, (run, _) in served.items():
        rows += _served_rows(args, name, run, requests)
    df = served_frame(rows)
    summary = summarize_serving(df)
    clock = ("simulated (--inline: the simulator's clock)" if args.inline else
             f"wall clock ({args.stages} stage processes and the head)")
    print(f"serving {len(requests)} requests on {args.stages} stages; times: {clock}")
    print(format_serving(summary))
    differ = _differing_outputs(served, requests)
    if differ:
        print(f"pipedec-real: warning: outputs differ between strategies for requests "
              f"{', '.join(differ)}", file=sys.stderr)
    if not args.out:
        return
    with atomic_paths(args.out / name for name in SERVE_FILES) as (s_tmp, r_tmp, o_tmp):
        summary.to_csv(s_tmp, index=False)
        df.to_csv(r_tmp, index=False)
        with open(o_tmp, "w", encoding="utf-8") as fh:
            for name, (_, outputs) in served.items():
                for r, req in enumerate(requests):
                    fh.write(json.dumps({"id": req.id, "strategy": name,
                                         "prompt_ids": req.prompt_ids,
                                         "output_ids": outputs[r]}) + "\n")
    print(f"wrote {args.out}/{', '.join(SERVE_FILES)}", file=sys.stderr)


def _write_serving_timeline(args, served: dict) -> None:
    """--timeline: each strategy's run as one process of a Chrome/Perfetto trace."""
    if args.timeline:
        from pipedec_sim.results.timeline import write_chrome_trace
        write_chrome_trace(args.timeline, {name: run.pipeline.timeline
                                           for name, (run, _) in served.items()})


def _served_rows(args, name: str, run, requests) -> list[dict]:
    """One row per request of a serving run (`results.serving.served_row`), with the
    pipeline's totals `programs.serve.summarize_serving` reads."""
    from pipedec_sim.results.serving import served_row
    busy = sum(v for k, v in run.pipeline.busy_ms.items() if k.startswith("stage"))
    extra = {"stages": args.stages, "steps": run.pipeline.batches, "parts": run.parts,
             "stage_busy_ms": busy, "run_ms": run.end_ms}
    return [served_row(name, requests[r].id, arrival_ms=s.arrival_ms, commits=s.commits,
                       end_ms=s.end_ms, prompt_len=len(requests[r].prompt_ids), **extra)
            for r, s in run.requests.items()]


def _differing_outputs(served: dict, requests) -> list[str]:
    outputs = [out for _, out in served.values()]
    return [req.id for r, req in enumerate(requests)
            if any(o[r] != outputs[0][r] for o in outputs[1:])]


def _torchrun_serve_stage(args) -> int:
    """A torchrun rank > 0 of `serve`: a serving stage until the head says stop."""
    from backends.torch.serve_worker import serve_stage_main
    world = int(os.environ["WORLD_SIZE"])
    serve_stage_main(_stage_config(args), int(os.environ["RANK"]), world, "env://", "")
    return 0


COMMANDS = {"run": cmd_run, "profile": cmd_profile, "serve": cmd_serve}


# Subcommands with parsers of their own (their modules run standalone too).
DELEGATED = {"trace": "trace_recorder", "distill-draft": "distill"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib
        module = importlib.import_module(f"backends.torch.{DELEGATED[argv[0]]}")
        return guarded("pipedec-real", lambda: module.main(argv[1:]))
    args = build_parser().parse_args(argv)
    args.argv = argv                     # the command as given (a profile records it)
    return guarded("pipedec-real", lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
