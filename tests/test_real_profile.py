"""`pipedec-real profile` writes a profile `pipedec-sim run --profile` loads and uses."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from pipedec_sim.inputs.profile import bundled_profiles, load_profile  # noqa: E402

pytestmark = pytest.mark.real


def test_profile_loads_in_the_simulator(tmp_path, capsys):
    from backends.torch.cli import main as real
    from pipedec_sim.programs.cli import main as sim
    out = tmp_path / "profile.json"
    assert real(["profile", "--target", "tiny", "--draft", "tiny-draft", "--quick",
                 "--out", str(out)]) == 0
    p = load_profile(out)
    assert p.provenance["kind"] == "measured" and p.device_kind == "cpu"
    assert p.shared_cores and p.layer(4, 64) > 0 and p.link.latency_ms > 0
    (tmp_path / "p.txt").write_text("hello\n")
    assert sim(["run", "--trace", str(tmp_path / "p.txt"), "--profile", str(out),
                "--stages", "2", "--max-new-tokens", "8", "--quiet"]) == 0
    assert "pipedec" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["cpu-tiny", "cpu-smollm2"])
def test_bundled_measured_profiles(name):
    p = load_profile(bundled_profiles()[name])
    assert p.provenance["kind"] == "measured" and p.shared_cores
