"""Simulator modelling of what the real CPU runtime does: processor sharing of the
machine's cores, stage 1's acks over a hop, and flow control (a window of batches in
flight, a PipeDec knob the harness sets to S + 1) that keeps a slow downstream stage from
queueing PipeDec layers without bound."""
from __future__ import annotations

import dataclasses

import pytest
import simpy

from backends.simulated.cores import CorePool
from backends.simulated.oracle import TraceOracle
from backends.simulated.pipeline import Pipeline
from pipedec_sim.errors import InputError
from pipedec_sim.inputs.profile import constant_profile, load_profile, parse_profile
from pipedec_sim.protocol.strategies import make_strategy

from .helpers import bernoulli_trace


def _finish_times(cores: float, works: list[float], starts: list[float] | None = None):
    env = simpy.Environment()
    pool = CorePool(env, cores)
    done = {}

    def job(i, w, at):
        yield env.timeout(at)
        _, ev = pool.start(w)
        yield ev
        done[i] = env.now
    for i, w in enumerate(works):
        env.process(job(i, w, (starts or [0.0] * len(works))[i]))
    env.run()
    return [done[i] for i in range(len(works))]


def test_processor_sharing_closed_forms():
    # Three 10 ms jobs on two cores: each progresses at 2/3, all end at 15 ms (FIFO: 10, 10, 20).
    assert _finish_times(2, [10, 10, 10]) == pytest.approx([15, 15, 15])
    # Fewer jobs than cores: full speed.
    assert _finish_times(2, [4, 10]) == pytest.approx([4, 10])
    # One core, 2 ms then 6 ms jobs: the short one ends at 4 ms (shared), the long at 8.
    assert _finish_times(1, [2, 6]) == pytest.approx([4, 8])
    # A late arrival: job 0 alone for 5 ms (5 done), then both share one core at 1/2.
    assert _finish_times(1, [10, 2], [0, 5]) == pytest.approx([12, 9])


def test_measured_share_table():
    """A measured table replaces min(1, cores/n): shares of 1, 1/2, 1/3 (one core left to
    us) make two 10 ms jobs take 20 ms; relative to a profile measured with a share of
    1.0, a table measured now at 0.5 doubles a lone job."""
    assert pool_finish([10, 10], share=(1.0, 0.5, 0.333)) == pytest.approx([20, 20])
    assert pool_finish([10], share=(0.5, 0.25), base=1.0) == pytest.approx([20])
    assert pool_finish([10, 10, 10], share=(1.0, 0.5)) == pytest.approx([30, 30, 30], rel=1e-6)


def pool_finish(works, **kw):
    """End times of jobs of `works` ms started together on a 2-core CorePool(**kw)."""
    env = simpy.Environment()
    pool = CorePool(env, 2, **kw)
    ends = []

    def job(w):
        _, ev = pool.start(w)
        yield ev
        ends.append(env.now)
    for w in works:
        env.process(job(w))
    env.run()
    return ends


def _run(profile, stages, name, trace, window=None, **kw):
    req = trace.requests[0]
    pipe = Pipeline(profile, stages, **kw)
    s = make_strategy(name, [1] * req.prompt_len, len(req.output), width=4, topk=4,
                      window=window or stages + 1)
    run = pipe.run(s, TraceOracle(req))
    assert s.output == list(req.output)
    c = run.commits
    return (c[-1][0] - c[0][0]) / (sum(x[1] for x in c) - c[0][1]), run


def test_shared_cores_ps_vs_fifo_vs_dedicated():
    """PipeDec with an always-right draft on 4 stages + head: 5 busy actors. Dedicated
    devices give one token per stage time; two shared cores slow it to about 5/2 of it
    when everything is busy; FIFO and PS agree on throughput, PS spreads the delay."""
    trace = bernoulli_trace(1, 60, 1.0, k=4)
    base = constant_profile(layers=8, layer_ms=1.0, draft_ms=2.0)      # 2 ms per stage
    tbt_free, _ = _run(base, 4, "pipedec", trace)
    assert tbt_free == pytest.approx(2.0, rel=0.05)
    ps = dataclasses.replace(base, shared_cores=2, device_kind="cpu")
    fifo = dataclasses.replace(ps, core_sharing="fifo")
    tbt_ps, _ = _run(ps, 4, "pipedec", trace)
    tbt_fifo, _ = _run(fifo, 4, "pipedec", trace)
    assert tbt_ps > 1.8 * tbt_free and tbt_fifo > 1.8 * tbt_free
    assert tbt_ps == pytest.approx(tbt_fifo, rel=0.2)
    # Plain PP keeps one actor busy at a time: cores never bind.
    ar_free, _ = _run(base, 4, "ar", trace)
    ar_ps, _ = _run(ps, 4, "ar", trace)
    assert ar_ps == pytest.approx(ar_free, rel=1e-6)


def test_window_bounds_queueing_behind_a_slow_stage():
    """Stage 2 holds 3x stage 1's layers; EntryFree comes from stage 1. Without a window
    layers pile up before stage 2; with in-band prune notices (the torch runtime's mode)
    a miss's notice waits behind the whole queue, which is computed for nothing. With the
    default window (S + 1 batches in flight) PipeDec stays near the slowest stage's pace."""
    prof = dataclasses.replace(constant_profile(layers=4, layer_ms=1.0), split=(1, 3))
    kw = dict(prune="piggyback", cancel=False)
    tbt, _ = _run(prof, 2, "pipedec", bernoulli_trace(1, 80, 1.0, k=4), **kw)
    assert tbt == pytest.approx(3.0, rel=0.05)
    trace = bernoulli_trace(1, 80, 0.8, k=4)
    tbt, _ = _run(prof, 2, "pipedec", trace, **kw)
    tbt_unbounded, _ = _run(prof, 2, "pipedec", trace, window=10**9, **kw)
    assert tbt < 6.0 and tbt_unbounded > 3 * tbt          # measured: 4.8 vs 27.6 ms


def test_ack_hop_paces_pipedec():
    """Topology A: stage 1's ack crosses a hop before the head injects the next layer."""
    trace = bernoulli_trace(1, 60, 1.0, k=4)
    prof = constant_profile(layers=4, layer_ms=0.25, link_latency_ms=1.0)   # 0.5 ms stages
    tbt, _ = _run(prof, 2, "pipedec", trace)
    # ack hop (1) + inject hop (1) per layer: the entry, not the stages, sets the pace
    assert tbt == pytest.approx(2.0, rel=0.05)


def test_core_sharing_in_profiles():
    p = load_profile("cpu-smollm2")
    assert p.core_sharing == "ps"
    d = p.to_dict()
    assert "core_sharing" not in d["devices"]          # the default stays implicit
    d["devices"]["core_sharing"] = "fifo"
    assert parse_profile(d).core_sharing == "fifo"
    assert parse_profile(parse_profile(d).to_dict()).core_sharing == "fifo"
    d["devices"]["core_sharing"] = "round-robin"
    with pytest.raises(InputError, match="core_sharing"):
        parse_profile(d)


# ---- optional CPU-host costs (issue 6): per-message stage CPU, head CPU, contention ----

def test_stage_message_cpu_slows_plain_pp_predictably():
    """Plain PP, 2 stages of 4 ms on dedicated cores: every batch costs each stage one
    message of CPU before its compute, so a token takes 2 x 1.5 ms longer."""
    trace = bernoulli_trace(1, 40, 0.0, k=4)
    base = constant_profile(layers=8, layer_ms=1.0)                     # 4 ms per stage
    tbt, _ = _run(base, 2, "ar", trace)
    slow, run = _run(dataclasses.replace(base, stage_message_ms=1.5), 2, "ar", trace)
    assert slow == pytest.approx(tbt + 2 * 1.5, rel=1e-6)
    assert run.busy_ms["wire1"] > 0 and run.rows.get("wire1", 0) == 0


def test_head_event_cpu_occupies_the_head():
    """Plain PP: each token is one Verified event at the head; its CPU delays the next
    inject by head_event_ms (the ack's EntryFree event is off the critical path)."""
    trace = bernoulli_trace(1, 40, 0.0, k=4)
    base = constant_profile(layers=8, layer_ms=1.0)
    tbt, _ = _run(base, 2, "ar", trace)
    slow, run = _run(dataclasses.replace(base, head_event_ms=0.5), 2, "ar", trace)
    assert slow == pytest.approx(tbt + 0.5, rel=1e-6)
    assert run.busy_ms["head"] > 0


def test_message_contention_only_when_the_cores_are_oversubscribed():
    """Plain PP keeps one process busy at a time on 2 cores: message costs stay quiet.
    PipeDec with an always-right draft keeps every stage busy: they rise."""
    trace = bernoulli_trace(1, 40, 1.0, k=4)
    base = dataclasses.replace(load_profile("cpu-smollm2"), stage_message_ms=1.0,
                               message_contention=1.0)
    hot = dataclasses.replace(base, message_contention=4.0)
    for name, changes in (("ar", False), ("pipedec", True)):
        a, _ = _run(base, 4, name, trace, prune="piggyback", cancel=False)
        b, _ = _run(hot, 4, name, trace, prune="piggyback", cancel=False)
        assert (b > a * 1.02) == changes, (name, a, b)


def test_contention_slowdown_only_when_oversubscribed():
    # Three 10 ms jobs on two cores: 15 ms with no contention cost, 15 x 1.2 with it;
    # two jobs on two cores are not oversubscribed: unchanged.
    assert pool_finish([10, 10, 10], slowdown=1.2) == pytest.approx([18, 18, 18])
    assert pool_finish([10, 10], slowdown=1.2) == pytest.approx([10, 10])


def test_cpu_cost_fields_optional_and_round_trip():
    """Old profiles (no fields) load with zero costs and simulate exactly as before; the
    fields round-trip and are validated."""
    p = load_profile("cpu-smollm2")
    d = p.to_dict()
    for k in ("stage_message_ms", "stage_notice_ms", "head_event_ms"):
        d["latency"].pop(k, None)
    d["devices"].pop("contention_slowdown", None)
    d["devices"].pop("message_contention", None)
    old = parse_profile(d)
    assert (old.stage_message_ms, old.stage_notice_ms, old.head_event_ms,
            old.contention_slowdown, old.message_contention) == (0.0, 0.0, 0.0, 1.0, 1.0)
    assert "stage_message_ms" not in old.to_dict()["latency"]
    assert "contention_slowdown" not in old.to_dict()["devices"]
    d["latency"].update(stage_message_ms=1.0, stage_notice_ms=0.5, head_event_ms=0.25)
    d["devices"].update(contention_slowdown=1.1, message_contention=3.0)
    new = parse_profile(d)
    assert parse_profile(new.to_dict()) == new
    assert (new.stage_message_ms, new.contention_slowdown, new.message_contention) == (
        1.0, 1.1, 3.0)
    for bad in ({"latency": {"stage_message_ms": -1}}, {"devices": {"contention_slowdown": 0.9}},
                {"devices": {"message_contention": 0.5}}):
        e = parse_profile(new.to_dict()).to_dict()
        for sec, kv in bad.items():
            e[sec].update(kv)
        with pytest.raises(InputError):
            parse_profile(e)


def test_zero_cpu_costs_give_identical_runs():
    """A profile with the fields explicitly 0 / 1 simulates bit for bit like one without."""
    trace = bernoulli_trace(1, 50, 0.7, k=4)
    p = dataclasses.replace(load_profile("cpu-smollm2"), stage_message_ms=0.0,
                            stage_notice_ms=0.0, head_event_ms=0.0, contention_slowdown=1.0,
                            message_contention=1.0)
    d = p.to_dict()
    old = parse_profile(d)
    for name in ("ar", "tree-sd", "pipedec"):
        kw = dict(prune="piggyback", cancel=False)
        a, ra = _run(old, 3, name, trace, **kw)
        b, rb = _run(p, 3, name, trace, **kw)
        assert a == b and ra.commits == rb.commits and ra.busy_ms == rb.busy_ms
