"""Bad input to `pipedec-real` found by probing it, each refused in one line before any
stage starts: an empty path, two outputs that are one file, a prompt longer than the
target's positions, a flag that changes nothing; and an event record that a failed run
cuts to its finished request runs instead of leaving half a request (or wiping the old
file). Everything here runs in this process (no stage is started)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.torch import cli  # noqa: E402
from backends.torch.eventlog import read_records  # noqa: E402

from .helpers import one_error_line, real_cli  # noqa: E402

pytestmark = pytest.mark.real


@pytest.fixture
def prompts(tmp_path) -> str:
    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\n")
    return str(path)


def _run(prompts, *more) -> list[str]:
    return ["run", "--target", "tiny", "--draft", "tiny-noisy", "--stages", "2",
            "--strategies", "ar", "--prompts", prompts, *map(str, more)]


@pytest.mark.parametrize("flag", ["--out", "--timeline", "--record-events"])
def test_an_empty_path_is_refused(prompts, capsys, flag):
    code, err = real_cli(_run(prompts, flag, ""), capsys)
    assert code == 2 and "expected a path, got an empty string" in one_error_line(err)


@pytest.mark.parametrize("more, flag, other", [
    (lambda d: ["--out", d / "o", "--timeline", d / "o" / "summary.csv"], "--timeline", "--out"),
    (lambda d: ["--timeline", d / "same.json", "--record-events", d / "same.json"],
     "--record-events", "--timeline"),
])
def test_two_outputs_that_are_one_file_are_refused(tmp_path, prompts, capsys, more, flag,
                                                   other):
    code, err = real_cli(_run(prompts, *more(tmp_path)), capsys)
    line = one_error_line(err)
    assert code == 2 and f"field '{flag}'" in line and f"where {other} writes" in line, err
    assert list(tmp_path.iterdir()) == [tmp_path / "p.txt"]


def test_a_prompt_past_the_targets_positions_is_refused(tmp_path, capsys):
    long = tmp_path / "long.txt"
    long.write_text("x " * 4200 + "\n")               # tiny: 4096 positions
    code, err = real_cli(_run(str(long), "--max-new-tokens", 4), capsys)
    line = one_error_line(err)
    assert code == 2 and "long.txt" in line and "past the target's 4096 positions" in line


def test_prompt_format_is_a_flag_of_run(tmp_path, capsys):
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"foo": "bar"}) + "\n")
    code, err = real_cli(_run(str(odd)), capsys)
    line = one_error_line(err)
    assert code == 2 and "name it with --format" in line and "pipedec-sim" not in line
    code, err = real_cli(_run(str(odd), "--format", "alpaca"), capsys)
    assert code == 2 and "instruction" in one_error_line(err), err


def test_serve_refuses_batched_forward_without_inline(prompts, capsys):
    code, err = real_cli(["serve", "--target", "tiny", "--draft", "tiny-noisy", "--stages", "2",
                          "--prompts", prompts, "--concurrency", "1", "--batched-forward"],
                         capsys)
    assert code == 2 and "--batched-forward" in one_error_line(err), err


def test_trace_names_the_flag_of_an_unknown_model(tmp_path, prompts, capsys):
    code, err = real_cli(["trace", "--target", "tiny", "--draft", "nosuch", "--prompts",
                          prompts, "--out", str(tmp_path / "t.jsonl")], capsys)
    line = one_error_line(err)
    assert code == 2 and "field '--draft'" in line and "'nosuch' is not a model" in line


# ---- the event record of a run that fails midway --------------------------------------------

def _record(path, runs: list, requests: int, finished: int, fail: bool = False) -> None:
    """Record `requests` requests (two steps each) of which the first `finished` finish."""
    from backends.torch.eventlog import Recorder
    with cli._event_record(path, runs) as rec:
        assert isinstance(rec, Recorder)
        for i in range(requests):
            rec.request(strategy="ar", id=str(i), prompt_ids=[1, 2])
            rec.start([])
            if i < finished:
                runs.append(i)
        if fail:
            raise KeyboardInterrupt


def test_a_failed_run_keeps_the_records_of_its_finished_requests(tmp_path):
    path = tmp_path / "ev.jsonl"
    _record(path, [], requests=2, finished=2)
    assert [r["request"]["id"] for r in read_records(path)] == ["0", "1"]
    _record(path, [], requests=3, finished=1)          # a stage failed in request 1
    assert [r["request"]["id"] for r in read_records(path)] == ["0"]
    _record(path, [], requests=1, finished=0)          # nothing finished: the old file stays
    assert [r["request"]["id"] for r in read_records(path)] == ["0"]
    with pytest.raises(KeyboardInterrupt):             # the head itself stopped: likewise
        _record(path, [], requests=2, finished=2, fail=True)
    assert [r["request"]["id"] for r in read_records(path)] == ["0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev.jsonl"]
