"""Serving workloads: Poisson and given arrival times, drawing requests, the serving flags."""
from __future__ import annotations

import numpy as np
import pytest

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.arrivals import (
    ServeWorkload,
    draw_requests,
    poisson_arrivals,
    poisson_until,
    read_arrivals,
    serve_workload,
)
from pipedec_sim.inputs.traces import TraceRequest

from .helpers import bernoulli_trace


def reqs(n: int = 5) -> list[TraceRequest]:
    return bernoulli_trace(n, 4, 0.5).requests


# ----------------------------------------------------------------------------- Poisson

def test_poisson_mean_gap_and_seed():
    t = np.array(poisson_arrivals(20000, 4.0, seed=1))
    gaps = np.diff(np.concatenate(([0.0], t)))
    assert len(t) == 20000 and (gaps >= 0).all() and t[0] > 0
    assert abs(gaps.mean() - 250.0) < 10.0              # mean 1000/rate ms, sd/sqrt(n) ~ 1.8
    assert abs(gaps.std() - 250.0) < 15.0               # exponential: sd = mean
    assert poisson_arrivals(50, 4.0, seed=1) == tuple(t[:50])
    assert poisson_arrivals(50, 4.0, seed=2) != tuple(t[:50])


def test_poisson_until_is_a_prefix_cut_at_the_duration():
    full = poisson_arrivals(10000, 100.0, seed=3)        # ~100 s of arrivals, 10 ms apart
    cut = poisson_until(60_000.0, 100.0, seed=3)          # ~6000: spans two chunks of gaps
    assert len(cut) > 4096 and cut == full[:len(cut)]     # bit for bit
    assert cut[-1] < 60_000.0 <= full[len(cut)]
    assert poisson_until(60_000.0, 100.0, seed=3, cap=10) == full[:10]


# ----------------------------------------------------------------------------- files

def test_read_arrivals_plain_and_csv(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("# seconds\n0\n\n0.5\n0.5\n2.25\n")
    assert read_arrivals(plain) == (0.0, 500.0, 500.0, 2250.0)
    table = tmp_path / "a.csv"
    table.write_text("id,arrival_s,note\nx,0.1,hi\n# skipped\ny,1.5,\"a, b\"\n")
    assert read_arrivals(table) == pytest.approx((100.0, 1500.0))


@pytest.mark.parametrize("text, line, match", [
    ("0\n1\nabc\n", 3, "expected a number of seconds"),
    ("0\n2\n1\n", 3, "before the previous arrival"),
    ("0\n-1\n", 2, "finite time >= 0"),
    ("0\nnan\n", 2, "finite time >= 0"),
    ("0\ninf\n", 2, "finite time >= 0"),
    ("id,start\na,1\n", 1, "arrival_s column"),
    ("id,arrival_s\na,1\nb\n", 3, "has 1 column"),
    ("id,arrival_s\na,1\nb,x\n", 3, "expected a number of seconds"),
])
def test_read_arrivals_errors_name_line_and_field(tmp_path, text, line, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=match) as info:
        read_arrivals(path)
    assert info.value.line == line and info.value.field == "arrival_s"
    assert str(info.value).startswith(f"{path}:{line}: field 'arrival_s': ")


def test_read_arrivals_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(InputError, match="no arrival times"):
        read_arrivals(empty)
    header_only = tmp_path / "h.csv"
    header_only.write_text("arrival_s\n")
    with pytest.raises(InputError, match="no arrival times"):
        read_arrivals(header_only)
    with pytest.raises(InputError, match="no such file"):
        read_arrivals(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------- requests

def test_draw_requests_prefix_then_unique_seeded_copies():
    base = reqs(3)
    assert draw_requests(base, 2, seed=0) == tuple(base[:2])
    many = draw_requests(base, 20, seed=7)
    assert many[:3] == tuple(base)
    ids = [r.id for r in many]
    assert len(set(ids)) == 20
    originals = {r.id: r for r in base}
    for r in many[3:]:
        src, _, k = r.id.partition("#")
        assert int(k) >= 1 and r.output == originals[src].output
    assert many == draw_requests(base, 20, seed=7)
    assert [r.id for r in draw_requests(base, 20, seed=8)] != ids


def test_draw_requests_ids_stay_unique_when_the_file_has_copy_like_ids():
    a, b = reqs(2)
    base = [a, TraceRequest(f"{a.id}#1", b.prompt_len, b.output, b.topk_ids, b.topk_probs)]
    drawn = draw_requests(base, 40, seed=0)
    assert len({r.id for r in drawn}) == 40


# ----------------------------------------------------------------------------- flags

def test_serve_workload_poisson():
    w = serve_workload(reqs(5), n=None, rate=2.0, concurrency=None, duration_s=None, seed=0)
    assert len(w.requests) == 5 and w.arrivals_ms == poisson_arrivals(5, 2.0, 0)
    assert w.concurrency is None and w.describe == "5 requests, Poisson 2.0 req/s (seed 0)"
    w = serve_workload(reqs(5), n=12, rate=2.0, concurrency=None, duration_s=None, seed=0)
    assert len(w.requests) == len(w.arrivals_ms or ()) == 12
    assert "5 distinct" in w.describe


def test_serve_workload_duration_cut():
    w = serve_workload(reqs(3), n=None, rate=50.0, concurrency=None, duration_s=10.0, seed=4)
    a = w.arrivals_ms
    assert a is not None and 400 < len(a) < 600             # ~500 expected, sd ~22
    assert a[-1] < 10_000.0 and len(w.requests) == len(a) and w.duration_ms == 10_000.0
    assert a == poisson_arrivals(len(a) + 1, 50.0, 4)[:-1]
    capped = serve_workload(reqs(3), n=7, rate=50.0, concurrency=None, duration_s=10.0, seed=4)
    assert capped.arrivals_ms == a[:7]
    with pytest.raises(InputError, match="no request arrives") as info:
        serve_workload(reqs(3), n=None, rate=0.001, concurrency=None, duration_s=0.001, seed=0)
    assert info.value.field == "--duration"


def test_serve_workload_closed_loop():
    w = serve_workload(reqs(4), n=None, rate=None, concurrency=2, duration_s=3.0, seed=0)
    assert w.arrivals_ms is None and w.concurrency == 2 and w.duration_ms == 3000.0
    assert len(w.requests) == 4 and "closed loop, 2 outstanding" in w.describe
    w = serve_workload(reqs(4), n=9, rate=None, concurrency=2, duration_s=None, seed=0)
    assert len(w.requests) == 9 and w.duration_ms is None


def test_serve_workload_given_arrivals(tmp_path):
    f = tmp_path / "times.txt"
    f.write_text("0\n0.25\n1\n4\n")
    w = serve_workload(reqs(2), n=None, rate=None, concurrency=None, arrivals_file=f,
                       duration_s=None, seed=0)
    assert w.arrivals_ms == (0.0, 250.0, 1000.0, 4000.0) and len(w.requests) == 4
    w = serve_workload(reqs(2), n=2, rate=None, concurrency=None, arrivals_file=f,
                       duration_s=None, seed=0)
    assert w.arrivals_ms == (0.0, 250.0) and [r.id for r in w.requests] == ["0", "1"]
    w = serve_workload(reqs(2), n=None, rate=None, concurrency=None, arrivals_file=f,
                       duration_s=2.0, seed=0)
    assert w.arrivals_ms == (0.0, 250.0, 1000.0)
    with pytest.raises(InputError, match="only 4 arrival times") as info:
        serve_workload(reqs(2), n=5, rate=None, concurrency=None, arrivals_file=f,
                       duration_s=None, seed=0)
    assert info.value.field == "--requests"


@pytest.mark.parametrize("kw, field, match", [
    (dict(rate=None, concurrency=None), "--rate", "got none"),
    (dict(rate=1.0, concurrency=2), "--rate", "more than one"),
    (dict(rate=1.0, concurrency=None, arrivals_file="x"), "--rate", "more than one"),
    (dict(rate=0.0, concurrency=None), "--rate", "> 0"),
    (dict(rate=float("inf"), concurrency=None), "--rate", "> 0"),
    (dict(rate=None, concurrency=0), "--concurrency", ">= 1"),
    (dict(rate=1.0, concurrency=None, n=0), "--requests", r"\[1,"),
    (dict(rate=1.0, concurrency=None, duration_s=-1.0), "--duration", "> 0"),
    (dict(rate=1.0, concurrency=None, seed=-1), "--seed", "integer"),
])
def test_serve_workload_flag_problems(kw, field, match):
    args = dict(n=None, duration_s=None, seed=0) | kw
    with pytest.raises(InputError, match=match) as info:
        serve_workload(reqs(2), **args)
    assert info.value.field == field
    if field == "--rate" and "one of" in str(info.value):
        assert all(f in str(info.value) for f in ("--rate", "--concurrency", "--arrivals"))


def test_serve_workload_needs_requests():
    with pytest.raises(InputError, match="no requests"):
        serve_workload([], n=None, rate=1.0, concurrency=None, duration_s=None, seed=0)


def test_workload_checks_its_own_consistency():
    r = tuple(reqs(2))
    with pytest.raises(ValueError, match="either"):
        ServeWorkload(r, (0.0, 1.0), 2, None, "x")
    with pytest.raises(ValueError, match="non-decreasing"):
        ServeWorkload(r, (1.0, 0.0), None, None, "x")
    with pytest.raises(ValueError, match="2 requests"):
        ServeWorkload(r, (0.0,), None, None, "x")
    with pytest.raises(ValueError, match="unique"):
        ServeWorkload((r[0], r[0]), None, 1, None, "x")
