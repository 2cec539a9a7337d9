"""Prompt-file readers, trace_from_prompts and load_workload."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.acceptance import (
    AcceptanceModel,
    load_acceptance,
    trace_from_prompts,
)
from pipedec_sim.inputs.prompts import Prompt, load_workload, read_prompts
from pipedec_sim.inputs.traces import read_trace, write_trace

SAMPLES = Path(__file__).resolve().parent.parent / "traces" / "samples"
BUNDLED = SAMPLES.parent / "synthetic-llama70b.jsonl"


@pytest.mark.parametrize("name,dataset,count,first_id,starts", [
    ("alpaca.json", "alpaca", 3, "0", "Suggest three names"),
    ("alpaca.jsonl", "alpaca", 5, "0", "List four fruits"),
    ("sharegpt.json", "sharegpt", 3, "sample_0", "How do I reverse"),
    ("mtbench.jsonl", "mtbench", 3, "1", "Write a short welcome"),
    ("humaneval.jsonl", "humaneval", 3, "Sample/0", "def add("),
    ("gsm8k.jsonl", "gsm8k", 3, "0", "Mia buys"),
    ("prompts.txt", "plain", 4, "1", "Explain what a KV cache"),
])
def test_samples_auto_detected(name, dataset, count, first_id, starts):
    prompts = read_prompts(SAMPLES / name)
    assert len(prompts) == count
    assert {p.dataset for p in prompts} == {dataset}
    assert prompts[0].id == first_id and prompts[0].text.startswith(starts)
    assert len({p.id for p in prompts}) == count


def test_format_details():
    alpaca = read_prompts(SAMPLES / "alpaca.jsonl")
    assert alpaca[1].text == "Translate the phrase into French.\n\nGood morning, how are you?"
    assert alpaca[0].text == "List four fruits that are high in vitamin C."  # empty input
    assert alpaca[0].reference.startswith("Oranges")
    share = read_prompts(SAMPLES / "sharegpt.json")
    assert share[1].text.startswith("What is the difference")  # system turn skipped
    assert share[1].reference.startswith("Latency is")  # first gpt turn after it
    assert [p.id for p in share] == ["sample_0", "sample_1", "sample_3"]  # empty one skipped
    assert read_prompts(SAMPLES / "humaneval.jsonl")[0].reference == "    return a + b\n"
    assert read_prompts(SAMPLES / "gsm8k.jsonl")[0].reference.endswith("#### 14")
    assert read_prompts(SAMPLES / "mtbench.jsonl")[1].reference is None  # answer keys are terse
    assert [p.id for p in read_prompts(SAMPLES / "prompts.txt")] == ["1", "3", "4", "5"]


def test_gzip_forced_format_and_max_requests(tmp_path):
    gz = tmp_path / "HumanEval.jsonl.gz"
    gz.write_bytes(gzip.compress((SAMPLES / "humaneval.jsonl").read_bytes()))
    assert [p.id for p in read_prompts(gz)] == ["Sample/0", "Sample/1", "Sample/2"]
    assert len(read_prompts(SAMPLES / "alpaca.jsonl", max_requests=2)) == 2
    lines = read_prompts(SAMPLES / "gsm8k.jsonl", format="plain")
    assert len(lines) == 3 and lines[0].text.startswith('{"question"')
    with pytest.raises(InputError) as info:
        read_prompts(SAMPLES / "gsm8k.jsonl", format="alpaca")
    assert (info.value.line, info.value.field) == (1, "instruction")
    with pytest.raises(InputError, match="unknown prompt format"):
        read_prompts(SAMPLES / "gsm8k.jsonl", format="csv")


def _truncate_sharegpt(tmp_path: Path, marker: str) -> Path:
    text = (SAMPLES / "sharegpt.json").read_text()
    path = tmp_path / "cut.json"
    path.write_text(text[:text.index(marker) + len(marker)])
    return path


_WHOLE_2 = ["sample_0", "sample_1"]


@pytest.mark.parametrize("marker,ids,skipped", [
    ('"Suggest a name for a cat', _WHOLE_2, 1),  # inside a string
    ('"id": "sample_3", "conversations": [', _WHOLE_2, 1),  # between tokens
    ('"from": "gpt", "value": "Qwerty."}', _WHOLE_2, 1),  # the last item lacks only its closers
    ('{"id": "sample_2", "conversations": []},', _WHOLE_2, 1),  # right after a comma
    ('{"id": "sample_2", "conversations": []', _WHOLE_2, 0),  # a ']' that is not the list's
    ('"Qwerty."}\n  ]}', _WHOLE_2 + ["sample_3"], 1),  # only the list's ']' is missing
])
def test_truncated_sharegpt_keeps_whole_items(tmp_path, marker, ids, skipped):
    path = _truncate_sharegpt(tmp_path, marker)
    assert [p.id for p in read_prompts(path)] == ids
    _, desc = load_workload(path)
    assert "truncated" in desc and (f"skipped {skipped}" in desc) == bool(skipped)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name,text,line,field,match", [
    ("e.jsonl", "", None, None, "empty"),
    ("e.json", "  \n", None, None, "empty"),
    ("l.json", "[]", None, None, "no prompts"),
    ("s.json", '[{"conversations": []}]', None, None, "no prompts"),
    ("a.jsonl", '{"instruction": "x"}\n{"instruction": "y",\n', 2, None, "invalid JSON"),
    ("a.json", '[{"instruction": "x"},\n {"input": "y"}]', 2, "[1].instruction", "missing"),
    ("a.json", '[{"instruction": "x"},\n {"instruction": 3}]', 2, "[1].instruction", "string"),
    ("a.json", '[{"instruction": "x"}\n {"instruction": "y"}]', 2, "[0]", "expected ','"),
    ("a.json", '[{"instruction": "x"}, {"instruction": "y" "z"}]', 1, "[1]", "invalid JSON"),
    ("a.json", '[{"instruction": "x" "y"},\n {"instruction": "z"}, {"ins', 1, "[0]",
     "invalid JSON"),
    ("a.json", '[{"instruction": "x"}, {"instruction": "y"]', 1, "[1]", "invalid JSON"),
    ("a.jsonl", '{"instruction": "x"}\n\n{"instruction": "  "}\n', 3, "instruction", "empty"),
    ("a.jsonl", '{"instruction": "x"}\n[1]\n', 2, None, "object"),
    ("s.jsonl", '{"conversations": [{"from": "human"}]}', 1, "conversations[0].value", "missing"),
    ("s.jsonl", '{"conversations": "hi"}', 1, "conversations", "array"),
    ("m.jsonl", '{"question_id": 1, "turns": []}', 1, "turns", "non-empty"),
    ("m.jsonl", '{"turns": ["hi"]}', 1, "question_id", "missing"),
    ("h.jsonl", '{"task_id": "t", "prompt": null}', 1, "prompt", "string"),
    ("g.jsonl", '{"question": "q", "answer": 4}', 1, "answer", "string"),
    ("u.jsonl", '{"text": "hello"}', 1, None, "cannot tell"),
    ("x.json", "hello there", 1, None, "not JSON"),
    ("t.jsonl", '{"format": "pipedec-trace/9", "source": "recorded"}', 1, "format", "unsupported"),
])
def test_malformed_prompt_files(tmp_path, name, text, line, field, match):
    path = _write(tmp_path, name, text)
    with pytest.raises(InputError, match=match) as info:
        read_prompts(path)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), line, field), str(err)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        read_prompts(tmp_path / "nope.jsonl")


def test_trace_from_prompts_lengths(tmp_path):
    model = AcceptanceModel(alpha=2.0, beta=1.0, top_k=4, vocab=1000, name="m")
    prompts = [Prompt("a", "x" * 10, "d", reference="y" * 9), Prompt("b", "x", "d"),
               Prompt("c", "x" * 3, "d", reference="y" * 4000)]
    t = trace_from_prompts(prompts, model=model, max_new_tokens=50, seed=0)
    assert [(r.prompt_len, len(r.output)) for r in t.requests] == [(3, 3), (1, 50), (1, 50)]
    assert t.header.source == "synthetic" and t.header.top_k == 4
    assert "chars/token" in t.header.notes and "m" in t.header.notes
    assert trace_from_prompts(prompts, model=model, max_new_tokens=50, seed=0) == t
    write_trace(t, tmp_path / "t.jsonl")  # a valid trace
    assert read_trace(tmp_path / "t.jsonl").requests == t.requests


def test_load_workload_prompt_file():
    trace, desc = load_workload(SAMPLES / "alpaca.jsonl", max_new_tokens=20, seed=3)
    prompts = read_prompts(SAMPLES / "alpaca.jsonl")
    assert [r.id for r in trace.requests] == [p.id for p in prompts]
    for r, p in zip(trace.requests, prompts):
        assert r.prompt_len == math.ceil(len(p.text) / 4)
        assert len(r.output) == min(20, math.ceil(len(p.reference) / 4))
    assert trace.header.dataset == "alpaca: alpaca.jsonl"
    assert desc.startswith("prompt file alpaca.jsonl (alpaca, 5 prompts)")
    # Alpaca has no fitted model of its own: the ShareGPT fit (general chat) stands in
    assert "smollm2-sharegpt" in desc and "recorded top-1" in desc
    mt, desc = load_workload(SAMPLES / "mtbench.jsonl", max_new_tokens=64, max_requests=2)
    assert [len(r.output) for r in mt.requests] == [64, 64]
    assert "smollm2-mtbench" in desc
    _, desc = load_workload(SAMPLES / "alpaca.jsonl",
                            acceptance=load_acceptance("synthetic-default"))
    assert "synthetic-default" in desc and "hand-set" in desc


def test_load_workload_trace_and_custom_model():
    trace, desc = load_workload(BUNDLED, max_requests=2)
    assert len(trace.requests) == 2 and trace.path == str(BUNDLED)
    assert desc.startswith("synthetic trace synthetic-llama70b.jsonl (2 requests")
    model = AcceptanceModel(alpha=1.0, beta=1.0, top_k=2, vocab=10, name="mine", source="test")
    _, desc = load_workload(BUNDLED, max_requests=1, acceptance=model)
    assert "unused" in desc
    t, desc = load_workload(SAMPLES / "prompts.txt", acceptance=model, max_new_tokens=8)
    assert "mine (test)" in desc and t.header.top_k == 2
    assert all(len(r.output) == 8 for r in t.requests)
    assert json.loads(json.dumps(t.header.acceptance_model))["name"] == "mine"
