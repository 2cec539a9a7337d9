"""Bad input that used to get through: values with no upper bound (latencies, link speeds,
arrival times, GPU ratings), plot tables with text or zeros where numbers go, a profile
used with the other topology, a repeated strategy, a disk that fills while results are
written. Each is one line (exit 2; a storage failure exit 1), nothing left behind."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pandas as pd
import pytest

from pipedec_sim.inputs.limits import MAX_ARRIVAL_S, MAX_MS, MIN_GBPS

from .test_hardening_sim import TRACE, cli, profile_dict, refused, run_args, small_trace


def _profile(tmp_path: Path, edit) -> Path:
    d = profile_dict()
    edit(d)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    return path


# --------------------------------------------------------------------------- profiles

@pytest.mark.parametrize("edit, field", [
    (lambda d: d["latency"].__setitem__("head_overhead_ms", 1e308), "latency.head_overhead_ms"),
    (lambda d: d["link"].__setitem__("latency_ms", 1e300), "link.latency_ms"),
    (lambda d: d["latency"]["layer"]["ms"][0].__setitem__(0, 1e200), "latency.layer.ms[0][0]"),
], ids=["head overhead", "link latency", "layer grid"])
def test_profile_durations_have_an_upper_bound(tmp_path, capsys, edit, field):
    refused(capsys, *run_args(TRACE, "--profile", _profile(tmp_path, edit)),
            needles=["p.json", f"field '{field}'", f"{MAX_MS:g} (the limit)"])


def test_profile_link_bandwidth_has_a_lower_bound(tmp_path, capsys):
    prof = _profile(tmp_path, lambda d: d["link"].__setitem__("bandwidth_gbps", 1e-300))
    refused(capsys, *run_args(TRACE, "--profile", prof),
            needles=["p.json", "field 'link.bandwidth_gbps'", f">= {MIN_GBPS:g}"])


def test_core_share_is_at_most_one_core(tmp_path, capsys):
    d = json.loads((Path(__file__).parent.parent / "pipedec_sim/profiles/cpu-tiny.json")
                   .read_text())
    d["devices"]["core_share"] = [1.0, 5.0, 3.0]
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps(d))
    refused(capsys, *run_args(TRACE, "--profile", prof),
            needles=["p.json", "field 'devices.core_share[1]'", "<= 1"])


@pytest.mark.parametrize("flag, value, needle", [
    ("--link-latency-ms", "1e300", f"<= {MAX_MS}"),
    ("--link-gbps", "1e-300", f">= {MIN_GBPS}"),
])
def test_link_flags_are_bounded(capsys, flag, value, needle):
    refused(capsys, *run_args(TRACE, flag, value), needles=[flag, needle])


def test_a_profile_refuses_the_other_topology(tmp_path, capsys):
    prof = tmp_path / "a.json"
    code, _, err = cli(capsys, "profile", "analytic", "--quiet", "--gpu", "h100-sxm",
                       "--target", "llama-3.1-8b", "--draft", "llama-3.2-1b", "--stages", 2,
                       "--topology", "A", "--out", prof)
    assert code == 0, err
    refused(capsys, *run_args(TRACE, "--profile", prof, "--topology", "B"),
            needles=["a.json", "field '--topology'", "made for topology A"])
    refused(capsys, "sweep", "--trace", TRACE, "--profile", prof, "--stages", 2,
            "--topology", "A,B", "--strategies", "ar", "--out", tmp_path / "sw", "--quiet",
            needles=["--topology", "made for topology A", "a.json"])
    assert not (tmp_path / "sw").exists()
    code, _, err = cli(capsys, *run_args(TRACE, "--profile", prof, "--topology", "A",
                                         "--max-requests", 1))
    assert code == 0, err


def test_gpu_spec_ratings_are_bounded(tmp_path, capsys):
    spec = tmp_path / "g.json"
    spec.write_text(json.dumps({"name": "x", "memory_gib": 80, "mem_bw_gbs": 1e-200,
                                "tflops": {"bf16": 300, "fp8": None}, "sources": ["me"]}))
    refused(capsys, "profile", "analytic", "--quiet", "--target", "llama-3.1-8b", "--draft",
            "llama-3.2-1b", "--stages", 2, "--gpu-spec", spec, "--out", tmp_path / "p.json",
            needles=["g.json", "field 'mem_bw_gbs'", "[0.001, 1e+07]"])
    assert not (tmp_path / "p.json").exists()


# --------------------------------------------------------------------------- serving load

def test_arrivals_have_an_upper_bound(tmp_path, capsys):
    trace = small_trace(tmp_path / "t.jsonl")
    arrivals = tmp_path / "a.txt"
    arrivals.write_text("0\n1e300\n")
    serve = ("serve", "--trace", trace, "--stages", 2, "--quiet", "--workers", 1,
             "--strategies", "pp")
    refused(capsys, *serve, "--arrivals", arrivals,
            needles=["a.txt:2", "arrival_s", f"{MAX_ARRIVAL_S:g} s (the limit)"])
    refused(capsys, *serve, "--rate", "1e-300", needles=["--rate", "past the limit"])


# --------------------------------------------------------------------------- strategies

@pytest.mark.parametrize("command", ["run", "serve"])
def test_a_repeated_strategy_runs_once(tmp_path, capsys, command):
    trace = small_trace(tmp_path / "t.jsonl")
    name = "pipedec" if command == "run" else "pp"
    more = ("--rate", 1) if command == "serve" else ()
    code, out, err = cli(capsys, command, "--trace", trace, "--stages", 2, "--quiet",
                         "--workers", 1, "--strategies", f"{name},{name}", *more)
    assert code == 0, err
    header, *rows = [line.split() for line in out.splitlines() if line.strip()]
    assert len(rows) == 1, out                                # one row per strategy
    assert rows[0][header.index("requests")] == "2", out      # 2 requests, counted once


# --------------------------------------------------------------------------- files

@pytest.mark.parametrize("name, body, line", [
    ("t.jsonl", b'{"a": 1}\n{"b": 2}\n\xff\xfe\n', 3),
    ("p.txt", b"hello\nwor\xffld\n", 2),
])
def test_bad_utf8_names_its_line(tmp_path, capsys, name, body, line):
    path = tmp_path / name
    path.write_bytes(body)
    refused(capsys, "run", "--trace", path, "--stages", 2, "--quiet",
            needles=[f"{name}:{line}:", "not UTF-8"])


def test_an_unknown_acceptance_name_lists_the_bundled_ones(capsys):
    refused(capsys, *run_args(TRACE, "--acceptance", "bogus"),
            needles=["bogus", "--acceptance", "not a bundled acceptance model", "mtbench"])


# --------------------------------------------------------------------------- outputs

def test_a_full_disk_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    import pipedec_sim.results.tables as tables

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tables, "write_table", full)
    out = tmp_path / "new" / "res"
    code, _, err = cli(capsys, *run_args(TRACE, "--max-requests", 1, "--out", out))
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"pipedec-sim: error: {out}: No space left on "
                                            "device"), err
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def summary(tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("plot") / "res"
    from pipedec_sim.programs.cli import main
    assert main([str(a) for a in run_args(TRACE, "--strategies", "ar,pipedec",
                                          "--max-requests", 1, "--out", out)]) == 0
    return pd.read_csv(out / "summary.csv")


@pytest.mark.parametrize("column, value, needle", [
    ("tbt_ms", "abc", ":2: field 'tbt_ms': expected a number > 0, got 'abc'"),
    ("stages", "abc", ":2: field 'stages': expected a number > 0"),
    ("tbt_ms", -5, ":2: field 'tbt_ms': expected a number > 0, got -5"),
    ("tbt_ms", float("nan"), "field 'tbt_ms': no values"),
    ("strategy", "pipedec", "field 'strategy': --kind speedup compares with plain PP"),
])
def test_plot_refuses_tables_it_cannot_draw(tmp_path, capsys, summary, column, value, needle):
    bad = summary.copy()
    bad[column] = value
    csv = tmp_path / "s.csv"
    bad.to_csv(csv, index=False)
    refused(capsys, "plot", csv, "--kind", "speedup", "--out", tmp_path / "a.png",
            needles=[needle])
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("suffix, magic", [(".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_plot_writes_the_format_its_name_says(tmp_path, capsys, summary, suffix, magic):
    csv = tmp_path / "s.csv"
    summary.to_csv(csv, index=False)
    out = tmp_path / f"a{suffix}"
    code, _, err = cli(capsys, "plot", csv, "--kind", "speedup", "--out", out)
    assert code == 0, err
    assert out.read_bytes().startswith(magic)
    refused(capsys, "plot", csv, "--kind", "speedup", "--out", tmp_path / "a.txt",
            needles=["a.txt", "--out", ".png, .pdf, .svg"])


@pytest.mark.parametrize("more, needle", [
    (("--out", ""), "--out: expected a path, got an empty string"),
    (("--timeline", ""), "--timeline: expected a path, got an empty string"),
])
def test_an_empty_output_path_is_refused(capsys, more, needle):
    refused(capsys, *run_args(TRACE, *more), needles=[needle])


def test_the_timeline_cannot_be_a_results_table(tmp_path, capsys):
    out = tmp_path / "o"
    refused(capsys, *run_args(TRACE, "--out", out, "--timeline", out / "summary.csv"),
            needles=["summary.csv", "field '--timeline'", "where --out writes"])
    assert not out.exists()


@pytest.mark.parametrize("dry", [(), ("--dry-run",)], ids=["run", "dry run"])
def test_sweep_address_needs_ray_even_in_a_dry_run(tmp_path, capsys, dry):
    refused(capsys, "sweep", "--trace", TRACE, "--strategies", "ar", "--stages", 2,
            "--executor", "process", "--address", "1.2.3.4:99", "--out", tmp_path / "sw",
            "--quiet", *dry, needles=["--address", "only goes with --executor ray"])
