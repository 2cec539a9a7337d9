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


@pytest.mark.parametrize("driver", [["--inline"], []])
def test_pipedec_real_run_commits_the_reference_samples(tiny, tmp_path, driver):
    """The CLI end to end: `--temperature/--top-p/--seed` reach the verifying rank, and
    every strategy's outputs.jsonl equals the target-alone reference for its request id."""
    import json

    from backends.torch.cli import main as real_main
    target = tiny[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat sat\nOnce upon a time\n", encoding="utf-8")
    out = tmp_path / "out"
    assert real_main(["run", "--target", "tiny", "--draft", "tiny-noisy", "--stages", "2",
                      "--prompts", str(prompts), "--max-new-tokens", "12", "--quiet",
                      "--temperature", "0.8", "--top-p", "0.95", "--seed", "4",
                      "--out", str(out), *driver]) == 0
    s = Sampling(temperature=0.8, top_p=0.95, seed=4)
    rows = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert {r["strategy"] for r in rows} == set(STRATEGIES)
    for r in rows:
        assert r["output_ids"] == reference_output(target, r["prompt_ids"], 12, s, r["id"])


def test_a_sampled_trace_records_the_targets_samples(tiny, tmp_path):
    """`pipedec-real trace --temperature`: the outputs are the reference samples (batched
    generation repaired to the unbatched rule), the header says how they were sampled."""
    from backends.torch.trace_recorder import main as trace_main
    from pipedec_sim.inputs.traces import read_trace, trace_sampling
    target = tiny[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    path = tmp_path / "t.jsonl"
    assert trace_main(["--target", "tiny", "--draft", "tiny-noisy", "--prompts", str(prompts),
                       "--out", str(path), "--max-new-tokens", "16", "--batch-size", "3",
                       "--temperature", "0.7", "--seed", "11", "--quiet"]) == 0
    trace = read_trace(path)
    s = trace_sampling(trace.header)
    assert s == Sampling(temperature=0.7, seed=11)
    for req in trace.requests:
        assert req.output == reference_output(target, req.prompt_ids, 16, s, req.id)


@pytest.fixture(scope="module")
def smollm2():
    try:
        from backends.torch.smollm2 import SmolLM2Missing
        t = load("smollm2")
    except (ImportError, SmolLM2Missing) as e:       # the offline package is optional
        pytest.skip(f"SmolLM2 not available: {e}")
    torch.set_num_threads(1)
    prompts = [t.encode(p) for p in ("What is the capital of France?",
                                     "Write a haiku about the sea.")]
    refs: dict[tuple[str, int], list[int]] = {}

    def ref(sampling: str, i: int) -> list[int]:
        """The target's own seeded samples for prompt i (each computed once)."""
        if (sampling, i) not in refs:
            refs[sampling, i] = reference_output(t, prompts[i], 32, SAMPLINGS[sampling], str(i))
        return refs[sampling, i]
    return t, load("smollm2-draft"), prompts, ref


@pytest.mark.slow
@pytest.mark.parametrize("stages, sampling", [(4, "T0.7"), (2, "T1-top-p0.9")])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_smollm2_lossless_when_sampling(smollm2, strategy, stages, sampling):
    """SmolLM2-135M with its distilled draft, 32 sampled tokens per prompt: real weights,
    misses and partial acceptance, and still the target's own seeded samples, on split
    pipelines with either sampling (the tiny models cover every S with both samplings)."""
    target, draft, prompts, ref = smollm2
    pipe = InlinePipeline(target, draft, stages, knobs=KNOBS, sampling=SAMPLINGS[sampling])
    for i, prompt in enumerate(prompts):
        out = pipe.run(strategy, Request(str(i), prompt, 32)).output
        assert out == ref(sampling, i), f"request {i}"
