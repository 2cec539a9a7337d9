"""`pipedec-sim sweep`: tables, resume after a kill, grid validation."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipedec_sim.errors import InputError
from pipedec_sim.programs.cli import main
from pipedec_sim.programs.sweep import build_grid, config_id, merge, run_sweep

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "traces" / "synthetic-llama70b.jsonl"


def write_grid(tmp_path: Path, body: str, name: str = "grid.toml") -> Path:
    p = tmp_path / name
    p.write_text(body, encoding="utf-8")
    return p


TINY = f"""
stages = [2]
strategies = ["pipedec"]
width = [2, 4]
topk = [4]
trace = "{TRACE}"
max_requests = 2
"""


def test_tiny_grid_tables(tmp_path, capsys):
    grid = write_grid(tmp_path, TINY)
    out = tmp_path / "res"
    assert main(["sweep", "--grid", str(grid), "--out", str(out), "--workers", "1"]) == 0
    req = pd.read_csv(out / "requests.csv")
    summ = pd.read_csv(out / "summary.csv")
    # plain PP is added to the group, PipeDec runs at two widths: 3 configurations x 2 requests
    assert sorted(summ.strategy) == ["ar", "pipedec", "pipedec"]
    assert len(req) == 6 and not req.duplicated(["config_id", "request"]).any()
    assert summ.config_id.is_unique and set(summ.config_id) == set(req.config_id)
    assert {"cfg_width", "cfg_topk", "cfg_window", "cfg_trace", "cfg_profile",
            "cfg_link_gbps"} <= set(req.columns)
    assert summ.loc[summ.strategy == "ar", "speedup_vs_ar"].iloc[0] == pytest.approx(1.0)
    pdr = summ[summ.strategy == "pipedec"]
    assert sorted(pdr.cfg_width) == [2, 4] and (pdr.speedup_vs_ar > 1).all()
    # ar ignores the PipeDec knobs
    assert summ.loc[summ.strategy == "ar", "cfg_width"].isna().all()
    assert "speedup_vs_ar" in capsys.readouterr().out
    # a re-run skips everything and rewrites the same tables
    before = sorted(p.stat().st_mtime_ns for p in (out / "parts").iterdir())
    assert main(["sweep", "--grid", str(grid), "--out", str(out), "--workers", "1"]) == 0
    assert "skipped 3 finished" in capsys.readouterr().err
    assert sorted(p.stat().st_mtime_ns for p in (out / "parts").iterdir()) == before
    pd.testing.assert_frame_equal(pd.read_csv(out / "requests.csv"), req)


def test_flags_extend_grid_and_reuse_parts(tmp_path, capsys):
    grid = write_grid(tmp_path, TINY)
    out = tmp_path / "res"
    assert main(["sweep", "--grid", str(grid), "--out", str(out), "--workers", "1",
                 "--quiet"]) == 0
    assert main(["sweep", "--grid", str(grid), "--out", str(out), "--workers", "1",
                 "--width", "2,4,8"]) == 0
    assert "ran 1, skipped 3 finished" in capsys.readouterr().err
    summ = pd.read_csv(out / "summary.csv")
    assert sorted(summ.cfg_width.dropna()) == [2, 4, 8]


def test_config_id_is_stable_and_knob_sensitive():
    grid = build_grid(None, {"trace": [str(TRACE)], "stages": [2], "width": [2, 4],
                             "strategies": ["pipedec"]})
    ids = [c["config_id"] for c in grid.configs()]
    again = [c["config_id"] for c in build_grid(None, {"trace": [str(TRACE)], "stages": [2],
                                                       "width": [2, 4], "strategies": ["pipedec"]}
                                                ).configs()]
    assert ids == again and len(set(ids)) == 3
    assert all(config_id(c) == c["config_id"] for c in grid.configs())


@pytest.mark.parametrize("start", ["spawn", ""])
def test_parallel_workers(tmp_path, start):
    out = tmp_path / "res"
    env = {**os.environ, "PIPEDEC_START_METHOD": start}
    r = subprocess.run([sys.executable, "-m", "pipedec_sim.programs.cli", "sweep",
                        "--trace", str(TRACE), "--stages", "2", "--strategies", "pipedec",
                        "--width", "2,4",
                        "--max-requests", "1", "--workers", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "configurations: 3/3" in r.stderr
    assert len(pd.read_csv(out / "summary.csv")) == 3


def test_killed_sweep_resumes_without_loss_or_duplicates(tmp_path):
    grid = write_grid(tmp_path, f"""
stages = [2, 3]
strategies = ["pipedec"]
width = [2, 4, 8]
topk = [4]
trace = "{TRACE}"
max_requests = 2
""")
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "pipedec_sim.programs.cli", "sweep", "--grid", str(grid),
           "--out", str(out), "--workers", "1", "--quiet"]
    total = 8                                        # 2 stages x (ar + 3 widths)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = out / "parts"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if parts.is_dir() and any(p.suffix == ".csv" for p in parts.iterdir()):
                break
            if proc.poll() is not None:
                pytest.fail(f"sweep ended before it could be killed: {proc.stderr.read()}")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    kept = {p.name for p in parts.glob("*.csv")}
    assert 1 <= len(kept) < total, kept
    first_mtimes = {n: (parts / n).stat().st_mtime_ns for n in kept}

    r = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"skipped {len(kept)} finished" in r.stderr
    # parts that survived the kill were not recomputed
    assert all((parts / n).stat().st_mtime_ns == t for n, t in first_mtimes.items())
    req = pd.read_csv(out / "requests.csv")
    summ = pd.read_csv(out / "summary.csv")
    assert len(summ) == total and summ.config_id.is_unique
    assert len(req) == total * 2
    assert not req.duplicated(["config_id", "request"]).any()
    assert not list(parts.glob(".*.tmp"))

    # the same grid run in one go gives the same table
    fresh = tmp_path / "fresh"
    assert main(["sweep", "--grid", str(grid), "--out", str(fresh), "--workers", "1",
                 "--quiet"]) == 0
    key = ["config_id", "request"]
    a = req.sort_values(key).reset_index(drop=True)
    b = pd.read_csv(fresh / "requests.csv").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_merge_ignores_parts_of_other_grids(tmp_path):
    g1 = build_grid(None, {"trace": [str(TRACE)], "stages": [2], "width": [2],
                           "strategies": ["pipedec"], "max_requests": [1]})
    out = tmp_path / "res"
    run_sweep(g1.configs(), out)
    g2 = build_grid(None, {"trace": [str(TRACE)], "stages": [2], "strategies": ["ar"],
                           "max_requests": [1]})
    assert merge(out, g2.configs()) == 1
    assert list(pd.read_csv(out / "summary.csv").strategy) == ["ar"]


# --------------------------------------------------------------------------- validation

def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("body, key, needle", [
    ('stages = [2]\nwidht = [4]\ntrace = "{trace}"\n', "widht", "unknown key"),
    ('stages = [2]\nwidth = [4, 0]\ntrace = "{trace}"\n', "width", "must be >= 1"),
    ('stages = [2]\nfloor = 1.5\ntrace = "{trace}"\n', "floor", "must be < 1"),
    ('stages = [2]\nstrategies = ["ar", "medusa"]\ntrace = "{trace}"\n', "strategies",
     "choose from"),
    ('stages = [2]\ntrace = "missing.jsonl"\n', "trace", "no such file"),
    ('stages = [2]\nprofile = "nope"\ntrace = "{trace}"\n', "profile", "bundled"),
    ('stages = [2]\ntopology = "C"\ntrace = "{trace}"\n', "topology", "choose from"),
    ('stages = [2]\nwidth = "16"\ntrace = "{trace}"\n', "width", "expected an integer"),
    ('stages = [2]\nwidth = []\ntrace = "{trace}"\n', "width", "empty list"),
    ('stages = [2]\n\nstages2 = {{ a = 1 }}\ntrace = "{trace}"\n', "stages2", "unknown key"),
    ('stages = [2, 400]\ntrace = "{trace}"\n', "stages", "layers"),
])
def test_grid_errors_name_file_and_key(tmp_path, capsys, body, key, needle):
    grid = write_grid(tmp_path, body.format(trace=TRACE))
    out = tmp_path / "res"
    code, err = run_cli(["sweep", "--grid", str(grid), "--out", str(out)], capsys)
    assert code == 2
    assert str(grid) in err and f"field '{key}'" in err and needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()                          # nothing started


def test_grid_error_has_line_number(tmp_path, capsys):
    grid = write_grid(tmp_path, f'trace = "{TRACE}"\nstages = [2]\nwidth = [0]\n')
    code, err = run_cli(["sweep", "--grid", str(grid), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and f"{grid}:3: field 'width'" in err


def test_toml_syntax_error(tmp_path, capsys):
    grid = write_grid(tmp_path, "stages = [2,\nwidth = 4\n")
    code, err = run_cli(["sweep", "--grid", str(grid), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and str(grid) in err and "not valid TOML" in err


def test_missing_grid_file_and_missing_trace(tmp_path, capsys):
    code, err = run_cli(["sweep", "--grid", str(tmp_path / "nope.toml")], capsys)
    assert code == 2 and "nope.toml" in err and "no such file" in err
    grid = write_grid(tmp_path, "stages = [2]\n")
    code, err = run_cli(["sweep", "--grid", str(grid)], capsys)
    assert code == 2 and "field 'trace'" in err


def test_flag_errors_name_the_flag(tmp_path, capsys):
    code, err = run_cli(["sweep", "--trace", str(TRACE), "--width", "4,0",
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "field '--width'" in err and "must be >= 1" in err
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--trace", str(TRACE), "--stages", "4,x"])
    assert e.value.code == 2
    assert "--stages" in capsys.readouterr().err


def test_relative_paths_resolve_against_the_grid_file(tmp_path, capsys):
    sub = tmp_path / "grids"
    sub.mkdir()
    rel = os.path.relpath(TRACE, sub)
    grid = write_grid(sub, f'stages = [2]\nstrategies = ["ar"]\ntrace = "{rel}"\n'
                           f'max_requests = 1\n')
    assert main(["sweep", "--grid", str(grid), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "1 configurations" in capsys.readouterr().err


def test_build_grid_raises_input_error():
    with pytest.raises(InputError) as e:
        build_grid(None, {"trace": [str(TRACE)], "link_gbps": [-1.0]})
    assert e.value.field == "--link-gbps"


def test_ctrl_c_keeps_finished_configurations(tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "pipedec_sim.programs.cli", "sweep", "--trace", str(TRACE),
           "--stages", "2,3", "--strategies", "pipedec", "--width", "2,4,8", "--topk", "4",
           "--max-requests", "2", "--workers", "1", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parts = out / "parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if parts.is_dir() and any(p.suffix == ".csv" for p in parts.iterdir()):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the sweep finished before the interrupt arrived")
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    n = len(list(parts.glob("*.csv")))
    assert len(pd.read_csv(out / "summary.csv")) == n
