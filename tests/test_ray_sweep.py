"""`pipedec-sim sweep --executor ray`: the same part files, resume and tables as the process
pool, on a local Ray instance (2 CPUs, loopback only) started once for this module."""
from __future__ import annotations

import ipaddress
import os
import sys
import uuid

import pandas as pd
import pytest

from pipedec_sim.programs.cli import main
from pipedec_sim.programs.sweep import Execution, build_grid, run_sweep

from .helpers import listening_sockets, tagged_pids
from .test_output_format import SWEEP
from .test_sweep import TRACE


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    from pipedec_sim.programs.ray_tasks import init_ray
    tag = f"PIPEDEC_RAY_TEST_{uuid.uuid4().hex[:8]}"
    os.environ[tag] = "1"                   # inherited by every process Ray starts
    try:
        assert init_ray(2) is True
        yield ray, tag
    finally:
        ray.shutdown()
        os.environ.pop(tag, None)


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def configs():
    grid = build_grid(None, {"trace": [str(TRACE)], "stages": [2], "width": [2, 4],
                             "strategies": ["tree-sd", "pipedec"], "max_requests": [2]})
    return grid.configs()


def tables(out):
    return [pd.read_csv(out / f, keep_default_na=False) for f in ("summary.csv", "requests.csv")]


def test_ray_sweep_equals_the_process_pool(tmp_path, local_ray):
    cfgs = configs()
    pool = run_sweep(cfgs, tmp_path / "pool", execution=Execution(workers=2))
    seen = []
    ray_res = run_sweep(cfgs, tmp_path / "ray", progress=lambda d, t: seen.append((d, t)),
                        execution=Execution(workers=2, executor="ray"))
    assert pool["ran"] == ray_res["ran"] == len(cfgs) == 4 and not ray_res["failed"]
    assert seen[0] == (0, 4) and seen[-1] == (4, 4)
    for a, b in zip(tables(tmp_path / "pool"), tables(tmp_path / "ray")):
        pd.testing.assert_frame_equal(a, b)
    parts = sorted(p.name for p in (tmp_path / "ray" / "parts").iterdir())
    assert parts == sorted(f"{c['config_id']}.csv" for c in cfgs)    # no temp files left
    again = run_sweep(cfgs, tmp_path / "ray", execution=Execution(workers=2, executor="ray"))
    assert again["skipped"] == 4 and again["ran"] == 0                # resumes
    assert local_ray[0].is_initialized()           # a connection it did not open stays


def test_ray_cli_with_parquet(tmp_path, capsys, local_ray):
    pytest.importorskip("pyarrow")
    out = tmp_path / "res"
    argv = [*SWEEP[:-1], "--executor", "ray", "--workers", "2", "--out-format", "parquet",
            "--out", str(out)]                      # SWEEP[:-1]: not --quiet
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "configurations: 3/3" in err and "ran 3, skipped 0 finished, 0 failed" in err
    assert len(pd.read_parquet(out / "summary.parquet")) == 3


def test_local_ray_listens_on_loopback_only(local_ray):
    ray, tag = local_ray
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    pids = sorted(set(tagged_pids(tag)) | {os.getpid()})
    sockets = listening_sockets(pids)
    assert len(pids) > 1 and sockets, (pids, sockets)       # Ray's processes, found
    assert all(_loopback(addr) for _, addr, _ in sockets), sockets


def test_without_ray_executor_ray_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)               # import ray fails
    assert main([*SWEEP, "--executor", "ray", "--out", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "field '--executor'" in err, err
    assert "pip install 'pipedec-sim[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "res").exists()


def test_address_goes_with_executor_ray(tmp_path, capsys):
    assert main([*SWEEP, "--address", "127.0.0.1:6379", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "field '--address': only goes with --executor ray" in err


@pytest.mark.parametrize("address, says", [
    ("127.0.0.1:1", "cannot reach a Ray cluster at 127.0.0.1:1"),
    ("nohost", "expected HOST:PORT"), ("127.0.0.1:99999", "expected HOST:PORT")])
def test_a_bad_address_is_one_line_before_any_work(tmp_path, capsys, address, says):
    pytest.importorskip("ray")
    out = tmp_path / "res"
    assert main([*SWEEP, "--executor", "ray", "--address", address, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "field '--address'" in err and says in err, err
    assert not out.exists()
