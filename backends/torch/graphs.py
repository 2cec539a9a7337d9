"""CUDA graphs for a stage's layer batch and the draft step (`--cuda-graphs on`).

Eager decoding launches ~15 kernels per decoder layer from Python, so at a few rows the
GPU waits on the host (the eager H100 profile: a 1B-shaped draft step 11 ms of wall time
for 2.4 ms of kernels). A CUDA graph replays a captured kernel sequence with one launch,
but only on fixed shapes and fixed memory, which transformers' DynamicCache (a growing
tensor per layer) and per-batch masks are not. `GraphShard` is a `Shard` whose compute
runs on static buffers instead:

* KV: one preallocated buffer for all its layers, [layers, 2, kv_heads, slots, head_dim];
  the first `state.context` slots are the cache, in the bookkeeping's row order, the rest
  is scratch. A prune compacts it in place (one index_select, one copy); a cancelled
  batch's keys are simply not counted. It grows (and drops its graphs) when a request
  needs more slots.
* A batch of n rows is padded to a row bucket B (`BUCKETS`) and attends over a key bucket
  C (a power of two, at least context + B). The rows' token ids (or hidden states),
  positions, KV slots and additive tree mask are copied into static tensors before each
  call; padding rows attend only to their own slot (finite garbage, never seen by a real
  row) and their outputs are dropped.
* On CUDA each (B, C) is captured into one `torch.cuda.CUDAGraph` on first use (warmed up
  on a side stream, as PyTorch documents; one memory pool per shard) and replayed. On the
  CPU the same padded code runs eagerly: what the CPU tests compare with `Shard`.
* Eager fallback: a batch larger than the last bucket (a prompt) runs the same layer code
  at its exact size. A graph cannot stop between layers, so with a graph the cancel
  question (`between`) is asked once, after the whole batch.

`GraphDraft` captures the draft step whole: layers, final norm, LM head, log-softmax and
top-`KMAX` over all B rows; the host keeps the wanted rows (a larger k runs eagerly).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from backends.torch.batch import layer_out, qkv
from backends.torch.shard import DraftModel, Shard
from pipedec_sim.protocol.messages import Update

BUCKETS = (1, 2, 4, 8, 16, 32, 64)   # row counts captured (a PipeDec layer, a tree-SD tree)
MIN_KEYS = 64                        # the smallest key bucket
SLOTS = 1024                         # initial KV slots per shard (grows on demand)
KMAX = 16                            # top-k the captured draft step returns per row


def row_bucket(n: int, buckets=BUCKETS) -> int | None:
    """The smallest bucket holding n rows, None beyond the last."""
    return next((b for b in buckets if b >= n), None)


def key_bucket(need: int, slots: int) -> int:
    """Keys attended over: the smallest power of two >= need (at least MIN_KEYS), capped
    at the buffer."""
    c = MIN_KEYS
    while c < need:
        c *= 2
    return min(c, slots)


class GraphShard(Shard):
    """A Shard on static buffers: CUDA-graph replay per (row, key) bucket (module doc)."""

    def __init__(self, model, lo: int, hi: int, *, embed: bool, head: bool, device="cpu",
                 capture: bool | None = None, slots: int = SLOTS, topk: int = 0,
                 buckets=BUCKETS):
        super().__init__(model, lo, hi, embed=embed, head=head, device=device)
        cfg = model.config
        self.cache = None                  # the static buffer holds the KV
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.topk, self.buckets = topk, tuple(buckets)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None
        self.calls = {"replay": 0, "padded_eager": 0, "exact": 0, "captured": 0}
        self._allocate(slots)

    def _allocate(self, slots: int) -> None:
        """(Re)allocate every static buffer for `slots` KV rows; drops captured graphs,
        which point at the old ones."""
        cfg, dev, dt = self.model.config, self.device, self.dtype
        self.slots, self.graphs, self.pool = slots, {}, None
        self.kv = torch.zeros(self.hi - self.lo, 2, cfg.num_key_value_heads, slots,
                              self.head_dim, device=dev, dtype=dt)
        bmax = self.buckets[-1]
        self.ints = torch.zeros(3, bmax, dtype=torch.int64, device=dev)  # ids, pos, slots
        self.x_in = torch.zeros(1, bmax, cfg.hidden_size, device=dev, dtype=dt)
        self.masks = {b: torch.zeros(1, 1, b, slots, device=dev, dtype=dt)
                      for b in self.buckets}
        # rotary cos/sin of every position, gathered by the rows' positions in the graph
        pos = torch.arange(slots, device=dev)[None]
        self.cos, self.sin = self.model.model.rotary_emb(self.x_in[:, :1], pos)

    # ---- KV bookkeeping ------------------------------------------------------------------
    def reset(self) -> None:
        """A new request: nothing counted (the buffers and graphs stay)."""
        self.state.reset()

    def kv_len(self) -> int:
        return self.state.context

    def _crop(self, upto: int) -> None:
        """Nothing to cut: slots past `state.context` are scratch."""

    @torch.inference_mode()
    def apply(self, update: Update) -> bool:
        """A prune notice: compact the KV in place (the graphs keep their buffer)."""
        keep = self.state.apply(update)
        if keep is None:
            return False
        idx = torch.from_numpy(keep).to(self.device)
        self.kv[:, :, :, :len(keep)] = self.kv.index_select(3, idx)
        return True

    def _ensure(self, need: int) -> None:
        if need <= self.slots:
            return
        old = self.kv[:, :, :, :self.state.context].clone()
        self._allocate(max(need, 2 * self.slots))
        self.kv[:, :, :, :old.shape[3]] = old

    # ---- compute ---------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, rows, committed: int, hidden=None, *, between=None):
        outs = self.run(rows, hidden, between)
        if outs is None:
            return None
        self.state.append(rows, committed)
        return outs[0]

    def run(self, rows, hidden, between=None):
        """The rows' outputs (hidden [1, n, H], then with `topk` the top-k ids and
        log-probs [n, topk]; the exact path gives hidden only), or None if `between`
        abandoned them. Records nothing in the bookkeeping."""
        n, ctx = len(rows), self.state.context
        B = row_bucket(n, self.buckets)
        self._ensure(ctx + (B or n))
        if B is None:
            self.calls["exact"] += 1
            return self._exact(rows, hidden, between)
        C = key_bucket(ctx + B, self.slots)
        self._fill(rows, hidden, B, C)
        if self.capture:
            outs = self._replay(B, C)
            outs = tuple(o[:, :n].clone() if o.dim() == 3 else o[:n].clone() for o in outs)
        else:
            self.calls["padded_eager"] += 1
            outs = tuple(o[:, :n] if o.dim() == 3 else o[:n] for o in self._body(B, C))
        if between is not None and between(frozenset(r.id for r in rows)):
            return None
        return outs

    def _fill(self, rows, hidden, B: int, C: int) -> None:
        """Copy a batch into the static inputs of bucket (B, C)."""
        n, ctx = len(rows), self.state.context
        ints = np.zeros((3, B), dtype=np.int64)
        ints[0, :n] = [r.token for r in rows]
        ints[1, :n] = [r.pos for r in rows]
        ints[2] = np.arange(ctx, ctx + B)
        self.ints[:, :B].copy_(torch.from_numpy(ints))
        if not self.has_embed:
            self.x_in[:, :n].copy_(hidden)
        self.masks[B][0, 0, :, :C].copy_(self._mask(rows, B, C))

    def _mask(self, rows, B: int, C: int) -> torch.Tensor:
        """The additive tree mask [B, C] (float: bool masks are wrong on the eager path,
        ENV.md); padding rows see their own slot only, so nothing becomes NaN."""
        n, ctx = len(rows), self.state.context
        m = self.state.mask(rows)
        f = np.full((B, C), torch.finfo(self.dtype).min, dtype=np.float32)
        f[:n, :m.shape[1]][m] = 0.0
        pad = np.arange(n, B)
        f[pad, ctx + pad] = 0.0
        return torch.from_numpy(f)

    def _body(self, B: int, C: int) -> tuple:
        """Bucket (B, C) on the static buffers: the code a graph captures."""
        ids, pos, slots = self.ints[0:1, :B], self.ints[1:2, :B], self.ints[2, :B]
        x = self.model.model.embed_tokens(ids) if self.has_embed else self.x_in[:, :B]
        out = self._layers(x.to(self.dtype), pos, slots, self.masks[B][..., :C], C)
        assert out is not None
        return self._outputs(out)

    def _exact(self, rows, hidden, between) -> tuple | None:
        """A batch beyond the buckets, eagerly at its exact size (cancel between layers)."""
        n, ctx = len(rows), self.state.context
        dev = self.device
        if self.has_embed:
            hidden = self.model.model.embed_tokens(torch.tensor([[r.token for r in rows]],
                                                                device=dev))
        pos = torch.tensor([[r.pos for r in rows]], device=dev)
        slots = torch.arange(ctx, ctx + n, device=dev)
        mask = self._mask(rows, n, ctx + n).to(dev, self.dtype).view(1, 1, n, ctx + n)
        ids = frozenset(r.id for r in rows) if between is not None else None
        out = self._layers(hidden.to(dev, self.dtype), pos, slots, mask, ctx + n,
                           (lambda: between(ids)) if between is not None else None)
        return None if out is None else (out,)

    def _layers(self, x, pos, slots, mask, C: int, stop=None):
        cos, sin = self.cos[:, pos[0]], self.sin[:, pos[0]]
        for i, layer in enumerate(self.layers):
            x = self._layer(layer, i, x, cos, sin, slots, mask, C)
            if stop is not None and stop():
                return None
        return x

    def _layer(self, layer, i: int, x, cos, sin, slots, mask, C: int):
        """Llama's decoder layer (batch.qkv, batch.layer_out) with its KV written into slots `slots`
        of the static buffer and attention over the first C of them."""
        q, k, v = qkv(layer, x, cos, sin)
        kv = self.kv[i]
        kv[0].index_copy_(1, slots, k[0])
        kv[1].index_copy_(1, slots, v[0])
        o = F.scaled_dot_product_attention(q, kv[0, :, :C][None], kv[1, :, :C][None],
                                           attn_mask=mask, scale=layer.self_attn.scaling,
                                           enable_gqa=True)
        return layer_out(layer, x, o)

    def _outputs(self, x) -> tuple:
        if not self.topk:
            return (x,)
        logp = torch.log_softmax(self.logits(x), -1)
        top = torch.topk(logp, min(self.topk, logp.shape[-1]), dim=-1)
        return x, top.indices, top.values

    # ---- CUDA graphs -------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self) -> None:
        """Capture every (row, key) bucket of the current buffer now, so that a run does
        not pay captures inside its first requests. Only before a request: the capture
        warm-ups write scratch keys at slot 0."""
        assert self.state.context == 0, "prepare() before any request"
        self.ints.zero_()
        for B in self.buckets:
            self.masks[B].zero_()
            C = key_bucket(B, self.slots)
            while True:
                if (B, C) not in self.graphs:
                    self.graphs[(B, C)] = self._capture(B, C)
                if C >= self.slots:
                    break
                C = key_bucket(C + 1, self.slots)

    def _replay(self, B: int, C: int) -> tuple:
        if (B, C) not in self.graphs:
            self.graphs[(B, C)] = self._capture(B, C)
        graph, outs = self.graphs[(B, C)]
        graph.replay()
        self.calls["replay"] += 1
        return outs

    def _capture(self, B: int, C: int) -> tuple:
        """Capture bucket (B, C) on its current inputs. The warm-up on a side stream does
        the lazy set-up (cuBLAS handles, kernel choice) outside the capture; it computes
        what the replay will (the same keys into the same slots)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._body(B, C)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the runtime's reader threads may touch CUDA meanwhile
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outs = self._body(B, C)
        self.calls["captured"] += 1
        return graph, outs


class GraphDraft(DraftModel):
    """The draft on a GraphShard: a step is one replay up to the top-k (module doc)."""

    def __init__(self, model, device="cpu", *, capture: bool | None = None, kmax: int = KMAX):
        self.shard = GraphShard(model, 0, model.config.num_hidden_layers, embed=True,
                                head=True, device=device, capture=capture, topk=kmax)

    @torch.inference_mode()
    def propose_live(self, live, want, k: int, committed: int) -> dict[int, tuple]:
        outs = self.shard.run(live, None)
        self.shard.state.append(live, committed)
        if len(outs) == 1 or k > self.shard.topk:       # exact path, or more than captured
            return self.top_k(live, outs[0], want, k)
        at = {r.id: j for j, r in enumerate(live)}
        wanted = [i for i in want if i in at]
        if not wanted:
            return {}
        sel = torch.tensor([at[i] for i in wanted], device=outs[1].device)
        toks = outs[1].index_select(0, sel)[:, :k].tolist()
        lps = outs[2].index_select(0, sel)[:, :k].tolist()
        return {i: tuple(zip(t, p)) for i, t, p in zip(wanted, toks, lps)}


def make_shard(model, lo: int, hi: int, *, embed: bool, head: bool, device="cpu",
               cuda_graphs: bool = False) -> Shard:
    """A stage's Shard: on static buffers (graphs on CUDA) with `cuda_graphs`."""
    if not cuda_graphs:
        return Shard(model, lo, hi, embed=embed, head=head, device=device)
    shard = GraphShard(model, lo, hi, embed=embed, head=head, device=device)
    if shard.capture:
        shard.prepare()
    return shard


def make_draft(model, device="cpu", cuda_graphs: bool = False) -> DraftModel:
    if not cuda_graphs:
        return DraftModel(model, device)
    draft = GraphDraft(model, device)
    if draft.shard.capture:
        draft.shard.prepare()
    return draft
