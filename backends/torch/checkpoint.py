"""Per-stage checkpoint loading: a pipeline stage reads only its own slice of the target.

`load_stage(spec, lo, hi, embed=..., head=...)` returns the same `Loaded` (and the same
module structure) as `models.load(spec)` followed by `models.keep_layers(...)`, without
ever holding the rest of the model:

* The model skeleton is built on the `meta` device (shapes only, no storage), and the
  modules the stage does not own are swapped for `Identity` / `None` while still on meta.
* Only the stage's tensors are read, one at a time, with `safetensors.safe_open` (a
  memory-mapped read of just those byte ranges) and assigned straight into the skeleton,
  so peak memory is the stage's own parameters plus one tensor in flight. For a sharded
  checkpoint only the shard files holding needed keys are opened. When the file's dtype
  is already the wanted one on CPU, safetensors hands back copy-on-write views of the
  memory-mapped file (as `from_pretrained` does): pages are read on first use and shared
  through the page cache by stages on one host, so do not rewrite a checkpoint in place
  while stages run. A dtype cast or a GPU device makes one private copy per tensor.
* The rotary embedding's `inv_freq` is a non-persistent buffer (not in the checkpoint):
  it is recomputed from the config by building that one small module for real.

The seeded `tiny*` specs have no file to read (their weights come from a seed), so they
keep the old path: build the full seeded model, then drop what the stage does not own.
The seeded eps pair (eps_pair.py) seeds each tensor by its name, so a stage builds the
skeleton, drops what it does not own and fills only the rest, as with a checkpoint.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from backends.torch import eps_pair, models
from backends.torch.models import Loaded
from pipedec_sim.errors import InputError

SUPPORTED = ("llama", "qwen2", "mistral")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_stage(spec: str, lo: int, hi: int, *, embed: bool, head: bool, device="cpu",
               dtype=torch.float32) -> Loaded:
    """Decoder layers [lo, hi) of `spec` (plus the embeddings if `embed`, the final norm
    and LM head if `head`), in eval mode on `device`. Layers outside the range are
    `Identity` so that layers and KV cache stay indexed by absolute layer number."""
    pair = eps_pair.parse(spec)
    if pair is not None:
        keep = functools.partial(models.keep_layers, lo=lo, hi=hi, embed=embed, head=head)
        model = models.eps_model(pair, keep).to(device=device, dtype=dtype)
        return Loaded(spec, model, models.tiny_encode, None)
    if spec in models.TINY or spec in models.NOISY:
        loaded = models.load(spec)
        models.keep_layers(loaded.model, lo, hi, embed=embed, head=head)
        loaded.model.to(device=device, dtype=dtype)
        return loaded
    path = models.resolve_path(spec)
    model = _skeleton(path, lo, hi, embed=embed, head=head, dtype=dtype)
    _fill(model, path, device=device, dtype=dtype)
    _rebuild_rotary(model, device)
    _generation_config(model, path)
    encode, eos = models.text_io(path, model)
    return Loaded(spec, model.eval(), encode, eos)


def num_layers(spec: str) -> int:
    """The target's decoder layer count, from its config alone (to split stages before
    anything is loaded)."""
    pair = eps_pair.parse(spec)
    if pair is not None:
        return pair.built_layers
    if spec in models.NOISY:
        spec = "tiny"
    if spec in models.TINY:
        return models.TINY[spec]["num_hidden_layers"]
    return AutoConfig.from_pretrained(models.resolve_path(spec)).num_hidden_layers


# ---- skeleton --------------------------------------------------------------------------
def _skeleton(path: Path, lo: int, hi: int, *, embed: bool, head: bool, dtype):
    """The full architecture on meta (no storage), cut down to the stage's modules."""
    config = AutoConfig.from_pretrained(path)
    kind = getattr(config, "model_type", "")
    if kind not in SUPPORTED:
        raise InputError(f"unsupported model type {kind!r} (Llama-family only)",
                         file=path / "config.json")
    n = config.num_hidden_layers
    if not 0 <= lo <= hi <= n:
        raise InputError(f"layer range [{lo}, {hi}) outside the model's {n} layers",
                         file=path / "config.json")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                 dtype=dtype)
    models.keep_layers(model, lo, hi, embed=embed, head=head)
    return model


# ---- weights ---------------------------------------------------------------------------
def _fill(model, path: Path, *, device, dtype) -> None:
    """Replace every meta parameter/buffer that the checkpoint holds by its real tensor,
    reading only those keys (and opening only the files that hold them)."""
    slots = _slots(model)
    keys = {name: _source_key(model, name) for name in slots}
    files = _locate(path, sorted(set(keys.values())))
    done: dict[int, torch.Tensor] = {}       # tied weights: one tensor, several owners
    for file in sorted(set(files.values())):
        names = [n for n in slots if files[keys[n]] == file]
        with _open(file, keys[names[0]]) as handle:
            present = set(handle.keys())
            for name in names:
                module, attr, old = slots[name]
                if id(old) not in done:
                    t = _read(handle, present, file, keys[name], tuple(old.shape))
                    t = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
                    done[id(old)] = torch.nn.Parameter(t) if isinstance(
                        old, torch.nn.Parameter) else t
                table = module._parameters if attr in module._parameters else module._buffers
                table[attr] = done[id(old)]


def _slots(model) -> dict[str, tuple]:
    """Checkpoint-backed tensors still to load: name -> (owner module, attribute, meta tensor),
    tied duplicates included (they resolve to the same tensor)."""
    out = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in module._parameters.items():
            if p is not None:
                out[prefix + attr] = (module, attr, p)
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                out[prefix + attr] = (module, attr, b)
    return out


def _source_key(model, name: str) -> str:
    """The checkpoint key for a parameter: tied LM heads are saved as the embeddings only."""
    if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
        return "model.embed_tokens.weight"
    return name


def _locate(path: Path, keys: list[str]) -> dict[str, Path]:
    """Which file holds each needed key (single file, or via the sharded index)."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = [k for k in keys if k not in weight_map]
        if missing:
            raise InputError(f"missing tensor {missing[0]!r} in the weight map "
                             f"({len(missing)} needed keys missing)", file=index)
        return {k: path / weight_map[k] for k in keys}
    single = path / SINGLE_FILE
    if not single.is_file():
        raise InputError(f"no {SINGLE_FILE} or {INDEX_FILE} (safetensors checkpoints only)",
                         file=path)
    return {k: single for k in keys}


def _open(file: Path, key: str):
    if not file.is_file():
        raise InputError(f"checkpoint file not found (needed for {key!r})", file=file)
    return safe_open(str(file), framework="pt")


def _read(handle, present: set, file: Path, key: str, shape: tuple) -> torch.Tensor:
    """One tensor from an open safetensors file, checked against the config's shape."""
    if key not in present:
        raise InputError(f"missing tensor {key!r}", file=file)
    got = tuple(handle.get_slice(key).get_shape())
    if got != shape:
        raise InputError(f"tensor {key!r} has shape {list(got)}, the config implies "
                         f"{list(shape)}", file=file)
    return handle.get_tensor(key)


# ---- what the checkpoint does not hold --------------------------------------------------
def _rebuild_rotary(model, device) -> None:
    """Rotary `inv_freq` is a non-persistent buffer: compute it from the config (building
    this one small module for real) rather than leave meta/uninitialised memory."""
    inner = model.model
    inner.rotary_emb = type(inner.rotary_emb)(config=model.config).to(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:      # an architecture with other computed buffers: refuse, do not guess
        raise InputError(f"{model.config.model_type}: tensors neither in the checkpoint nor "
                         f"rebuilt: {left[:5]}")


def _generation_config(model, path: Path) -> None:
    """As `from_pretrained` does: generation_config.json if present (it may carry eos)."""
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
