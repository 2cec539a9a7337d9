"""Hardening of the simulator's programs: no traceback, no hang, no lost result.

Every malformed input is refused with exit status 2 and exactly one line on stderr naming
the file, the line or the field (never a traceback); nothing blocks on a FIFO or spins in
the simulator; results are written all or nothing, and concurrent or killed sweeps lose
none. The CLIs run in-process (`main([...])`); a subprocess only where a process must be
killed. A reader that regressed into blocking on a FIFO fails (SIGALRM) instead of hanging.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.limits import (
    MAX_BETA_PARAM,
    MAX_JSON_DEPTH,
    MAX_OUTPUT_LEN,
    MAX_PROMPT_LEN,
    MAX_STAGES,
    SHAPE_LIMITS,
)
from pipedec_sim.inputs.profile import bundled_profiles
from pipedec_sim.inputs.traces import write_trace
from pipedec_sim.programs.cli import main

from .helpers import bernoulli_trace, deadline, tagged_pids

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO / "traces" / "synthetic-llama70b.jsonl"
SAMPLES = REPO / "traces" / "samples"
PROFILE = "analytic-llama70b-1b"


# --------------------------------------------------------------------------- helpers

def cli(capsys, *args) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:                      # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *args, needles=()) -> str:
    """Run the CLI; assert exit 2 and one line of error holding every needle."""
    code, _, err = cli(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert str(n) in err, (n, err)
    return err.strip()


def small_trace(path: Path, requests: int = 2, length: int = 6, **header) -> Path:
    t = bernoulli_trace(requests, length, 0.7, k=4, prompt_len=4)
    for k, v in header.items():
        setattr(t.header, k, v)
    write_trace(t, path)
    return path


def trace_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path: Path, objs: list) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def run_args(trace, *more):
    return ("run", "--trace", trace, "--stages", 2, "--strategies", "ar", "--quiet", *more)


def profile_dict() -> dict:
    return json.loads(bundled_profiles()[PROFILE].read_text())


DEEP = "[" * 100_000 + "]" * 100_000               # past the interpreter's recursion limit
NESTED = "[" * (MAX_JSON_DEPTH + 20) + "]" * (MAX_JSON_DEPTH + 20)   # decodes, but too deep
HUGE_INT = "7" * 5000                               # past Python's int <-> str limit


# --------------------------------------------------------------------------- 1. one line

@pytest.mark.parametrize("nest", [DEEP, NESTED], ids=["recursion", "depth"])
def test_deep_json_in_every_reader_is_one_line(tmp_path, capsys, nest):
    trace = small_trace(tmp_path / "t.jsonl")
    lines = trace.read_text().splitlines()
    lines[1] = lines[1][:-1] + f', "extra": {nest}}}'
    (tmp_path / "deep.jsonl").write_text("\n".join(lines) + "\n")
    refused(capsys, *run_args(tmp_path / "deep.jsonl"),
            needles=["deep.jsonl:2", f"more than {MAX_JSON_DEPTH} levels"])

    prompts = write_lines(tmp_path / "p.jsonl", [{"instruction": "a"},
                                                 f'{{"instruction": "b", "x": {nest}}}'])
    refused(capsys, *run_args(prompts), needles=["p.jsonl:2", "levels deep"])
    listed = tmp_path / "p.json"
    listed.write_text(f'[{{"instruction": "a"}},\n {{"instruction": {nest}}}]')
    refused(capsys, *run_args(listed), needles=["p.json:2", "levels deep"])

    prof = tmp_path / "prof.json"
    prof.write_text(json.dumps(profile_dict(), indent=1)[:-1] + f',\n"x": {nest}}}')
    err = refused(capsys, *run_args(TRACE, "--profile", prof), needles=["prof.json:", "deep"])
    assert err.split("prof.json:")[1].split(":")[0].isdigit()           # the line

    acc = tmp_path / "acc.json"
    acc.write_text(f'{{"alpha": 1, "beta": 1, "name": {nest}}}')
    refused(capsys, *run_args(SAMPLES / "prompts.txt", "--acceptance", acc),
            needles=["acc.json:1", "levels deep"])

    tl = tmp_path / "tl.json"
    tl.write_text(f'{{"traceEvents": {nest}}}')
    refused(capsys, "plot", tl, "--kind", "timeline", "--out", tmp_path / "x.png",
            needles=["tl.json:1", "levels deep"])


def test_integers_past_the_conversion_limit_are_one_line(tmp_path, capsys):
    lines = small_trace(tmp_path / "t.jsonl").read_text().splitlines()
    req = json.loads(lines[1])
    lines[1] = json.dumps(req).replace(f'"prompt_len": {req["prompt_len"]}',
                                       f'"prompt_len": {HUGE_INT}')
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    refused(capsys, *run_args(tmp_path / "big.jsonl"), needles=["big.jsonl:2", "digits"])
    acc = tmp_path / "acc.json"
    acc.write_text(f'{{"alpha": 1,\n "beta": {HUGE_INT}}}')
    refused(capsys, *run_args(SAMPLES / "prompts.txt", "--acceptance", acc),
            needles=["acc.json:2", "4300 digits"])
    prof = tmp_path / "prof.json"
    prof.write_text(json.dumps(profile_dict(), indent=1).replace('"layers": 80',
                                                                 f'"layers": {HUGE_INT}', 1))
    refused(capsys, *run_args(TRACE, "--profile", prof), needles=["prof.json:", "digits"])


def test_lone_surrogate_ids_are_refused_when_read(tmp_path, capsys):
    lines = small_trace(tmp_path / "t.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"id":"1"', '"id":"bad\\ud800"')
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "res"
    refused(capsys, *run_args(tmp_path / "s.jsonl", "--out", out),
            needles=["s.jsonl:3", "field 'id'", "surrogate"])
    assert not out.exists()
    prompts = write_lines(tmp_path / "p.jsonl", ['{"id": "\\udc00", "instruction": "x"}'])
    refused(capsys, *run_args(prompts), needles=["p.jsonl:1", "field 'id'", "surrogate"])
    sharegpt = write_lines(tmp_path / "g.jsonl", [
        '{"id": "a", "conversations": [{"from": "human", "value": "hi \\ud83d"}]}'])
    refused(capsys, *run_args(sharegpt), needles=["conversations[0].value", "surrogate"])


def test_outputs_are_all_or_nothing(tmp_path):
    from pipedec_sim.atomic import atomic_paths
    a, b = tmp_path / "summary.csv", tmp_path / "sub" / "requests.csv"
    a.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        with atomic_paths([a, b]) as (ta, tb):
            ta.write_text("new\n")
            tb.write_text("\ud800", encoding="utf-8")          # fails after the first
    assert a.read_text() == "old\n" and not b.exists()
    assert not [p for p in tmp_path.rglob(".*.tmp")]
    with atomic_paths([a, b]) as (ta, tb):
        ta.write_text("new\n")
        tb.write_text("rows\n")
    assert a.read_text() == "new\n" and b.read_text() == "rows\n"


def test_run_writes_tables_and_timeline_together(tmp_path, capsys):
    out, tl = tmp_path / "res", tmp_path / "tl.json"
    code, _, err = cli(capsys, *run_args(TRACE, "--max-requests", 1, "--out", out,
                                         "--timeline", tl))
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"summary.csv", "requests.csv"}
    assert json.loads(tl.read_text())["traceEvents"]


@pytest.mark.parametrize("field, value, needle", [
    ("prompt_len", 10**15, "prompt_len"), ("top_k", 10**9, "top_k")])
def test_absurd_trace_values(tmp_path, capsys, field, value, needle):
    lines = trace_lines(small_trace(tmp_path / "t.jsonl"))
    (lines[0] if field == "top_k" else lines[1])[field] = value
    bad = write_lines(tmp_path / "bad.jsonl", lines)
    refused(capsys, *run_args(bad),
            needles=[f"bad.jsonl:{1 if field == 'top_k' else 2}", f"field '{needle}'", "limit"])


def test_absurd_prompt_length(tmp_path, capsys):
    long = tmp_path / "long.txt"
    long.write_text("short\n" + "x" * (4 * MAX_PROMPT_LEN + 8) + "\n")
    refused(capsys, *run_args(long), needles=["long.txt:2", f"limit of {MAX_PROMPT_LEN}"])


@pytest.mark.parametrize("model, field", [
    ({"alpha": 1, "beta": 1, "top_k": 10**9, "vocab": 10**10}, "top_k"),
    ({"alpha": 1, "beta": 1, "vocab": 10**30}, "vocab"),
    ({"alpha": 1e308, "beta": 1e308}, "alpha"),        # random.betavariate spins on these
])
def test_absurd_acceptance_models(tmp_path, capsys, model, field):
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps(model))
    t0 = time.monotonic()
    with deadline(30):
        refused(capsys, *run_args(SAMPLES / "prompts.txt", "--acceptance", acc),
                needles=["acc.json", f"field '{field}'", "limit"])
    assert time.monotonic() - t0 < 10
    assert MAX_BETA_PARAM < 1e308


def test_absurd_profile_shapes(tmp_path, capsys):
    d = profile_dict()
    d["target"]["hidden"] = 10**400
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps(d))
    refused(capsys, *run_args(TRACE, "--profile", prof),
            needles=["p.json", "field 'target.hidden'", "limit"])
    d = profile_dict()
    d["target"]["layers"] = 10**7
    prof.write_text(json.dumps(d))
    with deadline(60):       # refused before any work: by --stages (and by the layers bound)
        refused(capsys, "run", "--trace", TRACE, "--profile", prof, "--stages", 5_000_000,
                "--quiet", needles=["limit"])


def test_profile_shape_bounds_helper():
    from pipedec_sim.inputs.profile.checks import check_shape_int
    for key, limit in SHAPE_LIMITS.items():
        assert check_shape_int(limit, f"target.{key}", "p.json") == limit
        with pytest.raises(InputError, match=f"must be <= {limit} \\(the limit\\)") as e:
            check_shape_int(limit + 1, f"draft.{key}", "p.json")
        assert e.value.field == f"draft.{key}" and e.value.file == "p.json"
    with pytest.raises(InputError, match="expected an integer"):
        check_shape_int(8.0, "target.layers", None)


@pytest.mark.parametrize("args, needles", [
    (("--tree-topk", 1_000_000), ["--tree-topk", "must be <= 64"]),
    (("--width", 10**9), ["--width", "must be <= 1024"]),
    (("--max-new-tokens", 1_000_000_000), ["--max-new-tokens", f"<= {MAX_OUTPUT_LEN}"]),
    (("--stages", 5_000_000), ["--stages", f"<= {MAX_STAGES}"]),
])
def test_absurd_flags_are_refused_before_any_work(capsys, args, needles):
    with deadline(30):
        refused(capsys, "run", "--trace", TRACE, *args, needles=needles)


def test_knob_bounds_reach_configs_grids_and_tuner(tmp_path, capsys):
    from pipedec_sim.programs.simulate import SimConfig
    from pipedec_sim.programs.tune import MAX_TOPK, MAX_WIDTH, check_space
    from pipedec_sim.protocol.knobs import KNOBS
    for name in ("width", "topk", "depth", "tree_topk", "total"):   # the tree's sizes
        assert KNOBS[name].hi is not None, name
        with pytest.raises(ValueError, match=f"{name}: must be <="):
            SimConfig(**{name: int(KNOBS[name].hi) + 1})
    check_space()
    assert MAX_WIDTH <= KNOBS["width"].hi and MAX_TOPK <= KNOBS["topk"].hi
    grid = tmp_path / "g.toml"
    grid.write_text(f'trace = "{TRACE}"\nstages = [2]\ntree_topk = [4, 1000000]\n')
    refused(capsys, "sweep", "--grid", grid, "--out", tmp_path / "res",
            needles=["g.toml:3", "field 'tree_topk'", "must be <= 64"])


def test_dev_zero_as_trace(capsys):
    with deadline(30):
        refused(capsys, *run_args("/dev/zero"), needles=["/dev/zero", "not a regular file"])


def test_plot_dpi_bound(tmp_path, capsys):
    refused(capsys, "plot", tmp_path, "--kind", "speedup", "--out", tmp_path / "x.png",
            "--dpi", 100000, needles=["--dpi", "limit"])


def test_bad_output_paths_are_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    missing = tmp_path / "missing.jsonl"     # reading it would fail: the output check is first
    refused(capsys, *run_args(missing, "--out", a_file), needles=["--out", "not a folder"])
    refused(capsys, *run_args(missing, "--out", "/sys/pipedec-out"),
            needles=["--out", "cannot write in /sys"])
    refused(capsys, *run_args(missing, "--timeline", tmp_path), needles=["--timeline",
                                                                        "is a folder"])
    out = tmp_path / "res"
    refused(capsys, *run_args(TRACE, "--max-requests", 1, "--out", out, "--timeline", tmp_path),
            needles=["--timeline"])
    assert not out.exists()                  # the CSVs were not written first
    refused(capsys, "sweep", "--trace", missing, "--out", a_file, needles=["--out"])
    refused(capsys, "tune", "--trace", missing, "--out", tmp_path, needles=["--out",
                                                                          "is a folder"])
    refused(capsys, "plot", missing, "--kind", "speedup", "--out", tmp_path,
            needles=["--out", "is a folder"])
    refused(capsys, "plot", missing, "--kind", "speedup", "--out", a_file / "x.png",
            needles=["--out", "not a folder"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    refused(capsys, *run_args(TRACE, "--out", ro / "res"), needles=["--out", "cannot write"])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_knob_refuses_nan_and_inf(capsys, value):
    from pipedec_sim.protocol.knobs import KNOBS
    floats = [k for k in KNOBS.values() if k.kind is float]
    assert floats
    for k in floats:
        with pytest.raises(ValueError):
            k.parse(value)
        assert k.problem(float(value)) is not None
        refused(capsys, *run_args(TRACE, k.flag, value), needles=[k.flag])
    refused(capsys, *run_args(TRACE, "--link-latency-ms", value), needles=["--link-latency-ms"])
    refused(capsys, *run_args(TRACE, "--link-gbps", value), needles=["--link-gbps"])


# --------------------------------------------------------------------------- 2. no hang

@pytest.mark.parametrize("flag", ["--trace", "--acceptance", "--profile", "grid", "results"])
def test_fifos_are_refused_not_opened(tmp_path, capsys, flag):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    if flag == "--trace":
        args = run_args(fifo)
    elif flag == "--acceptance":
        args = run_args(SAMPLES / "prompts.txt", "--acceptance", fifo)
    elif flag == "--profile":
        args = run_args(TRACE, "--profile", fifo)
    elif flag == "grid":
        args = ("sweep", "--grid", fifo, "--out", tmp_path / "res")
    else:
        args = ("plot", fifo, "--kind", "speedup", "--out", tmp_path / "x.png")
    with deadline(30):
        refused(capsys, *args, needles=["pipe.jsonl", "is a FIFO (named pipe), not a regular file"])
    with deadline(30):
        refused(capsys, "sweep", "--trace", fifo, "--out", tmp_path / "res",
                needles=["pipe.jsonl", "FIFO"])


def test_profile_folder_says_what_it_is(tmp_path, capsys):
    refused(capsys, *run_args(TRACE, "--profile", tmp_path), needles=["is a folder"])
    refused(capsys, *run_args(TRACE, "--profile", tmp_path / "nope.json"),
            needles=["no such file", "bundled"])


def _pool_steps(t0: float, works: list[float], cores: float = 1.0, limit: int = 1000):
    """Run a CorePool from clock t0; (steps taken, finish times), steps None if it spins."""
    import simpy

    from backends.simulated.cores import CorePool
    env = simpy.Environment(initial_time=t0)
    pool = CorePool(env, cores)
    done = {}
    for i, w in enumerate(works):
        pool.start(w)[1].callbacks.append(lambda _e, i=i: done.setdefault(i, env.now))
    steps = 0
    while len(done) < len(works):
        env.step()
        steps += 1
        if steps > limit:
            return None, done
    return steps, done


def test_core_pool_finishes_jobs_late_in_a_long_run():
    """Late in a long CPU-profile run the clock cannot resolve a job's last sliver of work
    (now + delay == now): the pool spun on zero-length timeouts forever (this case did)."""
    steps, done = _pool_steps(1e8, [0.11258823299559799, 3.2480811314919658])
    assert steps is not None and steps <= 6        # a wake-up per start and per finish
    assert done[0] == pytest.approx(1e8 + 2 * 0.11258823299559799, abs=1e-6)
    assert done[1] == pytest.approx(1e8 + 0.11258823299559799 + 3.2480811314919658, abs=1e-6)
    rng = random.Random(7)
    for _ in range(300):
        works = [rng.uniform(1e-3, 5.0) for _ in range(rng.randint(2, 5))]
        steps, done = _pool_steps(rng.choice([1e7, 1e8, 1e9, 1e12]), works,
                                  cores=rng.choice([1.0, 2.0]))
        assert steps is not None and steps <= 4 * len(works) + 4, works


def test_core_pool_times_are_unchanged_early():
    """Early clocks (every regression configuration): the times are the exact ones."""
    steps, done = _pool_steps(0.0, [1.0, 3.0, 0.5])          # 1 core shared by 3, then 2
    assert steps is not None
    assert done[2] == pytest.approx(1.5) and done[0] == pytest.approx(2.5)
    assert done[1] == pytest.approx(4.5)


# --------------------------------------------------------------------------- 3. no loss

def tiny_sweep(tmp_path: Path, out: Path, capsys, *more) -> tuple[int, str]:
    trace = small_trace(tmp_path / "t.jsonl", requests=2)
    code, _, err = cli(capsys, "sweep", "--trace", trace, "--stages", 2, "--strategies",
                       "pipedec", "--width", 2, "--workers", 1, "--out", out, *more)
    return code, err


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "res"
    holder = subprocess.Popen(   # another process holds the folder, as a running sweep does
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from pipedec_sim.programs.sweep import sweep_lock\n"
         f"with sweep_lock(Path({str(out)!r})):\n print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = tiny_sweep(tmp_path, out, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "another sweep" in err and f"pid {holder.pid}" in err and "--out" in err
    finally:
        holder.communicate("", timeout=30)
    code, err = tiny_sweep(tmp_path, out, capsys, "--quiet")
    assert code == 0, err
    assert len(pd.read_csv(out / "summary.csv")) == 2


@pytest.mark.parametrize("damage", ["empty", "cut mid-line", "a row short", "other config"])
def test_damaged_parts_are_named_and_run_again(tmp_path, capsys, damage):
    out = tmp_path / "res"
    assert tiny_sweep(tmp_path, out, capsys, "--quiet")[0] == 0
    before = pd.read_csv(out / "requests.csv")
    part = sorted((out / "parts").glob("*.csv"))[0]
    text = part.read_text()
    if damage == "empty":
        part.write_bytes(b"")
    elif damage == "cut mid-line":
        part.write_text(text[:-25])
    elif damage == "a row short":
        part.write_text("".join(text.splitlines(keepends=True)[:-1]))
    else:
        part.write_text(text.replace(part.stem, "0123456789ab"))
    code, err = tiny_sweep(tmp_path, out, capsys)
    assert code == 0, err
    assert "Traceback" not in err and str(part) in err and "again" in err, err
    assert (out / "parts" / f"{part.name}.damaged").is_file()
    after = pd.read_csv(out / "requests.csv")
    key = ["config_id", "request"]
    pd.testing.assert_frame_equal(before.sort_values(key).reset_index(drop=True),
                                  after.sort_values(key).reset_index(drop=True))


def test_a_config_id_that_reads_as_a_number_is_kept_as_text(tmp_path):
    """Config ids are hex digests: "8e0006296477" must not be read as the float 8e6296477
    (it was: the stages14 sweep refused its own part files)."""
    from pipedec_sim.programs.sweep import _part_columns, part_problem
    cid = "8e0006296477"
    cols = _part_columns()
    row = {c: 1 for c in cols} | {"config_id": cid}
    part = tmp_path / f"{cid}.csv"
    pd.DataFrame([row]).to_csv(part, index=False)
    assert part_problem(part, cid, 1) is None
    pd.DataFrame([row | {"config_id": "8e0006296478"}]).to_csv(part, index=False)
    assert "another configuration" in part_problem(part, cid, 1)


def test_merge_refuses_a_damaged_part(tmp_path, capsys):
    from pipedec_sim.programs.sweep import build_grid, merge
    out = tmp_path / "res"
    assert tiny_sweep(tmp_path, out, capsys, "--quiet")[0] == 0
    part = sorted((out / "parts").glob("*.csv"))[0]
    part.write_bytes(b"")
    grid = build_grid(None, {"trace": [str(tmp_path / "t.jsonl")], "stages": [2],
                             "strategies": ["pipedec"], "width": [2]})
    with pytest.raises(InputError, match="is empty") as e:
        merge(out, grid.configs())
    assert e.value.file == str(part)


def test_killed_sweep_leaves_no_orphan_processes(tmp_path):
    tag = f"PIPEDEC_HARDENING_TEST={os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1]}
    cmd = [sys.executable, "-m", "pipedec_sim.programs.cli", "sweep", "--trace", str(TRACE),
           "--stages", "8", "--strategies", "pipedec", "--width", "4,8,16,32", "--topk",
           "4,16", "--max-requests", "4", "--workers", "2", "--out", str(tmp_path / "res"),
           "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline_s = time.monotonic() + 60
        while len(tagged_pids(tag)) < 5:           # the sweep, a tracker, a fork server, 2 workers
            if proc.poll() is not None or time.monotonic() > deadline_s:
                pytest.fail(f"the sweep's workers never started (exit {proc.returncode})")
            time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=30)
        deadline_s = time.monotonic() + 30
        while tagged_pids(tag) and time.monotonic() < deadline_s:
            time.sleep(0.1)
        left = tagged_pids(tag)
        assert not left, f"orphans after 30 s: {left}"
    finally:
        for pid in tagged_pids(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- 4. messages

def test_trace_with_a_bom_or_a_long_header_is_a_trace(tmp_path, capsys):
    path = small_trace(tmp_path / "t.jsonl")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    code, _, err = cli(capsys, *run_args(bom))
    assert code == 0, err
    long = small_trace(tmp_path / "long.jsonl", notes="n" * (2 << 20))     # a 2 MiB header
    code, _, err = cli(capsys, *run_args(long))
    assert code == 0, err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(long.read_text().replace('"top_k":4', '"top_k":', 1))
    refused(capsys, *run_args(broken), needles=["broken.jsonl:1", "invalid JSON"])


def test_tune_holdout_says_how_many_requests_it_held_out(tmp_path, capsys):
    trace = small_trace(tmp_path / "t.jsonl", requests=3)
    base = ("tune", "--trace", trace, "--stages", 2, "--budget", 1, "--workers", 1, "--quiet")
    code, out, err = cli(capsys, *base, "--max-requests", 2, "--holdout", 1000)
    assert code == 0, err
    assert "--holdout 1000: the trace has only 1 requests after the 2 tuned on" in err
    assert "held-out requests 2..2:" in out and "1001" not in out
    refused(capsys, *base, "--max-requests", 3, "--holdout", 5,
            needles=["--holdout", "none is left"])


def test_run_and_sweep_agree_on_seeds(tmp_path, capsys):
    from pipedec_sim.inputs.limits import MAX_SEED
    run_err = refused(capsys, *run_args(TRACE, "--seed", -1), needles=["--seed"])
    sweep_err = refused(capsys, "sweep", "--trace", TRACE, "--seed", -1, "--dry-run",
                        needles=["--seed"])
    assert f"must be in [0, {MAX_SEED}]" in run_err and f"must be in [0, {MAX_SEED}]" in sweep_err
    refused(capsys, *run_args(TRACE, "--seed", MAX_SEED + 1), needles=["--seed"])
    code, _, err = cli(capsys, "sweep", "--trace", TRACE, "--seed", f"0,{MAX_SEED}",
                       "--dry-run", "--max-requests", 1)
    assert code == 0, err


@pytest.mark.parametrize("line", ["link_latency_ms = inf", "link_gbps = nan",
                                  "link_latency_ms = -inf", "coverage = nan"])
def test_grid_errors_on_non_finite_numbers_name_file_and_line(tmp_path, capsys, line):
    grid = tmp_path / "g.toml"
    grid.write_text(f'trace = "{TRACE}"\nstages = [2]\n{line}\n')
    key = line.split(" =")[0]
    refused(capsys, "sweep", "--grid", grid, "--out", tmp_path / "res",
            needles=[f"{grid}:3", f"field '{key}'"])


# --------------------------------------------------------------------------- 5. newcomers

def _summary(rows) -> pd.DataFrame:
    return pd.DataFrame([{"strategy": "pipedec", "stages": 4, "cfg_width": w, "cfg_topk": k,
                          "cfg_floor": f, "cfg_profile": p, "tbt_ms": t,
                          "speedup_vs_ar": 100.0 / t} for w, k, f, p, t in rows])


def test_heatmap_text_reads_on_its_cell_for_both_colormaps():
    import matplotlib.pyplot as plt

    from analysis import plots
    df = _summary([(w, k, 0.0, "p", 10.0 + w + 3 * k) for w in (2, 4, 8) for k in (2, 4)])
    for metric in ("speedup_vs_ar", "tbt_ms"):
        fig = plots.width_heatmap(df, metric=metric)
        ax = fig.axes[0]
        im = ax.images[0]
        for t in ax.texts:
            j, i = t.get_position()
            r, g, b, _ = im.cmap(im.norm(im.get_array()[int(i), int(j)]))
            light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
            assert t.get_color() == ("black" if light else "white"), (metric, t.get_text())
        colors = {t.get_color() for t in ax.texts}
        assert colors == {"black", "white"}
        plt.close(fig)


def test_plot_where_selects_and_says_which_slice(tmp_path, capsys):
    rows = [(w, k, f, p, 10.0 + w + k + 100 * f + (5 if p == "b" else 0))
            for w in (2, 4) for k in (2, 4) for f in (0.0, 0.1) for p in ("a", "b")]
    summary = tmp_path / "summary.csv"
    _summary(rows).to_csv(summary, index=False)
    png = tmp_path / "w.png"
    code, _, err = cli(capsys, "plot", summary, "--kind", "width", "--out", png)
    assert code == 0, err
    assert "S=4" in err and "1 of 2 workloads" in err and "lowest-TBT floor per cell" in err
    code, _, err = cli(capsys, "plot", summary, "--kind", "width", "--out", png,
                       "--where", "floor=0.1", "--where", "profile=b")
    assert code == 0, err
    assert "width heatmap of S=4" in err and "lowest-TBT" not in err and " of 2" not in err
    refused(capsys, "plot", summary, "--kind", "width", "--out", png, "--where", "flor=0.1",
            needles=["--where", "no column 'flor'", "floor"])
    refused(capsys, "plot", summary, "--kind", "width", "--out", png, "--where", "floor=0.5",
            needles=["--where", "no rows with floor=0.5", "0.1"])
    refused(capsys, "plot", summary, "--kind", "width", "--out", png, "--where", "floor",
            needles=["--where", "KEY=VALUE"])
    from analysis import plots
    with_ar = pd.concat([_summary(rows), pd.DataFrame([{"strategy": "ar", "stages": 4,
                                                        "cfg_profile": "a", "tbt_ms": 50.0}])])
    kept = plots.where(with_ar, {"floor": "0.1", "profile": "a"})
    assert sorted(set(kept.strategy)) == ["ar", "pipedec"] and len(kept) == 5


def test_timeline_instant_events_are_thread_scoped(tmp_path, capsys):
    from pipedec_sim.results.timeline import chrome_trace
    events = chrome_trace({"x": [{"name": "hit", "ph": "i", "ts": 1.0, "tid": "head"},
                                 {"name": "miss", "ph": "i", "s": "g", "ts": 2.0, "tid": "head"},
                                 {"name": "layer", "ph": "X", "ts": 0, "dur": 1,
                                  "tid": "stage1"}]})["traceEvents"]
    instants = [e for e in events if e["ph"] == "i"]
    assert len(instants) == 2 and all(e["s"] == "t" for e in instants)
    assert "s" not in next(e for e in events if e["ph"] == "X")
    tl = tmp_path / "tl.json"
    assert cli(capsys, *run_args(TRACE, "--max-requests", 1, "--timeline", tl,
                                 "--strategies", "pipedec"))[0] == 0
    instants = [e for e in json.loads(tl.read_text())["traceEvents"] if e["ph"] == "i"]
    assert instants and all(e["s"] == "t" for e in instants)


def test_run_format_flag_forces_the_reader(tmp_path, capsys):
    from pipedec_sim.inputs.prompts import WORKLOAD_FORMATS
    odd = tmp_path / "prompts.dat"
    odd.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": "4"}\n')
    code, _, err = cli(capsys, "run", "--trace", odd, "--stages", 2, "--strategies", "ar",
                       "--format", "gsm8k")
    assert code == 0, err
    assert "gsm8k, 2 prompts" in err
    refused(capsys, *run_args(odd, "--format", "trace"), needles=["prompts.dat:1", "format"])
    unknown = write_lines(tmp_path / "u.jsonl", [{"what": "x"}])
    refused(capsys, *run_args(unknown), needles=["cannot tell the prompt format",
                                                 "name it with --format"])
    assert WORKLOAD_FORMATS[:2] == ("auto", "trace")
    code, out, _ = cli(capsys, "run", "--help")
    assert code == 0 and "{" + ",".join(WORKLOAD_FORMATS) + "}" in out


def test_workload_line_says_prompt_lengths_are_estimated(capsys):
    code, _, err = cli(capsys, "run", "--trace", SAMPLES / "prompts.txt", "--stages", 2,
                       "--strategies", "ar", "--max-new-tokens", 4)
    assert code == 0, err
    workload = next(line for line in err.splitlines() if line.startswith("workload:"))
    assert "prompt lengths estimated at 4 characters per token" in workload
    assert "outputs 4 tokens" in workload


def test_notebooks_write_beside_their_working_directory():
    for name in ("speedup.ipynb", "timeline.ipynb"):
        cells = json.loads((REPO / "analysis" / name).read_text())["cells"]
        code = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert 'os.environ.get("PIPEDEC_FIGURES", "figures")' in code, name
        assert 'REPO / "analysis" / "figures"' not in code, name


def test_limits_are_sane():
    assert MAX_JSON_DEPTH >= 20 and math.isfinite(MAX_BETA_PARAM)
