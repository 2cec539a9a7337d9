"""`pipedec-real profile`: measure a `pipedec-profile/1` calibration profile on this machine.

Timings are medians after warm-up, one thread per process (as the stage workers run):
  layer       one target decoder layer, n new tree rows over c cached rows (tokens x context)
  draft_step  one whole draft step (all layers + LM head + top-k) over the same grid
  lm_head     final norm + LM head + argmax for n rows;   embed: the embedding lookup
  kv_compact  one prune (index_select) of a half-model stage's KV at the largest context
  link        gloo between two local ranks: ping-pong latency, bulk bandwidth
The rows are real tree rows (a star under the last committed row) through the same
`Shard` code the pipeline runs, so mask building and bookkeeping are included.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from datetime import date, timedelta

import torch

from pipedec_sim.calibration import save_profile
from pipedec_sim.messages import Row, Update

from .models import load
from .shard import Draft, Shard

GRID = {"tokens": (1, 4, 16, 64), "context": (0, 128, 512)}
QUICK = {"tokens": (1, 4, 16), "context": (0, 128)}


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def _prefilled(shard: Shard, ctx: int) -> None:
    shard.reset()
    if ctx:
        rows = [Row(i, i - 1, 1 + i % 200, i) for i in range(ctx)]
        hidden = None if shard.has_embed else torch.zeros(1, ctx, shard.model.config.hidden_size)
        shard.forward(rows, ctx, hidden)


def _tree(ctx: int, n: int, base: int) -> list[Row]:
    return [Row(base + k, ctx - 1, 1 + k, ctx) for k in range(n)]


def time_grid(step, shard: Shard, grid, repeats: int) -> list[list[float]]:
    """ms[tokens][context] of `step(rows)` on `shard`, each new batch pruned afterwards."""
    out = []
    for n in grid["tokens"]:
        row = []
        for c in grid["context"]:
            _prefilled(shard, c)
            ids = iter(range(10**6, 10**9, 10**4))

            def once():
                rows = _tree(c, n, next(ids))
                step(rows)
                shard.apply(Update(kill=tuple(r.id for r in rows)))
            row.append(round(_median_ms(once, repeats), 4))
        out.append(row)
    return out


def shape(name: str, cfg) -> dict:
    return {"name": name, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size, "dtype_bytes": 4}


def measure_link(repeats: int = 200) -> tuple[float, float]:
    """(one-way latency ms, bandwidth Gbit/s) between two local gloo ranks."""
    import multiprocessing as mp

    import torch.distributed as dist

    from .runtime import free_port
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    init = f"tcp://127.0.0.1:{free_port()}"
    child = mp.get_context("spawn").Process(target=_echo, args=(init, repeats), daemon=True)
    child.start()
    try:
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=2,
                                timeout=timedelta(seconds=60))
        small = torch.zeros(8, dtype=torch.int64)
        rtts = []
        for _ in range(repeats):
            t = time.perf_counter()
            dist.send(small, 1)
            dist.recv(small, 1)
            rtts.append(time.perf_counter() - t)
        big = torch.zeros(4 * 2**20 // 4)               # 4 MiB of float32
        t = time.perf_counter()
        for _ in range(10):
            dist.send(big, 1)
        dist.recv(small, 1)
        secs = time.perf_counter() - t
        dist.destroy_process_group()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    return statistics.median(rtts) / 2 * 1e3, 10 * big.numel() * 4 * 8 / secs / 1e9


def _echo(init: str, repeats: int) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=1, world_size=2,
                            timeout=timedelta(seconds=60))
    small = torch.zeros(8, dtype=torch.int64)
    for _ in range(repeats):
        dist.recv(small, 0)
        dist.send(small, 0)
    big = torch.zeros(4 * 2**20 // 4)
    for _ in range(10):
        dist.recv(big, 0)
    dist.send(small, 0)
    dist.destroy_process_group()


def build_profile(target_spec: str, draft_spec: str, device: str, quick: bool,
                  command: str) -> dict:
    torch.set_num_threads(1)
    grid = QUICK if quick else GRID
    reps = 5 if quick else 9
    target, draft = load(target_spec), load(draft_spec)
    tm, cfg = target.model.to(device), target.config
    layer = Shard(tm, 0, 1, embed=False, head=True, device=device)
    H = cfg.hidden_size

    def layer_step(rows):
        layer.forward(rows, 0, torch.zeros(1, len(rows), H, device=device))
    d = Draft(draft.model.to(device), device)
    layer_ms = time_grid(layer_step, layer, grid, reps)
    draft_ms = time_grid(lambda rows: d.propose(rows, [r.id for r in rows], 16, 0),
                         d.shard, grid, reps)
    lm = [round(_median_ms(lambda n=n: layer.logits(torch.zeros(1, n, H, device=device))
                           .argmax(-1), reps), 4) for n in grid["tokens"]]
    emb = [round(_median_ms(lambda n=n: tm.model.embed_tokens(
        torch.ones(1, n, dtype=torch.long, device=device)), reps), 4) for n in grid["tokens"]]
    compact = _compact_ms(tm, max(1, cfg.num_hidden_layers // 2), grid["context"][-1], device,
                          reps)
    lat, bw = measure_link(50 if quick else 200)
    versions = {"torch": torch.__version__}
    import transformers
    versions["transformers"] = transformers.__version__
    return {
        "schema": "pipedec-profile/1",
        "name": f"cpu-{target_spec}-{draft_spec}" if device == "cpu" else f"{device}-{target_spec}",
        "provenance": {
            "kind": "measured", "device": _device_name(device), "date": date.today().isoformat(),
            "command": command, "versions": versions,
            "notes": (f"medians of {reps} after 2 warm-up runs, 1 thread; layer = one decoder "
                      "layer of the target; draft_step = one whole draft step incl. top-k; "
                      "link = gloo between two local processes; head_overhead_ms not measured "
                      "(0)."),
        },
        "target": shape(target_spec, cfg),
        "draft": shape(draft_spec, draft.config),
        "latency": {
            "layer": {**_axes(grid), "ms": layer_ms},
            "draft_step": {**_axes(grid), "ms": draft_ms},
            "lm_head": {"tokens": list(grid["tokens"]), "ms": lm},
            "embed": {"tokens": list(grid["tokens"]), "ms": emb},
            "kv_compact_ms": compact, "head_overhead_ms": 0.0,
        },
        "link": {"latency_ms": round(lat, 4), "bandwidth_gbps": round(bw, 3)},
        "devices": {"kind": "cpu" if device == "cpu" else "gpu",
                    "shared_cores": os.cpu_count() if device == "cpu" else None},
        "split": None,
    }


def _axes(grid) -> dict:
    return {"tokens": list(grid["tokens"]), "context": list(grid["context"])}


def _compact_ms(model, layers: int, ctx: int, device, reps: int) -> float:
    """One prune of a `layers`-layer stage holding ctx committed + 16 tree rows."""
    shard = Shard(model, 0, layers, embed=True, head=False, device=device)
    ts = []
    for k in range(reps):
        _prefilled(shard, ctx)
        shard.forward(_tree(ctx, 16, 10**6), 0)
        t = time.perf_counter()
        shard.apply(Update(kill=tuple(range(10**6, 10**6 + 8))))
        ts.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(ts), 4)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread"


def profile_main(args) -> int:
    command = "pipedec-real " + " ".join(sys.argv[1:]) if sys.argv[1:] else "pipedec-real profile"
    t = time.perf_counter()
    prof = build_profile(args.target, args.draft, args.device, args.quick, command)
    save_profile(prof, args.out)
    print(f"wrote {args.out} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return 0
