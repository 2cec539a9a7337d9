"""Profiles know their host: this machine's CPU (pipedec_sim/inputs/host.py), the optional
`provenance.host` of a profile, and the warning for a CPU profile from another CPU model."""
from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest

from pipedec_sim.errors import InputError
from pipedec_sim.inputs import host
from pipedec_sim.inputs.profile import bundled_profiles, load_profile, parse_profile

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
stepping\t: 0
flags\t\t: fpu avx2 fma avx512f sse4_2

processor\t: 1
model name\t: something else
"""
LSCPU = "Architecture:   aarch64\nVendor ID:      ARM\nModel name:     Neoverse-N1\n"
HERE = {"cpu_model": "Intel(R) Xeon(R) Processor", "cpu_vendor": "GenuineIntel",
        "cpu_id": "family 6 model 143 stepping 8", "isa": ["avx2", "avx512f", "amx_tile"],
        "cpu_count": 2, "affinity_cores": 2, "machine": "x86_64"}


def test_parse_cpuinfo_reads_the_first_processor():
    info = host.parse_cpuinfo(CPUINFO)
    assert info == {"cpu_model": "AMD EPYC 7B13", "cpu_vendor": "AuthenticAMD",
                    "cpu_id": "family 25 model 1 stepping 0", "isa": ["avx2", "fma", "avx512f"]}
    assert host.parse_cpuinfo("") == {}
    assert host.parse_lscpu(LSCPU) == {"cpu_model": "Neoverse-N1", "cpu_vendor": "ARM"}


def test_this_machine():
    rec = host.host_record()
    assert rec["cpu_count"] >= 1 and rec["machine"]
    assert rec.get("affinity_cores", 1) <= rec["cpu_count"]
    if sys.platform.startswith("linux"):
        assert host.cpu_model()                       # lscpu "Model name" / cpuinfo
        lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True,
                               env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
        if lscpu.returncode == 0 and "Model name" in lscpu.stdout:
            assert host.parse_lscpu(lscpu.stdout)["cpu_model"] == host.cpu_model()


def test_host_is_light():
    """The simulator imports it: no torch, no pandas, no SimPy."""
    code = ("import sys; import pipedec_sim.inputs.host as h; h.host_record(); "
            "print([m for m in ('torch', 'pandas', 'simpy', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("recorded,why", [
    (HERE, None),
    ({**HERE, "load_average": [3.0, 2.0, 1.0]}, None),
    ({"cpu_model": "AMD EPYC 7B13", "cpu_count": 2}, "another CPU model"),
    ({**HERE, "isa": ["avx2", "avx512f"]}, "another instruction set"),
    ({**HERE, "cpu_id": "family 6 model 207 stepping 2"}, "another CPU family/model/stepping"),
    ({**HERE, "cpu_count": 4, "affinity_cores": 4}, "another core count"),
    ({"description": "Intel x86_64 with AMX (model name not recorded)", "cpu_count": 2},
     "no CPU model recorded"),
    ({"description": "Intel with AMX", "cpu_vendor": "GenuineIntel"}, "no CPU model recorded"),
    ({"description": "an AMD", "cpu_vendor": "AuthenticAMD"}, "another CPU vendor"),
    ({}, "no CPU model recorded"),
    (None, "no CPU model recorded"),
])
def test_host_mismatch(recorded, why):
    assert host.host_mismatch(recorded, HERE) == why


def _with_host(p, rec):
    prov = copy.deepcopy(p.provenance)
    if rec is None:
        prov.pop("host", None)
    else:
        prov["host"] = rec
    return dataclasses.replace(p, provenance=prov)


def test_warning_for_cpu_profiles_only():
    cpu = load_profile("cpu-tiny")
    assert host.profile_host_warning(_with_host(cpu, HERE), HERE) is None
    other = host.profile_host_warning(_with_host(cpu, {"cpu_model": "AMD EPYC 7B13",
                                                        "cpu_count": 2}), HERE)
    assert "'AMD EPYC 7B13' (2 cores)" in other and "'Intel(R) Xeon(R) Processor'" in other
    assert "another CPU model" in other and "pipedec-real profile" in other
    assert "\n" not in other
    unknown = host.profile_host_warning(_with_host(cpu, None), HERE)
    assert "does not record the CPU model" in unknown
    # GPU and analytic profiles are not about this machine's CPU
    assert host.profile_host_warning(load_profile("analytic-llama70b-1b"), HERE) is None
    gpu = dataclasses.replace(_with_host(cpu, {"cpu_model": "x"}), device_kind="gpu")
    assert host.profile_host_warning(gpu, HERE) is None


@pytest.mark.parametrize("name", ["cpu-tiny", "cpu-smollm2"])
def test_bundled_cpu_profiles_say_which_host(name):
    p = load_profile(bundled_profiles()[name])
    h = p.host
    assert "AMX" in h["description"] and h["cpu_count"] == 2 == p.shared_cores
    assert h["cpu_vendor"] == "GenuineIntel" and "cpu_model" not in h   # not recorded then
    assert "AMX" in p.provenance["device"] and "Host:" in p.provenance["notes"]
    amd = {"cpu_model": "AMD EPYC 7B13", "cpu_vendor": "AuthenticAMD", "cpu_count": 2}
    assert "another CPU vendor" in host.profile_host_warning(p, amd)
    assert "does not record" in host.profile_host_warning(p, HERE)


def test_cli_run_warns_once_and_goes_on(tmp_path, capsys, monkeypatch):
    from pipedec_sim.programs.cli import main
    monkeypatch.setattr(host, "host_record",
                        lambda: {"cpu_model": "AMD EPYC 7B13", "cpu_count": 2})
    data = json.loads(bundled_profiles()["cpu-tiny"].read_text())
    data["provenance"]["host"] = dict(HERE)
    (tmp_path / "p.json").write_text(json.dumps(data))
    (tmp_path / "p.txt").write_text("hello\n")
    assert main(["run", "--trace", str(tmp_path / "p.txt"), "--profile",
                 str(tmp_path / "p.json"), "--stages", "2", "--max-new-tokens", "4",
                 "--quiet"]) == 0
    out = capsys.readouterr()
    warns = [x for x in out.err.splitlines() if "warning: CPU profile" in x]
    assert len(warns) == 1 and warns[0].startswith("pipedec-sim: warning: CPU profile")
    assert "pipedec" in out.out


# ---- provenance.host in the profile reader -----------------------------------------------

@pytest.fixture(scope="module")
def cpu_data() -> dict:
    return json.loads(bundled_profiles()["cpu-tiny"].read_text())


def test_old_profiles_without_host_load_and_simulate_identically(cpu_data, tmp_path):
    from pipedec_sim.inputs.prompts import load_workload
    from pipedec_sim.programs.simulate import SimConfig, simulate
    old = copy.deepcopy(cpu_data)
    del old["provenance"]["host"]
    old["provenance"]["versions"].pop("python", None)
    a, b = parse_profile(old), parse_profile(cpu_data)
    assert a.host == {} and b.host["cpu_count"] == 2
    assert dataclasses.replace(a, provenance={}) == dataclasses.replace(b, provenance={})
    (tmp_path / "p.txt").write_text("one prompt\nanother, longer prompt here\n")
    trace, _ = load_workload(tmp_path / "p.txt", max_requests=2, max_new_tokens=12)
    cfg = SimConfig(stages=2, width=4, topk=4, depth=3, tree_topk=4, total=12)
    ra, rb = simulate(trace, a, cfg), simulate(trace, b, cfg)
    assert ra.requests.equals(rb.requests)


def test_valid_host_round_trips(cpu_data, tmp_path):
    from pipedec_sim.inputs.profile import save_profile
    d = copy.deepcopy(cpu_data)
    d["provenance"]["host"] = {**HERE, "load_average": [0.5, 1, 2.25]}
    d["provenance"]["versions"]["python"] = "3.11.9"
    save_profile(d, tmp_path / "p.json")
    p = load_profile(tmp_path / "p.json")
    assert p.host["cpu_model"] == HERE["cpu_model"] and p.host["isa"] == HERE["isa"]
    assert load_profile(tmp_path / "p.json").to_dict()["provenance"]["host"] == p.host


BAD_HOST = [
    ("host", "Intel", "provenance.host"),
    ("cpu_model", "", "provenance.host.cpu_model"),
    ("cpu_model", 7, "provenance.host.cpu_model"),
    ("cpu_count", 0, "provenance.host.cpu_count"),
    ("cpu_count", "2", "provenance.host.cpu_count"),
    ("affinity_cores", 3, "provenance.host.affinity_cores"),   # > cpu_count 2
    ("isa", "avx2", "provenance.host.isa"),
    ("isa", ["avx2", 3], "provenance.host.isa[1]"),
    ("load_average", [1.0, 2.0], "provenance.host.load_average"),
    ("load_average", [1.0, -2.0, 0.0], "provenance.host.load_average[1]"),
    ("versions", {"python": 3.11}, "provenance.versions.python"),
]


@pytest.mark.parametrize("key,value,fld", BAD_HOST, ids=[b[2] for b in BAD_HOST])
def test_bad_host_names_the_field(cpu_data, key, value, fld):
    d = copy.deepcopy(cpu_data)
    if key in ("host", "versions"):
        d["provenance"][key] = value
    else:
        d["provenance"]["host"][key] = value
    with pytest.raises(InputError) as e:
        parse_profile(d, source="p.json")
    assert e.value.field == fld and "p.json" in str(e.value)
