"""Plots from sweep results and timelines: the `plot` CLI, the helpers, the notebooks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipedec_sim.programs.cli import main
from pipedec_sim.programs.sweep import build_grid, run_sweep

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "traces" / "synthetic-llama70b.jsonl"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    grid = build_grid(None, {"trace": [str(TRACE)], "stages": [2, 3], "width": [2, 4],
                             "topk": [2, 4], "max_requests": [1]})
    res = run_sweep(grid.configs(), out)
    assert not res["failed"]
    return out


@pytest.fixture(scope="module")
def timeline_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tl") / "timeline.json"
    assert main(["run", "--trace", str(TRACE), "--stages", "3", "--max-requests", "1",
                 "--timeline", str(path), "--quiet"]) == 0
    return path


def assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG and 5_000 < len(data) < 300_000


@pytest.mark.parametrize("kind", ["speedup", "stages", "width", "utilization"])
def test_plot_cli_from_sweep(sweep_dir, tmp_path, kind, capsys):
    out = tmp_path / f"{kind}.png"
    src = sweep_dir if kind != "width" else sweep_dir / "summary.csv"
    assert main(["plot", str(src), "--kind", kind, "--out", str(out)]) == 0
    assert_png(out)


@pytest.mark.parametrize("kind", ["timeline", "utilization"])
def test_plot_cli_from_timeline(timeline_json, tmp_path, kind):
    out = tmp_path / f"{kind}.png"
    assert main(["plot", str(timeline_json), "--kind", kind, "--out", str(out)]) == 0
    assert_png(out)
    out2 = tmp_path / f"{kind}-ar.png"
    assert main(["plot", str(timeline_json), "--kind", kind, "--run", "ar",
                 "--out", str(out2)]) == 0
    assert_png(out2)


def test_plot_cli_bad_inputs(sweep_dir, timeline_json, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["plot", str(tmp_path / "nope"), "--kind", "speedup", "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["plot", str(timeline_json), "--kind", "speedup", "--out", str(out)]) == 2
    assert "timeline" in capsys.readouterr().err
    assert main(["plot", str(sweep_dir / "requests.csv"), "--kind", "speedup",
                 "--out", str(out)]) == 0          # has strategy/stages/tbt_ms: still plots
    bad = tmp_path / "bad.json"
    bad.write_text("{\"traceEvents\": 3}")
    assert main(["plot", str(bad), "--kind", "timeline", "--out", str(out)]) == 2
    assert "traceEvents" in capsys.readouterr().err
    assert main(["plot", str(timeline_json), "--kind", "timeline", "--run", "medusa",
                 "--out", str(out)]) == 2
    assert "no run 'medusa'" in capsys.readouterr().err
    assert main(["plot", str(sweep_dir), "--kind", "width", "--stages", "9",
                 "--out", str(out)]) == 2
    assert "no results for 9 stages" in capsys.readouterr().err


def test_helpers(sweep_dir, timeline_json):
    from analysis import plots
    summary = plots.load_summary(sweep_dir)
    best = plots.best_per_strategy(summary)
    assert set(best.strategy) == {"ar", "tree-sd", "pipedec"} and len(best) == 6
    assert plots.reference_speedup(14, 1.0) == pytest.approx(14)
    assert plots.reference_speedup(14, 0.0) == pytest.approx(1)
    busy = plots.stage_busy(timeline_json)
    assert list(busy.actor[busy.actor.str.startswith("stage")]) == ["stage1", "stage2", "stage3"]
    assert ((busy.utilization >= 0) & (busy.utilization <= 1.0001)).all()
    runs = plots.timeline_runs(plots.load_timeline(timeline_json))
    assert sorted(n.split(" /")[0] for n in runs.values()) == ["ar", "pipedec", "tree-sd"]


def test_load_summary_parquet_sweep(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    from analysis import plots

    from .test_output_format import SWEEP, same_as_csv
    assert main([*SWEEP, "--out", str(tmp_path / "csv")]) == 0
    assert main([*SWEEP, "--out", str(tmp_path / "pq"), "--out-format", "parquet"]) == 0
    csv = plots.load_summary(tmp_path / "csv")
    same_as_csv(plots.load_summary(tmp_path / "pq"), csv)
    same_as_csv(plots.load_summary(tmp_path / "pq" / "summary.parquet"), csv)
    csv.head(1).to_csv(tmp_path / "pq" / "summary.csv", index=False)
    assert len(plots.load_summary(tmp_path / "pq")) == 1          # both: the CSV, as plot does


@pytest.mark.parametrize("name, figures", [
    ("speedup.ipynb", ["speedup_bars.png", "speedup_vs_stages.png", "width_heatmap.png",
                       "utilization.png"]),
    ("timeline.ipynb", ["timeline_pipedec.png", "timeline_tree_sd.png",
                        "stage_utilization_pipedec.png", "timeline.json"]),
])
def test_notebooks_execute(name, figures, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PIPEDEC_FIGURES", str(tmp_path))
    monkeypatch.delenv("PIPEDEC_RESULTS", raising=False)
    nb = nbformat.read(REPO / "analysis" / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "analysis")}}).execute()
    for f in figures:
        p = tmp_path / f
        assert p.is_file(), f
        if f.endswith(".png"):
            assert_png(p)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if o.output_type == "error"]


def test_speedup_notebook_loads_results(sweep_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PIPEDEC_FIGURES", str(tmp_path))
    monkeypatch.setenv("PIPEDEC_RESULTS", str(sweep_dir))
    nb = nbformat.read(REPO / "analysis" / "speedup.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "analysis")}}).execute()
    assert_png(tmp_path / "speedup_bars.png")
    text = json.dumps(nb.cells[3].outputs)
    assert "simulated into" not in text
