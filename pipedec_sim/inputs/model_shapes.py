"""Model shapes for analytic profiles: named presets and HF `config.json` files.

Dense decoder-only Llama-style models only (Llama, Mistral, Qwen2: RMSNorm, rotary
attention with grouped KV heads, a gated SiLU MLP). A preset holds the figures of the
model's published `config.json` on the Hugging Face hub (the `source` of each says which
fields); `resolve_model` takes a preset name or the path of a `config.json` (or of a
folder holding one), so no download is needed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.files import FilePath, load_json, read_text, short
from pipedec_sim.inputs.limits import SHAPE_LIMITS
from pipedec_sim.inputs.profile.analytic import layer_params
from pipedec_sim.inputs.profile.model import ModelShape

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


@dataclass(frozen=True)
class ModelSpec:
    """A model's shape plus what memory needs and the profile does not keep."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool                 # the LM head shares the embedding's weights
    source: str                # where the figures come from

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer (the analytic model's count: norms and biases,
        well under 0.1%, ignored)."""
        return layer_params(self.shape())

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        return (self.layers * self.layer_params
                + self.embed_params * (1 if self.tied else 2))

    def kv_bytes_per_token(self, layers: int, kv_bytes: int) -> int:
        """K and V of one token over `layers` layers."""
        return layers * 2 * self.kv_heads * self.head_dim * kv_bytes

    def shape(self, dtype_bytes: int = 2) -> ModelShape:
        """The profile's ModelShape (dtype_bytes: of the activations between stages)."""
        return ModelShape(self.name, self.layers, self.hidden, self.heads, self.kv_heads,
                          self.intermediate, self.vocab, dtype_bytes)


def _preset(name: str, layers: int, hidden: int, heads: int, kv_heads: int,
            intermediate: int, vocab: int, tied: bool, ctx: str) -> ModelSpec:
    src = (f"{name} config.json on the Hugging Face hub: num_hidden_layers {layers}, "
           f"hidden_size {hidden}, num_attention_heads {heads}, num_key_value_heads "
           f"{kv_heads}, intermediate_size {intermediate}, vocab_size {vocab}, "
           f"tie_word_embeddings {str(tied).lower()}, {ctx}")
    return ModelSpec(name, layers, hidden, heads, kv_heads, intermediate, vocab, tied, src)


PRESETS: dict[str, ModelSpec] = {m.name.split("/")[-1].lower(): m for m in (
    _preset("meta-llama/Llama-3.1-8B", 32, 4096, 32, 8, 14336, 128256, False,
            "max_position_embeddings 131072"),
    _preset("meta-llama/Llama-3.1-70B", 80, 8192, 64, 8, 28672, 128256, False,
            "max_position_embeddings 131072"),
    _preset("meta-llama/Llama-3.1-405B", 126, 16384, 128, 8, 53248, 128256, False,
            "max_position_embeddings 131072"),
    _preset("meta-llama/Llama-3.2-1B", 16, 2048, 32, 8, 8192, 128256, True,
            "head_dim 64, max_position_embeddings 131072"),
    _preset("meta-llama/Llama-3.2-3B", 28, 3072, 24, 8, 8192, 128256, True,
            "head_dim 128, max_position_embeddings 131072"),
    _preset("Qwen/Qwen2.5-0.5B", 24, 896, 14, 2, 4864, 151936, True,
            "max_position_embeddings 32768"),
    _preset("Qwen/Qwen2.5-7B", 28, 3584, 28, 4, 18944, 152064, False,
            "max_position_embeddings 131072 (the Instruct model's config says 32768)"),
    _preset("Qwen/Qwen2.5-72B", 80, 8192, 64, 8, 29568, 152064, False,
            "max_position_embeddings 131072 (the Instruct model's config says 32768)"),
)}


def preset_names() -> str:
    return ", ".join(PRESETS)


def _preset_key(name: str) -> str:
    key = name.strip().split("/")[-1].lower()
    for suffix in ("-instruct", "-chat", "-hf"):
        key = key.removesuffix(suffix)
    return key.replace("meta-llama-", "llama-")


def resolve_model(spec: str, *, flag: str) -> ModelSpec:
    """A preset by name (case-insensitive; `meta-llama/Llama-3.1-70B-Instruct` finds the
    70B's shape) or a `config.json` (or a folder holding one) by path. InputError naming
    `flag` lists the presets."""
    p = Path(os.path.expanduser(spec))
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return read_hf_config(p)
    key = _preset_key(spec)
    if key in PRESETS:
        return PRESETS[key]
    hint = " (no such file either)" if ("/" in spec and spec.endswith(".json")) else ""
    raise InputError(f"unknown model {spec!r}{hint} (presets: {preset_names()}; or give the "
                     "path of an HF config.json)", field=flag)


def read_hf_config(path: FilePath) -> ModelSpec:
    d = load_json(read_text(path), file=path)
    p = Path(path)
    name = d.get("_name_or_path") if isinstance(d, dict) else None
    if not isinstance(name, str) or not name.strip():
        name = p.parent.name if p.name == "config.json" and p.parent.name else p.stem
    return parse_hf_config(d, name=name, file=path)


def parse_hf_config(d: Any, *, name: str, file: FilePath | None = None) -> ModelSpec:
    """A ModelSpec from a decoded HF config.json (dense Llama, Mistral or Qwen2)."""
    if not isinstance(d, dict):
        raise InputError("a config.json must be a JSON object", file=file)
    mtype = d.get("model_type")
    if mtype not in SUPPORTED_TYPES:
        raise InputError(f"unsupported model_type {short(mtype)} (supported: "
                         f"{', '.join(SUPPORTED_TYPES)}: dense Llama-style decoders)",
                         file=file, field="model_type")
    for key in MOE_KEYS:
        if d.get(key):
            raise InputError("a mixture-of-experts model: only dense decoders are supported",
                             file=file, field=key)

    def need(key: str, limit: str) -> int:
        if key not in d:
            raise InputError("missing required key", file=file, field=key)
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"expected a positive integer, got {short(v)}", file=file,
                             field=key)
        if v > SHAPE_LIMITS[limit]:
            raise InputError(f"must be <= {SHAPE_LIMITS[limit]} (the limit), got {v}",
                             file=file, field=key)
        return v

    layers = need("num_hidden_layers", "layers")
    hidden = need("hidden_size", "hidden")
    heads = need("num_attention_heads", "heads")
    kv_heads = need("num_key_value_heads", "kv_heads") if d.get("num_key_value_heads") \
        is not None else heads                      # absent: multi-head attention
    intermediate = need("intermediate_size", "intermediate")
    vocab = need("vocab_size", "vocab")
    if hidden % heads:
        raise InputError(f"hidden_size {hidden} is not a multiple of num_attention_heads "
                         f"{heads}", file=file, field="num_attention_heads")
    if heads % kv_heads:
        raise InputError(f"num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv_heads}", file=file,
                         field="num_key_value_heads")
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise InputError(f"head_dim {short(head_dim)} differs from hidden_size / "
                         f"num_attention_heads = {hidden // heads}: not supported (the "
                         "profile format derives head_dim from them)", file=file,
                         field="head_dim")
    tied = d.get("tie_word_embeddings", False)       # Llama/Mistral/Qwen2 configs: False
    if not isinstance(tied, bool):
        raise InputError(f"expected true or false, got {short(tied)}", file=file,
                         field="tie_word_embeddings")
    where = f"{file}" if file is not None else "a config.json"
    return ModelSpec(name.strip(), layers, hidden, heads, kv_heads, intermediate, vocab, tied,
                     f"{name.strip()} from {where} ({mtype})")
