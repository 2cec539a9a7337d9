"""Serving metrics: per-request latencies, the throughput-latency summary, matched-latency
ratios, and `pipedec-sim plot --kind serving`."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipedec_sim.results.serving import (
    SERVED_COLUMNS,
    SERVING_COLUMNS,
    at_matched_latency,
    format_serving,
    served_frame,
    served_row,
    serving_summary,
)

PNG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- per request

def test_served_row_exact_latencies():
    commits = [(130.0, 1, 0, "token"), (150.0, 3, 2, "hit"), (190.0, 2, 1, "miss")]
    row = served_row("pipedec", "r1", arrival_ms=100.0, commits=commits, end_ms=195.0,
                     prompt_len=16, cfg_rate=2.0)
    assert row["ttft_ms"] == 30.0 and row["first_ms"] == 130.0
    assert row["tokens"] == 6 and row["drafted"] == 3 and row["decode_tokens"] == 5
    assert row["tbt_ms"] == pytest.approx(60.0 / 5)          # (190 - 130) / 5, as metrics.py
    assert row["e2e_ms"] == 95.0 and row["prompt_len"] == 16 and row["cfg_rate"] == 2.0


def test_served_row_single_commit_has_no_tbt():
    row = served_row("ar", "r", arrival_ms=0.0, commits=[(5.0, 2, 0, "token")], end_ms=6.0,
                     prompt_len=1)
    assert row["decode_tokens"] == 0 and math.isnan(row["tbt_ms"])
    with pytest.raises(ValueError, match="committed nothing"):
        served_row("ar", "r", arrival_ms=0.0, commits=[], end_ms=1.0, prompt_len=1)


def test_served_frame_columns():
    df = served_frame([served_row("ar", "a", arrival_ms=0.0, commits=[(1.0, 1, 0, "t")],
                                  end_ms=1.0, prompt_len=1, cfg_rate=1.0)])
    assert list(df.columns) == SERVED_COLUMNS + ["cfg_rate"]
    assert list(served_frame([]).columns) == SERVED_COLUMNS


# ----------------------------------------------------------------------------- summary

def frame(strategy: str, tbts: list[float], *, rate: float = 1.0, gap_ms: float = 100.0,
          tokens: int = 11, ttft_ms: float = 20.0) -> pd.DataFrame:
    """One request per TBT value, arriving every gap_ms, each committing `tokens` tokens one
    at a time at that TBT after its first token."""
    rows = []
    for i, tbt in enumerate(tbts):
        arrival = i * gap_ms
        first = arrival + ttft_ms
        commits = [(first + j * tbt, 1, j % 2, "token") for j in range(tokens)]
        rows.append(served_row(strategy, str(i), arrival_ms=arrival, commits=commits,
                               end_ms=commits[-1][0], prompt_len=4, cfg_rate=rate))
    return served_frame(rows)


def test_summary_percentiles_match_numpy():
    tbts = [5.0, 1.0, 3.0, 9.0, 2.0, 7.0, 4.0]
    df = frame("pipedec", tbts)
    s = serving_summary(df)
    assert list(s.columns) == ["cfg_rate"] + SERVING_COLUMNS
    row = s.iloc[0]
    for q in (50, 90, 99):
        assert row[f"tbt_p{q}_ms"] == pytest.approx(np.percentile(tbts, q))
    assert row.requests == 7 and row.tokens == 77
    end = max(i * 100.0 + 20.0 + 10 * t for i, t in enumerate(tbts))   # the last commit
    assert row.duration_s == pytest.approx(end / 1e3)
    assert row.throughput_tok_s == pytest.approx(77 / (end / 1e3))
    assert row.requests_per_s == pytest.approx(7 / (end / 1e3))
    assert row.tbt_mean_ms == pytest.approx(np.mean(tbts))     # equal decode tokens each
    assert row.ttft_p50_ms == pytest.approx(20.0)
    assert row.e2e_p99_ms == pytest.approx(np.percentile([20 + 10 * t for t in tbts], 99))
    assert row.hit_rate == pytest.approx(5 / 11)
    assert math.isnan(row.slo_attainment) and math.isnan(row.goodput_tok_s)


def test_summary_token_weighted_mean_and_nan_tbt_ignored():
    a = served_row("ar", "a", arrival_ms=0.0, commits=[(0.0, 1, 0, "t"), (10.0, 1, 0, "t")],
                   end_ms=10.0, prompt_len=1)                       # 1 decode token, 10 ms
    b = served_row("ar", "b", arrival_ms=0.0, commits=[(0.0, 1, 0, "t"), (30.0, 3, 0, "t")],
                   end_ms=30.0, prompt_len=1)                       # 3 decode tokens, 30 ms
    c = served_row("ar", "c", arrival_ms=0.0, commits=[(5.0, 4, 0, "t")], end_ms=5.0,
                   prompt_len=1)                                    # no TBT
    row = serving_summary(served_frame([a, b, c])).iloc[0]
    assert row.tbt_mean_ms == pytest.approx(40.0 / 4)
    assert row.tbt_p50_ms == pytest.approx(10.0)                   # median of [10, 10]
    assert row.tokens == 2 + 4 + 4


def test_summary_slo_attainment_and_goodput():
    df = frame("pipedec", [1.0, 2.0, 3.0, 4.0])
    s = serving_summary(df, slo_tbt_ms=2.5)
    row = s.iloc[0]
    assert row.slo_attainment == pytest.approx(0.5)
    assert row.goodput_tok_s == pytest.approx(0.5 * row.throughput_tok_s)
    both = serving_summary(df, slo_tbt_ms=2.5, slo_ttft_ms=10.0).iloc[0]
    assert both.slo_attainment == 0.0 and both.goodput_tok_s == 0.0
    ttft = serving_summary(df, slo_ttft_ms=25.0).iloc[0]
    assert ttft.slo_attainment == 1.0


def test_summary_groups_by_strategy_and_cfg():
    df = pd.concat([frame("ar", [4.0, 5.0], rate=1.0), frame("ar", [6.0, 8.0], rate=2.0),
                    frame("pipedec", [1.0, 2.0], rate=1.0)], ignore_index=True)
    s = serving_summary(df)
    assert [(r.strategy, r.cfg_rate) for r in s.itertuples()] == [
        ("ar", 1.0), ("ar", 2.0), ("pipedec", 1.0)]
    assert s.tbt_p50_ms.tolist() == pytest.approx([4.5, 7.0, 1.5])
    assert s.requests.tolist() == [2, 2, 2]
    slo = serving_summary(df, slo_tbt_ms=4.5)
    assert slo.slo_attainment.tolist() == [0.5, 0.0, 1.0]
    table = format_serving(slo)
    assert "tbt_p99_ms" in table and "100.0%" in table and "50.0%" in table
    assert "-" in format_serving(s)                      # NaN goodput without an SLO


# ----------------------------------------------------------------------------- matched latency

def curve(strategy: str, lat: list[float], thr: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"strategy": strategy, "cfg_rate": range(1, len(lat) + 1),
                         "tbt_p99_ms": lat, "throughput_tok_s": thr})


def test_matched_latency_double_throughput():
    lat, thr = [5.0, 8.0, 12.0, 30.0], [100.0, 180.0, 240.0, 260.0]
    s = pd.concat([curve("ar", lat, thr), curve("pipedec", lat, [2 * t for t in thr])])
    r = at_matched_latency(s, "pipedec", "ar")
    assert r["levels"] == lat and r["ratios"] == pytest.approx([2.0] * 4)
    assert r["min_ratio"] == pytest.approx(2.0) and r["max_ratio"] == pytest.approx(2.0)


def test_matched_latency_interpolates_within_range_only():
    s = pd.concat([curve("ar", [4.0, 10.0, 40.0], [10.0, 20.0, 25.0]),
                   curve("pipedec", [5.0, 15.0], [20.0, 40.0])])
    r = at_matched_latency(s, "pipedec", "ar", bound=12.0)
    assert r["levels"] == [10.0]                          # 4 and 40 ms are outside 5..15
    assert r["ratios"] == pytest.approx([30.0 / 20.0])    # interp(10) = 30
    assert r["best"] == 20.0 and r["baseline_best"] == 20.0
    assert r["bound_ratio"] == pytest.approx(1.0)
    none = at_matched_latency(s, "pipedec", "ar", bound=4.5)
    assert math.isnan(none["bound_ratio"]) and none["baseline_best"] == 10.0
    with pytest.raises(ValueError, match="no 'medusa' rows"):
        at_matched_latency(s, "medusa", "ar")


# ----------------------------------------------------------------------------- plot

def test_plot_serving_cli(tmp_path, capsys):
    from pipedec_sim.programs.cli import main
    df = pd.concat([frame("ar", [4.0, 5.0], rate=1.0), frame("ar", [6.0, 9.0], rate=2.0),
                    frame("pipedec", [1.0, 2.0], rate=1.0),
                    frame("pipedec", [2.0, 4.0], rate=2.0)], ignore_index=True)
    summary = tmp_path / "summary.csv"
    serving_summary(df).to_csv(summary, index=False)
    out = tmp_path / "serving.png"
    assert main(["plot", str(summary), "--kind", "serving", "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == PNG and len(data) > 5_000
    folder = tmp_path / "run"
    folder.mkdir()
    serving_summary(df).to_csv(folder / "summary.csv", index=False)
    assert main(["plot", str(folder), "--kind", "serving", "--where", "rate=2",
                 "--out", str(tmp_path / "one.png")]) == 0


def test_plot_serving_bad_tables(tmp_path, capsys):
    from pipedec_sim.programs.cli import main
    out = tmp_path / "x.png"
    bad = tmp_path / "bad.csv"
    serving_summary(frame("ar", [1.0])).drop(columns="tbt_p99_ms").to_csv(bad, index=False)
    capsys.readouterr()
    assert main(["plot", str(bad), "--kind", "serving", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing column(s) tbt_p99_ms" in err
    assert not out.exists()
    twice = tmp_path / "twice.csv"
    s = serving_summary(pd.concat([frame("ar", [1.0]), frame("ar", [2.0])], ignore_index=True)
                        .assign(cfg_stages=[2, 4]))
    s.to_csv(twice, index=False)
    assert main(["plot", str(twice), "--kind", "serving", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "several rows per strategy and rate" in err
    assert "stages" in err
    # the other kinds still ask for their own columns
    assert main(["plot", str(bad), "--kind", "speedup", "--out", str(out)]) == 2
    assert "missing column(s) stages, tbt_ms" in capsys.readouterr().err
