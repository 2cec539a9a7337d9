"""`--out-format csv|parquet` (run, sweep, tune): Parquet tables hold what the CSV tables
hold; the output checks know the Parquet names; no pyarrow is one line, exit 2."""
from __future__ import annotations

import sys

import pandas as pd
import pytest

from pipedec_sim.programs.cli import main
from pipedec_sim.results.tables import read_table

from .test_tune import TRACE

pytest.importorskip("pyarrow")

RUN = ["run", "--stages", "3", "--trace", str(TRACE), "--max-requests", "3", "--width", "4",
       "--workers", "1", "--quiet"]
SWEEP = ["sweep", "--trace", str(TRACE), "--stages", "2", "--strategies", "pipedec",
         "--width", "2,4", "--max-requests", "2", "--workers", "1", "--quiet"]


def same_as_csv(parquet: pd.DataFrame, csv: pd.DataFrame) -> None:
    """The same rows and values; CSV has lost the column types (ids read as numbers)."""
    assert list(parquet.columns) == list(csv.columns) and len(parquet) == len(csv)
    for col in parquet.columns:
        a, b = parquet[col], csv[col]
        if a.dtype.kind in "iuf" and b.dtype.kind in "iuf":
            pd.testing.assert_series_equal(a.astype(float), b.astype(float), check_names=False)
        else:
            assert [None if pd.isna(x) else str(x) for x in a] == \
                   [None if pd.isna(x) else str(x) for x in b], col


def test_run_parquet_round_trips_the_csv_tables(tmp_path, capsys):
    assert main([*RUN, "--out", str(tmp_path / "csv")]) == 0
    assert main([*RUN, "--out", str(tmp_path / "pq"), "--out-format", "parquet"]) == 0
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == ["requests.parquet",
                                                                    "summary.parquet"]
    assert "requests.parquet" in capsys.readouterr().err
    for name in ("summary", "requests"):
        pq = read_table(tmp_path / "pq" / f"{name}.parquet", "parquet")
        same_as_csv(pq, pd.read_csv(tmp_path / "csv" / f"{name}.csv"))
    req = read_table(tmp_path / "pq" / "requests.parquet", "parquet")
    assert req.request.tolist() == ["0", "1", "2"] * 3      # ids keep their type


def test_run_parquet_is_the_simulated_frame(tmp_path):
    from pipedec_sim.inputs.profile import load_profile
    from pipedec_sim.inputs.prompts import load_workload
    from pipedec_sim.programs.simulate import SimConfig, simulate
    assert main([*RUN, "--out", str(tmp_path), "--out-format", "parquet"]) == 0
    trace = load_workload(TRACE, max_requests=3)[0]
    res = simulate(trace, load_profile("analytic-llama70b-1b"), SimConfig(stages=3, width=4))
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "requests.parquet"),
                                  res.requests, check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "summary.parquet"),
                                  res.summary, check_dtype=False)


def test_sweep_parquet_tables_equal_csv_tables(tmp_path, capsys):
    assert main([*SWEEP, "--out", str(tmp_path / "csv")]) == 0
    assert main([*SWEEP, "--out", str(tmp_path / "pq"), "--out-format", "parquet"]) == 0
    assert {p.name for p in (tmp_path / "pq").iterdir()} >= {"requests.parquet",
                                                              "summary.parquet", "parts"}
    assert not (tmp_path / "pq" / "summary.csv").exists()
    assert "speedup_vs_ar" in capsys.readouterr().out        # the table, read back
    for name in ("summary", "requests"):
        same_as_csv(pd.read_parquet(tmp_path / "pq" / f"{name}.parquet"),
                    pd.read_csv(tmp_path / "csv" / f"{name}.csv"))


def test_tune_parquet_trials(tmp_path, capsys):
    tune = ["tune", "--trace", str(TRACE), "--stages", "3", "--max-requests", "1",
            "--budget", "3", "--workers", "1", "--quiet"]
    assert main([*tune, "--out", str(tmp_path / "t.csv")]) == 0
    assert main([*tune, "--out", str(tmp_path / "t.parquet"), "--out-format", "parquet"]) == 0
    same_as_csv(pd.read_parquet(tmp_path / "t.parquet"), pd.read_csv(tmp_path / "t.csv"))


@pytest.mark.parametrize("argv", [RUN + ["--out"], SWEEP + ["--out"]])
def test_output_checks_know_parquet_names(tmp_path, capsys, argv):
    (tmp_path / "summary.parquet").mkdir()
    assert main([*argv, str(tmp_path), "--out-format", "parquet"]) == 2
    err = capsys.readouterr().err
    assert "holds a folder named summary.parquet" in err and len(err.splitlines()) == 1


def test_without_pyarrow_parquet_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)          # import pyarrow fails
    for argv in (RUN + ["--out", str(tmp_path / "r")], SWEEP + ["--out", str(tmp_path / "s")],
                 ["tune", "--trace", str(TRACE), "--out", str(tmp_path / "t.parquet")]):
        assert main([*argv, "--out-format", "parquet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "field '--out-format'" in err, err
        assert "pip install 'pipedec-sim[parquet]'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())                       # nothing written


def test_out_format_is_not_format(capsys):
    with pytest.raises(SystemExit) as e:
        main([*RUN, "--out-format", "json"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--out-format" in err and len(err.splitlines()) == 1
    assert "--out-format" in _help("run") and "--format" in _help("run")


def _help(cmd: str) -> str:
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main([cmd, "--help"])
    return buf.getvalue()


def test_plot_reads_a_parquet_sweep(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "res"
    assert main([*SWEEP, "--out", str(out), "--out-format", "parquet"]) == 0
    for kind in ("speedup", "width"):
        png = tmp_path / f"{kind}.png"
        code = main(["plot", str(out), "--kind", kind, "--out", str(png)])
        assert code == 0 and png.stat().st_size > 1000, capsys.readouterr().err
        capsys.readouterr()
    bad = tmp_path / "summary.parquet"
    bad.write_bytes(b"not parquet")
    assert main(["plot", str(bad), "--kind", "speedup", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "not a Parquet table" in err and err.count("\n") == 1
