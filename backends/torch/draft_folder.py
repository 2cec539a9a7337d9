"""The trained draft's folder forms: a full HF folder, and the shipped-small form (only the
draft's own layers, `draft-layers.safetensors`; embeddings and LM head are the target's,
tied) that `assemble_draft` rebuilds into a full folder."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from backends.torch.weights import from_folder


def cache_root() -> Path:
    root = os.environ.get("PIPEDEC_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "pipedec-sim")


def make_draft(target, n_layers: int, init_layers: list[int] | None):
    from transformers import LlamaForCausalLM
    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = n_layers
    cfg.tie_word_embeddings = True
    for k in ("layer_types",):
        if getattr(cfg, k, None) is not None:
            setattr(cfg, k, getattr(cfg, k)[:n_layers])
    draft = LlamaForCausalLM(cfg)
    draft.model.embed_tokens.weight.data.copy_(target.model.embed_tokens.weight.data)
    draft.tie_weights()
    draft.model.norm.load_state_dict(target.model.norm.state_dict())
    if init_layers:
        for i, src in enumerate(init_layers):
            draft.model.layers[i].load_state_dict(target.model.layers[src].state_dict())
    draft.model.embed_tokens.weight.requires_grad_(False)
    return draft


def trainable_state(draft) -> dict:
    return {k: v for k, v in draft.state_dict().items()
            if not (k.startswith("model.embed_tokens") or k.startswith("lm_head"))}


def save_draft(draft, tok, out: Path, provenance: dict) -> None:
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    d16 = copy.deepcopy(draft).half()
    d16.config.dtype = "float16"
    d16.save_pretrained(out)
    tok.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in trainable_state(d16).items()},
              str(out / "draft-layers.safetensors"))
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


def assemble_draft(layers_file: str | os.PathLike, out: str | os.PathLike,
                   n_layers: int | None = None, target: str = "smollm2") -> Path:
    """Rebuild the draft's HF folder from `draft-layers.safetensors` + the target's
    embeddings (the shipped-small form of the draft)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from backends.torch.smollm2 import resolve_model
    tp = resolve_model(target)
    tgt = from_folder(tp)
    sd = load_file(str(layers_file))
    n = n_layers or 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    draft = make_draft(tgt, n, None)
    missing, unexpected = draft.load_state_dict({k: v.float() for k, v in sd.items()},
                                                strict=False)
    assert not unexpected, unexpected
    out = Path(out)
    prov = Path(layers_file).with_name("provenance.json")
    p = json.loads(prov.read_text()) if prov.is_file() else {"assembled_from": str(layers_file)}
    save_draft(draft, AutoTokenizer.from_pretrained(tp), out, p)
    return out
