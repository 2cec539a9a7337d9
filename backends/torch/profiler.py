"""`pipedec-real profile`: measure a `pipedec-profile/1` calibration profile on this machine.

Timings are medians after warm-up, one thread per process (as the stage workers run):
  layer       one target decoder layer, n new tree rows over c cached rows (tokens x context),
              timed over all the target's layers in sequence and divided (cold weights)
  draft_step  one whole draft step (all layers + LM head + top-k) over the same grid
  lm_head     final norm + LM head + argmax for n rows;   embed: the embedding lookup
  kv_compact  one prune (index_select) of a half-model stage's KV at the largest context
  batch       (optional section) one decoder layer over B requests' rows at once, each
              request over its own context, in one forward (`batch.forward_requests`, what
              the serving stages run), timed like `layer`; `Profile.batch_error` compares
              `batch_layer`'s model with it
  link        gloo between two local ranks: ping-pong latency, bulk bandwidth
  cold_*      (CPU) the same work right after streaming a buffer larger than the last-level
              cache, minus warm: what a stage pays when the rest of the pipeline evicted
              its weights and state since its last batch (the grids above are warm)
The rows are real tree rows (a star under the last committed row) through the same
`Shard` code the pipeline runs, so mask building and bookkeeping are included.
"""
from __future__ import annotations

import os
import signal
import statistics
import sys
import time
from datetime import date, timedelta

import torch

from backends.torch.batch import forward_requests
from backends.torch.graphs import make_draft, make_shard
from backends.torch.models import load
from backends.torch.shard import Shard
from pipedec_sim.inputs.host import host_record
from pipedec_sim.inputs.profile import parse_profile, save_profile
from pipedec_sim.inputs.profile.model import COLD_FIELDS, CPU_FIELDS, DEVICE_FIELDS
from pipedec_sim.protocol.messages import Row, Update

GRID = {"tokens": (1, 4, 16, 64), "context": (0, 128, 512)}
QUICK = {"tokens": (1, 4, 16), "context": (0, 128)}
# Batched forwards ("latency.batch"): B requests x n rows each, over equal contexts (the
# grid's second context) and over contexts spread evenly from 0 to the grid's largest.
BATCH = {"requests": (2, 4, 8), "tokens": (1, 4)}
QUICK_BATCH = {"requests": (2, 8), "tokens": (1, 4)}


def _sync() -> None:
    """Wait for queued GPU work: CUDA kernels run asynchronously, so a host clock read
    without this times the launches, not the work. A no-op on CPU runs."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
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


def time_grid(step, shard: Shard, grid, repeats: int, tick=None) -> list[list[float]]:
    """ms[tokens][context] of `step(rows)` on `shard`, each new batch pruned afterwards;
    `tick()` after each cell (progress)."""
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
            if tick:
                tick()
        out.append(row)
    return out


def batch_points(grid, quick: bool) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(rows per request, context per request) of each batched forward to measure: for
    B requests and n rows each (BATCH / QUICK_BATCH), all at the grid's second context,
    and spread evenly from 0 to its largest (0..512; quick 0..128)."""
    ctx = grid["context"]
    equal, top = ctx[min(1, len(ctx) - 1)], ctx[-1]
    spec = QUICK_BATCH if quick else BATCH
    out = []
    for B in spec["requests"]:
        for n in spec["tokens"]:
            out.append(((n,) * B, (equal,) * B))
            out.append(((n,) * B, tuple(round(b * top / (B - 1)) for b in range(B))))
    return out


def measure_batch(model, points, reps: int, device="cpu", tick=None) -> list[dict]:
    """ms per layer of one `forward_requests` forward over all the model's decoder layers
    (in sequence, divided by their number: cold weights, as the `layer` grid) at each
    point, then the pruning of its new rows (as `time_grid` prunes each batch): medians
    of `reps` after 2 warm-up runs. The KV is random (timing does not depend on its
    values); each request's rows are a star under its last committed row."""
    K = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    out = []
    for rows_n, ctxs in points:
        shards = [_random_kv(Shard(model, 0, K, embed=False, head=False, device=device), c,
                             gen) for c in ctxs]
        hidden = [torch.zeros(1, n, model.config.hidden_size, device=device, dtype=sh.dtype)
                  for n, sh in zip(rows_n, shards)]
        ids = iter(range(10**6, 10**9, 10**4))

        def once(shards=shards, hidden=hidden, rows_n=rows_n, ctxs=ctxs):
            base = next(ids)
            rows = [_tree(c, n, base) for n, c in zip(rows_n, ctxs)]
            forward_requests(shards, rows, [0] * len(rows), hidden)
            for sh, rs in zip(shards, rows):
                sh.apply(Update(kill=tuple(r.id for r in rs)))
        ms = _median_ms(once, reps)
        out.append({"rows": list(rows_n), "context": list(ctxs), "ms": round(ms / K, 4)})
        if tick:
            tick()
    return out


def _random_kv(shard: Shard, ctx: int, gen) -> Shard:
    """`shard` holding `ctx` committed rows with random keys and values (a chain)."""
    if ctx:
        cfg = shard.model.config
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        for i in range(shard.lo, shard.hi):
            k, v = (torch.randn(1, cfg.num_key_value_heads, ctx, d, generator=gen).mul_(0.5)
                    .to(shard.device, shard.dtype) for _ in range(2))
            shard.cache.update(k, v, i)
        shard.state.append([Row(i, i - 1, 1, i) for i in range(ctx)], ctx)
    return shard


def batch_report(profile) -> list[str]:
    """Lines on how well `Profile.batch_layer` models the measured batched forwards: one
    per point, then the mean and max |relative error|; [] without a batch section."""
    errs = profile.batch_error()
    if not errs:
        return []
    lines = []
    for e in errs:
        p = e.point
        ctx = (f"context {p.context[0]} each" if len(set(p.context)) == 1
               else f"contexts {min(p.context)}..{max(p.context)}")
        rows = f"{p.rows[0]} rows each" if len(set(p.rows)) == 1 else f"rows {list(p.rows)}"
        lines.append(f"  {len(p.rows)} requests x {rows}, {ctx}: measured {p.ms:.4g} ms, "
                     f"model {e.model_ms:.4g} ms ({e.error:+.1%})")
    a = [abs(e.error) for e in errs]
    lines.append(f"batch_layer ({profile.batching}) vs {len(errs)} measured batched forwards "
                 f"(ms per layer): mean |error| {statistics.fmean(a):.1%}, max {max(a):.1%}")
    return lines


def shape(name: str, cfg, layers: int | None = None, dtype_bytes: int = 4) -> dict:
    return {"name": name, "layers": layers or cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size,
            "dtype_bytes": dtype_bytes}


# ---- random-weight models of a shape (--target-shape / --draft-shape) ---------------------

SHAPE_PREFIX = "shape:"      # a spec "shape:NAME|config.json": random weights of that shape
SHAPE_STAGE_LAYERS = 6       # target layers built and timed in sequence: one stage of 80 / 14
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def is_shape(spec: str) -> bool:
    return spec.startswith(SHAPE_PREFIX)


def shape_spec(spec: str):
    """The ModelSpec of a "shape:..." spec (a preset name or an HF config.json path)."""
    from pipedec_sim.inputs.model_shapes import resolve_model
    return resolve_model(spec[len(SHAPE_PREFIX):], flag="--target-shape")


def shaped_model(spec: str, layers: int | None, device: str, dtype):
    """A seeded random-weight Llama of a shape spec with `layers` decoder layers (default
    all), built directly on `device` in `dtype` (as benchmarks/gpu/check.py does): no
    checkpoint is read. Returns (Loaded, ModelSpec)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from backends.torch.models import Loaded, tiny_encode
    m = shape_spec(spec)
    cfg = LlamaConfig(num_hidden_layers=min(layers or m.layers, m.layers),
                      hidden_size=m.hidden, intermediate_size=m.intermediate,
                      num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
                      vocab_size=m.vocab, tie_word_embeddings=m.tied,
                      max_position_embeddings=131072, rope_theta=500000.0,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)          # build in dtype: no float32 copy at peak
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)             # never time zeros or uninitialised memory
    return Loaded(spec, model.eval(), tiny_encode, None), m


def _short_name(spec: str) -> str:
    """A spec as it goes into a profile name: 'shape:llama-3.1-70b' -> 'llama-3.1-70b-shape'."""
    if is_shape(spec):
        return shape_spec(spec).name.split("/")[-1].lower() + "-shape"
    return spec


def _load_for_profile(spec: str, device: str, dtype, layers: int | None = None):
    """(Loaded, ModelSpec or None): a shape spec as random weights, else the checkpoint."""
    if is_shape(spec):
        return shaped_model(spec, layers, device, dtype)
    return load(spec), None


def _trimmed_mean(xs, trim: float = 0.02) -> float:
    xs = sorted(xs)
    k = int(len(xs) * trim)
    xs = xs[:len(xs) - k] if k else xs
    return statistics.fmean(xs)


# ---- child processes: the head owns an interrupt ----------------------------------------
# Ctrl-C signals the terminal's whole process group, children included; the head handles it
# (one line, exit 130) and ends its children, which must neither react (a traceback) nor
# outlive it. SIGTERM kills the head at once: its children then die with it.

LINK_TIMEOUT = timedelta(seconds=10)   # gloo between two local processes: a stall, not load


def _process(ctx, fn, *args, daemon: bool = True):
    """A child process of `ctx` running fn(*args) that dies with this one (`_child`)."""
    return ctx.Process(target=_child, args=(os.getpid(), fn, *args), daemon=daemon)


def _child(parent: int, fn, *args) -> None:
    from backends.torch.worker import die_with_parent
    die_with_parent()                 # SIGTERM when the parent dies...
    if os.getppid() != parent:         # ...or now: it died while this one imported torch
        os._exit(1)
    fn(*args)


def _start(*procs) -> None:
    """Start children with SIGINT ignored from their first instruction, before they import
    anything (SIG_IGN survives exec, Python keeps it, their children inherit it). A SIGINT
    to this process in the few milliseconds this takes is lost."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for p in procs:
            p.start()
    finally:
        signal.signal(signal.SIGINT, before)


def _end(procs, wait: bool) -> None:
    """Reap children: given 10 s to exit (`wait`: they are finishing), else killed at once
    with their own children."""
    for p in procs:
        if not wait and p.exitcode is None:     # not reaped: its pid is still its own
            _kill_tree(p.pid)
    for p in procs:
        p.join(10 if wait else 5)
        if p.is_alive():
            p.kill()
            p.join()


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants, every one stopped first (SIGSTOP, top down, so
    that none starts another meanwhile): none sees a peer vanish and reports it, none is left
    finishing its start-up. Descendants from /proc (Linux); elsewhere only `pid` itself."""
    tree = [pid]
    for p in tree:                     # grows as it goes
        try:
            os.kill(p, signal.SIGSTOP)
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    tree += [int(c) for c in f.read().split()]
        except OSError:                # gone already, or no /proc
            pass
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def measure_link(repeats: int = 200, hidden: int = 256, gap_s: float = 0.002
                 ) -> tuple[float, float, dict]:
    """(one-way latency ms, bandwidth Gbit/s, details) between two local gloo ranks.

    The latency is what a pipeline hop pays: a batch-shaped message (int64 header, rows
    [1, 4] and hidden [1, H], framed as the runtime sends them: `_batch_message`) to a
    process that sat idle in a receive (a `gap_s` pause before each ping), echoed back;
    one-way = half
    the round trip, mean of the central 98 % (a sum of hops accumulates means, not
    medians). Back-to-back ping-pong of one small tensor (the old measure) is kept in the
    details: on a VM it is ~4x lower, because neither process ever goes idle."""
    import multiprocessing as mp

    import torch.distributed as dist

    from backends.torch.runtime import loopback_store
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store, init = loopback_store(2)           # the rendezvous listens on 127.0.0.1 only
    ctx = mp.get_context("spawn")
    ready, ready_w = ctx.Pipe(duplex=False)
    child = _process(ctx, _echo, init, repeats, hidden, ready_w)
    _start(child)
    ok = False
    try:
        # The rendezvous blocks in C++, where a signal waits until it returns: wait here
        # (interruptible) while the child imports torch, so that it takes milliseconds.
        while not ready.poll(0.1):
            if child.exitcode is not None:
                raise RuntimeError(f"the link's echo process exited ({child.exitcode})")
        dist.init_process_group("gloo", store=store, rank=0, world_size=2,
                                timeout=LINK_TIMEOUT)
        small = torch.zeros(8, dtype=torch.int64)
        hot = []
        for _ in range(repeats):
            t = time.perf_counter()
            dist.send(small, 1)
            dist.recv(small, 1)
            hot.append(time.perf_counter() - t)
        msg = _batch_message(hidden)
        idle = []
        for _ in range(repeats):
            time.sleep(gap_s)
            t = time.perf_counter()
            works = [dist.isend(x, 1) for x in msg]
            for x in msg:
                dist.recv(x, 1)
            for w in works:
                w.wait()
            idle.append(time.perf_counter() - t)
        big = torch.zeros(4 * 2**20 // 4)               # 4 MiB of float32
        t = time.perf_counter()
        for _ in range(10):
            dist.send(big, 1)
        dist.recv(small, 1)
        secs = time.perf_counter() - t
        dist.destroy_process_group()
        ok = True
    finally:
        _end([child], ok)              # killed before our end of the link closes, if unfinished
        if dist.is_initialized():
            dist.destroy_process_group()
    lat = _trimmed_mean(idle) / 2 * 1e3
    details = {"hop_mean_ms": round(lat, 4),
               "hop_median_ms": round(statistics.median(idle) / 2 * 1e3, 4),
               "hot_pingpong_median_ms": round(statistics.median(hot) / 2 * 1e3, 4)}
    return lat, 10 * big.numel() * 4 * 8 / secs / 1e9, details


def _batch_message(hidden: int) -> list[torch.Tensor]:
    """A one-row batch message as the runtime puts it on the wire over gloo: the header,
    then the row and its hidden state packed into one payload (`Links.send_batch`), in
    the DATA stream's frame (`wire.frame`: one tensor while it fits)."""
    from backends.torch import wire
    return wire.frame([torch.zeros(wire.HEADER_LEN, dtype=torch.int64),
                       wire.pack(torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, hidden))],
                      wire.TAG_DATA)


def _echo(init: str, repeats: int, hidden: int, ready) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    ready.send(True)                    # torch is imported: the rendezvous is quick now
    try:
        dist.init_process_group("gloo", init_method=init, rank=1, world_size=2,
                                timeout=LINK_TIMEOUT)
        small = torch.zeros(8, dtype=torch.int64)
        for _ in range(repeats):
            dist.recv(small, 0)
            dist.send(small, 0)
        msg = _batch_message(hidden)
        for _ in range(repeats):
            for x in msg:
                dist.recv(x, 0)
            works = [dist.isend(x, 0) for x in msg]
            for w in works:
                w.wait()
        big = torch.zeros(4 * 2**20 // 4)
        for _ in range(10):
            dist.recv(big, 0)
        dist.send(small, 0)
        dist.destroy_process_group()
    except RuntimeError:                # gloo lost the head: if it died, its SIGTERM
        time.sleep(1)                   # (`_child`) ends this process quietly meanwhile;
        raise                           # if not, the failure is this one's own: shown


def _spin(seconds: float, out) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    x = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(1000):
            x += 1
    out.put((time.process_time() - c0) / (time.perf_counter() - t0))


def measure_core_share(max_n: int = 5, seconds: float = 1.0) -> list[float]:
    """The share of a core each of n busy processes gets, n = 1..max_n: shares[n-1].
    On an idle 2-core machine it is min(1, 2/n); foreign work (other users' processes)
    lowers it. The simulator's core pool runs n of our processes at shares[n-1] /
    shares[0] of the speed the profile measured (one process, shares[0])."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    out = []
    for n in range(1, max_n + 1):
        q = ctx.Queue()
        procs = [_process(ctx, _spin, seconds, q) for _ in range(n)]
        _start(*procs)
        shares = [q.get(timeout=seconds + 30) for _ in procs]
        for p in procs:
            p.join(5)
        out.append(round(min(1.0, statistics.fmean(shares)), 3))
    return out


def measure_head_overhead(events: int = 400) -> tuple[float, dict]:
    """ms the head spends per event outside the draft and the LM head: the strategy's
    `on()`, turning its actions into wire tensors (what `runtime.py` sends), and the
    reader-thread -> main-thread queue hand-off every inbound message takes. Measured on
    a PipeDec run with a synthetic always-right draft (width 4)."""
    import queue
    import threading

    from backends.torch import wire
    from backends.torch.shard import rows_tensor
    from pipedec_sim.protocol.messages import Draft as DraftAction
    from pipedec_sim.protocol.messages import (
        Drafted,
        EntryFree,
        Inject,
        Update,
        Verified,
    )
    from pipedec_sim.protocol.strategies import make_strategy

    def serialise(actions):
        for a in actions:
            if isinstance(a, Inject):
                wire.header(wire.BATCH, 1, id=a.batch.id, n=len(a.batch.rows))
                rows_tensor(a.batch.rows)
            elif isinstance(a, Update):
                wire.notices([(1, a)])

    n_tok = events // 3
    s = make_strategy("pipedec", list(range(1, 33)), n_tok, width=4, topk=4)
    todo = list(s.start())
    spent, count = 0.0, 0
    inflight = []
    while not s.done and count < 10 * events:
        drafts = [a for a in todo if isinstance(a, DraftAction)]
        inflight += [a.batch for a in todo if isinstance(a, Inject)]
        evs = [Drafted(d.ticket, {i: tuple((100 + k, -0.1 * (k + 1)) for k in range(d.k))
                                  for i in d.want}) for d in drafts]
        evs.append(EntryFree())
        if inflight:
            b = inflight.pop(0)
            evs.append(Verified(b.id, {r.id: 100 for r in b.rows[b.verify_from:]}))
        todo = []
        for e in evs:
            t = time.perf_counter()
            acts = s.on(e)
            serialise(acts)
            spent += time.perf_counter() - t
            count += 1
            todo += acts
    q: queue.Queue = queue.Queue()
    lat = []

    def producer():
        for _ in range(200):
            time.sleep(0.001)
            q.put(time.perf_counter())
    th = threading.Thread(target=producer, daemon=True)
    th.start()
    for _ in range(200):
        sent = q.get()
        lat.append(time.perf_counter() - sent)
    th.join()
    per_event = spent / max(count, 1) * 1e3
    handoff = statistics.median(lat) * 1e3
    return per_event + handoff, {"strategy_and_wire_ms": round(per_event, 4),
                                 "thread_handoff_ms": round(handoff, 4), "events": count}


def build_profile(target_spec: str, draft_spec: str, device: str, quick: bool,
                  command: str, steps: "Steps | None" = None, *, dtype: str | None = None,
                  stage_layers: int | None = None, cuda_graphs: bool = False) -> dict:
    """Measure a profile; `steps` reports the progress (default: a line per phase). A
    "shape:..." spec builds random weights of that shape in `dtype` (default bf16 on cuda,
    fp32 on cpu), the target with `stage_layers` layers (default SHAPE_STAGE_LAYERS).
    `cuda_graphs`: the layer grid, draft step and compaction are timed on the static-buffer
    shards a `--cuda-graphs on` run computes with (graphs.py; replayed graphs on CUDA)."""
    steps = steps or Steps(quick, device)
    _phase = steps.phase
    torch.set_num_threads(1)
    load_at_start = [round(x, 2) for x in os.getloadavg()]   # others' work on the cores
    grid = QUICK if quick else GRID
    reps = 5 if quick else 9
    dt = DTYPES[dtype or ("fp32" if device == "cpu" else "bf16")]
    target, tspec = _load_for_profile(target_spec, device, dt,
                                      stage_layers or SHAPE_STAGE_LAYERS)
    draft, dspec = _load_for_profile(draft_spec, device, dt)
    tm, cfg = target.model.to(device), target.config
    # Every layer in sequence, per layer: a stage streams its layers' weights from memory
    # in turn, so re-running one layer (whose weights then stay in cache: 14 MB for
    # SmolLM2, on a 32 MB L3) measures about half the real cost.
    K = cfg.num_hidden_layers
    layer = make_shard(tm, 0, K, embed=False, head=True, device=device,
                       cuda_graphs=cuda_graphs)
    H = cfg.hidden_size

    def layer_step(rows):
        layer.forward(rows, 0, torch.zeros(1, len(rows), H, device=device, dtype=layer.dtype))
    d = make_draft(draft.model.to(device), device, cuda_graphs)
    _phase("target layers")
    layer_ms = [[round(v / K, 4) for v in row] for row in time_grid(layer_step, layer, grid,
                                                                     reps, steps.step)]
    _phase("batched requests (one forward over several requests' contexts)")
    batch = measure_batch(tm, batch_points(grid, quick), reps, device, steps.step)
    _phase("draft step")
    draft_ms = time_grid(lambda rows: d.propose(rows, [r.id for r in rows], 16, 0),
                         d.shard, grid, reps, steps.step)
    _phase("LM head, embedding, KV compaction")
    lm = [round(_median_ms(lambda n=n: layer.logits(torch.zeros(1, n, H, device=device,
                                                                dtype=layer.dtype))
                           .argmax(-1), reps), 4) for n in grid["tokens"]]
    emb = [round(_median_ms(lambda n=n: tm.model.embed_tokens(
        torch.ones(1, n, dtype=torch.long, device=device)), reps), 4) for n in grid["tokens"]]
    compact = _compact_ms(tm, max(1, cfg.num_hidden_layers // 2), grid["context"][-1], device,
                          reps, cuda_graphs)
    steps.step()
    _phase("link between two processes")
    lat, bw, link_details = measure_link(50 if quick else 200, hidden=H)
    steps.step()
    _phase("head overhead")
    head_ms, head_details = measure_head_overhead(200 if quick else 600)
    steps.step()
    share, cpu_costs, cpu_details = None, {}, None       # CPU hosts only
    cold, cold_details = {}, None
    if device == "cpu":
        _phase("cold caches (compute after the caches were evicted)")
        ctx_mid = grid["context"][min(1, len(grid["context"]) - 1)]
        cold, cold_details = measure_cold(tm, d, ctx_mid, reps, layer)
        steps.step()
        _phase("core share")
        share = measure_core_share()
        steps.step()
        if tspec is None:
            _phase("CPU per message (real stage processes; about a minute)")
            cpu_costs, cpu_details = isolated_cpu_costs(target_spec)
        else:                   # stage processes load checkpoints: a shape has none
            _phase("CPU per message: skipped (random-weight shape, no checkpoint)")
        steps.step()
    import platform

    import transformers
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    host = host_record()
    host["load_average"] = load_at_start
    tname, dname = (f"{m.name} (shape)" if m else spec
                    for m, spec in ((tspec, target_spec), (dspec, draft_spec)))
    shaped_bytes = torch.finfo(dt).bits // 8       # checkpoints load in float32: 4
    shapes = "" if not (tspec or dspec) else (
        f" Random-weight {str(dt).split('.')[-1]} model(s) built from the shape (no checkpoint): "
        + "; ".join(f"{w} {m.source}" for w, m in (("target", tspec), ("draft", dspec)) if m)
        + (f"; the target's layer grid times {K} of its {tspec.layers} layers in sequence"
           if tspec else "")
        + ("; CPU per-message costs not measured (their stage processes load checkpoints)"
           if tspec and device == "cpu" else "") + ".")
    short = "-".join(_short_name(x) for x in (target_spec, draft_spec))
    return {
        "schema": "pipedec-profile/1",
        "name": (f"cpu-{short}" if device == "cpu" else f"{device}-{_short_name(target_spec)}")
        + ("-graphs" if cuda_graphs else ""),
        "provenance": {
            "kind": "measured", "device": _device_name(device), "date": date.today().isoformat(),
            "command": command, "versions": versions, "host": host,
            "notes": (f"medians of {reps} after 2 warm-up runs, 1 thread; layer = one decoder "
                      f"layer of the target, the mean over its {K} layers run in sequence (cold "
                      "weights, as in a stage); draft_step = one whole draft step incl. top-k; "
                      "link = gloo between two local processes, a batch-shaped message to an "
                      "idle receiver, mean one-way; head_overhead_ms = strategy step + wire "
                      "tensors + reader-thread hand-off per event; core_share = share of a "
                      "core each of n busy processes got while profiling (n = 1..5); batch = "
                      "one decoder layer (mean over the target's layers in sequence) over B "
                      "requests' rows in one forward (weights shared, attention per request "
                      "over its own context: batch.forward_requests; Profile.batch_error "
                      "compares batch_layer with it)."
                      + shapes + (GRAPHS_NOTE if cuda_graphs else "")),
            "details": {"link": link_details, "head_overhead": head_details,
                        **({"cpu_costs": cpu_details} if cpu_details else {}),
                        **({"cold": cold_details} if cold_details else {})},
        },
        "target": shape(tname, cfg, tspec.layers if tspec else None,
                        shaped_bytes if tspec else 4),
        "draft": shape(dname, draft.config, None, shaped_bytes if dspec else 4),
        "latency": {
            "layer": {**_axes(grid), "ms": layer_ms},
            "draft_step": {**_axes(grid), "ms": draft_ms},
            "lm_head": {"tokens": list(grid["tokens"]), "ms": lm},
            "embed": {"tokens": list(grid["tokens"]), "ms": emb},
            "kv_compact_ms": compact, "head_overhead_ms": round(head_ms, 4),
            **{k: v for k, v in cpu_costs.items() if k in CPU_FIELDS},
            **{k: v for k, v in cold.items() if k in COLD_FIELDS},
            "batch": batch,
        },
        "link": {"latency_ms": round(lat, 4), "bandwidth_gbps": round(bw, 3)},
        "devices": {"kind": "cpu" if device == "cpu" else "gpu",
                    "shared_cores": os.cpu_count() if device == "cpu" else None,
                    "core_share": share,
                    **{k: cpu_costs[k] for k in DEVICE_FIELDS if k in cpu_costs}},
        "split": None,
    }


GRAPHS_NOTE = (" --cuda-graphs on: layer, draft_step and kv_compact_ms timed on the "
               "static-buffer shards (rows padded to a bucket, KV preallocated; CUDA-graph "
               "replay on CUDA, the same code eagerly elsewhere); batch, lm_head and embed "
               "eager as before.")


class Steps:
    """The profiler's progress on stderr: on a terminal a bar over its measurements (each
    grid cell, each other phase) with the phase beside it; in a log a line per phase and
    one at every 10%; nothing when `quiet`. A context manager (the bar ends on error)."""

    def __init__(self, quick: bool, device: str, quiet: bool = False):
        from pipedec_sim.programs.flags import progress_bar
        grid = QUICK if quick else GRID
        cells = len(grid["tokens"]) * len(grid["context"])
        # the two grids, the batched forwards, then: LM head..., link, head overhead
        # (+ cold, core share, CPU)
        self.total = 2 * cells + len(batch_points(grid, quick)) + (6 if device == "cpu"
                                                                   else 3)
        self.done, self.quiet = 0, quiet
        self.bar = progress_bar("pipedec-real profile:", quiet, unit="step")
        self.bar(0, self.total)

    def phase(self, what: str) -> None:
        """A phase begins: named beside the bar, or on a line of its own."""
        if self.bar.tty:
            self.bar.note(what)
        elif not self.quiet:
            print(f"pipedec-real profile: {what}...", file=sys.stderr, flush=True)

    def step(self) -> None:
        self.done = min(self.done + 1, self.total)
        self.bar(self.done, self.total)

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _axes(grid) -> dict:
    return {"tokens": list(grid["tokens"]), "context": list(grid["context"])}


def llc_bytes() -> int | None:
    """The largest CPU cache this machine reports (sysfs), None where unknown."""
    import glob
    sizes = []
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(f).read().strip().upper()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * mult)
        except ValueError:
            pass
    return max(sizes) if sizes else None


def _fit_line(points) -> tuple[float, float]:
    """Least-squares a + b*x over (x, y) points, both clipped at 0."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
    if b < 0:
        b = 0.0
    a = my - b * mx
    if a < 0:
        a, b = 0.0, max(0.0, my / mx) if mx else 0.0
    return a, b


def measure_cold(model, draft, ctx: int, reps: int, head_shard) -> tuple[dict, dict]:
    """Cold minus warm compute (CPU hosts). In a pipeline on one host every stage's batch
    comes after the other stages, the LM head and the draft streamed their own weights
    through the shared caches: on a machine whose last-level cache holds a good part of
    the model, a back-to-back measure (the grids) is warm, the pipeline is not. For a
    stage of K layers (K = L/8, L/4, L/2, L; 1 and 4 decode rows at context `ctx`):
    flush (stream 2x the LLC, >= 256 MB), time the step (cold), time it again (warm);
    fit the median extra over K as cold_stage_ms + K * cold_layer_ms. The same for the
    LM head (1 row) and a draft step (1 row)."""
    L = model.config.num_hidden_layers
    H = model.config.hidden_size
    llc = llc_bytes()
    flush_bytes = min(max(2 * (llc or 0), 256 * 2**20), 2 * 2**30)
    buf = torch.ones(flush_bytes // 4)
    ids = iter(range(10**7, 10**9, 10))

    def pair(step) -> tuple[float, float]:
        buf.sum()                                   # evict: the rest of the pipeline ran
        t = time.perf_counter()
        step()
        cold = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        step()
        return cold, (time.perf_counter() - t) * 1e3

    def medians(step) -> tuple[float, float]:
        step()
        ps = [pair(step) for _ in range(reps)]
        return statistics.median(c for c, _ in ps), statistics.median(w for _, w in ps)

    stage_pts, details = [], {"llc_mb": round(llc / 2**20) if llc else None,
                              "flush_mb": flush_bytes // 2**20, "context": ctx, "stage": {}}
    for K in sorted({max(1, L // 8), max(1, L // 4), max(1, L // 2), L}):
        sh = Shard(model, 0, K, embed=False, head=False, device="cpu")
        _prefilled(sh, ctx)
        for n in (1, 4):
            def step(n=n, sh=sh):
                rows = _tree(ctx, n, next(ids))
                sh.forward(rows, ctx, torch.zeros(1, n, H, dtype=sh.dtype))
                sh.apply(Update(kill=tuple(r.id for r in rows)))
            c, w = medians(step)
            details["stage"][f"K{K}_n{n}"] = {"cold_ms": round(c, 4), "warm_ms": round(w, 4)}
            stage_pts.append((K, c - w))
    a, b = _fit_line(stage_pts)
    c, w = medians(lambda: head_shard.logits(torch.zeros(1, 1, H, dtype=head_shard.dtype))
                   .argmax(-1))
    details["lm_head"] = {"cold_ms": round(c, 4), "warm_ms": round(w, 4)}
    lm = max(0.0, c - w)
    _prefilled(draft.shard, ctx)

    def dstep():
        rows = _tree(ctx, 1, next(ids))
        draft.propose(rows, [r.id for r in rows], 4, ctx)
        draft.shard.apply(Update(kill=tuple(r.id for r in rows)))
    c, w = medians(dstep)
    details["draft_step"] = {"cold_ms": round(c, 4), "warm_ms": round(w, 4)}
    return ({"cold_stage_ms": round(a, 4), "cold_layer_ms": round(b, 4),
             "cold_lm_head_ms": round(lm, 4), "cold_draft_ms": round(max(0.0, c - w), 4)},
            details)



def _compact_ms(model, layers: int, ctx: int, device, reps: int,
                cuda_graphs: bool = False) -> float:
    """One prune of a `layers`-layer stage holding ctx committed + 16 tree rows."""
    shard = make_shard(model, 0, layers, embed=True, head=False, device=device,
                       cuda_graphs=cuda_graphs)
    ts = []
    for _ in range(reps):
        _prefilled(shard, ctx)
        shard.forward(_tree(ctx, 16, 10**6), 0)
        _sync()
        t = time.perf_counter()
        shard.apply(Update(kill=tuple(range(10**6, 10**6 + 8))))
        _sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(ts), 4)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform
    h = host_record()
    name = h.get("cpu_model") or platform.machine()
    cores = h.get("affinity_cores") or h["cpu_count"]
    return f"CPU {name} ({platform.machine()}), {cores} cores, 1 thread"


def profile_main(args) -> int:
    import shlex
    argv = getattr(args, "argv", None) or sys.argv[1:]      # as given to the CLI's main()
    command = "pipedec-real " + shlex.join(argv) if argv else "pipedec-real profile"
    t = time.perf_counter()
    with Steps(args.quick, args.device, args.quiet) as steps:
        prof = build_profile(args.target, args.draft, args.device, args.quick, command, steps,
                             dtype=getattr(args, "dtype", None),
                             stage_layers=getattr(args, "stage_layers", None),
                             cuda_graphs=getattr(args, "cuda_graphs", "off") == "on")
    save_profile(prof, args.out)
    print(f"wrote {args.out} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    lines = batch_report(parse_profile(prof))
    for line in lines if not args.quiet else lines[-1:]:
        print(line, file=sys.stderr)
    return 0


# ---- CPU work outside the compute (issue 6: simulator fidelity on shared cores) ---------

def _stage_cpu_child(cfg, j: int, world: int, init: str, out) -> None:
    """A real stage process (`worker.stage_main`) with CPU accounting: per request (RESET to
    REPORT) its process CPU (main + gloo threads), main-thread CPU, and the CPU inside
    `run_stage` and KV compaction, which the profile's grids already model."""
    from backends.torch import worker
    from backends.torch.shard import Shard
    acc = {"compute": 0.0, "compact": 0.0, "calls": []}
    marks = []
    run_stage, apply = worker.run_stage, Shard.apply

    def timed_run(shard, batch, hidden, **kw):
        ctx, c = shard.state.context, time.thread_time()
        res = run_stage(shard, batch, hidden, **kw)
        dc = (time.thread_time() - c) * 1e3
        acc["compute"] += dc
        acc["calls"].append((len(res[0].rows) if res[0] is not None else 0, ctx, dc))
        return res

    def timed_apply(self, update):
        c = time.thread_time()
        try:
            return apply(self, update)
        finally:
            acc["compact"] += (time.thread_time() - c) * 1e3

    def mark(orig):
        def handler(self, h):
            marks.append({"process": time.process_time() * 1e3, "main": time.thread_time() * 1e3,
                          "compute": acc["compute"], "compact": acc["compact"],
                          "calls": list(acc["calls"])})
            acc["calls"].clear()
            return orig(self, h)
        return handler
    worker.run_stage, Shard.apply = timed_run, timed_apply
    worker.Stage.on_reset = mark(worker.Stage.on_reset)
    worker.Stage.on_report = mark(worker.Stage.on_report)
    worker.stage_main(cfg, j, world, init, "")
    out.send((j, marks))


def _head_cycle(out, S: int, H: int, seq: int, rows, committed: int, *, ack: bool = True):
    """Send one batch into stage 1 and wait for stage 1's ack and the result from stage S."""
    from backends.torch import wire
    from backends.torch.shard import rows_tensor
    h = wire.header(wire.BATCH, seq, id=rows[0].id, n=len(rows), committed=committed)
    out.send([h, rows_tensor(rows)], 1)
    if ack:
        wire.recv(2, torch.int64, 1, wire.TAG_ACK)
    r = wire.recv(wire.HEADER_LEN, torch.int64, S)
    n = int(r[wire.N])
    if n:
        wire.recv_packed(n, H, S)


def _head_ring(out, S: int, H: int, seq: int, ctx: int, cycles: int, n: int, window: int,
               notices: bool) -> None:
    """`cycles` batches of n tree rows with `window` in flight: each result from stage S
    lets the next batch in (and, with `notices`, kills the returned rows: a prune notice
    that follows the batches already queued). Stage 1's acks are drained at the end."""
    from backends.torch import wire
    from backends.torch.shard import rows_tensor
    from pipedec_sim.protocol.messages import Row, Update

    def send(c):
        rows = [Row(10**6 + c * 100 + k, ctx - 1, 1 + k, ctx) for k in range(n)]
        out.send([wire.header(wire.BATCH, seq, id=rows[0].id, n=n, committed=ctx),
                  rows_tensor(rows)], 1)
    for c in range(min(window, cycles)):
        send(c)
    for c in range(cycles):
        r = wire.recv(wire.HEADER_LEN, torch.int64, S)
        m = int(r[wire.N])
        if m:
            ids = wire.recv_packed(m, H, S)[0][:, 0]
            if notices:                   # one notice message, as the runtime sends them
                out.send_notices([(seq, Update(kill=tuple(ids.tolist())))], (1,))
        if c + window < cycles:
            send(c + window)
    for _ in range(cycles):
        wire.recv(2, torch.int64, 1, wire.TAG_ACK)


def _busy_streamer() -> None:
    """Background load like a pipeline stage's: 4-row matmuls over ~100 MB of weights."""
    torch.set_num_threads(1)
    ws = [torch.randn(576, 1536) for _ in range(24)] + [torch.randn(576, 576) for _ in range(16)]
    x = torch.randn(4, 576)
    while True:                        # until killed
        for w in ws:
            x @ w


def measure_stage_overhead(target_spec: str, *, cycles: int = 40, n: int = 4, ctx: int = 64,
                           gap_s: float = 0.004, background: int = 0, stages: int = 2,
                           window: int = 1) -> tuple[dict, dict]:
    """CPU ms a stage process spends per message outside the modelled compute, on `stages`
    real stages (`worker.stage_main`, gloo, topology A) fed by this process acting as the
    head: one batch at a time after a `gap_s` idle pause (window 1: a stage that waits), or
    `window` batches in flight back to back (a saturated pipeline, every process runnable).

    Two requests: `cycles` batches of n tree rows; then `cycles` x (batch, prune notice
    message killing it). Per stage: batch_ms = (process CPU - run_stage CPU) / batches of
    the first; notice_ms = the second's extra CPU per notice message (the runtime sends
    one per event, however many notices it carries), KV compaction excluded. Also
    compute_after_idle = run_stage CPU / the profile-style back-to-back time of the same
    rows (median over the batches; the idle gap cools caches). Returns (fields, details)."""
    import multiprocessing as mp

    import torch.distributed as dist

    from backends.torch import wire
    from backends.torch.link import connect
    from backends.torch.runtime import loopback_store
    from backends.torch.worker import IDLE_TIMEOUT, StageConfig
    from pipedec_sim.protocol.messages import Row, Update
    S = stages
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store, init = loopback_store(S + 1)       # the rendezvous listens on 127.0.0.1 only
    cfg = StageConfig(target_spec, S)
    ctxm = mp.get_context("spawn")
    # Pipes, not queues or events: their semaphores, left by a killed process, would make
    # the resource tracker warn on stderr.
    pipes = [ctxm.Pipe(duplex=False) for _ in range(S)]
    kids = [_process(ctxm, _stage_cpu_child, cfg, j, S + 1, init, pipes[j - 1][1])
            for j in range(1, S + 1)]
    busy = [_process(ctxm, _busy_streamer) for _ in range(background)]
    _start(*kids, *busy)
    ok = False
    try:
        H = load(target_spec).config.hidden_size
        dist.init_process_group("gloo", store=store, rank=0, world_size=S + 1,
                                timeout=IDLE_TIMEOUT)
        connect(0, S + 1, "cpu", "gloo", H, torch.float32)   # the stages' handshake
        out = wire.Outbox()
        prefix = [Row(i, i - 1, 1 + i % 200, i) for i in range(ctx)]
        head_cpu = []
        for seq, notices in ((1, False), (2, True)):
            out.send([wire.header(wire.RESET, seq)], 1)
            _head_cycle(out, S, H, seq, prefix, ctx)
            c0 = time.process_time()
            if window > 1:
                _head_ring(out, S, H, seq, ctx, cycles, n, window, notices)
            for c in range(cycles if window == 1 else 0):
                time.sleep(gap_s)
                rows = [Row(10**6 + c * 100 + k, ctx - 1, 1 + k, ctx) for k in range(n)]
                _head_cycle(out, S, H, seq, rows, ctx)
                if notices:               # one notice message, as the runtime sends them
                    time.sleep(gap_s)
                    kill = Update(kill=tuple(r.id for r in rows))
                    out.send_notices([(seq, kill)], (1,))
            head_cpu.append((time.process_time() - c0) * 1e3)
            out.send([wire.header(wire.REPORT, seq), torch.zeros((S, 2), dtype=torch.int64)], 1)
            r = wire.recv(wire.HEADER_LEN, torch.int64, S)
            wire.recv((S, 2), torch.int64, S)
            if int(r[wire.N]):                           # the stages' timeline slices
                wire.recv((int(r[wire.N]), 6), torch.float64, S)
        out.send([wire.header(wire.STOP, 3)], 1)
        wire.recv(wire.HEADER_LEN, torch.int64, S)      # STOP comes back from the last stage
        wire.recv(2, torch.int64, 1, wire.TAG_ACK)      # and stage 1 ends the ack stream
        out.flush()
        if not all(r.poll(60) for r, _ in pipes):
            raise TimeoutError("a stage process sent no CPU accounting in 60 s")
        marks = dict(r.recv() for r, _ in pipes)
        dist.destroy_process_group()
        ok = True
    finally:
        _end(busy, wait=False)
        _end(kids, wait=ok)
    fields, details = _overhead_fields(marks, cycles, n)
    # The head's wire CPU per batch round trip covers two inbound events (ack, result).
    fields["head_event_ms"] = round(head_cpu[0] / cycles / 2, 4)
    return fields, details


def measure_cpu_costs(target_spec: str, *, background: int = 2) -> tuple[dict, dict]:
    """The optional CPU-host profile fields (see pipedec_sim/inputs/profile/): per-message
    costs measured with `background` streaming processes beside the head and 2 stages
    (background 2: five busy processes, as a 4-stage pipeline on its cores), and
    contention_slowdown = a stage's compute CPU then / on a quiet machine."""
    quiet_fields, quiet = measure_stage_overhead(target_spec)
    loaded_fields, loaded = measure_stage_overhead(target_spec, background=background)
    ring_fields, ring = measure_stage_overhead(target_spec, stages=4, window=5)
    a, b = quiet["run_stage_cpu_median_ms"], loaded["run_stage_cpu_median_ms"]
    # Per-message costs: the quiet ones, times message_contention while the cores are
    # oversubscribed (a saturated 4-stage ring: every process runnable, as PipeDec keeps
    # them); compute slows by contention_slowdown (the streamers' measurement).
    fields = {**quiet_fields, "head_event_ms": loaded_fields["head_event_ms"],
              "contention_slowdown": round(max(1.0, b / a), 3) if a and b else 1.0,
              "message_contention": round(max(1.0, ring_fields["stage_message_ms"]
                                              / quiet_fields["stage_message_ms"]), 3)}
    return fields, {"background": background, "quiet": {**quiet_fields, **quiet},
                    "loaded": {**loaded_fields, **loaded}, "ring4": {**ring_fields, **ring},
                    "load_average": os.getloadavg()}


def _cpu_costs_child(target_spec: str, out) -> None:
    out.send(measure_cpu_costs(target_spec))


def isolated_cpu_costs(target_spec: str) -> tuple[dict, dict]:
    """measure_cpu_costs in a child process: a gloo abort there (a transport that changed
    under it) leaves a profile without the optional fields instead of no profile."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    results, out = ctx.Pipe(duplex=False)      # no queue: see measure_stage_overhead
    p = _process(ctx, _cpu_costs_child, target_spec, out, daemon=False)   # it has children
    _start(p)
    ok = False
    try:
        for _ in range(600):
            if results.poll(1.0):
                ok = True
                return results.recv()
            if p.exitcode is not None:
                break
        ok = True
        return {}, {"error": f"measure_cpu_costs failed (exit {p.exitcode})"}
    finally:
        _end([p], wait=ok)


def _overhead_fields(marks: dict, cycles: int, n: int) -> tuple[dict, dict]:
    """Per stage and phase: CPU outside compute + compaction, per message."""
    def delta(m, a, b):
        x, y = m[a], m[b]
        other = (y["process"] - x["process"]) - (y["main"] - x["main"])
        outside = (y["main"] - x["main"]) - (y["compute"] - x["compute"]) - (
            y["compact"] - x["compact"])
        return outside, other, [c for c in y["calls"] if c[0] == n]
    per_stage, idle_cpu = {}, []
    for j, m in sorted(marks.items()):
        # marks: RESET 1, REPORT 1, RESET 2, REPORT 2 (calls are attached at the next mark)
        o1, t1, calls = delta(m, 0, 1)
        o2, t2, _ = delta(m, 2, 3)
        msgs1 = cycles + 1
        batch = (o1 + t1) / msgs1
        notice = max((o2 + t2) - batch * msgs1, 0.0) / cycles
        per_stage[j] = {"batch_main_ms": round(o1 / msgs1, 4),
                        "batch_threads_ms": round(t1 / msgs1, 4),
                        "batch_ms": round(batch, 4), "notice_ms": round(notice, 4)}
        idle_cpu += [c[2] for c in calls]
    fields = {"stage_message_ms": round(statistics.fmean(s["batch_ms"]
                                                         for s in per_stage.values()), 4),
              "stage_notice_ms": round(statistics.fmean(s["notice_ms"]
                                                        for s in per_stage.values()), 4)}
    return fields, {"per_stage": per_stage, "run_stage_cpu_median_ms":
                    round(statistics.median(idle_cpu), 4) if idle_cpu else None}
