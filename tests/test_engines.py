"""The fast SimPy engine against the reference engine: identical results.

The fast engine (backends/simulated/fast.py) must process the reference's events in the
reference's order, so every figure (commit times, end, busy time and rows per actor,
batches, cancellations, timelines) is the same, ties at one instant included. Flat
profiles with round numbers make such ties common; the analytic and measured H100
profiles cover the grids; CPU profiles with shared cores run the reference itself.
"""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.simulated.fast import fast_model
from backends.simulated.oracle import TraceOracle
from backends.simulated.pipeline import Pipeline, Replay
from pipedec_sim.inputs.acceptance import synthetic_trace
from pipedec_sim.inputs.profile import constant_profile, load_profile
from pipedec_sim.programs.simulate import SimConfig, prompt_tokens, simulate
from pipedec_sim.protocol.pacing import PRUNE_MODES
from pipedec_sim.protocol.strategies import make_strategy
from tests.helpers import random_trace

STRATEGIES = ("ar", "tree-sd", "pipedec")


def outcome(pipe_kw: dict, profile, stages: int, req, name: str, knobs: dict, seed: int = 0):
    """One request on one engine: everything a RequestRun holds."""
    pipe = Pipeline(profile, stages, timeline=True, **pipe_kw)
    strategy = make_strategy(name, prompt_tokens(req), len(req.output), **knobs)
    run = pipe.run(strategy, TraceOracle(req, seed=seed))
    assert strategy.output == list(req.output)
    return (run.commits, run.end_ms, run.busy_ms, run.rows, run.batches, run.cancelled,
            run.timeline)


def assert_same(a, b, rel: float = 1e-9) -> None:
    """Equal, floats to `rel` relative (the engines agree to the bit; this is the spec)."""
    if isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=rel, abs_tol=1e-12), (a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            assert_same(x, y, rel)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for k in a:
            assert_same(a[k], b[k], rel)
    else:
        assert a == b, (a, b)


def both(profile, stages, req, name, knobs, **pipe_kw):
    ref = outcome({**pipe_kw, "engine": "reference"}, profile, stages, req, name, knobs)
    fast = outcome({**pipe_kw, "engine": "fast"}, profile, stages, req, name, knobs)
    assert_same(fast, ref)
    return ref


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), stages=st.integers(1, 6), k=st.integers(1, 5),
       width=st.integers(1, 6), length=st.integers(1, 30),
       topology=st.sampled_from("AB"), prune=st.sampled_from(PRUNE_MODES),
       cancel=st.booleans(), draft_ms=st.sampled_from([0.0, 0.3, 4.0]),
       name=st.sampled_from(STRATEGIES))
def test_fast_engine_equals_the_reference_on_flat_profiles(seed, stages, k, width, length,
                                                           topology, prune, cancel,
                                                           draft_ms, name):
    """The property-test space of test_simulated, with round durations (many ties)."""
    rng = random.Random(seed)
    trace = random_trace(rng, 1, length, k, rng.randint(1, 5))
    prof = constant_profile(layers=6, layer_ms=rng.choice([0.5, 1.0]), draft_ms=draft_ms,
                            lm_head_ms=rng.choice([0.0, 0.5]),
                            link_latency_ms=rng.choice([0.0, 0.1]),
                            bandwidth_gbps=rng.choice([None, 10.0]),
                            kv_compact_ms=rng.choice([0.0, 0.05]),
                            head_overhead_ms=rng.choice([0.0, 0.05]))
    knobs = dict(width=width, topk=k, depth=rng.randint(1, 4), tree_topk=rng.randint(1, 3),
                 total=rng.randint(1, 8), window=rng.choice([None, 1, stages + 1]))
    both(prof, stages, trace.requests[0], name, knobs, topology=topology, prune=prune,
         cancel=cancel)


@pytest.mark.parametrize("profile", ["analytic-llama70b-1b", "h100-llama70b-1b-kernels"])
@pytest.mark.parametrize("topology", ["A", "B"])
@pytest.mark.parametrize("prune", PRUNE_MODES)
def test_fast_engine_equals_the_reference_on_gpu_profiles(profile, topology, prune):
    prof = load_profile(profile)
    trace = synthetic_trace(requests=2, output_len=40, prompt_len=(16, 200), seed=3)
    knobs = SimConfig(stages=7, width=8, topk=8).knobs()
    for req in trace.requests:
        for name in STRATEGIES:
            for cancel in (True, False):
                both(prof, 7, req, name, knobs, topology=topology, prune=prune,
                     cancel=cancel)


def test_cpu_profiles_with_shared_cores_run_the_reference():
    """Processor sharing couples every job on the cores: the fast engine hands such
    profiles to the reference, so `--engine fast` gives the reference's figures."""
    prof = load_profile("cpu-smollm2")
    assert prof.shared_cores and not fast_model(prof, Replay(None))
    assert fast_model(load_profile("analytic-llama70b-1b"), Replay(None))
    trace = synthetic_trace(requests=1, output_len=24, prompt_len=(8, 32), seed=1)
    for name in STRATEGIES:
        both(prof, 3, trace.requests[0], name, SimConfig(stages=3, width=4, topk=4).knobs())


def test_simulate_tables_are_identical_on_both_engines():
    trace = synthetic_trace(requests=3, output_len=48, prompt_len=(32, 300), seed=2)
    prof = load_profile("analytic-llama70b-1b")
    ref = simulate(trace, prof, SimConfig(stages=14, engine="reference"), timeline_requests=1)
    fast = simulate(trace, prof, SimConfig(stages=14, engine="fast"), timeline_requests=1)
    assert fast.summary.equals(ref.summary)
    assert fast.requests.equals(ref.requests)
    assert fast.timelines == ref.timelines


def test_an_unknown_engine_is_refused():
    from backends.simulated.pipeline import ENGINES
    from pipedec_sim.programs.flags import ENGINES as FLAG_ENGINES
    assert ENGINES == FLAG_ENGINES
    with pytest.raises(ValueError, match="engine must be one of fast, reference"):
        Pipeline(constant_profile(), 2, engine="turbo")
    with pytest.raises(ValueError, match="engine must be one of fast, reference"):
        SimConfig(engine="turbo")
