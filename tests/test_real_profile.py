"""`pipedec-real profile` writes a profile `pipedec-sim run --profile` loads and uses."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from pipedec_sim.inputs.profile import bundled_profiles, load_profile  # noqa: E402

pytestmark = pytest.mark.real


def test_profile_loads_in_the_simulator(tiny_profile, tmp_path, capsys):
    """`pipedec-real profile --quick` (the session's `tiny_profile`): a measured CPU profile
    of this host that the simulator runs."""
    from pipedec_sim.programs.cli import main as sim
    code, out = tiny_profile
    assert code == 0
    p = load_profile(out)
    assert p.provenance["kind"] == "measured" and p.device_kind == "cpu"
    assert p.shared_cores and p.layer(4, 64) > 0 and p.link.latency_ms > 0
    from pipedec_sim.inputs.host import cpu_model, profile_host_warning
    assert p.host.get("cpu_model") == cpu_model() and p.host["cpu_count"] >= 1  # its host
    assert len(p.host["load_average"]) == 3 and p.provenance["versions"]["python"]
    assert profile_host_warning(p) is None                  # measured here: no warning
    assert min(p.cold_stage_ms, p.cold_layer_ms, p.cold_lm_head_ms, p.cold_draft_ms) >= 0
    cold = p.provenance["details"]["cold"]
    assert cold["flush_mb"] >= 256 and cold["stage"] and cold["lm_head"]["warm_ms"] > 0
    (tmp_path / "p.txt").write_text("hello\n")
    assert sim(["run", "--trace", str(tmp_path / "p.txt"), "--profile", str(out),
                "--stages", "2", "--max-new-tokens", "8", "--quiet"]) == 0
    assert "pipedec" in capsys.readouterr().out


def test_fit_line():
    from backends.torch.profiler import _fit_line
    assert _fit_line([(1, 3.0), (3, 7.0)]) == pytest.approx((1.0, 2.0))
    assert _fit_line([(1, 3.0), (3, 1.0)]) == pytest.approx((2.0, 0.0))    # no negative slope
    assert _fit_line([(2, -1.0), (4, 1.0)]) == pytest.approx((0.0, 0.0))


@pytest.mark.parametrize("name", ["cpu-tiny", "cpu-smollm2"])
def test_bundled_measured_profiles(name):
    p = load_profile(bundled_profiles()[name])
    assert p.provenance["kind"] == "measured" and p.shared_cores
