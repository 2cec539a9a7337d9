"""The trained draft's folder forms: a full HF folder, and the shipped-small form (only the
draft's own layers, `draft-layers.safetensors`; embeddings and LM head are the target's,
tied) that `assemble_draft` rebuilds into a full folder.

Either is written all-or-nothing (`save_draft`): a failed or interrupted save leaves no
half-written draft behind."""
from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from backends.torch.weights import from_folder
from pipedec_sim.atomic import missing_parents, remove_empty, seal
from pipedec_sim.errors import InputError

LAYERS_FILE = "draft-layers.safetensors"
PROVENANCE = "provenance.json"
# What save_draft writes (the tokenizer's files vary a little with its kind): an output
# folder must not hold a folder under one of these names (atomic.check_output's `files`).
DRAFT_FILES = ("config.json", "generation_config.json", "model.safetensors", LAYERS_FILE,
               PROVENANCE, "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


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
    """The draft's HF folder (fp16), its trained layers alone (LAYERS_FILE) and
    provenance.json, written all-or-nothing (`_filled_in_place`): a folder `out` that does
    not exist yet appears complete or not at all; in an existing folder each file replaces
    its namesake only once every file is complete, and its other files are kept."""
    from safetensors.torch import save_file
    with _filled_in_place(Path(out)) as tmp:
        d16 = copy.deepcopy(draft).half()
        d16.config.dtype = "float16"
        d16.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in trainable_state(d16).items()},
                  str(tmp / LAYERS_FILE))
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")


@contextmanager
def _filled_in_place(out: Path) -> Iterator[Path]:
    """Yield an empty temp folder on `out`'s file system; once the block has filled it,
    it becomes `out` (renamed, where `out` does not exist) or its files replace their
    namesakes in the existing folder `out` (nothing else there is deleted: `out` may be
    `.` or hold the user's own files), provenance.json last. On any error the temp folder
    and the parents made for it are removed, and `out` is as it was."""
    existing = out.is_dir()
    made = [] if existing else missing_parents(out)
    home = out if existing else out.parent
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f".{out.name or 'draft'}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()                                  # mode from the umask, as any new folder
    try:
        yield tmp
        # every file durable, with its target's mode (new: 0644, though safetensors writes
        # 0600: a draft folder is meant to be shared), before any becomes visible
        for f in tmp.iterdir():
            seal(f, out / f.name)
        if existing:
            _move_files(tmp, out)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)
        raise


def _move_files(tmp: Path, out: Path) -> None:
    """Move the files of `tmp` into `out` (provenance.json last, so that a draft folder
    with a new provenance.json is complete), then remove `tmp`."""
    names = sorted((f.name for f in tmp.iterdir()), key=lambda n: (n == PROVENANCE, n))
    clash = [n for n in names if (out / n).is_dir()]
    if clash:
        raise InputError(f"holds a folder named {clash[0]}, where a draft file goes",
                         file=out)
    for name in names:
        os.replace(tmp / name, out / name)
    tmp.rmdir()


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
    prov = Path(layers_file).with_name(PROVENANCE)
    p = json.loads(prov.read_text()) if prov.is_file() else {"assembled_from": str(layers_file)}
    save_draft(draft, AutoTokenizer.from_pretrained(tp), out, p)
    return out
