"""Serving with real models is lossless: under greedy decoding every request of a serving
workload commits exactly the target's own output (HF `generate(do_sample=False)`), for
every serving strategy, over 1, 2 and 4 stages, closed loop at concurrency 1, 3 and 8 and
open loop with Poisson arrivals, with chunked prefill and with pipedec-db layers shared
between requests; sampled at T=0.7, each request commits its own seeded samples.

Runs `backends.torch.serve.InlineServer` (ServeSim's clock, real shards): each request
has its own KV caches on every stage, so a request reading another's cache, or a part
computed through the wrong request's rows, changes tokens. The prompts differ in length
and the requests in max_new_tokens, so they finish at different times and new ones are
admitted while others are mid-flight.
"""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.torch.generate import reference_output  # noqa: E402
from backends.torch.head import Request  # noqa: E402
from backends.torch.models import load  # noqa: E402
from backends.torch.serve import InlineServer  # noqa: E402
from pipedec_sim.inputs.arrivals import poisson_arrivals  # noqa: E402
from pipedec_sim.protocol.sampling import Sampling  # noqa: E402
from pipedec_sim.protocol.serve import SERVE_STRATEGIES  # noqa: E402

pytestmark = pytest.mark.real
KNOBS = dict(width=4, topk=4, depth=4, tree_topk=4, total=16)
PROMPTS = [("Hello, world! This is a test.", 8), ("abc", 16),
           ("The quick brown fox jumps", 11), ("Once upon a time there was", 13),
           ("x", 9), ("Pipelines decode speculatively, layer by layer.", 15)]


def greedy(loaded, prompt, n):
    out = loaded.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                                eos_token_id=loaded.eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny():
    """The tiny target, a draft that hits and misses, the requests and their references."""
    torch.set_num_threads(1)
    target = load("tiny")
    requests = [Request(str(i), target.encode(text), n) for i, (text, n) in enumerate(PROMPTS)]
    refs = [greedy(target, r.prompt_ids, r.max_new_tokens) for r in requests]
    return target, load("tiny-noisy"), requests, refs


def check_lossless(run, outputs, refs) -> None:
    """Every request finished with the target's output, its commits adding up to it."""
    assert sorted(outputs) == list(range(len(refs)))
    for r, ref in enumerate(refs):
        assert outputs[r] == ref, f"request {r}"
        served = run.requests[r]
        assert math.isfinite(served.end_ms) and served.end_ms >= served.arrival_ms
        assert sum(c[1] for c in served.commits) == len(ref), f"request {r}"


def stage1_rows(run, label: str) -> list[int]:
    """Rows of every step stage 1 computed whose parts are all of kind `label`."""
    return [e["args"]["rows"] for e in run.pipeline.timeline
            if e.get("ph") == "X" and e["tid"] == "stage1" and e["name"] == label]


@pytest.mark.parametrize("concurrency", [1, 3, 8])
@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("strategy", SERVE_STRATEGIES)
def test_serving_is_lossless(tiny, strategy, stages, concurrency):
    target, draft, requests, refs = tiny
    server = InlineServer(target, draft, stages, knobs=KNOBS)
    run, outputs = server.serve(strategy, requests, concurrency=concurrency)
    check_lossless(run, outputs, refs)
    if concurrency > stages and strategy != "pipedec-db":
        # more requests than micro-batches (S of them): some steps carried several
        assert run.parts > run.pipeline.batches


@pytest.mark.parametrize("strategy", SERVE_STRATEGIES)
def test_topology_b_serving_is_lossless(tiny, strategy):
    """The last stage's LM head verifies every part (no verifier on the head)."""
    target, draft, requests, refs = tiny
    server = InlineServer(target, draft, 2, topology="B", knobs=KNOBS)
    check_lossless(*server.serve(strategy, requests, concurrency=3), refs)


@pytest.mark.parametrize("strategy", SERVE_STRATEGIES)
def test_poisson_arrivals_are_lossless(tiny, strategy):
    target, draft, requests, refs = tiny
    arrivals = poisson_arrivals(len(requests), rate_per_s=40.0, seed=3)
    server = InlineServer(target, draft, 2, knobs=KNOBS)
    run, outputs = server.serve(strategy, requests, arrivals_ms=arrivals)
    check_lossless(run, outputs, refs)
    served = [run.requests[r] for r in range(len(requests))]
    assert [s.arrival_ms for s in served] == pytest.approx(list(arrivals))
    # the arrivals overlap: some request arrives while an earlier one is still running
    assert any(b.arrival_ms < a.end_ms for a, b in zip(served, served[1:]))


@pytest.mark.parametrize("topology", ["A", "B"])
def test_chunked_prefill_is_lossless(tiny, topology):
    """pp with a 3-row budget: prompts enter a chunk per step, beside running requests."""
    target, draft, requests, refs = tiny
    assert max(len(r.prompt_ids) for r in requests) > 3

    def serve(chunked):
        server = InlineServer(target, draft, 2, topology=topology, knobs=KNOBS, timeline=True,
                              serve_knobs=dict(chunked_prefill=chunked, max_batched_tokens=3))
        return server.serve("pp", requests, concurrency=3)
    run, outputs = serve(True)
    check_lossless(run, outputs, refs)
    rows = [e["args"]["rows"] for e in run.pipeline.timeline
            if e.get("ph") == "X" and e["tid"] == "stage1"]
    assert max(rows) <= 3                            # every prompt was cut into chunks
    whole, _ = serve(False)
    assert max(stage1_rows(whole, "prefill")) > 3   # without chunking a prompt goes whole


def test_pipedec_db_requests_share_narrow_layers(tiny):
    """step_width 2 < width 4: the running requests split each layer's two rows."""
    target, draft, requests, refs = tiny

    def serve(step_width):
        server = InlineServer(target, draft, 4, knobs=KNOBS, timeline=True,
                              serve_knobs=dict(step_width=step_width))
        return server.serve("pipedec-db", requests, concurrency=8)
    run, outputs = serve(2)
    check_lossless(run, outputs, refs)
    assert run.parts > run.pipeline.batches          # steps carried several requests
    assert stage1_rows(run, "layer") and max(stage1_rows(run, "layer")) <= 2
    wide, _ = serve(64)
    assert max(stage1_rows(wide, "layer")) > 2       # the knob is what narrowed the layers


@pytest.mark.parametrize("strategy", SERVE_STRATEGIES)
def test_sampled_serving_commits_each_requests_own_samples(tiny, strategy):
    """At T=0.7 each request's tokens are keyed on its own id (TargetSampler per request):
    the target-alone seeded samples (backends/torch/generate.py)."""
    target, draft, requests, _ = tiny
    s = Sampling(temperature=0.7, seed=11)
    refs = [reference_output(target, r.prompt_ids, r.max_new_tokens, s, r.id) for r in requests]
    server = InlineServer(target, draft, 2, knobs=KNOBS, sampling=s)
    check_lossless(*server.serve(strategy, requests, concurrency=3), refs)


def test_requests_get_their_own_kv_over_shared_weights(tiny):
    """Per-request holders reference the loaded modules (no weight is copied) and own
    their bookkeeping and caches."""
    target, draft, requests, _ = tiny
    server = InlineServer(target, draft, 2, knobs=KNOBS)
    a, b = server.compute_for(requests[0]), server.compute_for(requests[1])
    model_layers = list(target.model.model.layers)
    for sa, sb in zip(a.shards, b.shards):
        assert sa.model is sb.model is target.model
        assert all(x is y is model_layers[sa.lo + k]
                   for k, (x, y) in enumerate(zip(sa.layers, sb.layers)))
        assert sa.cache is not sb.cache and sa.state is not sb.state
    assert a.draft_model.shard.model is b.draft_model.shard.model is draft.model
    assert a.draft_model.shard.cache is not b.draft_model.shard.cache
    assert a.verifier.state is not b.verifier.state
    assert a.sampler.key != b.sampler.key


@pytest.fixture(scope="module")
def smollm2():
    try:
        from backends.torch.smollm2 import SmolLM2Missing
        target = load("smollm2")
    except (ImportError, SmolLM2Missing) as e:       # the offline package is optional
        pytest.skip(f"SmolLM2 not available: {e}")
    torch.set_num_threads(1)
    texts = [("What is the capital of France?", 12), ("Write a haiku about the sea.", 16),
             ("Name three primary colours.", 10), ("Say hi.", 8)]
    requests = [Request(str(i), target.encode(t), n) for i, (t, n) in enumerate(texts)]
    refs = [greedy(target, r.prompt_ids, r.max_new_tokens) for r in requests]
    # the references may stop at EOS: ask for exactly what they produced
    requests = [Request(r.id, r.prompt_ids, len(ref)) for r, ref in zip(requests, refs)]
    return target, load("smollm2-draft"), requests, refs


@pytest.mark.slow
@pytest.mark.parametrize("strategy", SERVE_STRATEGIES)
def test_smollm2_serving_is_lossless(smollm2, strategy):
    """SmolLM2-135M with its distilled draft (misses and partial acceptance on real
    weights), four requests at once over two stages."""
    target, draft, requests, refs = smollm2
    server = InlineServer(target, draft, 2, knobs=KNOBS)
    check_lossless(*server.serve(strategy, requests, concurrency=4), refs)


@pytest.mark.parametrize("topology", ["A", "B"])
@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("strategy", SERVE_STRATEGIES)
def test_one_forward_per_step_is_lossless(tiny, strategy, stages, topology):
    """batched=True: a stage computes a step's parts of several requests in one forward
    (batch.forward_requests: weights once, attention per request over its own cache)
    and a draft pass over several requests is one forward too; every request still
    commits the target's own output, and steps and draft passes really mixed requests."""
    target, draft, requests, refs = tiny
    calls: dict[str, list[int]] = {"stage": [], "draft": []}
    import backends.torch.serve as serve_mod
    real_stage, real_draft = serve_mod.batched_stage, serve_mod.batched_draft

    def stage(j, parts):
        calls["stage"].append(len(parts))
        real_stage(j, parts)

    def drafted(items):
        calls["draft"].append(len(items))
        return real_draft(items)
    serve_mod.batched_stage, serve_mod.batched_draft = stage, drafted
    try:
        server = InlineServer(target, draft, stages, topology=topology, knobs=KNOBS,
                              batched=True)
        check_lossless(*server.serve(strategy, requests, concurrency=8), refs)
    finally:
        serve_mod.batched_stage, serve_mod.batched_draft = real_stage, real_draft
    assert calls["stage"] and max(calls["stage"]) > 1
    assert strategy == "pp" or max(calls["draft"]) > 1
