"""`--workers` and `--engine` (run, tune), and the progress bar: the same frames, row for
row, for any number of worker processes."""
from __future__ import annotations

import io

import pandas as pd
import pytest

from pipedec_sim.inputs.profile import load_profile
from pipedec_sim.programs import flags
from pipedec_sim.programs.cli import main
from pipedec_sim.programs.simulate import CHUNK, SimConfig, _chunks, simulate

from .helpers import bernoulli_trace
from .test_tune import TRACE


def test_simulate_with_two_workers_is_one_worker():
    trace = bernoulli_trace(9, 24, 0.7)
    profile = load_profile("analytic-llama70b-1b")
    cfg = SimConfig(stages=3, width=4, topk=4, strategies=("pipedec", "ar", "tree-sd"))
    seen = []
    one = simulate(trace, profile, cfg, workers=1, timeline_requests=2)
    two = simulate(trace, profile, cfg, workers=2, timeline_requests=2,
                   progress=lambda d, t: seen.append((d, t)))
    pd.testing.assert_frame_equal(one.requests, two.requests)
    pd.testing.assert_frame_equal(one.summary, two.summary)
    assert list(one.timelines) == list(two.timelines) and len(one.timelines) == 6
    assert all(one.timelines[k] == two.timelines[k] for k in one.timelines)
    assert one.requests.strategy.tolist() == ["pipedec"] * 9 + ["ar"] * 9 + ["tree-sd"] * 9
    assert one.requests.request.tolist() == [str(i) for i in range(9)] * 3
    assert seen[0] == (0, 27) and seen[-1] == (27, 27)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize("requests, workers", [(1, 2), (7, 1), (9, 2), (100, 2), (100, 64)])
def test_chunks_keep_every_request_in_order(requests, workers):
    chunks = _chunks(list(range(requests)), workers)
    assert [i for c in chunks for i, _ in c] == list(range(requests))
    assert all(1 <= len(c) <= CHUNK for c in chunks)


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    argv = ["run", "--stages", "3", "--trace", str(TRACE), "--max-requests", "5",
            "--width", "4", "--out", str(out), "--quiet", *extra]
    assert main(argv) == 0
    return [pd.read_csv(out / f, keep_default_na=False) for f in ("summary.csv",
                                                                 "requests.csv")]


def test_run_workers_1_and_2_write_the_same_tables(tmp_path, capsys):
    one = _run(tmp_path, "w1", "--workers", "1")
    two = _run(tmp_path, "w2", "--workers", "2")
    ref = _run(tmp_path, "ref", "--workers", "2", "--engine", "reference")
    for a, b, c in zip(one, two, ref):
        pd.testing.assert_frame_equal(a, b)
        pd.testing.assert_frame_equal(a, c)       # the engines agree exactly
    assert list(one[1].strategy.unique()) == ["ar", "tree-sd", "pipedec"]


@pytest.mark.parametrize("argv, field", [
    (["run", "--workers", "0"], "--workers"), (["run", "--engine", "quick"], "--engine"),
    (["tune", "--workers", "-1"], "--workers"), (["tune", "--engine", "x"], "--engine"),
    (["sweep", "--engine", "x"], "--engine"), (["sweep", "--executor", "mpi"], "--executor")])
def test_bad_speed_flags_are_one_line(argv, field, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--trace", str(TRACE)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and field in err and len(err.strip().splitlines()) == 1


def test_tune_workers_1_and_2_agree(tmp_path, capsys):
    frames = []
    for w in ("1", "2"):
        out = tmp_path / f"trials{w}.csv"
        assert main(["tune", "--trace", str(TRACE), "--stages", "3", "--max-requests", "2",
                     "--budget", "3", "--workers", w, "--out", str(out), "--quiet"]) == 0
        frames.append(pd.read_csv(out))
    pd.testing.assert_frame_equal(*frames)
    assert len(frames[0]) == 3


# --------------------------------------------------------------------------- progress

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_lines_in_a_log(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    with flags.progress_bar("runs:", unit="run") as p:
        for d in range(0, 41):
            p(d, 40)
    lines = log.getvalue().splitlines()
    assert len(lines) == 11 and lines[0] == "runs: 0/40" and "\r" not in log.getvalue()
    assert lines[-1].startswith("runs: 40/40 (100%), ") and " run/s, " in lines[-1]
    assert "eta 0:00" in lines[-1]


def test_progress_bar_on_a_terminal_ends_on_error(monkeypatch):
    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    with pytest.raises(RuntimeError):
        with flags.progress_bar("configurations:", unit="config") as p:
            p(0, 4)
            p(2, 4)
            p.write("a problem")
            raise RuntimeError("stop")
    text = term.getvalue()
    assert "configurations:" in text and "2/4" in text and "config/s" in text
    assert "a problem\n" in text and text.endswith("\n")        # closed: the line ended
    assert p._bar is None


def test_quiet_progress_prints_nothing_but_problems(monkeypatch):
    log = Terminal()
    monkeypatch.setattr("sys.stderr", log)
    with flags.progress_bar("runs:", quiet=True) as p:
        p(1, 2)
        p.note("status")
        p.write("a problem")
    assert log.getvalue() == "a problem\n"


def test_run_progress_in_a_log(tmp_path, capsys):
    assert main(["run", "--stages", "2", "--trace", str(TRACE), "--max-requests", "2",
                 "--strategies", "ar", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "simulated request runs: 0/2" in err and "simulated request runs: 2/2 (100%)" in err
