"""Lossless under sampling: every strategy commits exactly the target's own seeded samples.

The reference is the target alone with the core's sampler (backends/torch/generate.py).
Tiny models in float32, drafts that miss (random), mix (noisy) and always hit (the target
itself); the inline driver (the simulator's clock, real shards and KV) over S in {1, 2, 4}
and both topologies, and the distributed runtime (processes, gloo) once per topology.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.torch.generate import reference_output  # noqa: E402
from backends.torch.head import Request  # noqa: E402
from backends.torch.inline import InlinePipeline  # noqa: E402
from backends.torch.models import load  # noqa: E402
from pipedec_sim.protocol.sampling import GREEDY, Sampling  # noqa: E402

pytestmark = pytest.mark.real
STRATEGIES = ("ar", "tree-sd", "pipedec")
KNOBS = dict(width=4, topk=4, depth=4, tree_topk=4, total=16)
PROMPTS = ["Hello, world! This is a test.", "abc", "The quick brown fox jumps"]
SAMPLINGS = {"T0.7": Sampling(temperature=0.7, seed=11),
             "T1-top-p0.9": Sampling(temperature=1.0, top_p=0.9, seed=12)}
N = 20


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    t = load("tiny")
    drafts = {"random": load("tiny-draft"), "noisy": load("tiny-noisy"), "self": t}
    prompts = [t.encode(p) for p in PROMPTS]
    refs = {name: [reference_output(t, p, N, s, str(i)) for i, p in enumerate(prompts)]
            for name, s in SAMPLINGS.items()}
    return t, drafts, prompts, refs


def test_the_reference_at_temperature_zero_is_hf_greedy(tiny):
    target, _, prompts, _ = tiny
    for i, p in enumerate(prompts):
        hf = target.model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=N,
                                   eos_token_id=target.eos, pad_token_id=0)[0, len(p):]
        assert reference_output(target, p, N, GREEDY, str(i)) == hf.tolist()


def test_seeds_change_the_samples_and_a_seed_repeats_them(tiny):
    target, _, prompts, refs = tiny
    again = [reference_output(target, p, N, SAMPLINGS["T0.7"], str(i))
             for i, p in enumerate(prompts)]
    other = [reference_output(target, p, N, Sampling(temperature=0.7, seed=99), str(i))
             for i, p in enumerate(prompts)]
    greedy = [reference_output(target, p, N, GREEDY, str(i)) for i, p in enumerate(prompts)]
    assert again == refs["T0.7"]
    assert other != refs["T0.7"] and greedy != refs["T0.7"]


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("draft", ["random", "noisy", "self"])
def test_tiny_lossless_when_sampling(tiny, strategy, stages, draft, sampling):
    target, drafts, prompts, refs = tiny
    pipe = InlinePipeline(target, drafts[draft], stages, knobs=KNOBS,
                          sampling=SAMPLINGS[sampling])
    for i, (prompt, ref) in enumerate(zip(prompts, refs[sampling])):
        run = pipe.run(strategy, Request(str(i), prompt, len(ref)))
        assert run.output == ref, f"request {i}"


def test_topology_b_samples_on_the_last_stage(tiny):
    target, drafts, prompts, refs = tiny
    pipe = InlinePipeline(target, drafts["noisy"], 2, topology="B", knobs=KNOBS,
                          sampling=SAMPLINGS["T0.7"])
    for i, (prompt, ref) in enumerate(zip(prompts, refs["T0.7"])):
        assert pipe.run("pipedec", Request(str(i), prompt, len(ref))).output == ref


@pytest.mark.parametrize("topology", ["A", "B"])
def test_the_distributed_runtime_samples_the_same_tokens(tiny, topology):
    """Processes over gloo: the head (A) or the last stage (B) samples, keyed on the
    request id that travels in RESET."""
    from backends.torch.runtime import DistributedPipeline
    from backends.torch.worker import StageConfig
    target, _, prompts, refs = tiny
    s = SAMPLINGS["T1-top-p0.9"]
    cfg = StageConfig(target="tiny", stages=2, topology=topology,
                      sampling=dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                    seed=s.seed))
    with DistributedPipeline(cfg, "tiny-noisy", knobs=KNOBS) as pipe:
        for strategy in STRATEGIES:
            for i, (prompt, ref) in enumerate(zip(prompts, refs["T1-top-p0.9"])):
                run = pipe.run(strategy, Request(str(i), prompt, len(ref)))
                assert run.output == ref, (strategy, i)
