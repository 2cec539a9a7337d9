"""`pipedec-sim run` end to end, and its answers to bad input."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipedec_sim.programs.cli import main

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "traces" / "synthetic-llama70b.jsonl"


def run(*args):
    return main(["run", *map(str, args), "--quiet"])


def test_run_prints_one_row_per_strategy_and_writes_tables(tmp_path, capsys):
    out = tmp_path / "res"
    assert run("--stages", 4, "--trace", TRACE, "--max-requests", 2, "--out", out,
               "--timeline", tmp_path / "tl.json") == 0
    table = capsys.readouterr().out
    for name in ("ar", "tree-sd", "pipedec"):
        assert name in table
    summary = pd.read_csv(out / "summary.csv")
    need = {"strategy", "stages", "requests", "tokens", "tbt_ms", "tokens_per_s",
            "speedup_vs_ar", "hit_rate", "mean_accepted", "utilization"}
    assert need <= set(summary.columns)
    assert list(summary.strategy) == ["ar", "tree-sd", "pipedec"]
    assert summary.set_index("strategy").loc["ar", "speedup_vs_ar"] == 1.0
    assert (summary.tokens == 512).all()
    requests = pd.read_csv(out / "requests.csv")
    assert len(requests) == 6
    events = json.loads((tmp_path / "tl.json").read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert {"stage1", "stage4", "draft", "head"} <= names
    assert any(e.get("name") == "hit" for e in events)
    assert not list(out.glob(".*tmp"))


def test_prompt_file_runs_with_the_acceptance_model(tmp_path, capsys):
    prompts = tmp_path / "alpaca.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": f"Say {i}", "input": "",
                                             "output": "x" * 40}) for i in range(3)))
    assert main(["run", "--stages", "2", "--trace", str(prompts), "--strategies", "ar,pipedec",
                 "--max-new-tokens", "16"]) == 0
    captured = capsys.readouterr()
    assert "acceptance model" in captured.err
    assert "pipedec" in captured.out


def write_trace(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def bad_cases(tmp_path):
    header = TRACE.read_text().splitlines()[0]
    req = json.loads(TRACE.read_text().splitlines()[1])
    short = dict(req, draft_topk=req["draft_topk"][:-1])
    typo = dict(req, output="oops")
    prof = json.loads((ROOT / "pipedec_sim/profiles/analytic-llama70b-1b.json").read_text())
    del prof["link"]["latency_ms"]
    bad_prof = tmp_path / "p.json"
    bad_prof.write_text(json.dumps(prof))
    return [
        (["--trace", write_trace(tmp_path / "a.jsonl", [header, "{not json"])], "a.jsonl:2"),
        (["--trace", write_trace(tmp_path / "b.jsonl", [header, json.dumps(short)])], "b.jsonl:2"),
        (["--trace", write_trace(tmp_path / "c.jsonl", [header, json.dumps(typo)])], "output"),
        (["--trace", tmp_path / "missing.jsonl"], "missing.jsonl"),
        (["--trace", TRACE, "--profile", bad_prof], "link.latency_ms"),
        (["--trace", TRACE, "--profile", "no-such-profile"], "no-such-profile"),
        (["--trace", TRACE, "--stages", "81"], "stages"),
        (["--trace", TRACE, "--width", "0"], "--width"),
        (["--trace", TRACE, "--strategies", "ar,warp"], "warp"),
        (["--trace", TRACE, "--floor", "1.5"], "--floor"),
        (["--trace", TRACE, "--coverage", "2"], "--coverage"),
        (["--trace", TRACE, "--window", "0"], "--window"),
        (["--trace", TRACE, "--prune", "fast"], "--prune"),
    ]


def test_bad_input_exits_2_with_one_clear_line_and_writes_nothing(tmp_path):
    for args, needle in bad_cases(tmp_path):
        out = tmp_path / "never"
        proc = subprocess.run([sys.executable, "-m", "pipedec_sim.programs.cli", "run", "--quiet",
                               "--out", str(out), *map(str, args)],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert needle in proc.stderr, (needle, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not out.exists()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--stages", "--trace", "--profile", "--strategies", "--width", "--topk",
                 "--max-requests", "--seed", "--out", "--timeline", "--topology", "--prune",
                 "--no-cancel", "--window", "--coverage", "--tree-topk"):
        assert flag in text
    assert "{broadcast,inband,piggyback}" in text and "(default 16)" in text


def test_gzip_trace_reads_transparently(tmp_path):
    lines = TRACE.read_text().splitlines()[:3]
    gz = tmp_path / "t.jsonl.gz"
    gz.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    assert run("--stages", 2, "--trace", gz, "--strategies", "ar") == 0
