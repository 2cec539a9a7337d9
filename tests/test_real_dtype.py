"""`--dtype bfloat16`: weights and activations in bf16 through every path (per-stage loading,
gloo's float32 wire and back, the head's LM head and draft). One token per batch (plain PP)
computes exactly what HF's incremental greedy decoding computes, so it must match it
bit for bit; tree batches change the order of sums, so speculative strategies match
only up to bf16 rounding (see `pipedec-real run --help`)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.torch.head import Request  # noqa: E402
from backends.torch.inline import InlinePipeline  # noqa: E402
from backends.torch.models import load  # noqa: E402

pytestmark = pytest.mark.real
PROMPTS = ["Hello, world! This is a test.", "abc", "The quick brown fox jumps"]
N = 20


@pytest.fixture(scope="module")
def bf16_refs():
    torch.set_num_threads(1)
    t = load("tiny")
    t.model.to(torch.bfloat16)
    refs = []
    for p in PROMPTS:
        ids = t.encode(p)
        out = t.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=N,
                               pad_token_id=0)
        refs.append(out[0, len(ids):].tolist())
    return refs


def test_inline_plain_pp_in_bf16_equals_hf_greedy_in_bf16(bf16_refs):
    target = load("tiny")
    pipe = InlinePipeline(target, None, 2, dtype=torch.bfloat16)
    assert next(target.model.parameters()).dtype == torch.bfloat16
    outs = [pipe.run("ar", Request(str(i), target.encode(p), N)).output
            for i, p in enumerate(PROMPTS)]
    assert outs == bf16_refs


def test_distributed_bf16_run(tmp_path, bf16_refs):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    r = subprocess.run([sys.executable, "-m", "backends.torch.cli", "run", "--target", "tiny",
                        "--draft", "tiny-noisy", "--stages", "2", "--prompts",
                        str(tmp_path / "p.txt"), "--max-new-tokens", str(N), "--width", "4",
                        "--topk", "4", "--dtype", "bfloat16", "--strategies", "ar,pipedec",
                        "--out", str(tmp_path / "out"), "--quiet"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "out" / "outputs.jsonl").read_text().splitlines()]
    ar = [x["output_ids"] for x in rows if x["strategy"] == "ar"]
    assert ar == bf16_refs                       # through gloo's float32 wire and back
    assert all(len(x["output_ids"]) == N for x in rows)


def test_bad_dtype_is_a_flag_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "backends.torch.cli", "run", "--target", "tiny",
                        "--prompts", "x.txt", "--dtype", "int8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--dtype" in r.stderr and r.stderr.count("\n") == 1
