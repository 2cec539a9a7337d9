"""`pipedec-sim tune`: never worse than the default; bounded neighbours; CLI output."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipedec_sim.programs.cli import main
from pipedec_sim.programs.sweep import POLICY_KNOBS, build_grid
from pipedec_sim.programs.tune import DEFAULT, MAX_TOPK, MAX_WIDTH, _neighbours, tune

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "traces" / "synthetic-llama70b.jsonl"


def common(stages=3, requests=1):
    g = build_grid(None, {"trace": [str(TRACE)], "stages": [stages], "strategies": ["pipedec"],
                          "max_requests": [requests]})
    c = {k: v[0] for k, v in g.axes.items() if k != "strategies"}
    for k in POLICY_KNOBS:
        c.pop(k)
    return c


def test_tuner_is_at_least_as_good_as_the_default():
    seen = []
    best, default, trials = tune(common(), budget=6, progress=lambda d, t: seen.append((d, t)))
    assert default.key == DEFAULT
    assert best.tbt_ms <= default.tbt_ms
    assert len(trials) == 6 and seen[-1] == (6, 6)
    assert trials[0].tbt_ms == best.tbt_ms


def test_neighbours_stay_in_bounds():
    for p in [(1, 1, 0.0), (MAX_WIDTH, MAX_TOPK, 0.1), (16, 16, 1e-3)]:
        for w, k, f in _neighbours(p, 2.0):
            assert 1 <= w <= MAX_WIDTH and 1 <= k <= MAX_TOPK and 0 <= f < 1
            assert (w, k, f) != p
    assert (16, 16, 1e-4) in _neighbours((16, 16, 0.0), 2.0)


def test_tune_cli(capsys, tmp_path):
    out = tmp_path / "trials.csv"
    assert main(["tune", "--trace", str(TRACE), "--stages", "3", "--max-requests", "1",
                 "--budget", "5", "--holdout", "1", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "best: --width" in text and "for the default (W=16, k=16, floor=0)" in text
    assert "held-out requests 1..1" in text
    assert out.is_file() and len(out.read_text().splitlines()) == 6


def test_tune_cli_bad_input(capsys, tmp_path):
    assert main(["tune", "--trace", str(tmp_path / "nope.jsonl"), "--stages", "3"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["tune", "--trace", str(TRACE), "--stages", "3", "--profile", "nope"]) == 2
    assert "--profile" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", "--trace", str(TRACE), "--stages", "0"])
