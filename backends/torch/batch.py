"""Several requests' rows through one shard's decoder layers in ONE forward.

Serving puts rows of several requests into one step. `forward_requests` computes them
together the way a varlen (paged) attention kernel does, which is what the profile's
default `batching = "requests"` prices: the rows of every request go through the
weights as one [1, N, H] sequence (the projections, o_proj and the MLP: the weight work
is shared), and each request's queries attend only over its own KV cache and its own
tree (one `scaled_dot_product_attention` per request, with the mask `StageState.mask`
gives it). Nothing is padded and no cache is copied: each request's new keys and values
are appended to its own `DynamicCache`, as its own `Shard.forward` would append them.
Each request's output equals its unbatched `Shard.forward` (float rounding aside:
tests/test_batch_profile.py).

Used by the serving stage processes (`serve_worker.py`), the serving head's draft pass
(`propose_requests`), the inline serving driver (`serve.py`, `batched=True`) and
`pipedec-real profile` (`latency.batch`). The decoder layer is Llama's (input norm,
attention with rotary positions and grouped KV heads, residual, post norm, MLP,
residual), unrolled here so the weight work can be shared between requests.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from backends.torch.shard import DraftModel, Shard, top_k_children
from pipedec_sim.protocol.messages import Row


@torch.inference_mode()
def forward_requests(shards: Sequence[Shard], rows: Sequence[Sequence[Row]],
                     committed: Sequence[int], hidden: Sequence[torch.Tensor] | None = None,
                     *, between: Callable[[], bool] | None = None
                     ) -> list[torch.Tensor] | None:
    """Request b's live `rows[b]` through `shards[b]` (one holder per request, all over
    the same model's layers lo..hi-1), in one forward. hidden[b] is its input [1, n_b, H]
    (None: the shards embed). Returns each request's output [1, n_b, H]; each shard then
    holds its rows' KV and bookkeeping, as after `shards[b].forward(rows[b], ...)`.

    `between()`, if given, is asked after each decoder layer whether to abandon the
    step; if it says so, every shard's appended KV is cut back and None is returned."""
    s0 = shards[0]
    assert len({id(s) for s in shards}) == len(shards), "one part per request per forward"
    for sh in shards:
        assert sh.kv_len() == sh.state.context, "KV cache and bookkeeping disagree"
    spans = _spans([len(r) for r in rows])
    x = _inputs(shards, rows, hidden)
    pos = torch.tensor([[r.pos for rs in rows for r in rs]], device=s0.device)
    cos, sin = s0.model.model.rotary_emb(x, pos)
    masks = [_mask(sh, rs) for sh, rs in zip(shards, rows)]
    for i in range(s0.lo, s0.hi):
        x = _layer(s0.model.model.layers[i], i, x, cos, sin, shards, spans, masks)
        if between is not None and between():
            for sh in shards:
                sh._crop(i + 1)
            return None
    for sh, rs, c in zip(shards, rows, committed):
        sh.state.append(list(rs), c)
    return [x[:, a:b] for a, b in spans]


def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each request's rows in the joined sequence."""
    out, a = [], 0
    for n in sizes:
        out.append((a, a + n))
        a += n
    return out


def _inputs(shards, rows, hidden) -> torch.Tensor:
    """The joined input [1, N, H]: the rows' embeddings, or the given hidden states."""
    s0 = shards[0]
    if hidden is None:
        assert s0.has_embed, "hidden states are needed past the first stage"
        ids = torch.tensor([[r.token for rs in rows for r in rs]], device=s0.device)
        return s0.model.model.embed_tokens(ids).to(s0.dtype)
    return torch.cat([h.to(s0.device, s0.dtype) for h in hidden], 1)


def _mask(shard: Shard, rows) -> torch.Tensor:
    """The additive mask [1, 1, n, c + n] of a request's rows over its own context and
    tree (float: boolean masks are wrong on the eager path, see ENV.md)."""
    m = torch.from_numpy(shard.state.mask(list(rows))).to(shard.device)
    f = torch.zeros(m.shape, dtype=shard.dtype, device=shard.device)
    f.masked_fill_(~m, torch.finfo(shard.dtype).min)
    return f.view(1, 1, *m.shape)


def _layer(layer, i: int, x, cos, sin, shards, spans, masks) -> torch.Tensor:
    """Llama decoder layer i over the joined rows: the weights once, attention per
    request over its own cache (which gets the request's new keys and values)."""
    att = layer.self_attn
    q, k, v = qkv(layer, x, cos, sin)
    outs = []
    for sh, (a, b), m in zip(shards, spans, masks):
        keys, values = sh.cache.update(k[:, :, a:b], v[:, :, a:b], i)
        outs.append(F.scaled_dot_product_attention(q[:, :, a:b], keys, values, attn_mask=m,
                                                   scale=att.scaling, enable_gqa=True))
    return layer_out(layer, x, torch.cat(outs, 2))


def qkv(layer, x, cos, sin):
    """Llama layer's queries, keys and values [1, heads, n, head_dim] of the rows x
    [1, n, H], rotary applied: the part of the layer before attention."""
    att = layer.self_attn
    h = layer.input_layernorm(x)
    shape = (1, x.shape[1], -1, att.head_dim)
    q = att.q_proj(h).view(shape).transpose(1, 2)
    k = att.k_proj(h).view(shape).transpose(1, 2)
    v = att.v_proj(h).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def layer_out(layer, x, o):
    """The rest of the layer after attention output o [1, heads, n, head_dim]: o_proj into
    the residual, then the MLP's."""
    x = x + layer.self_attn.o_proj(o.transpose(1, 2).reshape(1, x.shape[1], -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def rounds(parts: Sequence, key: Callable) -> list[list]:
    """`parts` in forwards of at most one part per request (key(part): its request): a
    request with two parts in one step (a prompt or a new root, then the layer grown
    from it) gets its second in the next forward, after its first joined its cache."""
    out: list[list] = []
    seen: dict = {}
    for part in parts:
        k = seen[key(part)] = seen.get(key(part), -1) + 1
        if k == len(out):
            out.append([])
        out[k].append(part)
    return out


def propose_requests(work: Sequence[tuple[DraftModel, object]]) -> list[dict[int, tuple]]:
    """One draft pass over several requests: (draft model, `Draft` request) per request;
    each request's new rows are admitted (dead ones dropped), then `propose_live`."""
    return propose_live([(m, d, m.shard.admit(d.rows, None)[0]) for m, d in work])


def propose_live(work: Sequence[tuple[DraftModel, object, Sequence[Row]]]
                 ) -> list[dict[int, tuple]]:
    """One draft pass over several requests' admitted rows: (draft model, `Draft`, live
    rows) per request; one forward (`forward_requests`), then one LM head and top-k over
    every request's wanted rows (`shard.top_k_children`, as `DraftModel.top_k`). A
    request without live rows proposes nothing."""
    answers: list[dict[int, tuple]] = [{} for _ in work]
    todo = [(b, m, d, rows) for b, (m, d, rows) in enumerate(work) if rows]
    for group in rounds(todo, key=lambda x: id(x[1])):
        if len(group) == 1:
            b, m, d, rows = group[0]
            answers[b] = m.propose_live(list(rows), d.want, d.k, d.committed)
            continue
        outs = forward_requests([m.shard for _, m, _, _ in group],
                                [rows for *_, rows in group],
                                [d.committed for _, _, d, _ in group])
        assert outs is not None
        picks = [(rows, out, d.want, d.k) for (_, _, d, rows), out in zip(group, outs)]
        for (b, *_), got in zip(group, top_k_children(group[0][1].shard, picks)):
            answers[b] = got
    return answers
