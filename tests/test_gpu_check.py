"""The GPU check script runs end to end on the CPU (`--smoke`), so it cannot rot between
the rare sessions that have a GPU; its profile loads in the simulator."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_checks_and_writes_a_loadable_profile(tmp_path):
    from pipedec_sim.inputs.profile import load_profile
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/check.py"), "--smoke",
                        "--out", str(tmp_path), "--only", "tree,lossless,kernels"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["tree"]["tree_vs_sequences_fp32"] < 1e-4
    assert all(report["lossless"][s] for s in ("ar", "tree-sd", "pipedec"))
    prof = load_profile(tmp_path / "smoke-profile-kernels.json")
    assert prof.target.layers == 80 and prof.draft.layers == 2


def test_smoke_graphs_section_runs_the_static_path(tmp_path):
    """The `graphs` section on the CPU: the static path eagerly (said so), numbers equal to
    Shard's, the pipeline lossless with it; a bad section name is refused."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/check.py"), "--smoke",
                        "--out", str(tmp_path), "--sections", "graphs"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    g = json.loads((tmp_path / "gpu_check.json").read_text())["graphs"]
    assert g["mode"].startswith("NO CUDA") and g["stage_calls"]["captured"] == 0
    assert g["stage_rel_err"] < 1e-4 and g["lossless"]["ok"]
    assert [row["rows"] for row in g["draft"]] == [1, 4, 12, 16, 64]
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/check.py"), "--smoke",
                          "--out", str(tmp_path), "--sections", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown sections nope" in bad.stderr
