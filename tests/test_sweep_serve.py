"""`pipedec-sim sweep` over serving grids (rate or concurrency as axes): each configuration
is one `pipedec-sim serve` run, with the sweep's part files, resume, damaged-part checks
and error lines; bad serving grids are one line, exit 2."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from pipedec_sim.inputs.traces import Trace, read_trace, write_trace
from pipedec_sim.programs.cli import main
from pipedec_sim.programs.sweep import Execution, build_grid, run_sweep

REPO = Path(__file__).resolve().parent.parent
REAL = REPO / "traces" / "real-mtbench.jsonl.gz"
OUTPUT = 32                           # tokens per request: short runs


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    """The first 6 MT-Bench requests, cut to 32 output tokens (recorded acceptance)."""
    full = read_trace(REAL, max_requests=6)
    cut = [dataclasses.replace(r, output=r.output[:OUTPUT], topk_ids=r.topk_ids[:OUTPUT],
                               topk_probs=r.topk_probs[:OUTPUT]) for r in full.requests]
    path = tmp_path_factory.mktemp("trace") / "mtbench-short.jsonl"
    write_trace(Trace(full.header, cut), path)
    return path


def write_grid(tmp_path: Path, body: str, name: str = "grid.toml") -> Path:
    p = tmp_path / name
    p.write_text(body, encoding="utf-8")
    return p


def grid_body(trace: Path, **more) -> str:
    keys = {"stages": 2, "strategies": ["pp", "pipedec-db"], "rate": [1, 4], "requests": 4,
            "width": 4, **more}
    lines = [f'trace = "{trace}"'] + [f"{k} = {_toml(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def _toml(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def serve_tables(trace: Path, out: Path, *extra: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    assert main(["serve", "--trace", str(trace), "--stages", "2", "--rate", "1,4",
                 "--strategies", "pp,pipedec-db", "--requests", "4", "--width", "4",
                 "--workers", "1", "--quiet", "--out", str(out), *extra]) == 0
    return pd.read_csv(out / "summary.csv"), pd.read_csv(out / "requests.csv")


def same_rows(sweep: pd.DataFrame, serve: pd.DataFrame, key: list[str]) -> None:
    """The sweep's table has every column of serve's, with the same values row for row
    (matched by `key`)."""
    assert set(serve.columns) <= set(sweep.columns), set(serve.columns) - set(sweep.columns)
    common = list(serve.columns)
    a = sweep[common].sort_values(key).reset_index(drop=True)
    b = serve[common].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_a_serving_sweep_is_serve_and_resumes(tmp_path, trace, capsys):
    grid = write_grid(tmp_path, grid_body(trace, slo_tbt_ms=180))
    out = tmp_path / "res"
    argv = ["sweep", "--grid", str(grid), "--out", str(out), "--workers", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "4 configurations (2 pp, 2 pipedec-db)" in captured.err
    assert "throughput_vs_pp" in captured.out and "ran 4, skipped 0" in captured.err
    summ, req = pd.read_csv(out / "summary.csv"), pd.read_csv(out / "requests.csv")
    assert len(summ) == 4 and summ.config_id.is_unique and len(req) == 4 * 4
    assert set(summ.config_id) == set(req.config_id)
    # cfg_ columns for every grid key, the serving ones included (one load key only)
    assert {"cfg_rate", "cfg_requests", "cfg_duration", "cfg_max_running", "cfg_step_width",
            "cfg_share", "cfg_slo_tbt_ms", "cfg_width", "cfg_trace"} <= set(summ.columns)
    assert "cfg_concurrency" not in summ.columns
    assert summ.loc[summ.strategy == "pp", "cfg_step_width"].isna().all()  # pp ignores it

    serve_summ, serve_req = serve_tables(trace, tmp_path / "serve", "--slo-tbt-ms", "180")
    same_rows(summ, serve_summ, ["cfg_rate", "strategy"])
    same_rows(req, serve_req, ["cfg_rate", "strategy", "request"])
    assert summ.slo_attainment.notna().all()

    # a second run does nothing but merge again
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    assert main(argv) == 0
    assert "ran 0, skipped 4 finished" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()} == before
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), summ)

    # another SLO reuses every run: only the summary's goodput changes
    assert main([*argv, "--slo-tbt-ms", "150", "--quiet"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()} == before
    again = pd.read_csv(out / "summary.csv")
    serve_summ, _ = serve_tables(trace, tmp_path / "serve150", "--slo-tbt-ms", "150")
    same_rows(again, serve_summ, ["cfg_rate", "strategy"])
    assert (again.cfg_slo_tbt_ms == 150).all()


def test_concurrency_and_serving_knob_axes(tmp_path, trace, capsys):
    """A closed-loop grid sweeping a pipedec-db knob: pp runs once per load point, and
    throughput_vs_pp divides by it; flags replace the file's keys."""
    grid = write_grid(tmp_path, grid_body(trace, strategies=["pipedec-db"]).replace(
        "rate = [1, 4]", "concurrency = [2]"))
    out = tmp_path / "res"
    assert main(["sweep", "--grid", str(grid), "--out", str(out), "--workers", "2",
                 "--step-width", "4,8", "--quiet"]) == 0
    summ = pd.read_csv(out / "summary.csv")
    assert sorted(summ.strategy) == ["pipedec-db", "pipedec-db", "pp"]
    assert sorted(summ.cfg_step_width.dropna()) == [4, 8] and "cfg_rate" not in summ.columns
    assert (summ.cfg_concurrency == 2).all()
    pp = summ[summ.strategy == "pp"].iloc[0]
    db = summ[summ.strategy == "pipedec-db"]
    assert pp.throughput_vs_pp == 1.0
    assert list(db.throughput_vs_pp) == pytest.approx(list(db.throughput_tok_s
                                                           / pp.throughput_tok_s))
    assert main(["sweep", "--grid", str(grid), "--out", str(out), "--dry-run",
                 "--step-width", "4,8"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("done") == 3 and "concurrency=2" in listing and "step_width=8" in listing


def test_a_damaged_serving_part_runs_again(tmp_path, trace, capsys):
    grid = write_grid(tmp_path, grid_body(trace, rate=[2]))
    out = tmp_path / "res"
    argv = ["sweep", "--grid", str(grid), "--out", str(out), "--workers", "1"]
    assert main([*argv, "--quiet"]) == 0
    before = pd.read_csv(out / "requests.csv")
    part = sorted((out / "parts").glob("*.csv"))[0]
    part.write_text("".join(part.read_text().splitlines(keepends=True)[:-1]))  # a row short
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert str(part) in err and "has 3 rows, expected 4" in err and "ran 1, skipped 1" in err
    assert (out / "parts" / f"{part.name}.damaged").is_file()
    key = ["config_id", "request"]
    pd.testing.assert_frame_equal(
        before.sort_values(key).reset_index(drop=True),
        pd.read_csv(out / "requests.csv").sort_values(key).reset_index(drop=True))


def test_a_failing_serving_configuration_is_one_line_and_the_rest_go_on(tmp_path, trace,
                                                                        capsys, monkeypatch):
    from pipedec_sim.programs import serve
    real = serve.serve_task

    def flaky(profile, cfg, name, workload, load):
        if name == "pipedec-db":
            raise RuntimeError("boom")
        return real(profile, cfg, name, workload, load)
    monkeypatch.setattr(serve, "serve_task", flaky)
    grid = write_grid(tmp_path, grid_body(trace, rate=[2]))
    out = tmp_path / "res"
    assert main(["sweep", "--grid", str(grid), "--out", str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "(pipedec-db, S=2) failed: RuntimeError: boom" in err and "1 failed" in err
    assert list(pd.read_csv(out / "summary.csv").strategy) == ["pp"]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of 2 CPUs (as tests/test_ray_sweep.py starts one)."""
    ray = pytest.importorskip("ray")
    from pipedec_sim.programs.ray_tasks import init_ray
    try:
        assert init_ray(2) is True
        yield ray
    finally:
        ray.shutdown()


def test_ray_serving_sweep_equals_the_process_pool(tmp_path, trace, local_ray):
    configs = build_grid(write_grid(tmp_path, grid_body(trace))).configs()
    pool = run_sweep(configs, tmp_path / "pool", execution=Execution(workers=2))
    ray = run_sweep(configs, tmp_path / "ray", execution=Execution(workers=2, executor="ray"))
    assert pool["ran"] == ray["ran"] == 4 and not ray["failed"]
    for name in ("summary.csv", "requests.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "pool" / name),
                                      pd.read_csv(tmp_path / "ray" / name))
    again = run_sweep(configs, tmp_path / "ray", execution=Execution(workers=2, executor="ray"))
    assert again["skipped"] == 4 and again["ran"] == 0


# --------------------------------------------------------------------------- bad grids

@pytest.mark.parametrize("more, key, needle", [
    ({"concurrency": [2]}, "concurrency", "rate or concurrency, not both"),
    ({"strategies": ["pp", "ar"]}, "strategies", "ar is not a serving strategy"),
    ({"strategies": ["pipedec"]}, "strategies", "pipedec is not a serving strategy"),
    ({"strategies": ["vllm"]}, "strategies", "choose from pp, tree-sd, chain-sd, pipedec-db"),
    ({"rate": [1, 0]}, "rate", "must be > 0"),
    ({"requests": 1.5}, "requests", "expected an integer"),
    ({"share": "greedy"}, "share", "choose from fair, best"),
    ({"step_width": 0}, "step_width", "must be >= 1"),
    ({"slo_tbt_ms": [50, 100]}, "slo_tbt_ms", "takes one value"),
    ({"rate": [0.001], "duration": 0.01}, "duration", "no request arrives within 0.01 s"),
])
def test_bad_serving_grids_exit_2_with_one_line(tmp_path, trace, capsys, more, key, needle):
    grid = write_grid(tmp_path, grid_body(trace, **more))
    out = tmp_path / "res"
    assert main(["sweep", "--grid", str(grid), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert str(grid) in err and f"field '{key}'" in err and needle in err, err
    assert not out.exists()                          # nothing started


@pytest.mark.parametrize("body, key, needle", [
    ('strategies = ["ar", "pp"]\n', "strategies", "pp is a serving strategy"),
    ('strategies = ["pipedec-db"]\n', "strategies", "with rate or concurrency"),
    ("requests = 4\n", "requests", "a serving key: it goes with rate or concurrency"),
    ("step_width = [8, 16]\n", "step_width", "a serving key"),
])
def test_serving_keys_and_strategies_need_a_load_point(tmp_path, trace, capsys, body, key,
                                                       needle):
    grid = write_grid(tmp_path, f'trace = "{trace}"\nstages = 2\n' + body)
    assert main(["sweep", "--grid", str(grid), "--out", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{grid}:3: field '{key}'" in err and needle in err, err


def test_bad_serving_flags_name_the_flag(tmp_path, trace, capsys):
    grid = write_grid(tmp_path, grid_body(trace))
    assert main(["sweep", "--grid", str(grid), "--concurrency", "2",
                 "--out", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "field '--concurrency'" in err and "not both" in err
    assert main(["sweep", "--trace", str(trace), "--requests", "4",
                 "--out", str(tmp_path / "res")]) == 2
    assert "field '--requests': a serving key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--trace", str(trace), "--rate", "1,x"])
    assert e.value.code == 2 and "--rate" in capsys.readouterr().err
