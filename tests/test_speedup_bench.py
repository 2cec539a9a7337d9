"""benchmarks/speedup.py (issue 16's predicted real speedup): its refusals and its report.
The run itself needs a host with S + 2 free cores; a smoke run of it (--force) is slow,
so only what decides its figures is tested here."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("speedup_bench",
                                                  ROOT / "benchmarks" / "speedup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_refuses_a_host_without_a_core_per_stage_and_two_for_the_head(bench, monkeypatch,
                                                                       capsys, tmp_path):
    monkeypatch.setattr(bench, "free_cores", lambda: 9)
    out = tmp_path / "r.txt"
    assert bench.main(["--stages", "4,8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "S=8 needs 10 free cores" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("flag", [["--stages", "4,x"], ["--stages", "0"]])
def test_bad_stage_counts_are_a_usage_error(bench, capsys, flag):
    with pytest.raises(SystemExit) as e:
        bench.main(flag)
    assert e.value.code == 2 and "stage counts" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--shape", "4x"], ["--eps", "-1"]])
def test_a_bad_pair_exits_2_before_any_work(bench, monkeypatch, capsys, flag):
    monkeypatch.setattr(bench, "free_cores", lambda: 64)
    monkeypatch.setattr(bench, "run_benchmark", lambda *a: pytest.fail("ran"))
    assert bench.main(flag) == 2
    err = capsys.readouterr().err
    assert err.startswith("speedup: error:") and "Traceback" not in err


def test_report_gives_speedups_as_ratios_of_time_per_token(bench):
    pred = {4: {"ar": 10.0, "tree-sd": 8.0, "pipedec": 5.0}}
    real = {4: {"ar": 12.0, "tree-sd": 8.0, "pipedec": 4.0}}
    assert bench.speedups(real[4]) == (3.0, 2.0)
    rows = [line.split() for line in bench.format_report(pred, real)]
    assert ["4", "pipedec", "/", "pp", "3.00x", "2.00x", "-33.3%"] in rows
    assert ["4", "pipedec", "/", "tree-sd", "2.00x", "1.60x", "-20.0%"] in rows
    assert ["4", "pipedec", "4.00", "5.00", "+25.0%"] in rows
