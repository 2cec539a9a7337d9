"""Several requests' rows through one shard's decoder layers in ONE padded forward.

Serving puts rows of several requests into one step; `BatchedRequests` computes them
together, each request over its own KV context and tree (one additive mask), and gives
each request's rows what its own unbatched `Shard.forward` gives (tests/test_batch_profile.py).
`pipedec-real profile` times it (`latency.batch`); the inline serving driver can compute
a step with it (`backends/torch/serve.py`, `batched=True`).
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from backends.torch.compat import with_cache
from backends.torch.shard import Shard
from pipedec_sim.protocol.messages import Row
from pipedec_sim.protocol.stage_state import StageState


class BatchedRequests:
    """Decoder layers lo..hi-1 of `model` over B requests' rows in ONE forward, request b
    holding its own KV context of c_b rows (a `StageState` each: its tree, its prefix).

    How: right-pad to one tensor. Hidden states [B, N, H] (N = the most new rows of any
    request; a shorter request's extra rows are padding), KV [B, kv_heads, C, d] per
    layer (C = the longest context; request b's cache in columns 0..c_b-1, zeros after),
    built directly into a transformers `DynamicCache` whose layers then append the N new
    rows at columns C..C+N-1. Position ids [B, N] are each row's own position (RoPE per
    request), and one additive float mask [B, 1, N, C+N] (finfo.min where hidden) gives
    request b's row k exactly what `StageState.mask` gives it unbatched: its committed
    prefix and speculative ancestors (columns < c_b and its own new rows), never another
    request's or a padding column; a padding row sees only itself. The output of request
    b's real rows is what its own unbatched `Shard.forward` gives (float rounding aside:
    tests/test_batch_profile.py). The cost is that of dense padded attention: every
    request's rows attend over C + N columns, not over its own c_b + n_b."""

    def __init__(self, model, lo: int, hi: int, states: list[StageState],
                 kv: list[tuple[torch.Tensor, torch.Tensor]], device="cpu"):
        """`kv[i]`: layer lo+i's padded (keys, values) [B, kv_heads, C, d], C the largest
        `states[b].context` (see `pad_kv`); they go into the cache as they are."""
        self.model, self.lo, self.hi = model, lo, hi
        self.layers = [model.model.layers[i] for i in range(lo, hi)]
        self.states = states
        self.contexts = [s.context for s in states]
        self.c_max = max(self.contexts)
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self.cache = DynamicCache(config=model.config)
        if self.c_max:
            for i, (k, v) in zip(range(lo, hi), kv):
                assert k.shape[0] == len(states) and k.shape[-2] == self.c_max
                self.cache.update(k, v, i)

    @classmethod
    def from_shards(cls, shards: list[Shard]) -> "BatchedRequests":
        """The requests of unbatched `shards` (same model and layers), their caches copied
        into padded tensors; the shards are left as they were."""
        s0 = shards[0]
        per = [[(sh.cache.layers[i].keys, sh.cache.layers[i].values) if sh.kv_len() else None
                for i in range(s0.lo, s0.hi)] for sh in shards]
        kv = pad_kv(per, [sh.kv_len() for sh in shards], s0.model.config, s0.dtype,
                    s0.device)
        return cls(s0.model, s0.lo, s0.hi, [sh.state for sh in shards], kv, s0.device)

    def mask(self, rows: list[list[Row]], n_max: int) -> torch.Tensor:
        """The additive mask [B, 1, n_max, C + n_max] (class docstring)."""
        B, C = len(rows), self.c_max
        m = np.zeros((B, n_max, C + n_max), dtype=bool)
        for b, (st, rs) in enumerate(zip(self.states, rows)):
            c, n = self.contexts[b], len(rs)
            own = st.mask(rs)                                  # [n, c + n]
            m[b, :n, :c] = own[:, :c]
            m[b, :n, C:C + n] = own[:, c:]
            for k in range(n, n_max):
                m[b, k, C + k] = True                           # padding rows: themselves
        f = torch.zeros(m.shape, dtype=self.dtype, device=self.device)
        f.masked_fill_(~torch.from_numpy(m).to(self.device), torch.finfo(self.dtype).min)
        return f.view(B, 1, n_max, C + n_max)

    @torch.inference_mode()
    def forward(self, rows: list[list[Row]], hidden: torch.Tensor) -> torch.Tensor:
        """Request b's `rows[b]` (hidden[b, :len(rows[b])]; hidden [B, n_max, H]) through
        the layers: output [B, n_max, H], the padding rows' outputs meaningless. The new
        rows' KV stays appended after column C until `drop_new` (the states are not told:
        the measurement prunes them again, as `time_grid` does)."""
        n_max = hidden.shape[1]
        hidden = hidden.to(self.device, self.dtype)
        mask = self.mask(rows, n_max)
        pos = torch.tensor([[r.pos for r in rs] + [0] * (n_max - len(rs)) for rs in rows],
                           device=self.device)
        pe = self.model.model.rotary_emb(hidden, pos)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=pos, use_cache=True,
                           position_embeddings=pe, **with_cache(self.cache))
            if isinstance(hidden, tuple):          # older transformers return (hidden, ...)
                hidden = hidden[0]
        return hidden

    def drop_new(self) -> None:
        """Prune the rows the last forward appended: index_select back to the C context
        columns (as a stage compacts its KV after a prune notice)."""
        keep = torch.arange(self.c_max, device=self.device)
        for i in range(self.lo, self.hi):
            layer = self.cache.layers[i]
            layer.keys = layer.keys.index_select(-2, keep)
            layer.values = layer.values.index_select(-2, keep)


def pad_kv(per_request, contexts: list[int], config, dtype, device
           ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the requests' caches right-padded with zeros: per_request[b][i] is
    (keys, values) [1, kv_heads, contexts[b], d] of layer i (None where contexts[b] is
    0); returns [(keys, values) [B, kv_heads, C, d]] (C = max(contexts))."""
    B, C = len(per_request), max(contexts)
    kvh = config.num_key_value_heads
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    out = []
    for i in range(len(per_request[0])):
        K = torch.zeros(B, kvh, C, d, dtype=dtype, device=device)
        V = torch.zeros_like(K)
        for b, c in enumerate(contexts):
            if c:
                K[b, :, :c] = per_request[b][i][0][0]
                V[b, :, :c] = per_request[b][i][1][0]
        out.append((K, V))
    return out
