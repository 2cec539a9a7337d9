"""`pipedec-real serve`: the serving table (one row per strategy), the --out files and the
one-line errors, on the tiny models, with the inline driver (simulated clock) and the
distributed runtime (stage processes, wall clock). Every request's output in
outputs.jsonl is the target's own greedy output (HF `generate`)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.torch.cli import main  # noqa: E402
from backends.torch.models import load  # noqa: E402
from pipedec_sim.protocol.serve import SERVE_STRATEGIES  # noqa: E402

pytestmark = pytest.mark.real
PROMPTS = ["Hello, world! This is a test.", "abc", "The quick brown fox jumps",
           "Once upon a time there was", "x"]
NEW_TOKENS = 10
KNOB_FLAGS = ["--width", "4", "--topk", "4", "--depth", "4", "--tree-topk", "4",
              "--total", "16"]


@pytest.fixture(scope="module")
def refs():
    """The target's greedy output per prompt text (requests drawn again share it)."""
    torch.set_num_threads(1)
    target = load("tiny")
    out = {}
    for text in PROMPTS:
        ids = target.encode(text)
        gen = target.model.generate(torch.tensor([ids]), do_sample=False,
                                    max_new_tokens=NEW_TOKENS, pad_token_id=0)
        out[tuple(ids)] = gen[0, len(ids):].tolist()
    return out


def serve(tmp_path, *flags):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return main(["serve", "--target", "tiny", "--draft", "tiny-noisy", "--prompts",
                 str(prompts), "--max-new-tokens", str(NEW_TOKENS), "--quiet", *KNOB_FLAGS,
                 *flags])


def check_files(out, strategies, n_requests, refs) -> None:
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.strategy) == list(strategies)
    assert (summary.requests == n_requests).all()
    assert (summary.throughput_tok_s > 0).all() and summary.tbt_p50_ms.notna().all()
    requests = pd.read_csv(out / "requests.csv", dtype={"request": str})
    assert len(requests) == len(strategies) * n_requests
    assert (requests.tokens == NEW_TOKENS).all() and (requests.e2e_ms > 0).all()
    lines = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    assert [x["strategy"] for x in lines] == [s for s in strategies for _ in range(n_requests)]
    for x in lines:
        assert x["output_ids"] == refs[tuple(x["prompt_ids"])], (x["strategy"], x["id"])


def table_rows(text: str) -> list[str]:
    """The strategies of the printed table's rows (the header line starts with it)."""
    lines = text.strip().splitlines()
    start = next(i for i, x in enumerate(lines) if x.split()[:1] == ["strategy"])
    return [x.split()[0] for x in lines[start + 1:]]


def test_inline_serve_prints_a_row_per_strategy_and_writes_tables(tmp_path, capsys, refs):
    """Closed loop, more requests than prompts (drawn again), every serving strategy, a
    step's parts in one forward over their requests."""
    out = tmp_path / "out"
    assert serve(tmp_path, "--stages", "2", "--concurrency", "3", "--requests", "7",
                 "--inline", "--batched-forward", "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "times: simulated" in text
    assert table_rows(text) == list(SERVE_STRATEGIES)
    check_files(out, SERVE_STRATEGIES, 7, refs)


def test_distributed_serve_runs_on_stage_processes(tmp_path, capsys, refs):
    """Open loop (Poisson), wall-clock times, over three stage processes; --timeline
    holds each strategy's commits, head work and stage steps."""
    out = tmp_path / "out"
    strategies = ("pp", "pipedec-db")
    timeline = tmp_path / "serve.json"
    assert serve(tmp_path, "--stages", "3", "--rate", "30", "--strategies",
                 ",".join(strategies), "--out", str(out), "--timeout", "60",
                 "--timeline", str(timeline)) == 0
    text = capsys.readouterr().out
    assert "times: wall clock (3 stage processes" in text
    assert table_rows(text) == list(strategies)
    check_files(out, strategies, len(PROMPTS), refs)
    events = json.loads(timeline.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(names.values()) == sorted(strategies)
    threads = {(e["pid"], e["args"]["name"]) for e in events if e["name"] == "thread_name"}
    for pid in names:
        assert {(pid, f"stage{j}") for j in (1, 2, 3)} <= threads
        commits = [e for e in events if e["pid"] == pid and e["ph"] == "i"]
        assert sum(len(e["args"]["tokens"]) for e in commits) == len(PROMPTS) * NEW_TOKENS
        steps = [e for e in events if e["pid"] == pid and e["ph"] == "X"
                 and e["name"] == "step"]
        assert steps and all(e["dur"] >= 0 and e["ts"] >= 0 for e in steps)
    assert {(pid, "draft") for pid, n in names.items() if n == "pipedec-db"} <= threads
    requests = pd.read_csv(out / "requests.csv")
    for _, arrivals in requests.groupby("strategy").arrival_ms:     # the same Poisson times
        assert arrivals.is_monotonic_increasing and arrivals.iloc[0] > 0
        assert list(arrivals) == list(requests.arrival_ms[:len(PROMPTS)])


@pytest.mark.parametrize("flags, message", [
    ([], "one of the arguments --concurrency --rate is required"),
    (["--concurrency", "2", "--rate", "3"], "not allowed with argument"),
    (["--concurrency", "0"], "must be > 0"),
    (["--concurrency", "2", "--strategies", "pp,vllm"], "unknown serving strategy 'vllm'"),
    (["--concurrency", "2", "--stages", "9"], "9 stages but the target has only 4 layers"),
    (["--concurrency", "2", "--step-width", "0"], "--step-width"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:       # argparse's own errors
        code = serve(tmp_path, *flags)
        raise SystemExit(code)                 # the program's checks return 2
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


def test_speculation_without_a_draft_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("abc\n")
    assert main(["serve", "--target", "tiny", "--prompts", str(prompts), "--concurrency", "1",
                 "--strategies", "pp,tree-sd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pipedec-real: error: field '--draft': tree-sd, chain-sd and pipedec-db "
                   "need a draft model"]


def test_every_serve_flag_has_help_and_shows_its_default():
    from backends.torch.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for a in sub.choices["serve"]._actions:
        if a.option_strings and a.option_strings[0] not in ("-h", "--help"):
            assert a.help and ("required" if a.required else "default") in a.help, a.help
