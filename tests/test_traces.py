"""Trace format (read/write/validate) and the parametric acceptance model."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
from pathlib import Path

import pytest

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.acceptance import (
    DEFAULT_ACCEPTANCE,
    AcceptanceModel,
    fit_acceptance,
    load_acceptance,
    save_acceptance,
    synthetic_trace,
)
from pipedec_sim.inputs.traces import (
    FORMAT,
    Trace,
    TraceHeader,
    TraceRequest,
    is_trace_file,
    read_trace,
    write_trace,
)

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "traces" / "synthetic-llama70b.jsonl"


def _header(**kw) -> TraceHeader:
    base = dict(source="recorded", target="tgt", draft="drf", tokenizer="tok", dataset="ds",
                top_k=3, command="make it", created="2026-11-26")
    return TraceHeader(**{**base, **kw})


def _trace() -> Trace:
    reqs = [TraceRequest(id="a", prompt_len=2, output=[5, 6],
                         topk_ids=[[5, 7, 8], [9, 6]], topk_probs=[[0.6, 0.2, 0.1], [0.5, 0.3]],
                         prompt_ids=[1, 2]),
            TraceRequest(id="b", prompt_len=4, output=[3], topk_ids=[[3]], topk_probs=[[1.0]])]
    return Trace(header=_header(notes="n", extra={"future_key": [1, 2]}), requests=reqs)


def _lines(trace: Trace, tmp_path: Path) -> list[dict]:
    path = tmp_path / "t.jsonl"
    write_trace(trace, path)
    return [json.loads(x) for x in path.read_text().splitlines()]


def _write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _expect(path: Path, line: int | None, field: str | None, match: str = "") -> InputError:
    with pytest.raises(InputError, match=match) as info:
        read_trace(path)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), line, field), str(err)
    assert str(path) in str(err)
    return err


# ----------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz"])
def test_round_trip(tmp_path, name):
    path = tmp_path / name
    write_trace(_trace(), path)
    back = read_trace(path)
    assert back.header == _trace().header
    assert back.requests == _trace().requests
    assert back.path == str(path)
    assert is_trace_file(path)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left behind


def test_gzip_detected_by_content_and_reproducible(tmp_path):
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    write_trace(_trace(), a)
    write_trace(_trace(), b)
    assert a.read_bytes() == b.read_bytes()  # mtime=0: same trace, same bytes
    renamed = tmp_path / "plain-name.jsonl"
    renamed.write_bytes(a.read_bytes())
    assert read_trace(renamed).requests == _trace().requests


def test_int_ids_blank_lines_and_max_requests(tmp_path):
    lines = _lines(_trace(), tmp_path)
    lines[1]["id"] = 7
    path = _write_lines(tmp_path / "x.jsonl", [lines[0], "", lines[1], lines[2], "  "])
    t = read_trace(path)
    assert [r.id for r in t.requests] == ["7", "b"]
    assert len(read_trace(path, max_requests=1).requests) == 1


def test_is_trace_file_negative(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"instruction": "x"}\n')
    (tmp_path / "bin").write_bytes(b"\x00\xff\xfe")
    assert not is_trace_file(tmp_path / "p.jsonl")
    assert not is_trace_file(tmp_path / "bin")
    assert not is_trace_file(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- validation

def _mutated(tmp_path: Path, line_no: int, mutate) -> Path:
    lines = _lines(_trace(), tmp_path)
    mutate(lines[line_no - 1])
    return _write_lines(tmp_path / "bad.jsonl", lines)


@pytest.mark.parametrize("line_no,mutate,field,match", [
    (1, lambda d: d.update(format="pipedec-trace/0"), "format", "pipedec-trace/1"),
    (1, lambda d: d.pop("format"), "format", "speculation trace"),
    (1, lambda d: d.update(source="guessed"), "source", "recorded"),
    (1, lambda d: d.pop("target"), "target", "missing"),
    (1, lambda d: d.update(top_k="3"), "top_k", "integer"),
    (1, lambda d: d.update(created="26/11/2026"), "created", "YYYY-MM-DD"),
    (1, lambda d: d.update(acceptance_model={"alpha": 1, "beta": 1}), "acceptance_model",
     "synthetic"),
    (2, lambda d: d.pop("output"), "output", "missing"),
    (2, lambda d: d.update(prompt_len="12"), "prompt_len", "integer"),
    (2, lambda d: d.update(prompt_len=0), "prompt_len", ">= 1"),
    (2, lambda d: d.update(output=[]), "output", "at least 1"),
    (2, lambda d: d.update(output=[5, -1]), "output[1]", "token id"),
    (2, lambda d: d.update(id=True), "id", "string"),
    (2, lambda d: d["draft_topk"].pop(), "draft_topk", "one per position"),
    (2, lambda d: d["draft_topk"][1].__setitem__(1, 9), "draft_topk[1]", "more than once"),
    (2, lambda d: d["draft_topk"][0].append(11), "draft_topk[0]", "top_k is 3"),
    (2, lambda d: d["draft_probs"][0].__setitem__(0, 1.5), "draft_probs[0][0]", r"\[0, 1\]"),
    (2, lambda d: d["draft_probs"][0].__setitem__(1, "0.2"), "draft_probs[0][1]", "probability"),
    (2, lambda d: d["draft_probs"][1].pop(), "draft_probs[1]", "expected 2 probabilities"),
    (2, lambda d: d["draft_probs"].pop(), "draft_probs", "rows"),
    (2, lambda d: d["draft_probs"][0].reverse(), "draft_probs[0][1]", "best first"),
    (2, lambda d: d["draft_probs"].__setitem__(0, [0.7, 0.6, 0.1]), "draft_probs[0]", "sum"),
    (2, lambda d: d.update(prompt_ids=[1, 2, 3]), "prompt_ids", "prompt_len"),
    (3, lambda d: d.update(id="a"), "id", "duplicate"),
])
def test_validation_names_line_and_field(tmp_path, line_no, mutate, field, match):
    _expect(_mutated(tmp_path, line_no, mutate), line_no, field, match)


def test_bad_json_names_line(tmp_path):
    lines = _lines(_trace(), tmp_path)
    cut = '{"id": "c", "prompt_len": 3,'
    path = _write_lines(tmp_path / "bad.jsonl", [lines[0], lines[1], cut])
    _expect(path, 3, None, "invalid JSON")


def test_request_not_object(tmp_path):
    lines = _lines(_trace(), tmp_path)
    _expect(_write_lines(tmp_path / "bad.jsonl", [lines[0], [1, 2]]), 2, None, "object")


def test_empty_and_header_only(tmp_path):
    _expect(_write_lines(tmp_path / "empty.jsonl", []), None, None, "empty")
    _expect(_write_lines(tmp_path / "blank.jsonl", ["", " "]), None, None, "empty")
    header = _lines(_trace(), tmp_path)[0]
    _expect(_write_lines(tmp_path / "h.jsonl", [header]), 2, None, "no requests")


def test_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        read_trace(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"format": "pipedec-trace/1"}\n' * 50)[:40])
    with pytest.raises(InputError, match="cannot read"):
        read_trace(broken)


def test_write_rejects_invalid_trace_and_leaves_nothing(tmp_path):
    t = _trace()
    t.requests[0].topk_probs[0][0] = 2.0
    with pytest.raises(InputError, match="probability"):
        write_trace(t, tmp_path / "x.jsonl")
    with pytest.raises(InputError, match="at least one request"):
        write_trace(Trace(header=_header(), requests=[]), tmp_path / "y.jsonl")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- acceptance model

def test_sample_position_shape():
    rng = random.Random(1)
    m = AcceptanceModel(alpha=2.0, beta=2.0, top_k=8, vocab=50)
    for _ in range(500):
        ids, probs, true = m.sample_position(rng)
        assert len(ids) == len(set(ids)) == len(probs) == 8
        assert all(0 <= t < 50 for t in ids) and 0 <= true < 50
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-12


def test_top1_agreement_and_rank_probs_match_sampling():
    m = DEFAULT_ACCEPTANCE
    rng, n = random.Random(123), 20000
    ranks = [0] * (m.top_k + 1)
    for _ in range(n):
        ids, _, true = m.sample_position(rng)
        ranks[ids.index(true) if true in ids else m.top_k] += 1
    expected = m.rank_probs()
    assert abs(ranks[0] / n - m.alpha / (m.alpha + m.beta)) < 0.02
    assert expected[0] == pytest.approx(m.top1_agreement)
    assert abs(ranks[1] / n - expected[1]) < 0.015
    assert abs(ranks[-1] / n - (1 - sum(expected))) < 0.01


def test_synthetic_trace_deterministic_and_seeded():
    kw = dict(requests=3, output_len=(5, 20), prompt_len=(1, 9), created="2026-01-01")
    a, b = synthetic_trace(seed=4, **kw), synthetic_trace(seed=4, **kw)
    assert a == b
    assert synthetic_trace(seed=5, **kw).requests != a.requests
    assert synthetic_trace(seed=4, **{**kw, "requests": 5}).requests[:3] == a.requests
    assert all(5 <= len(r.output) <= 20 and 1 <= r.prompt_len <= 9 for r in a.requests)
    assert a.header.source == "synthetic"
    assert AcceptanceModel.from_dict(a.header.acceptance_model) == DEFAULT_ACCEPTANCE


def test_synthetic_trace_round_trips(tmp_path):
    t = synthetic_trace(requests=2, output_len=30, prompt_len=10, seed=1)
    write_trace(t, tmp_path / "s.jsonl.gz")
    assert read_trace(tmp_path / "s.jsonl.gz").requests == t.requests


def test_fit_recovers_model():
    truth = AcceptanceModel(alpha=3.0, beta=2.0, top_k=8)
    t = synthetic_trace(requests=20, output_len=300, prompt_len=8, model=truth, seed=2)
    fit = fit_acceptance([t], name="fit")
    assert abs(fit.top1_agreement - truth.top1_agreement) < 0.03
    assert fit.alpha == pytest.approx(truth.alpha, rel=0.25)
    assert fit.beta == pytest.approx(truth.beta, rel=0.25)
    assert fit.top_k == 8 and fit.name == "fit" and "6000" in fit.source


def test_fit_rejects_degenerate():
    with pytest.raises(InputError, match="Beta"):
        fit_acceptance([Trace(_header(), [TraceRequest("a", 1, [1, 2], [[1], [2]],
                                                       [[0.5], [0.5]])])])
    with pytest.raises(InputError):
        fit_acceptance([])


def test_model_dict_round_trip_and_errors(tmp_path):
    m = AcceptanceModel(alpha=1.5, beta=0.5, top_k=4, vocab=100, name="m", source="hand-set")
    assert AcceptanceModel.from_dict(m.to_dict()) == m
    save_acceptance(m, tmp_path / "m.json")
    assert load_acceptance(tmp_path / "m.json") == m
    for bad, field in [({"alpha": -1, "beta": 1}, "alpha"), ({"alpha": 1}, "beta"),
                       ({"alpha": 1, "beta": 1, "top_k": 0}, "top_k"),
                       ({"alpha": 1, "beta": 1, "top_k": 8, "vocab": 8}, "vocab"),
                       ({"alpha": 1, "beta": 1, "alhpa": 1}, "alhpa"),
                       ({"kind": "other", "alpha": 1, "beta": 1}, "kind")]:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(InputError) as info:
            load_acceptance(tmp_path / "bad.json")
        assert (info.value.file, info.value.field) == (str(tmp_path / "bad.json"), field)
    (tmp_path / "bad.json").write_text('{\n"alpha": 1,\n}')
    with pytest.raises(InputError) as info:
        load_acceptance(tmp_path / "bad.json")
    assert info.value.line == 3


def test_synthetic_header_acceptance_model_validated(tmp_path):
    t = synthetic_trace(requests=1, output_len=3, prompt_len=3)
    lines = _lines(t, tmp_path)
    lines[0]["acceptance_model"]["beta"] = 0
    _expect(_write_lines(tmp_path / "bad.jsonl", lines), 1, "acceptance_model.beta", "positive")


# ----------------------------------------------------------------------------- bundled trace

def test_bundled_trace_matches_its_script(tmp_path):
    assert BUNDLED.stat().st_size < 5_000_000
    bundled = read_trace(BUNDLED)
    h = bundled.header
    assert h.source == "synthetic" and h.top_k == 16 and len(bundled.requests) == 40
    assert h.command == "python traces/make_synthetic.py --out traces/synthetic-llama70b.jsonl"
    assert all(len(r.output) == 256 and 64 <= r.prompt_len <= 512 for r in bundled.requests)
    spec = importlib.util.spec_from_file_location("make_synthetic",
                                                  ROOT / "traces" / "make_synthetic.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "again.jsonl"
    assert script.main(["--out", os.fspath(out)]) == 0
    assert read_trace(out).requests == bundled.requests  # regenerating gives the same data
    assert load_acceptance(BUNDLED).top_k == 16  # a trace is also an acceptance source


def test_format_constant():
    assert FORMAT == "pipedec-trace/1"
