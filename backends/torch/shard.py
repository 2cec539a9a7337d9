"""One KV holder's compute: a contiguous slice of a Llama model with tree attention.

`Shard` runs rows through embeddings (stage 1), its decoder layers, and the final norm
+ LM head (where verification happens). Its KV cache is keyed by node id through the
shared `StageState`: prune notices become `index_select` on the cache, and the state's
boolean ancestry mask becomes a float additive mask (bool masks are silently wrong on
the eager path, see ENV.md). `DraftModel` is a whole small model as one shard that
proposes top-k children with log-probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from backends.torch.compat import with_cache
from pipedec_sim.protocol.messages import Row, Update
from pipedec_sim.protocol.sampling import GREEDY, Sampling, sample
from pipedec_sim.protocol.stage_state import StageState


def rows_tensor(rows) -> torch.Tensor:
    """Rows as int64 [n, 4] (id, parent, token, pos): the wire format of a batch."""
    return torch.tensor([(r.id, r.parent, r.token, r.pos) for r in rows],
                        dtype=torch.int64).reshape(-1, 4)


def select_rows(rows_in, hidden: torch.Tensor, rows) -> torch.Tensor:
    """The hidden states [1, len(rows), H] of `rows`, a subset of `rows_in` in its order."""
    if len(rows) == len(rows_in):
        return hidden
    at = {r.id: k for k, r in enumerate(rows_in)}
    return hidden[:, [at[r.id] for r in rows]]


def tensor_rows(t: torch.Tensor) -> tuple[Row, ...]:
    return tuple(Row(*map(int, r)) for r in t.tolist())


class Shard:
    def __init__(self, model, lo: int, hi: int, *, embed: bool, head: bool, device="cpu"):
        self.model, self.lo, self.hi = model, lo, hi
        self.has_embed, self.has_head = embed, head
        self.device = torch.device(device)
        self.layers = [model.model.layers[i] for i in range(lo, hi)]
        self.state = StageState()
        self.cache = DynamicCache(config=model.config)
        self.dtype = next(model.parameters()).dtype

    def reset(self) -> None:
        """A new request: empty KV."""
        self.state.reset()
        self.cache = DynamicCache(config=self.model.config)

    # ---- prune notices ---------------------------------------------------------------
    def apply(self, update: Update) -> bool:
        """Apply a prune notice; compact the KV if rows died. True if it compacted."""
        keep = self.state.apply(update)
        if keep is None:
            return False
        idx = torch.from_numpy(keep).to(self.device)
        for i in range(self.lo, self.hi):
            layer = self.cache.layers[i]
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys.index_select(-2, idx)
                layer.values = layer.values.index_select(-2, idx)
        return True

    def kv_len(self) -> int:
        layer = self.cache.layers[self.lo]
        keys = getattr(layer, "keys", None)
        return 0 if keys is None or not keys.numel() else keys.shape[-2]

    # ---- compute ---------------------------------------------------------------------
    def admit(self, rows, hidden: torch.Tensor | None):
        """Drop dead rows (and their hidden states)."""
        live = self.state.admit(rows)
        if hidden is not None:
            hidden = select_rows(rows, hidden, live)
        return live, hidden

    @torch.inference_mode()
    def forward(self, rows: list[Row], committed: int, hidden: torch.Tensor | None = None,
                *, between=None):
        """Compute live `rows` (hidden [1, n, H] unless this shard embeds); returns the
        output hidden states [1, n, H] and records the rows' KV.

        `between(ids)`, if given, is asked after each decoder layer whether to abandon the
        rows (ids: theirs); if it says so, the KV the finished layers appended is dropped,
        nothing is recorded, and forward returns None."""
        assert self.kv_len() == self.state.context, "KV cache and bookkeeping disagree"
        row_ids = frozenset(r.id for r in rows) if between is not None else None
        n = len(rows)
        if self.has_embed:
            ids = torch.tensor([[r.token for r in rows]], device=self.device)
            hidden = self.model.model.embed_tokens(ids)
        hidden = hidden.to(self.device, self.dtype)
        mask = torch.from_numpy(self.state.mask(rows)).to(self.device)
        fmask = torch.zeros(mask.shape, dtype=self.dtype, device=self.device)
        fmask.masked_fill_(~mask, torch.finfo(self.dtype).min)
        fmask = fmask.view(1, 1, n, -1)
        pos = torch.tensor([[r.pos for r in rows]], device=self.device)
        pe = self.model.model.rotary_emb(hidden, pos)
        for k, layer in enumerate(self.layers):
            hidden = layer(hidden, attention_mask=fmask, position_ids=pos, use_cache=True,
                           position_embeddings=pe, **with_cache(self.cache))
            if isinstance(hidden, tuple):          # older transformers return (hidden, ...)
                hidden = hidden[0]
            if between is not None and between(row_ids):
                self._crop(self.lo + k + 1)
                return None
        self.state.append(rows, committed)
        return hidden

    def _crop(self, upto: int) -> None:
        """Layers lo..upto-1 appended rows that will not be recorded: cut their KV back
        to the bookkeeping's length (DynamicCache.crop would cut every layer)."""
        n = self.state.context
        for i in range(self.lo, upto):
            layer = self.cache.layers[i]
            layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: [1, n, H] -> [n, vocab] (float32)."""
        return self.model.lm_head(self.model.model.norm(hidden))[0].float()

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's greedy next token per row: [1, n, H] -> int64 [n] on the CPU."""
        return self.logits(hidden).argmax(-1).cpu()


@dataclass(frozen=True)
class TargetSampler:
    """The target's token rule for one request: greedy (temperature 0, the argmax as
    before) or the core's seeded sampler keyed on the request (pipedec_sim.protocol.
    sampling), so that every strategy, batch and stage layout gets the same token."""
    sampling: Sampling = GREEDY
    key: int = 0                   # sampling.request_key(request id)

    def tokens(self, shard: "Shard", hidden: torch.Tensor, rows) -> list[int]:
        """The target's next token after each of `rows` (hidden states [1, n, H])."""
        if self.sampling.greedy:
            return shard.greedy(hidden).tolist()
        logits = shard.logits(hidden).double().cpu().numpy()
        return [sample(logits[i], self.sampling, self.key, r.pos + 1)
                for i, r in enumerate(rows)]


GREEDY_TARGET = TargetSampler()


class Verifier:
    """The LM head where verification happens (topology A: the head; B: the last stage).
    It holds no KV but must drop rows killed since they left the last stage."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.state = StageState()
        self.sampler = GREEDY_TARGET      # set per request by the driver

    def reset(self) -> None:
        self.state.reset()

    def apply(self, update: Update) -> None:
        self.state.apply(update)

    def verify(self, rows, verify_from: int, hidden: torch.Tensor) -> dict[int, int]:
        """The target's token after each live row of rows[verify_from:]."""
        rows = list(rows[verify_from:])
        hidden = hidden[:, verify_from:]
        live = self.state.admit(rows)
        if not live:
            return {}
        tokens = self.sampler.tokens(self.shard, select_rows(rows, hidden, live), live)
        return {r.id: t for r, t in zip(live, tokens)}


class DraftModel:
    """The draft model: one shard over all its layers, with its own tree KV cache."""

    def __init__(self, model, device="cpu"):
        self.shard = Shard(model, 0, model.config.num_hidden_layers, embed=True, head=True,
                           device=device)

    def reset(self) -> None:
        self.shard.reset()

    def apply(self, update: Update) -> bool:
        return self.shard.apply(update)

    def propose(self, rows, want, k: int, committed: int) -> dict[int, tuple]:
        """Run new rows; top-k (token, log-prob) children of each live wanted row."""
        live, _ = self.shard.admit(rows, None)
        return self.propose_live(live, want, k, committed) if live else {}

    @torch.inference_mode()
    def propose_live(self, live, want, k: int, committed: int) -> dict[int, tuple]:
        """`propose` for rows already admitted (the inline driver's simulator admits)."""
        return self.top_k(live, self.shard.forward(live, committed), want, k)

    @torch.inference_mode()
    def top_k(self, live, hidden: torch.Tensor, want, k: int) -> dict[int, tuple]:
        """Top-k (token, log-prob) children of each wanted row of `live` (their draft
        hidden states [1, n, H], already computed)."""
        return top_k_children(self.shard, [(live, hidden, want, k)])[0]


@torch.inference_mode()
def top_k_children(shard: Shard, requests) -> list[dict[int, tuple]]:
    """Per request (live rows, their draft hidden states [1, n, H], wanted ids, k): the
    top-k (token, log-prob) children of each wanted row, from ONE LM head and top-k over
    every request's wanted rows (several requests share the weight work)."""
    picks, hidden = [], []
    for live, h, want, k in requests:
        at = {r.id: j for j, r in enumerate(live)}
        wanted = [i for i in want if i in at]
        picks.append((wanted, k))
        hidden.append(h[:, [at[i] for i in wanted]])
    if not any(wanted for wanted, _ in picks):
        return [{} for _ in picks]
    logp = torch.log_softmax(shard.logits(torch.cat(hidden, 1)), -1)
    top = torch.topk(logp, min(max(k for _, k in picks), logp.shape[-1]), dim=-1)
    toks, lps = top.indices.tolist(), top.values.tolist()
    out, j = [], 0
    for wanted, k in picks:
        out.append({i: tuple(zip(toks[j + n][:k], lps[j + n][:k]))
                    for n, i in enumerate(wanted)})
        j += len(wanted)
    return out

