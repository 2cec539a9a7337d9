"""One-call GPU check and calibration: everything the real backend needs a GPU for.

    python3 benchmarks/gpu/check.py --out DIR            # on a CUDA machine (bf16 shapes)
    python3 benchmarks/gpu/check.py --out DIR --smoke    # on a CPU: tiny shapes, tiny grid

Sections (each one guarded: a failure is reported and the next one still runs):
  tree    tree attention on the device: a tree batch against the same rows computed as plain
          sequences (float32 and bf16), and the device against the CPU (float32)
  lossless  the in-process pipeline on the device, every strategy, S=2, against HF greedy
  runtime   `pipedec-real run --device cuda` (stage processes; which transport it chose),
          and `--transport nccl`'s answer when stages share a GPU
  bf16    `pipedec-real run --dtype bfloat16` against HF greedy of the bf16 target
  cliprofile  `pipedec-real profile --device cuda` on tiny models loads in the simulator
  profile per-layer latency of a Llama-3.1-70B-shaped layer, a Llama-3.2-1B-shaped draft
          step, LM head and embedding in bf16 (random weights), through the backend's own
          `Shard` code, written as a `pipedec-profile/1` calibration profile
  graphs  CUDA graphs (`--cuda-graphs on`, backends/torch/graphs.py): a 70B-shaped stage's
          layer batch and a 1B-shaped draft step at a few row counts, eager vs graph replay
          vs summed kernel time (aim: graphs within 1.3x of kernels), the static path's
          numbers against Shard's, and the in-process pipeline lossless with graphs on
  fidelity1  one-GPU fidelity: every stage and the head's draft time-share the GPU. Per
          model pair (tiny; a random-weight 1B-shaped eps pair) and graphs off/on:
          `pipedec-real profile` on the device, then real `pipedec-real run` at S = 2, 4 x
          ar, tree-sd, pipedec against the simulator's prediction from that profile, with
          the GPU as each stage's own and as one device they share (shared_cores = 1)
  speedup  issue 16's real speedup on the machine's CPU cores (16 on the GPU machine):
          `benchmarks/speedup.py`, the eps pair at S = 4, 8: a profile measured there, the
          simulator's PP / tree-SD / PipeDec prediction written first, then the real runs
In --smoke (CPU) the graphs section runs the static path eagerly (nothing captured) and
fidelity1 runs tiny shapes at S = 2 with CPU profiles: both only test the script.
Writes DIR/gpu_check.json (every figure) and DIR/<profile name>.json; prints a summary last.
`--sections a,b` runs only those (a rerun); the plan's estimated GPU time is printed first.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import traceback
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from backends.torch.compat import CACHE_KW  # noqa: E402
from backends.torch.graphs import GraphDraft, GraphShard  # noqa: E402
from backends.torch.head import Request  # noqa: E402
from backends.torch.inline import InlinePipeline  # noqa: E402
from backends.torch.models import load  # noqa: E402
from backends.torch.profiler import (  # noqa: E402
    _axes,
    _median_ms,
    _prefilled,
    _sync,
    _tree,
    measure_head_overhead,
)
from backends.torch.shard import DraftModel, Shard  # noqa: E402
from pipedec_sim.protocol.messages import Row, Update  # noqa: E402

# Llama-3.1-70B and Llama-3.2-1B (their config.json); layers = how many the profile reports.
LLAMA70B = dict(layers=80, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256, tie=False)
LLAMA1B = dict(layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie=True)
SMOKE70 = dict(layers=80, hidden_size=256, intermediate_size=512, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, tie=False)
SMOKE1 = dict(layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, tie=True)
GRID = {"tokens": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        "context": (0, 128, 512, 1024, 2048, 4096)}
SMOKE_GRID = {"tokens": (1, 4, 16), "context": (0, 128)}
STAGE_LAYERS = 6          # 80 layers / 14 stages ~ 5.7: the layers one stage streams in turn
PROMPTS = ["Hello, world! This is a test.", "abc", "The quick brown fox jumps"]
KNOBS = dict(width=4, topk=4, depth=4, tree_topk=4, total=16)


def sync(device) -> None:
    _sync()                     # the profiler's: synchronises CUDA once it is in use


def median_ms(fn, device, reps: int) -> float:
    return round(_median_ms(fn, reps), 4)


def kernel_ms(fn, device) -> float:
    """ms of GPU kernel (and copy) time one call of `fn` launches, summed over kernels:
    what the step costs with its launch gaps removed, as CUDA-graph replay approaches."""
    from torch.profiler import ProfilerActivity, profile
    if torch.device(device).type != "cuda":          # smoke: CPU op time stands in
        with profile(activities=[ProfilerActivity.CPU]) as p:
            fn()
        return sum(e.self_cpu_time_total for e in p.key_averages()) / 1e3
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        sync(device)
    return sum(getattr(e, "self_device_time_total", 0) or 0 for e in p.key_averages()) / 1e3


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- tree attention ------------------------------------------------------------------------
def tree_rows(prompt_len: int) -> list[Row]:
    """A two-level tree under the last prompt row: 3 children, 2 grandchildren each."""
    rows, nid, last = [], 1000, prompt_len - 1
    for a in range(3):
        rows.append(Row(nid, last, 10 + a, prompt_len))
        kid = nid
        nid += 1
        for b in range(2):
            rows.append(Row(nid, kid, 20 + 3 * a + b, prompt_len + 1))
            nid += 1
    return rows


def path_of(rows: list[Row], prompt: list[Row], r: Row) -> list[Row]:
    by_id = {x.id: x for x in rows}
    chain = [r]
    while chain[-1].parent in by_id:
        chain.append(by_id[chain[-1].parent])
    return prompt + chain[::-1]


def tree_vs_sequences(model, device) -> float:
    """Max relative error of each tree row's output against its root path run alone."""
    prompt = [Row(i, i - 1, 1 + 7 * i % 200, i) for i in range(12)]
    tree = tree_rows(len(prompt))
    shard = Shard(model, 0, model.config.num_hidden_layers, embed=True, head=False,
                  device=device)
    shard.reset()
    shard.forward(prompt, len(prompt))
    out = shard.forward(tree, len(prompt))[0]
    worst = 0.0
    for k, r in enumerate(tree):
        seq = path_of(tree, prompt, r)
        seq = [Row(j, j - 1, x.token, j) for j, x in enumerate(seq)]   # a plain sequence
        shard.reset()
        ref = shard.forward(seq, len(seq))[0, -1]
        worst = max(worst, rel(out[k], ref))
    return worst


def check_tree(device) -> dict:
    res = {}
    t32 = load("tiny").model
    res["tree_vs_sequences_fp32"] = tree_vs_sequences(t32.to(device), device)
    res["tree_vs_sequences_bf16"] = tree_vs_sequences(load("tiny").model.to(device,
                                                                          torch.bfloat16), device)
    if torch.device(device).type == "cuda":
        prompt = [Row(i, i - 1, 1 + 7 * i % 200, i) for i in range(12)]
        outs = []
        for dev in ("cpu", device):
            shard = Shard(load("tiny").model.to(dev), 0, 4, embed=True, head=False, device=dev)
            shard.forward(prompt, len(prompt))
            outs.append(shard.forward(tree_rows(12), 12)[0])
        res["device_vs_cpu_fp32"] = rel(outs[1], outs[0])
    res["ok"] = (res["tree_vs_sequences_fp32"] < 1e-4 and res["tree_vs_sequences_bf16"] < 3e-2
                 and res.get("device_vs_cpu_fp32", 0.0) < 1e-3)
    return res


# ---- lossless -------------------------------------------------------------------------------
def greedy_refs(n: int) -> tuple[list, list]:
    t = load("tiny")
    prompts = [t.encode(p) for p in PROMPTS]
    refs = []
    for p in prompts:
        out = t.model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n,
                               eos_token_id=None, pad_token_id=0)
        refs.append(out[0, len(p):].tolist())
    return prompts, refs


def check_lossless(device, n: int, cuda_graphs: bool = False) -> dict:
    prompts, refs = greedy_refs(n)
    res = {"tokens": n, "requests": len(prompts)}
    for name in ("ar", "tree-sd", "pipedec"):
        pipe = InlinePipeline(load("tiny"), load("tiny-noisy"), 2, knobs=KNOBS, device=device,
                              cuda_graphs=cuda_graphs)
        runs = [pipe.run(name, Request(str(i), p, n)) for i, p in enumerate(prompts)]
        res[name] = all(r.output == ref for r, ref in zip(runs, refs))
        res[f"{name}_hit_rate"] = round(sum(c[2] for r in runs for c in r.commits)
                                        / max(1, sum(len(r.output) for r in runs)), 3)
    res["ok"] = all(res[s] for s in ("ar", "tree-sd", "pipedec"))
    return res


# ---- runtime -------------------------------------------------------------------------------
def real_run(device, out: Path, n: int, extra=()) -> subprocess.CompletedProcess:
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cmd = [sys.executable, "-m", "backends.torch.cli", "run", "--target", "tiny", "--draft",
           "tiny-noisy", "--stages", "2", "--prompts", str(prompts), "--device", device,
           "--width", "4", "--topk", "4", "--max-new-tokens", str(n), "--quiet", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)


def check_runtime(device, out: Path, n: int) -> dict:
    _, refs = greedy_refs(n)
    r = real_run(device, out, n, ["--out", str(out / "real")])
    res = {"exit": r.returncode, "table": r.stdout.strip(),
           "transport": [ln for ln in r.stderr.splitlines() if "activations" in ln]}
    if r.returncode == 0:
        got = [json.loads(ln) for ln in (out / "real" / "outputs.jsonl").read_text().splitlines()]
        res["lossless"] = all(g["output_ids"] == refs[int(g["id"]) - 1] for g in got)
    else:
        res["stderr"] = r.stderr[-2000:]
    forced = real_run(device, out, 4, ["--transport", "nccl", "--strategies", "ar"])
    res["forced_nccl"] = {"exit": forced.returncode, "stderr": forced.stderr.strip()[-600:]}
    res["ok"] = r.returncode == 0 and res.get("lossless", False)
    return res


def check_bf16(device, out: Path, n: int) -> dict:
    """`pipedec-real run --dtype bfloat16 --device cuda`: per strategy, does the output equal
    HF greedy of the bf16 target on the same device? Plain PP must (one token per batch is
    HF's own computation); tree batches may differ by bf16 rounding, which this reports."""
    t = load("tiny")
    t.model.to(device, torch.bfloat16)
    refs = []
    for p in PROMPTS:
        ids = t.encode(p)
        o = t.model.generate(torch.tensor([ids], device=device), do_sample=False,
                             max_new_tokens=n, pad_token_id=0)
        refs.append(o[0, len(ids):].tolist())
    r = real_run(device, out, n, ["--dtype", "bfloat16", "--out", str(out / "bf16")])
    if r.returncode:
        return {"ok": False, "exit": r.returncode, "stderr": r.stderr[-2000:]}
    got = [json.loads(ln) for ln in (out / "bf16" / "outputs.jsonl").read_text().splitlines()]
    res = {}
    for name in ("ar", "tree-sd", "pipedec"):
        mine = [g for g in got if g["strategy"] == name]
        res[f"{name}_equal_requests"] = sum(g["output_ids"] == refs[int(g["id"]) - 1]
                                            for g in mine)
        res[f"{name}_equal_tokens"] = sum(a == b for g in mine for a, b in
                                          zip(g["output_ids"], refs[int(g["id"]) - 1]))
    res["ok"] = res["ar_equal_requests"] == len(PROMPTS)
    res["of"] = {"requests": len(PROMPTS), "tokens": len(PROMPTS) * n}
    return res


def check_cli_profile(device, out: Path) -> dict:
    """`pipedec-real profile --device cuda` (tiny models, quick grid) writes a profile that
    loads in the simulator."""
    from pipedec_sim.inputs.profile import load_profile
    path = out / "cli-profile-tiny.json"
    r = subprocess.run([sys.executable, "-m", "backends.torch.cli", "profile", "--target", "tiny",
                        "--draft", "tiny-draft", "--device", device, "--quick", "--out", str(path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    if r.returncode:
        return {"ok": False, "exit": r.returncode, "stderr": r.stderr[-1500:]}
    p = load_profile(path)
    return {"ok": True, "device": p.provenance["device"], "layer_ms_1tok": p.layer(1, 0),
            "draft_ms_1tok": p.draft_step(1, 0), "lm_head_ms_1tok": p.lm_head(1)}


# ---- CUDA graphs ---------------------------------------------------------------------------
GRAPH_ROWS = (1, 4, 12, 16, 64)      # 12: padded to the 16-row bucket
GRAPH_AIM = 1.3                      # graph replay within this factor of the kernel time


def check_graphs(device, smoke: bool, n: int) -> dict:
    """Eager vs static-buffer (graph replay on CUDA) vs summed kernel time of a stage's
    layer batch (STAGE_LAYERS 70B-shaped layers) and a 1B-shaped draft step, each batch a
    star of n rows over a prefilled context; then the static path's outputs against
    Shard's and the pipeline lossless with graphs on."""
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tspec, dspec = (SMOKE70, SMOKE1) if smoke else (LLAMA70B, LLAMA1B)
    ctx, reps = (128, 3) if smoke else (512, 7)
    grid = {"tokens": GRAPH_ROWS, "context": (ctx,)}
    res: dict = {"mode": "CUDA graphs captured and replayed" if cuda else
                 "NO CUDA: the static-buffer path runs eagerly, nothing captured (needs "
                 "CUDA for graph timings)", "context": ctx, "rows": list(GRAPH_ROWS)}
    target = random_llama(tspec, STAGE_LAYERS, device, dtype)
    H = tspec["hidden_size"]
    xs = {k: torch.randn(1, k, H, device=device, dtype=dtype) for k in GRAPH_ROWS}
    eager = Shard(target, 0, STAGE_LAYERS, embed=False, head=False, device=device)
    static = GraphShard(target, 0, STAGE_LAYERS, embed=False, head=False, device=device)

    def stage(sh):
        return lambda rows: sh.forward(rows, 0, xs[len(rows)])
    res["stage"] = _graph_table(stage(eager), eager, stage(static), static, grid, device,
                                reps)
    res["stage_rel_err"] = _static_error(eager, static, ctx, device, xs)
    res["stage_calls"] = dict(static.calls)
    eager = static = target = None
    if cuda:
        torch.cuda.empty_cache()
    draft = random_llama(dspec, dspec["layers"], device, dtype)
    d0, d1 = DraftModel(draft, device), GraphDraft(draft, device)

    def step(d):
        return lambda rows: d.propose(rows, [r.id for r in rows], 16, 0)
    res["draft"] = _graph_table(step(d0), d0.shard, step(d1), d1.shard, grid, device, reps)
    res["draft_calls"] = dict(d1.shard.calls)
    d0 = d1 = draft = None
    res["lossless"] = check_lossless(device, n, cuda_graphs=True)
    worst = max(r["graph_over_kernel"] for t in ("stage", "draft") for r in res[t])
    res["worst_graph_over_kernel"] = worst
    res["aim_met"] = bool(cuda and worst <= GRAPH_AIM)
    res["ok"] = res["lossless"]["ok"] and res["stage_rel_err"] < (3e-2 if cuda else 1e-4)
    return res


def _graph_table(eager_step, eager, graph_step, graph, grid, device, reps) -> list[dict]:
    """Per row count: eager ms, static/graph ms, eager's summed kernel ms and the ratios."""
    e = time_grid(eager_step, eager, grid, device, reps)
    g = time_grid(graph_step, graph, grid, device, reps)
    k = time_grid(eager_step, eager, grid, device, reps, kernels=True)
    return [{"rows": n, "eager_ms": e[i][0], "graph_ms": g[i][0], "kernel_ms": k[i][0],
             "eager_over_graph": round(e[i][0] / g[i][0], 2),
             "graph_over_kernel": round(g[i][0] / max(k[i][0], 1e-6), 2)}
            for i, n in enumerate(grid["tokens"])]


def _static_error(eager: Shard, static: GraphShard, ctx: int, device, xs) -> float:
    """Largest relative error of the static path's outputs against Shard's: a tree batch
    of each row count over the same prefilled context."""
    worst = 0.0
    for n in GRAPH_ROWS:
        for sh in (eager, static):
            torch.manual_seed(1)                     # the same context in both
            _prefilled_on(sh, ctx, device)
        outs = [sh.forward(_tree(ctx, n, 10**6), 0, xs[n]) for sh in (eager, static)]
        worst = max(worst, rel(outs[1], outs[0]))
    return worst


def graphs_lines(res: dict) -> list[str]:
    lines = [f"graphs: {res['mode']}; context {res['context']}"]
    for what in ("stage", "draft"):
        lines.append(f"  {what:5s} rows  eager ms  graph ms  kernel ms  eager/graph  "
                     "graph/kernel")
        for r in res[what]:
            lines.append(f"  {'':5s} {r['rows']:4d}  {r['eager_ms']:8.3f}  {r['graph_ms']:8.3f}"
                         f"  {r['kernel_ms']:9.3f}  {r['eager_over_graph']:11.2f}  "
                         f"{r['graph_over_kernel']:12.2f}")
    return lines


# ---- one-GPU fidelity -----------------------------------------------------------------------
FIDELITY_PAIRS = {"tiny": ("tiny", "tiny-noisy"),
                  "1b-shape": ("eps-pair:16x2048:0.02:1", "eps-pair-draft:16x2048:1")}
SMOKE_PAIRS = {"tiny": ("tiny", "tiny-noisy")}   # CPU profiles take ~45 s each


def check_fidelity1(device, smoke: bool, out: Path) -> dict:
    """Real runs on one GPU against the simulator (benchmarks/fidelity.py's machinery):
    per pair and graphs mode a profile on the device, a trace per pair (CPU, float32),
    then per S the real run and the simulation, with the GPU as every stage's own
    (shared_cores None, as measured) and as one device all share (shared_cores 1)."""
    import dataclasses

    import benchmarks.fidelity as fid
    from pipedec_sim.inputs.profile import load_profile
    work = out / "fidelity1"
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    stages, tokens = ((2,), 8) if smoke else ((2, 4), 24)
    cells, log = [], []

    def say(msg):
        log.append(msg)
        print(msg, flush=True)
    for key, (target, draft) in (SMOKE_PAIRS if smoke else FIDELITY_PAIRS).items():
        args = fid.build_parser().parse_args(["--target", target, "--draft", draft,
                                              "--max-new-tokens", str(tokens),
                                              "--max-requests", str(len(PROMPTS)),
                                              "--share", "profile"])
        trace = fid.record(args, prompts, say)
        for graphs in ("off", "on"):
            path = work / f"profile-{key}-{graphs}.json"
            fid._run([sys.executable, "-m", "backends.torch.cli", "profile", "--target",
                      target, "--draft", draft, "--device", device, "--quick", "--quiet",
                      "--cuda-graphs", graphs, "--out", str(path)], "profile", 900, say)
            own = load_profile(path)
            shared = dataclasses.replace(own, shared_cores=1, core_share=None)
            for S in stages:
                run = work / f"real-{key}-{graphs}-S{S}"
                opts = fid.pipeline_options(args)
                opts = {**opts, "real_flags": opts["real_flags"] + [
                    "--device", device, "--cuda-graphs", graphs]}
                run.mkdir(parents=True, exist_ok=True)
                (run / "pipeline.json").write_text(json.dumps({"prune": opts["prune"],
                                                               "cancel": opts["cancel"]}))
                fid.real_run(args, S, prompts, run, say, opts)
                for device_model, prof in (("own", own), ("shared", shared)):
                    got, _ = fid.compare_stage(args, S, trace, prof, run, say)
                    for c in got:
                        c.update(pair=key, graphs=graphs, gpu=device_model)
                    cells += got
    table = fidelity_table(cells)
    print(table, flush=True)
    shared_errs = [abs(c["err"]) for c in cells if c["gpu"] == "shared"]
    return {"ok": True, "stages": list(stages), "tokens": tokens, "table": table,
            "cells": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()}
                      for c in cells],
            "median_abs_err_shared": round(statistics.median(shared_errs), 4),
            "worst_abs_err_shared": round(max(shared_errs), 4),
            "note": None if device == "cuda" else "CPU smoke: CPU profiles, tests the script"}


def check_speedup(smoke: bool, out: Path) -> dict:
    """benchmarks/speedup.py in a process of its own (it starts the stage processes), its
    report kept as DIR/speedup.txt; smoke: a tiny pair at S = 2 on the cores there are."""
    flags = (["--stages", "2", "--shape", "4x64", "--max-requests", "1",
              "--max-new-tokens", "8", "--force"] if smoke else
             ["--stages", "4,8", "--max-requests", "3", "--max-new-tokens", "32"])
    report = out / "speedup.txt"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speedup.py"), *flags,
                        "--out", str(report), "--work", str(out / "speedup")],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    text = report.read_text() if report.exists() else ""
    print(text or r.stderr[-3000:], flush=True)
    return {"ok": r.returncode == 0, "flags": flags, "report": text.splitlines()[-16:],
            **({} if r.returncode == 0 else {"error": r.stderr[-3000:]})}


def fidelity_table(cells: list[dict]) -> str:
    """One line per (pair, graphs, S, strategy): real ms per token vs the simulator with
    the GPU per stage (own) and shared by all (shared); * = the event oracle."""
    by = {}
    for c in cells:
        by.setdefault((c["pair"], c["graphs"], c["stages"], c["strategy"]), {})[c["gpu"]] = c
    lines = ["real / sim ms per token; own: a GPU per stage (as profiled), shared: one GPU "
             "time-shared by all; * = shared, the event oracle",
             "pair      graphs  S  strategy  real ms  sim own  error  sim shared  error  "
             "error*"]
    for (pair, graphs, S, name), d in by.items():
        o, sh = d["own"], d["shared"]
        lines.append(f"{pair:9s} {graphs:6s} {S:2d}  {name:8s} {o['real_tbt_ms']:8.2f} "
                     f"{o['sim_tbt_ms']:8.2f} {o['err']:+6.1%} {sh['sim_tbt_ms']:11.2f} "
                     f"{sh['err']:+6.1%} {sh.get('exact_err', float('nan')):+6.1%}")
    return "\n".join(lines)


# ---- profile -------------------------------------------------------------------------------
def random_llama(spec: dict, layers: int, device, dtype):
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=spec["hidden_size"],
                      intermediate_size=spec["intermediate_size"],
                      num_attention_heads=spec["num_attention_heads"],
                      num_key_value_heads=spec["num_key_value_heads"],
                      vocab_size=spec["vocab_size"], tie_word_embeddings=spec["tie"],
                      max_position_embeddings=131072, rope_theta=500000.0,
                      attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)             # never time zeros or uninitialised memory
    return model.eval()


def time_grid(step, shard, grid, device, reps, kernels=False) -> list[list[float]]:
    out = []
    for n in grid["tokens"]:
        row = []
        for c in grid["context"]:
            _prefilled_on(shard, c, device)
            ids = iter(range(10**6, 10**9, 10**4))
            live = []

            def once():
                rows = _tree(c, n, next(ids))
                step(rows)
                live.append(rows)
            ts = []
            for _ in range(reps + 2):
                if kernels:
                    ts.append(kernel_ms(once, device))
                else:
                    sync(device)
                    t = time.perf_counter()
                    once()
                    sync(device)
                    ts.append((time.perf_counter() - t) * 1e3)
                shard.apply(Update(kill=tuple(r.id for r in live.pop())))   # untimed prune
            row.append(round(statistics.median(ts[2:]), 4))
        out.append(row)
    return out


def _prefilled_on(shard, ctx, device):
    if shard.has_embed:
        return _prefilled(shard, ctx)
    shard.reset()
    if ctx:
        rows = [Row(i, i - 1, 1 + i % 200, i) for i in range(ctx)]
        shard.forward(rows, ctx, torch.randn(1, ctx, shard.model.config.hidden_size,
                                             device=device, dtype=shard.dtype))


def build_profile(device, smoke: bool, command: str, kernels: bool = False) -> dict:
    dtype = torch.float32 if smoke else torch.bfloat16
    grid, reps = (SMOKE_GRID, 3) if smoke else (GRID, 5 if kernels else 11)
    timed = kernel_ms if kernels else None
    tspec, dspec = (SMOKE70, SMOKE1) if smoke else (LLAMA70B, LLAMA1B)
    target = random_llama(tspec, STAGE_LAYERS, device, dtype)
    H = tspec["hidden_size"]
    stage = Shard(target, 0, STAGE_LAYERS, embed=False, head=True, device=device)
    x = {}

    def layer_step(rows):
        if len(rows) not in x:
            x[len(rows)] = torch.randn(1, len(rows), H, device=device, dtype=dtype)
        stage.forward(rows, 0, x[len(rows)])
    layer = [[round(v / STAGE_LAYERS, 4) for v in row]
             for row in time_grid(layer_step, stage, grid, device, reps, kernels)]
    lm = [_timed(lambda n=n: stage.logits(torch.randn(1, n, H, device=device, dtype=dtype))
                 .argmax(-1), device, reps, timed) for n in grid["tokens"]]
    emb = [_timed(lambda n=n: target.model.embed_tokens(
        torch.randint(1, 500, (1, n), device=device)), device, reps, timed)
        for n in grid["tokens"]]
    compact = _compact_ms(stage, grid["context"][-1], device, reps)
    stage = target = None           # free them: the closures above are done with them
    if device != "cpu":
        torch.cuda.empty_cache()
    draft_model = random_llama(dspec, dspec["layers"], device, dtype)
    d = DraftModel(draft_model, device)
    draft = time_grid(lambda rows: d.propose(rows, [r.id for r in rows], 16, 0), d.shard,
                      grid, device, reps, kernels)
    head_ms, head_details = measure_head_overhead(600)
    analytic = json.loads((ROOT / "pipedec_sim/profiles/analytic-llama70b-1b.json").read_text())
    name = "smoke-profile" if smoke else f"{_gpu_tag(device)}-llama70b-1b"
    name += "-kernels" if kernels else ""
    tshape, dshape = (_shape("meta-llama/Llama-3.1-70B (shape)", tspec, dtype),
                      _shape("meta-llama/Llama-3.2-1B (shape)", dspec, dtype))
    return {
        "schema": "pipedec-profile/1", "name": name,
        "provenance": {
            "kind": "measured", "device": _device_name(device), "date": date.today().isoformat(),
            "command": command,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "notes": ((KERNEL_NOTE if kernels else WALL_NOTE)
                      + f" Random-weight {str(dtype).split('.')[-1]} models with the Llama-3.1-70B "
                      f"and Llama-3.2-1B shapes, eager PyTorch (sdpa), through the backend's "
                      f"Shard code (tree mask built on the host, copied per batch). layer = one "
                      f"70B-shaped decoder layer, the mean over {STAGE_LAYERS} layers run in "
                      f"sequence (one stage of 80/14); draft_step = a whole 1B-shaped draft "
                      f"step incl. LM head and top-16; medians of {reps} after 2 warm-ups, "
                      f"kv_compact_ms = one prune of a "
                      f"{STAGE_LAYERS}-layer stage at context {grid['context'][-1]}. link is "
                      f"NOT measured (one GPU): 10 GbE as in the analytic profile. "
                      f"head_overhead_ms measured on this host's CPU."),
            "details": {"head_overhead": head_details},
        },
        "target": tshape, "draft": dshape,
        "latency": {
            "layer": {**_axes(grid), "ms": layer},
            "draft_step": {**_axes(grid), "ms": draft},
            "lm_head": {"tokens": list(grid["tokens"]), "ms": lm},
            "embed": {"tokens": list(grid["tokens"]), "ms": emb},
            "kv_compact_ms": compact, "head_overhead_ms": round(head_ms, 4),
        },
        "link": dict(analytic["link"]),
        "devices": {"kind": "gpu", "shared_cores": None},
        "split": None,
    }


def _timed(fn, device, reps, timed) -> float:
    if timed is None:
        return median_ms(fn, device, reps)
    fn()
    fn()
    return round(statistics.median(timed(fn, device) for _ in range(reps)), 4)


WALL_NOTE = ("Wall-clock ms, device synchronised around each call: what this eager backend "
             "pays, host launch overhead included.")
KERNEL_NOTE = ("GPU kernel ms: the durations of the kernels and copies one call launches, "
               "summed (torch.profiler, CUPTI), host launch gaps excluded: what CUDA-graph "
               "replay of the same kernels approaches.")


def _shape(name, spec, dtype) -> dict:
    return {"name": name, "layers": spec["layers"], "hidden": spec["hidden_size"],
            "heads": spec["num_attention_heads"], "kv_heads": spec["num_key_value_heads"],
            "intermediate": spec["intermediate_size"], "vocab": spec["vocab_size"],
            "dtype_bytes": torch.finfo(dtype).bits // 8}


def _compact_ms(stage, ctx, device, reps) -> float:
    ts = []
    for _ in range(reps):
        _prefilled_on(stage, ctx, device)
        rows = _tree(ctx, 16, 10**6)
        stage.forward(rows, 0, torch.randn(1, 16, stage.model.config.hidden_size,
                                           device=device, dtype=stage.dtype))
        sync(device)
        t = time.perf_counter()
        stage.apply(Update(kill=tuple(range(10**6, 10**6 + 8))))
        sync(device)
        ts.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(ts), 4)


def _gpu_tag(device) -> str:
    name = torch.cuda.get_device_name(device).lower()
    for tag in ("h200", "h100", "a100", "l40s", "4090"):
        if tag in name:
            return tag
    return "gpu"


def _device_name(device) -> str:
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
    return "CPU (smoke run)"


# ---- main ----------------------------------------------------------------------------------
# Estimated seconds of each section on one H100/H200 (the first five measured on an H100,
# benchmarks/gpu/README.md; graphs, fidelity1 and speedup estimated from their parts).
ESTIMATE_S = {"tree": 10, "lossless": 10, "runtime": 35, "bf16": 25, "cliprofile": 25,
              "profile": 30, "kernels": 20, "graphs": 45, "fidelity1": 270,
              "speedup": 180}
SECTIONS = ",".join(ESTIMATE_S)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (tests the script)")
    ap.add_argument("--sections", "--only", dest="only", default=SECTIONS,
                    help=f"comma-separated sections to run (default all: {SECTIONS})")
    args = ap.parse_args(argv)
    keys = args.only.split(",")
    unknown = [k for k in keys if k not in ESTIMATE_S]
    if unknown:
        ap.error(f"unknown sections {', '.join(unknown)} (choose from {SECTIONS})")
    print("plan (estimated GPU seconds): " + ", ".join(f"{k} {ESTIMATE_S[k]}" for k in keys)
          + f"; total ~{sum(ESTIMATE_S[k] for k in keys) / 60:.1f} min", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    torch.manual_seed(0)
    report = {"env": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "cache_kw": CACHE_KW, "device": _device_name(device),
                      "cuda_devices": torch.cuda.device_count()}}
    print(json.dumps(report["env"]), flush=True)
    n = 12 if args.smoke else 24
    steps = {"tree": lambda: check_tree(device), "lossless": lambda: check_lossless(device, n),
             "runtime": lambda: check_runtime(device, args.out, n),
             "bf16": lambda: check_bf16(device, args.out, n),
             "cliprofile": lambda: check_cli_profile(device, args.out),
             "profile": lambda: _profile(device, args),
             "kernels": lambda: _profile(device, args, kernels=True),
             "graphs": lambda: check_graphs(device, args.smoke, n),
             "fidelity1": lambda: check_fidelity1(device, args.smoke, args.out),
             "speedup": lambda: check_speedup(args.smoke, args.out)}
    for key in keys:
        t = time.perf_counter()
        try:
            report[key] = steps[key]()
        except Exception as e:
            report[key] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                           "trace": traceback.format_exc()[-3000:]}
        report[key]["seconds"] = round(time.perf_counter() - t, 1)
        if key == "graphs" and "stage" in report[key]:
            print("\n".join(graphs_lines(report[key])), flush=True)
        shown = {k: v for k, v in report[key].items() if k not in ("trace", "cells", "table")}
        print(f"[{key}] {json.dumps(shown)} (estimated {ESTIMATE_S[key]} s on the GPU)",
              flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print("\nsummary: " + ", ".join(f"{k} {'ok' if report[k].get('ok') else 'FAILED'} "
                                    f"({report[k]['seconds']:.0f} s)" for k in keys))
    return 0 if all(report[k].get("ok") for k in keys) else 1


def _profile(device, args, kernels=False) -> dict:
    command = "python3 benchmarks/gpu/check.py " + " ".join(sys.argv[1:])
    prof = build_profile(device, args.smoke, command, kernels)
    path = args.out / f"{prof['name']}.json"
    path.write_text(json.dumps(prof, indent=1))
    lat = prof["latency"]
    return {"ok": True, "file": path.name,
            "layer_ms_1tok_ctx0": lat["layer"]["ms"][0][0],
            "layer_ms_16tok_ctx1024": _at(lat["layer"], 16, 1024),
            "draft_ms_1tok": lat["draft_step"]["ms"][0][0],
            "draft_ms_16tok_ctx1024": _at(lat["draft_step"], 16, 1024),
            "lm_head_ms_1tok": lat["lm_head"]["ms"][0], "kv_compact_ms": lat["kv_compact_ms"]}


def _at(table, n, c):
    if n in table["tokens"] and c in table["context"]:
        return table["ms"][table["tokens"].index(n)][table["context"].index(c)]
    return None


if __name__ == "__main__":
    sys.exit(main())
