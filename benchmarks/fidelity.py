"""Simulator fidelity: real pipeline vs simulator on the same models, prompts and profile.

    python benchmarks/fidelity.py [--target smollm2] [--draft smollm2|DIR] [--stages 2,3,4]
        [--prompts FILE] [--max-requests 3] [--max-new-tokens 48] [--profile FILE]
        [--prune MODE] [--no-cancel] [--prune-modes [MODES]]

For each stage count S and strategy (ar, tree-sd, pipedec):
  1. profile:  `pipedec-real profile` on this machine, every time (a CPU profile holds only
               on the host that measured it); --profile FILE reuses one, with a warning
               if FILE was measured on another CPU model than this machine's;
  2. real:     `pipedec-real run` on the prompts (one process group per S, every strategy),
               with --record-events (every event the real head fed the strategy);
  3. trace:    record a speculation trace from the same target and draft on the same prompt
               ids (the recorder's teacher-forced draft top-k, unrounded);
  4. simulate: `simulate()` on that trace and profile, topology A, and the pipeline
               options both backends default to (`pipeline_options`: the shared prune
               mode and cancel rule; --prune/--no-cancel change both alike);
then print per-token latency (TBT) real vs simulated with the relative error per cell, the
median and the worst, plus the decisions (hit rate, mean accepted) of both worlds. The
report names this machine's CPU model and the load average before and after.
`--prune-modes` adds one real run per prune mode at S=4 (--prune-stages) and reports each.

Decisions are compared twice: with the trace oracle (off-path proposals resampled, see
backends/simulated/oracle.py) and with an *event oracle* that answers every draft query with the
real run's own proposals for the same token path, so what remains is timing alone.

The machine's two cores are shared with whatever else runs. The simulator's core pool runs
n busy processes at the measured share of a core each gets (`devices.core_share`, from
`pipedec-real profile`); since foreign load changes, the benchmark measures that table again
right before and after each real run and simulates that S with the mean (`--share run`,
default), relative to the share the profile was measured at. The load average is printed too.

The extra columns say where the time goes: compute per output token of the draft, the LM
head and all stages together, real (timed around the compute calls in the real run) vs
simulated. A TBT gap with matching compute is waiting (hops, scheduling); a compute gap is
the profile mispredicting the compute itself.

`--resim WORK` re-runs only the simulator against a folder kept with `--work` (iterate on the
model without new real runs); `--profile FILE` swaps the profile.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backends.simulated.oracle import RecordedOracle, TraceOracle  # noqa: E402
from pipedec_sim.inputs.host import describe, host_record, profile_host_warning  # noqa: E402
from pipedec_sim.inputs.profile import load_profile  # noqa: E402
from pipedec_sim.programs.simulate import SimConfig  # noqa: E402

STRATEGIES = ("ar", "tree-sd", "pipedec")
DEFAULT_PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
    "What is the capital of France, and why is it famous?",
    "Give me a recipe for pancakes.",
    "Summarise the plot of Romeo and Juliet.",
]


# ---- the steps ------------------------------------------------------------------------

def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd: list[str], what: str, timeout: float, log) -> float:
    t = time.perf_counter()
    log(f"[fidelity] {what}: {' '.join(cmd[2:]) if cmd[1] == '-m' else ' '.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def core_share() -> list[float]:
    """Share of a core each of n = 1..5 busy processes gets right now (see profiler)."""
    from backends.torch.profiler import measure_core_share
    return measure_core_share()


def measure_profile(target: str, draft: str, out: Path, *, quick: bool, log) -> float:
    cmd = [sys.executable, "-m", "backends.torch.cli", "profile", "--target", target,
           "--draft", draft, "--out", str(out)] + (["--quick"] if quick else [])
    return _run(cmd, "profile", 1800, log)


def real_run(args, stages: int, prompts: Path, out: Path, log, opts: dict | None = None
             ) -> tuple[pd.DataFrame, Path, float]:
    opts = opts or pipeline_options(args)
    out.mkdir(parents=True, exist_ok=True)
    events = out / "events.jsonl"
    cmd = [sys.executable, "-m", "backends.torch.cli", "run", "--target", args.target,
           "--draft", args.draft, "--stages", str(stages), "--prompts", str(prompts),
           "--strategies", ",".join(args.strategies),
           "--max-new-tokens", str(args.max_new_tokens), "--width", str(args.width),
           "--topk", str(args.topk), "--depth", str(args.depth), "--tree-topk",
           str(args.tree_topk), "--total", str(args.total), "--out", str(out),
           "--record-events", str(events), "--quiet", "--timeout", "300"] + opts["real_flags"]
    if args.max_requests:
        cmd += ["--max-requests", str(args.max_requests)]
    wall = _run(cmd, f"real S={stages}", 3600, log)
    return pd.read_csv(out / "requests.csv", dtype={"request": str}), events, wall


def record(args, prompts: Path, log):
    """A trace from the target and draft on exactly the prompt ids `pipedec-real` uses."""
    import torch

    from backends.torch.models import load
    from backends.torch.trace_recorder import record_trace
    from pipedec_sim.inputs.prompts import read_prompts
    torch.set_num_threads(1)
    t = time.perf_counter()
    target, draft = load(args.target), load(args.draft)
    ps = read_prompts(prompts, max_requests=args.max_requests)
    ids = [target.encode(p.text) for p in ps]
    trace = record_trace(target.model, draft.model, None, ids, top_k=max(args.topk,
                         args.tree_topk), max_new_tokens=args.max_new_tokens, progress=False,
                         decimals=None, target_name=args.target, draft_name=args.draft,
                         dataset=str(prompts), command="benchmarks/fidelity.py")
    eos = target.eos
    for p, req in zip(ps, trace.requests):
        req.id = p.id
        # pipedec-real stops at the target's one EOS id; the recorder at any EOS id.
        if eos is not None and eos in req.output:
            cut = req.output.index(eos) + 1
            req.output, req.topk_ids, req.topk_probs = (req.output[:cut], req.topk_ids[:cut],
                                                        req.topk_probs[:cut])
    log(f"[fidelity] trace: {len(trace.requests)} requests, "
        f"{sum(len(r.output) for r in trace.requests)} tokens, top-1 agreement "
        f"{trace.header.extra.get('top1_agreement')} ({time.perf_counter() - t:.0f} s)")
    return trace


def shared_defaults() -> dict:
    """The pipeline options both backends default to, from the one place that defines
    them (`pipedec_sim.protocol.knobs` where it exists, else `protocol.pacing`)."""
    import importlib
    try:
        from pipedec_sim.protocol.knobs import KNOBS
        return {"prune": KNOBS["prune"].default, "cancel": bool(KNOBS["cancel"].default),
                "modes": tuple(KNOBS["prune"].choices), "source": "pipedec_sim.protocol.knobs"}
    except (ImportError, KeyError, AttributeError):
        pass
    for name in ("pipedec_sim.protocol.pacing",):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "DEFAULT_PRUNE") and hasattr(mod, "DEFAULT_CANCEL"):
            return {"prune": mod.DEFAULT_PRUNE, "cancel": bool(mod.DEFAULT_CANCEL),
                    "modes": tuple(getattr(mod, "PRUNE_MODES", (mod.DEFAULT_PRUNE,))),
                    "source": name}
    cfg = SimConfig()
    return {"prune": cfg.prune, "cancel": cfg.cancel, "modes": ("broadcast", "piggyback"),
            "source": "SimConfig"}


def real_flags() -> dict:
    """What `pipedec-real run` offers: {"prune": (default, choices) or None, "cancel":
    default or None, "no_cancel": the flag that turns it off} (None: no such flag; the
    runtime's behaviour is fixed)."""
    from backends.torch.cli import build_parser
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    run = sub.choices["run"]
    acts = {a.dest: a for a in run._actions}
    prune = acts.get("prune")
    cancel = acts.get("no_cancel") or acts.get("cancel")
    off = None
    if cancel is not None:
        off = next((o for o in cancel.option_strings if o.startswith("--no-")), None)
    return {"prune": (prune.default, tuple(prune.choices or ())) if prune else None,
            "cancel": (None if cancel is None else
                       (not cancel.default) if cancel.dest == "no_cancel" else cancel.default),
            "no_cancel": off}


# The torch runtime before it had --prune/--no-cancel: notices in the batch stream at once,
# never abandoning a batch (its docstring); the simulator's closest modes.
FIXED_REAL = {"prune": ("inband", "piggyback"), "cancel": False}


def pipeline_options(args, prune: str | None = None) -> dict:
    """The prune mode and cancel rule of both backends, and the flags that give them to
    `pipedec-real run`: the shared defaults (no flags) unless --prune / --no-cancel / a
    `prune` asked for (then the same flag to both). A real CLI without those flags runs
    fixed options; the simulator then runs the same ones, and `note` says so."""
    shared, real = shared_defaults(), real_flags()
    prune = prune or getattr(args, "prune", None)
    no_cancel = getattr(args, "no_cancel", False)
    if real["prune"] is None:                        # a runtime with fixed pipeline options
        sim_mode = next(m for m in FIXED_REAL["prune"] if m in shared["modes"]
                        or m == FIXED_REAL["prune"][-1])
        if prune and prune != sim_mode:
            raise SystemExit(f"fidelity: pipedec-real run has no --prune (its notices go "
                             f"in-band: simulated as {sim_mode!r}); cannot run {prune!r}")
        return {"prune": sim_mode, "cancel": FIXED_REAL["cancel"], "real_flags": [],
                "note": f"pipedec-real run has no --prune/--no-cancel flags: its runtime "
                        f"sends prune notices in-band and never cancels, so the simulator "
                        f"runs prune {sim_mode!r}, no cancel (not the shared defaults "
                        f"{shared['prune']!r} + cancel from {shared['source']})"}
    r_prune, choices = real["prune"]
    r_cancel = shared["cancel"] if real["cancel"] is None else real["cancel"]
    note = None
    if (r_prune or shared["prune"]) != shared["prune"] or r_cancel != shared["cancel"]:
        note = (f"pipedec-real run defaults to prune {r_prune!r}, cancel {r_cancel}, not the "
                f"shared {shared['prune']!r}, cancel {shared['cancel']} "
                f"({shared['source']}): the simulator follows the real defaults")
    mode = prune or r_prune or shared["prune"]
    if prune and choices and prune not in choices:
        raise SystemExit(f"fidelity: pipedec-real run --prune offers {', '.join(choices)}; "
                         f"not {prune!r}")
    flags = ["--prune", prune] if prune else []
    cancel = r_cancel
    if no_cancel:
        if not real.get("no_cancel"):
            raise SystemExit("fidelity: pipedec-real run has no --no-cancel")
        flags.append(real["no_cancel"])
        cancel = False
    return {"prune": mode, "cancel": cancel, "real_flags": flags, "note": note}


def prune_modes(args) -> list[str]:
    """The modes `--prune-modes` reports: those asked for, else every mode both backends
    run (the simulator's that pipedec-real run --prune accepts)."""
    shared, real = shared_defaults(), real_flags()
    if args.prune_modes and args.prune_modes != "all":
        return [m.strip() for m in args.prune_modes.split(",") if m.strip()]
    if real["prune"] is None:
        return [pipeline_options(args)["prune"]]
    choices = real["prune"][1] or shared["modes"]
    return [m for m in shared["modes"] if m in choices]


def sim_config(args, stages: int, strategies, opts: dict | None = None) -> SimConfig:
    """The simulator's side of a real run: the same knobs, topology A and the pipeline
    options of `pipeline_options` (the ones the real run was given)."""
    opts = opts or pipeline_options(args)
    return SimConfig(stages=stages, strategies=tuple(strategies), width=args.width,
                     topk=args.topk, depth=args.depth, tree_topk=args.tree_topk,
                     total=args.total, topology="A", prune=opts["prune"],
                     cancel=opts["cancel"])


def simulate_requests(trace, profile, cfg: SimConfig, records=None, *,
                      core_share=None) -> tuple[pd.DataFrame, dict]:
    """Like simulate(), with the event oracle when `records` ((strategy, id) -> record)."""
    from backends.simulated.pipeline import Pipeline
    from pipedec_sim.programs.simulate import prompt_tokens
    from pipedec_sim.protocol.strategies import make_strategy
    from pipedec_sim.results.metrics import request_metrics, requests_frame
    items, coverage, busy = [], {}, []
    for name in cfg.strategies:
        for req in trace.requests:
            pipe = Pipeline(profile, cfg.stages, topology=cfg.topology, prune=cfg.prune,
                            cancel=cfg.cancel, core_share=core_share)
            strategy = make_strategy(name, prompt_tokens(req), len(req.output), **cfg.knobs())
            rec = records.get((name, req.id)) if records else None
            oracle = RecordedOracle(req, rec, seed=cfg.seed) if rec else TraceOracle(req,
                                                                                 seed=cfg.seed)
            run = pipe.run(strategy, oracle)
            if strategy.output != list(req.output):
                raise RuntimeError(f"{name} committed a different output for request {req.id}")
            if rec:
                coverage[(name, req.id)] = (oracle.exact, oracle.fallback)
            items.append(request_metrics(name, req.id, cfg.stages, run.commits, run.end_ms,
                                         run.busy_ms, run.rows, run.batches,
                                         prompt_len=req.prompt_len))
            busy.append({"strategy": name, "request": req.id, "end_ms": run.end_ms,
                         **{f"busy_{k}": v for k, v in run.busy_ms.items()}})
    df = requests_frame(items)
    df.attrs["busy"] = pd.DataFrame(busy)
    return df, coverage


def _decisions(df: pd.DataFrame) -> pd.DataFrame:
    d = df[["strategy", "request", "tokens", "drafted", "decode_ms", "decode_tokens"]].copy()
    d["hit_rate"] = d.drafted / d.tokens
    d["mean_accepted"] = d.tokens / (d.tokens - d.drafted).clip(lower=1)
    return d


def _cell(df: pd.DataFrame) -> dict:
    tokens = int(df.tokens.sum())
    return {"tbt_ms": df.decode_ms.sum() / max(int(df.decode_tokens.sum()), 1),
            "hit_rate": df.drafted.sum() / tokens,
            "mean_accepted": tokens / max(tokens - int(df.drafted.sum()), 1)}


def compare(real: pd.DataFrame, sim: pd.DataFrame, sim_exact: pd.DataFrame | None,
            stages: int) -> tuple[list[dict], pd.DataFrame]:
    """Per strategy: TBT and decisions real vs simulated; per request: decisions."""
    rows = []
    r, s = _decisions(real), _decisions(sim)
    per_req = r.merge(s, on=["strategy", "request"], suffixes=("_real", "_sim"))
    if sim_exact is not None:
        e = _decisions(sim_exact)[["strategy", "request", "hit_rate", "mean_accepted",
                                   "decode_ms", "decode_tokens"]]
        per_req = per_req.merge(e.rename(columns={c: c + "_exact" for c in e.columns[2:]}),
                                 on=["strategy", "request"])
    per_req.insert(0, "stages", stages)
    for name in real.strategy.unique():
        cr, cs = _cell(r[r.strategy == name]), _cell(s[s.strategy == name])
        row = {"stages": stages, "strategy": name, "real_tbt_ms": cr["tbt_ms"],
               "sim_tbt_ms": cs["tbt_ms"], "err": cs["tbt_ms"] / cr["tbt_ms"] - 1,
               "real_hit": cr["hit_rate"], "sim_hit": cs["hit_rate"],
               "real_acc": cr["mean_accepted"], "sim_acc": cs["mean_accepted"]}
        if sim_exact is not None:
            ce = _cell(_decisions(sim_exact)[sim_exact.strategy == name])
            row.update(exact_tbt_ms=ce["tbt_ms"], exact_err=ce["tbt_ms"] / cr["tbt_ms"] - 1,
                       exact_hit=ce["hit_rate"], exact_acc=ce["mean_accepted"])
        rows.append(row)
    return rows, per_req


def format_cells(cells: list[dict]) -> str:
    df = pd.DataFrame(cells)
    extra = df.prune_run if "prune_run" in df else pd.Series(False, index=df.index)
    show = pd.DataFrame({
        "S": df.stages, "strategy": df.strategy,
        "real TBT ms": df.real_tbt_ms.map("{:.2f}".format),
        "sim TBT ms": df.sim_tbt_ms.map("{:.2f}".format),
        "error": df.err.map("{:+.1%}".format),
        "hit real/sim": [f"{a:.3f}/{b:.3f}" for a, b in zip(df.real_hit, df.sim_hit)],
        "acc real/sim": [f"{a:.2f}/{b:.2f}" for a, b in zip(df.real_acc, df.sim_acc)]})
    if "exact_err" in df:
        show["sim* TBT ms"] = df.exact_tbt_ms.map("{:.2f}".format)
        show["error*"] = df.exact_err.map("{:+.1%}".format)
        show["hit*"] = df.exact_hit.map("{:.3f}".format)
    if "real_draft_ms" in df:
        for actor in ("draft", "lm", "stages"):
            show[f"{actor} ms/tok real/sim"] = [f"{a:.1f}/{b:.1f}" for a, b in
                                                zip(df[f"real_{actor}_ms"],
                                                    df[f"sim_{actor}_ms"])]
    if extra.any():
        show.insert(2, "prune", [f"{p}{'' if k else ' no-cancel'}" + ("" if x else " (default)")
                                 for p, k, x in zip(df.prune, df.cancel, extra)])
    main = df[~extra]
    errs = main.err.abs()
    lines = [show.to_string(index=False),
             f"median |error| {errs.median():.1%}, worst {errs.max():.1%} "
             f"({main.strategy[errs.idxmax()]}, S={main.stages[errs.idxmax()]})"
             + (" over the default runs" if extra.any() else "")]
    if "exact_err" in df:
        ex = main.exact_err.abs()
        lines.append(f"with the event oracle (*): median |error| {ex.median():.1%}, "
                     f"worst {ex.max():.1%}")
    return "\n".join(lines)


def format_decisions(per_req: pd.DataFrame) -> str:
    cols = ["stages", "strategy", "request", "tokens_real", "hit_rate_real", "hit_rate_sim",
            "mean_accepted_real", "mean_accepted_sim"]
    if "hit_rate_exact" in per_req:
        cols += ["hit_rate_exact", "mean_accepted_exact"]
    d = per_req[[c for c in cols if c in per_req]].copy()
    for c in d.columns:
        if c.startswith(("hit_rate", "mean_acc")):
            d[c] = d[c].map("{:.3f}".format)
    return d.rename(columns={"tokens_real": "tokens"}).to_string(index=False)


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def host_line() -> str:
    """This machine: CPU model, cores, load average (a CPU profile and real runs hold only
    for the host that measured them, and others' work on the cores skews both)."""
    return f"host {describe(host_record())}; load average {load_avg()}"


def check_profile_host(profile, log) -> str | None:
    """Warn (one line) when a reused CPU profile comes from another CPU than this one."""
    msg = profile_host_warning(profile)
    if msg:
        log(f"[fidelity] {msg}")
    return msg


# ---- the whole benchmark --------------------------------------------------------------

def run_benchmark(args, log=print) -> dict:
    if args.resim:          # a kept folder: its own prompts and arguments, nothing rewritten
        return resimulate(args, Path(args.resim), log)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pipedec-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    prompts = Path(args.prompts) if args.prompts else work / "prompts.txt"
    if not args.prompts:
        prompts.write_text("\n".join(DEFAULT_PROMPTS) + "\n")
    t0 = time.perf_counter()
    log(f"[fidelity] target {args.target}, draft {args.draft}, stages {args.stages}, "
        f"{args.max_requests or 'all'} prompts x {args.max_new_tokens} tokens; "
        f"{host_line()}")
    opts = pipeline_options(args)
    if opts["note"]:
        log(f"[fidelity] note: {opts['note']}")
    log(f"[fidelity] pipeline: topology A, prune {opts['prune']!r}, "
        f"cancel {'on' if opts['cancel'] else 'off'} in both backends")
    if args.profile:
        profile_path = Path(args.profile)
    else:
        profile_path = work / "profile.json"
        secs = measure_profile(args.target, args.draft, profile_path, quick=args.quick_profile,
                               log=log)
        log(f"[fidelity] profile measured in {secs:.0f} s")
    profile = load_profile(profile_path)
    check_profile_host(profile, log)
    trace = record(args, prompts, log)
    from pipedec_sim.inputs.traces import write_trace
    write_trace(trace, work / "trace.jsonl")
    if profile_path != work / "profile.json":
        shutil.copy(profile_path, work / "profile.json")
    runs = [(S, None, work / f"real-S{S}") for S in args.stages]
    if args.prune_modes:
        runs += [(args.prune_stages, m, work / f"real-S{args.prune_stages}-prune-{m}")
                 for m in prune_modes(args)]
    cells, per_reqs = [], []
    for S, mode, out in runs:
        out.mkdir(parents=True, exist_ok=True)
        o = pipeline_options(args, mode)
        (out / "pipeline.json").write_text(json.dumps({"prune": o["prune"],
                                                       "cancel": o["cancel"]}))
        what = f"S={S}" + (f" prune {mode}" if mode else "")
        if args.share == "run":
            before = core_share()
        _, _, wall = real_run(args, S, prompts, out, log, o)
        if args.share == "run":
            after = core_share()
            share = [round((a + b) / 2, 3) for a, b in zip(before, after)]
            (out / "core_share.json").write_text(json.dumps({"before": before, "after": after,
                                                             "mean": share}))
            log(f"[fidelity] {what}: core share of n = 1..5 busy processes before {before}, "
                f"after {after}")
        log(f"[fidelity] {what}: real run {wall:.0f} s (incl. start-up); load average "
            f"{load_avg()}")
        c, p = compare_stage(args, S, trace, profile, out, log, mode)
        cells += c
        per_reqs.append(p)
    (work / "args.json").write_text(json.dumps({k: v for k, v in vars(args).items()
                                                if k not in ("resim",)}, default=str))
    return report(args, trace, profile, profile_path, cells, per_reqs, work, t0, log)


def compare_stage(args, S: int, trace, profile, out: Path, log, mode: str | None = None):
    """Simulate stage count S (trace oracle and event oracle) against real run `out`, with
    the pipeline options that run had (its pipeline.json; else those of `mode`)."""
    from backends.torch.eventlog import read_records
    real = pd.read_csv(out / "requests.csv", dtype={"request": str})
    real = real[real.strategy.isin(args.strategies)]
    outputs = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    by_id = {r.id: r for r in trace.requests}
    bad = [(o["strategy"], o["id"]) for o in outputs
           if o["output_ids"] != list(by_id[o["id"]].output)]
    if bad:
        log(f"[fidelity] warning: real outputs differ from the trace for {bad}")
    records = {(r["request"]["strategy"], str(r["request"]["id"])): r
               for r in read_records(out / "events.jsonl")}
    saved = out / "pipeline.json"
    if saved.is_file():
        opts = dict(json.loads(saved.read_text()))
    else:           # a folder kept before pipeline.json: in-band notices, no cancel
        opts = {"prune": getattr(args, "prune", None) or "piggyback", "cancel": False}
        log(f"[fidelity] {out.name}: no pipeline.json (an older run): simulating prune "
            f"{opts['prune']!r}, no cancel, as the runtime then ran")
    cfg = sim_config(args, S, args.strategies, opts)
    share_file = out / "core_share.json"
    share = None
    if args.share == "run" and share_file.is_file() and profile.core_share is not None:
        # The cores' share as measured around this very run (foreign load changes).
        share = tuple(json.loads(share_file.read_text())["mean"])
    t = time.perf_counter()
    sim, _ = simulate_requests(trace, profile, cfg, core_share=share)
    sim_exact, cov = simulate_requests(trace, profile, cfg, records, core_share=share)
    ex = sum(a for a, _ in cov.values())
    fb = sum(b for _, b in cov.values())
    log(f"[fidelity] S={S}: simulated in {time.perf_counter() - t:.1f} s; event oracle "
        f"answered {ex}/{ex + fb} draft queries from the real run")
    cells, per_req = compare(real, sim, sim_exact, S)
    for c in cells:
        c["prune"], c["cancel"], c["prune_run"] = cfg.prune, cfg.cancel, mode is not None
    if (out / "busy.csv").is_file():
        add_busy(cells, pd.read_csv(out / "busy.csv", dtype={"request": str}),
                 sim_exact.attrs["busy"], real)
    return cells, per_req


def add_busy(cells, real_busy: pd.DataFrame, sim_busy: pd.DataFrame, real) -> None:
    """Where the time goes: compute per output token, per actor, real vs simulated.
    Real busy times are measured around the compute calls themselves (head: draft and LM
    head; stages: their own report), so a gap between them and the simulator's is the
    profile mispredicting compute; a gap in TBT beyond it is waiting (hops, scheduling)."""
    for c in cells:
        rb = real_busy[real_busy.strategy == c["strategy"]]
        sb = sim_busy[sim_busy.strategy == c["strategy"]]
        tokens = real[real.strategy == c["strategy"]].tokens.sum()
        for actor, cols in (("draft", ["busy_draft"]), ("lm", ["busy_lm_head"]),
                            ("stages", [k for k in rb.columns if k.startswith("busy_stage")])):
            r = sum(rb[k].sum() for k in cols if k in rb)
            sv = sum(sb[k].sum() for k in cols if k in sb)
            c[f"real_{actor}_ms"] = r / tokens
            c[f"sim_{actor}_ms"] = sv / tokens


def resimulate(args, work: Path, log) -> dict:
    """Re-run only the simulator against a kept work folder (real runs, trace, profile)."""
    from pipedec_sim.inputs.traces import read_trace
    t0 = time.perf_counter()
    if (work / "args.json").is_file():
        saved = json.loads((work / "args.json").read_text())
        for k in ("target", "draft", "width", "topk", "depth", "tree_topk", "total",
                  "max_new_tokens", "max_requests"):
            setattr(args, k, saved[k])
    log(f"[fidelity] re-simulating {work}: target {args.target}, draft {args.draft}; "
        f"{host_line()}")
    profile_path = Path(args.profile) if args.profile else work / "profile.json"
    profile = load_profile(profile_path)
    check_profile_host(profile, log)
    if not (work / "trace.jsonl").is_file():          # deterministic: record it again
        from pipedec_sim.inputs.traces import write_trace
        write_trace(record(args, work / "prompts.txt", log), work / "trace.jsonl")
    trace = read_trace(work / "trace.jsonl")
    cells, per_reqs = [], []
    for S in args.stages:
        if (work / f"real-S{S}").is_dir():
            c, p = compare_stage(args, S, trace, profile, work / f"real-S{S}", log)
            cells += c
            per_reqs.append(p)
    for out in sorted(work.glob("real-S*-prune-*")):
        S, mode = int(out.name[6:].split("-", 1)[0]), out.name.split("-prune-", 1)[1]
        c, p = compare_stage(args, S, trace, profile, out, log, mode)
        cells += c
        per_reqs.append(p)
    return report(args, trace, profile, profile_path, cells, per_reqs, work, t0, log)


def report(args, trace, profile, profile_path, cells, per_reqs, work, t0, log) -> dict:
    per_req = pd.concat(per_reqs, ignore_index=True)
    table = format_cells(cells)
    result = {"cells": cells, "per_request": per_req, "table": table, "work": str(work),
              "profile": str(profile_path), "seconds": time.perf_counter() - t0}
    log("")
    log(f"Fidelity: {args.target} / draft {args.draft}, {len(trace.requests)} prompts x "
        f"<= {args.max_new_tokens} tokens, profile {profile_path.name} "
        f"(shared_cores={profile.shared_cores}, head_overhead_ms={profile.head_overhead_ms}, "
        f"measured on {describe(profile.host) if profile.host else 'an unrecorded host'})")
    log(f"This machine: {host_line()} (now)")
    main = {(c["prune"], c["cancel"]) for c in cells if not c.get("prune_run")}
    log("Pipeline: topology A; " + "; ".join(f"prune {p}, cancel {'on' if k else 'off'}"
                                             for p, k in sorted(main)) +
        (" (extra rows: each prune mode at S=" + str(args.prune_stages) + ")"
         if any(c.get("prune_run") for c in cells) else ""))
    log("error = sim/real - 1 of the decode time per token (TBT); * = event oracle "
        "(the real run's own draft proposals)")
    log(table)
    log("")
    log("Decisions per request (real vs simulated; exact = event oracle):")
    log(format_decisions(per_req))
    if args.csv:
        pd.DataFrame(cells).to_csv(args.csv, index=False)
    if not args.work and not args.keep and not args.resim:
        shutil.rmtree(work, ignore_errors=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--draft", default=os.environ.get("PIPEDEC_DRAFT", "smollm2"),
                    help="draft spec or folder (default $PIPEDEC_DRAFT, else smollm2: a "
                         "self-draft, always right)")
    ap.add_argument("--stages", default="2,3,4",
                    type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    type=lambda s: tuple(s.split(",")))
    ap.add_argument("--prompts", default=None, help="prompt file (default: 6 built-in prompts)")
    ap.add_argument("--max-requests", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--tree-topk", type=int, default=4)
    ap.add_argument("--total", type=int, default=16)
    ap.add_argument("--prune", default=None,
                    help="prune delivery in both backends (default: the shared default, "
                         "given to neither; see pipeline_options)")
    ap.add_argument("--no-cancel", action="store_true",
                    help="stages never abandon a batch, in both backends")
    ap.add_argument("--prune-modes", nargs="?", const="all", default=None, metavar="MODES",
                    help="also run and report each prune mode (a comma list; default every "
                         "mode both backends offer) at S = --prune-stages")
    ap.add_argument("--prune-stages", type=int, default=4)
    ap.add_argument("--profile", default=None,
                    help="reuse this profile instead of measuring one on this machine "
                         "(warns if it was measured on another CPU model)")
    ap.add_argument("--quick-profile", action="store_true")
    ap.add_argument("--work", default=None, help="keep intermediate files here")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--csv", default=None, help="write the cells as CSV")
    ap.add_argument("--share", choices=("run", "profile"), default="run",
                    help="core share table for the simulator: measured around each real run "
                         "(default) or the profile's own")
    ap.add_argument("--resim", default=None, metavar="WORK",
                    help="only re-simulate against a folder kept by --work (profile, trace "
                         "and real runs); --profile FILE swaps the profile")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
