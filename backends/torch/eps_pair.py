"""The acceptance-controlled model pair: `--target eps-pair[:LxH[:EPS[:K]]]` with
`--draft eps-pair-draft[:LxH[:K]]`. A controlled experiment, not a language model.

The target is a seeded random Llama of L decoder layers and hidden size H whose layers
K..L-1 have their residual contributions scaled by EPS: the weights that write into the
residual stream (each such layer's `o_proj` and `down_proj`) are multiplied by EPS. Their
compute cost is unchanged, and the model stays a plain `LlamaForCausalLM` that every code
path (HF generate, shards, tree attention, KV pruning, the profiler) runs as it is.

The draft is the target's embeddings, first K layers, final norm and LM head: the same
tensors, because every tensor's values come from a generator seeded by its own name. So
EPS sets how often the draft's greedy token is the target's: EPS = 0 leaves the target's
residual stream after layer K untouched (the draft's argmax is the target's, exactly), and
EPS = 1 is an ordinary random model that the draft mostly misses.
`benchmarks/eps_pair.py` measures the curve in between.

Naming a tensor's seed by its name also lets a pipeline stage build only its own layers
(`materialize` fills whatever the skeleton still holds), and every process builds the same
weights from the spec alone. Prompts use the tiny models' byte-level mapping and vocab
(backends/torch/models.py), so the pair needs no tokenizer and no download.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from pipedec_sim.errors import InputError

TARGET = "eps-pair"
DRAFT = "eps-pair-draft"
TARGET_SYNTAX, DRAFT_SYNTAX = f"{TARGET}[:LxH[:EPS[:K]]]", f"{DRAFT}[:LxH[:K]]"
SYNTAX = f"{TARGET_SYNTAX} or {DRAFT_SYNTAX}"
DEFAULT_SHAPE = (32, 512)
# Chosen from benchmarks/results/eps_pair.txt: the default shape's draft agrees with its
# target about 0.85-0.9 of the time at this eps (other shapes: measure with the benchmark).
DEFAULT_EPS = 0.02
HEAD_DIM = 64          # attention heads of 64 (as in the tiny target): H must be a multiple
SEED = 16              # part of every tensor's seed: a new value is a new pair
INIT_STD = 0.1         # as the tiny models (models.py): varied greedy output, clear margins
SCALED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")   # what writes the residual


@dataclass(frozen=True)
class EpsPair:
    """One side of the pair: the target's shape (layers, hidden), the draft's depth k, and
    eps (the target's scale on layers k..layers-1; None for the draft)."""
    layers: int
    hidden: int
    k: int
    eps: float | None = None

    @property
    def is_draft(self) -> bool:
        return self.eps is None

    @property
    def built_layers(self) -> int:
        """Decoder layers of the model this spec builds (the draft: the first k)."""
        return self.k if self.is_draft else self.layers

    @property
    def spec(self) -> str:
        """The canonical spec: parse(p.spec) == p."""
        shape = f"{self.layers}x{self.hidden}"
        if self.is_draft:
            return f"{DRAFT}:{shape}:{self.k}"
        return f"{TARGET}:{shape}:{self.eps!r}:{self.k}"

    @property
    def draft_spec(self) -> str:
        """The draft that belongs to this target (or to this draft's target)."""
        return EpsPair(self.layers, self.hidden, self.k).spec


def default_k(layers: int) -> int:
    """The draft's depth when the spec names none: 1/16 of the target (at least one
    layer), so that at S=4 a draft step costs about a quarter of a stage's layers."""
    return max(1, layers // 16)


def parse(spec: str) -> EpsPair | None:
    """The pair side a spec names, or None if it is not an eps-pair spec. A malformed one
    raises InputError naming the part that is wrong (callers add the flag)."""
    name, _, rest = spec.partition(":")
    if name not in (TARGET, DRAFT):
        return None
    parts = rest.split(":") if rest else []
    most = 3 if name == TARGET else 2
    if len(parts) > most:
        raise _bad(spec, f"{len(parts)} fields after {name!r}, at most {most}")
    layers, hidden = _shape(spec, parts[0]) if parts else DEFAULT_SHAPE
    if name == TARGET:
        eps = _eps(spec, parts[1]) if len(parts) > 1 else DEFAULT_EPS
        k = _k(spec, parts[2], layers) if len(parts) > 2 else default_k(layers)
        return EpsPair(layers, hidden, k, eps)
    k = _k(spec, parts[1], layers) if len(parts) > 1 else default_k(layers)
    return EpsPair(layers, hidden, k)


def _bad(spec: str, why: str) -> InputError:
    syntax = {TARGET: TARGET_SYNTAX, DRAFT: DRAFT_SYNTAX}[spec.partition(":")[0]]
    return InputError(f"{spec!r}: {why} (expected {syntax})")


def _int(spec: str, text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _bad(spec, f"{what} {text!r} is not a whole number") from None


def _shape(spec: str, text: str) -> tuple[int, int]:
    if text.count("x") != 1:
        raise _bad(spec, f"shape {text!r} is not LxH (layers x hidden, e.g. 32x512)")
    layers, hidden = (_int(spec, t, w) for t, w in zip(text.split("x"), ("layers", "hidden")))
    if layers < 2:          # one layer for the draft, at least one scaled by eps
        raise _bad(spec, f"layers L = {layers}: needs at least 2")
    if hidden < HEAD_DIM or hidden % HEAD_DIM:
        raise _bad(spec, f"hidden H = {hidden}: needs a multiple of {HEAD_DIM} (heads of "
                         f"{HEAD_DIM})")
    return layers, hidden


def _eps(spec: str, text: str) -> float:
    try:
        eps = float(text)
    except ValueError:
        raise _bad(spec, f"EPS {text!r} is not a number") from None
    if not math.isfinite(eps) or eps < 0:
        raise _bad(spec, f"EPS = {text}: needs a finite number >= 0")
    return eps


def _k(spec: str, text: str, layers: int) -> int:
    k = _int(spec, text, "draft layers K")
    if not 1 <= k < layers:
        raise _bad(spec, f"draft layers K = {k}: needs 1 <= K < L = {layers}")
    return k


def mismatch(target: EpsPair, draft: EpsPair) -> str | None:
    """Why `draft` is not the draft of `target` (None: it is). Any draft is lossless; a
    foreign one only breaks the experiment (its agreement is no longer eps's)."""
    if target.is_draft or not draft.is_draft or target.draft_spec == draft.spec:
        return None
    return (f"{draft.spec} is not the draft of {target.spec} (its draft is "
            f"{target.draft_spec}): the agreement would not be set by eps")


def shape(pair: EpsPair) -> dict:
    """LlamaConfig fields of the model the spec builds (models.seeded_config adds the rest)."""
    heads = pair.hidden // HEAD_DIM
    return dict(num_hidden_layers=pair.built_layers, hidden_size=pair.hidden,
                intermediate_size=2 * pair.hidden, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2), initializer_range=INIT_STD)


def materialize(model, pair: EpsPair) -> None:
    """Give every parameter still on the meta device its seeded value (the target's layers
    k.. scaled by eps), and rebuild the rotary embedding's computed buffer. Modules a stage
    dropped before this (models.keep_layers) are never built."""
    for mod_name, module in model.named_modules():
        for attr, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                name = f"{mod_name}.{attr}"
                module._parameters[attr] = torch.nn.Parameter(_value(name, p.shape, pair))
    inner = model.model
    # inv_freq is not a weight: computed from the config, as a checkpointed stage does
    inner.rotary_emb = type(inner.rotary_emb)(config=model.config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:     # a transformers version with other computed buffers: refuse, do not guess
        raise RuntimeError(f"eps-pair: tensors left unbuilt: {left[:5]}")


def _value(name: str, size, pair: EpsPair) -> torch.Tensor:
    """A tensor's seeded value, the same in every process and in both models of the pair:
    RMSNorm weights (the only 1-D parameters of a Llama) are ones, matrices are normal."""
    if len(size) == 1:
        return torch.ones(size)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{SEED}:{name}".encode()))
    t = torch.randn(size, generator=gen).mul_(INIT_STD)
    if pair.eps is not None and name.endswith(SCALED) and _layer(name) >= pair.k:
        t.mul_(pair.eps)
    return t


def _layer(name: str) -> int:
    """The decoder layer a parameter name belongs to ('model.layers.7.mlp...' -> 7)."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])
