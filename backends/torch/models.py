"""Model specs for `--target/--draft`: `tiny`, `tiny-draft`, `tiny-noisy`, `smollm2`,
`smollm2-draft` (the distilled draft shipped in traces/), the acceptance-controlled pair
`eps-pair[:LxH[:EPS[:K]]]` / `eps-pair-draft[:LxH[:K]]` (eps_pair.py), or an HF folder.

A spec resolves to a `Loaded` (model in eval mode, float32, plus how to turn text into ids
and which id ends a reply). `load` reads a whole model (the draft, tests, tools); pipeline
stages use `checkpoint.load_stage`, which reads only their own slice.

Weights are read from safetensors files only: a pickle checkpoint (`pytorch_model.bin`,
`.pt`) can run code when it is loaded, so a folder holding only those is refused by name
(`check_weights`, in `resolve_path`, before anything is read).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from backends.torch import eps_pair
from backends.torch.draft_folder import LAYERS_FILE
from backends.torch.weights import check_weights, from_folder
from pipedec_sim.errors import InputError

# Seeded random Llama models for tests: the same shape and seed give the same weights in
# every process, so stages built separately agree with the full model bit for bit. An init
# std of 0.1 (not HF's 0.02) keeps greedy output varied instead of a 1-2 token loop, with
# top-2 logit margins ~1e-3, far above float reordering noise (~1e-6).
TINY = {
    "tiny": dict(seed=0, num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                 num_attention_heads=4, num_key_value_heads=2),
    "tiny-draft": dict(seed=1, num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                       num_attention_heads=4, num_key_value_heads=2),
}
# A draft that agrees with `tiny` part of the time: tiny's weights plus seeded noise.
NOISY = {"tiny-noisy": 0.2}
TINY_VOCAB = 512


@dataclass
class Loaded:
    spec: str
    model: LlamaForCausalLM
    encode: Callable[[str], list[int]]     # prompt text -> ids (chat template if any)
    eos: int | None                        # stop token, or None (tiny: length only)

    @property
    def config(self):
        return self.model.config


def is_seeded(spec: str) -> bool:
    """Whether a spec's weights come from a seed (no file to read): the tiny models and
    the eps pair. A malformed eps-pair spec raises InputError."""
    return spec in TINY or spec in NOISY or eps_pair.parse(spec) is not None


def tiny_model(name: str) -> LlamaForCausalLM:
    """The whole model of a seeded spec (`is_seeded`)."""
    pair = eps_pair.parse(name)
    if pair is not None:
        return eps_model(pair)
    if name in NOISY:
        model = tiny_model("tiny")
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(NOISY[name] * p.std() * torch.randn(p.shape, generator=gen))
        return model
    kw = dict(TINY[name])
    seed = kw.pop("seed")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(seeded_config(initializer_range=0.1, **kw))
    return _no_stop_token(model).eval()


def eps_model(pair: eps_pair.EpsPair, keep: Callable | None = None) -> LlamaForCausalLM:
    """One side of the eps pair, built as a meta-device skeleton, cut down by `keep` (a
    stage's `keep_layers`) and only then given its seeded weights: a stage never builds
    the layers it does not own."""
    with torch.device("meta"):
        model = LlamaForCausalLM(seeded_config(**eps_pair.shape(pair)))
    if keep is not None:
        keep(model)
    eps_pair.materialize(model, pair)
    return _no_stop_token(model).eval()


def seeded_config(**shape) -> LlamaConfig:
    """The config of a seeded model: the tiny vocab and byte-level prompts (no tokenizer,
    no stop token), untied head, sdpa attention; `shape` gives layers, widths, heads."""
    return LlamaConfig(vocab_size=TINY_VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None, attn_implementation="sdpa", **shape)


def _no_stop_token(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Seeded models generate to the length asked for (their outputs have no EOS)."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def tiny_encode(text: str) -> list[int]:
    """A deterministic byte-level tokenizer into the tiny vocab (bytes 1..256 shifted by 1)."""
    return [b + 1 for b in text.encode("utf-8")] or [1]


def _hf_encode(tok) -> Callable[[str], list[int]]:
    def encode(text: str) -> list[int]:
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                          add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return tok(text)["input_ids"]
    return encode


# The draft distilled for SmolLM2, shipped as its trained layers only (see traces/README.md).
SHIPPED_DRAFT = Path(__file__).resolve().parents[2] / "traces" / "smollm2-draft"


def resolve_path(spec: str) -> Path:
    if spec.lower() == "smollm2-draft":
        return assembled_draft(SHIPPED_DRAFT)
    if spec.lower().startswith("smollm2"):
        from backends.torch.smollm2 import ensure_smollm2
        return ensure_smollm2()
    p = Path(spec).expanduser()
    if (p / LAYERS_FILE).is_file() and not (p / "config.json").is_file():
        return assembled_draft(p)
    if not (p / "config.json").is_file():
        raise InputError(f"{spec!r} is not a model: expected tiny, tiny-draft, tiny-noisy, "
                         f"smollm2, smollm2-draft, {eps_pair.SYNTAX} or an HF folder "
                         "with config.json")
    check_weights(p)
    return p


def assembled_draft(folder: Path) -> Path:
    """A shipped-layers draft folder as a full HF folder (the target's embeddings and LM
    head added), built once into the cache, keyed by the layers file's contents."""
    import hashlib
    import shutil

    from backends.torch.draft_folder import assemble_draft, cache_root
    layers = folder / LAYERS_FILE
    key = hashlib.sha256(layers.read_bytes()).hexdigest()[:12]
    out = cache_root() / f"draft-{key}"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        assemble_draft(layers, tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)                 # whole folder or nothing
    return out


def load(spec: str) -> Loaded:
    """Load a model spec on CPU in float32 (callers move stage slices to a device)."""
    if is_seeded(spec):
        return Loaded(spec, tiny_model(spec), tiny_encode, None)
    path = resolve_path(spec)
    model = from_folder(path)
    if getattr(model.config, "model_type", "") not in ("llama", "qwen2", "mistral"):
        raise InputError(f"{spec}: unsupported model type {model.config.model_type!r} "
                         "(Llama-family only)")
    return Loaded(spec, model, *text_io(path, model))


def text_io(path: Path, model) -> tuple[Callable[[str], list[int]], int | None]:
    """(encode, eos) for an HF folder: its tokenizer (chat template if any), and the first
    stop id of its generation config, else the tokenizer's."""
    tok = AutoTokenizer.from_pretrained(path)
    eos = model.generation_config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        eos = tok.eos_token_id
    return _hf_encode(tok), eos


def keep_layers(model, lo: int, hi: int, *, embed: bool, head: bool) -> None:
    """Free everything a stage holding decoder layers [lo, hi) does not need."""
    inner = model.model
    for i in range(len(inner.layers)):
        if not lo <= i < hi:
            inner.layers[i] = torch.nn.Identity()
    if not embed:
        inner.embed_tokens = None
    if not head:
        model.lm_head = None
        inner.norm = None


def check_pair(target: Loaded, draft: Loaded) -> None:
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise InputError(f"draft vocab {dv} differs from target vocab {tv}: they must share "
                         "a tokenizer", field="--draft")
    t, d = eps_pair.parse(target.spec), eps_pair.parse(draft.spec)
    why = eps_pair.mismatch(t, d) if t is not None and d is not None else None
    if why:
        raise InputError(why, field="--draft")
