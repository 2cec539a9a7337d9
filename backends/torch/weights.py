"""Reading model weights: safetensors only (a pickle can run code when it is loaded)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pipedec_sim.errors import InputError

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLES = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_weights(folder: Path) -> None:
    """An HF folder must hold safetensors weights; pickle files are refused by name."""
    if any((folder / name).is_file() for name in SAFE_WEIGHTS):
        return
    pickles = sorted({f.name for pattern in PICKLES for f in folder.glob(pattern)})
    if pickles:
        raise InputError("a pickle checkpoint, which can run code when loaded: only "
                         "safetensors weights are read (convert it to safetensors where you "
                         "trust the file)", file=folder / pickles[0])
    raise InputError(f"no weights: expected {' or '.join(SAFE_WEIGHTS)} beside config.json",
                     file=folder)


def from_folder(path: Path, dtype=torch.float32):
    """An HF folder's causal LM from its safetensors weights (never a pickle), eval mode."""
    check_weights(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                use_safetensors=True).eval()
