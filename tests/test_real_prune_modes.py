"""Every prune mode (`pacing.PRUNE_MODES`) is lossless on real models, in both drivers and
both topologies, and broadcast + cancel really abandons batches mid-stage.

Inline driver: every strategy x mode x topology at S = 2 and 4 against HF greedy
`generate`. Distributed runtime (S = 3, one process group per configuration, started once):
every mode, both topologies among them, cancel on and off.
"""
from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.torch.head import Request  # noqa: E402
from backends.torch.inline import InlinePipeline  # noqa: E402
from backends.torch.models import load  # noqa: E402
from pipedec_sim.protocol.pacing import DEFAULT_CANCEL, DEFAULT_PRUNE, PRUNE_MODES  # noqa: E402

pytestmark = pytest.mark.real
STRATEGIES = ("ar", "tree-sd", "pipedec")
KNOBS = dict(width=4, topk=4, depth=4, tree_topk=4, total=16)
PROMPTS = ["Hello, world! This is a test.", "The quick brown fox jumps"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    target, draft = load("tiny"), load("tiny-noisy")
    prompts = [target.encode(p) for p in PROMPTS]
    refs = [target.model.generate(torch.tensor([p]), do_sample=False,
                                  max_new_tokens=NEW_TOKENS, pad_token_id=0)[0, len(p):].tolist()
            for p in prompts]
    return target, draft, prompts, refs


def test_defaults_are_the_shared_ones():
    import inspect

    from backends.torch.worker import StageConfig
    params = inspect.signature(InlinePipeline).parameters
    assert (params["prune"].default, params["cancel"].default) == (DEFAULT_PRUNE, DEFAULT_CANCEL)
    cfg = StageConfig("tiny", 2)
    assert (cfg.prune, cfg.cancel) == (DEFAULT_PRUNE, DEFAULT_CANCEL) == ("broadcast", True)
    with pytest.raises(ValueError):
        StageConfig("tiny", 2, prune="telepathy")


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("topology", ["A", "B"])
@pytest.mark.parametrize("prune", PRUNE_MODES)
def test_inline_lossless(tiny, prune, topology, stages):
    target, draft, prompts, refs = tiny
    pipe = InlinePipeline(target, draft, stages, topology=topology, prune=prune, knobs=KNOBS)
    for strategy in STRATEGIES:
        for i, (prompt, ref) in enumerate(zip(prompts, refs)):
            run = pipe.run(strategy, Request(str(i), prompt, len(ref)))
            assert run.output == ref, (strategy, i)


# ---- the distributed runtime ------------------------------------------------------------
# (prune, topology, cancel): every mode, each topology, cancel on and off.
DISTRIBUTED = {"broadcast": ("broadcast", "A", True), "inband": ("inband", "B", True),
               "piggyback": ("piggyback", "A", True),
               "broadcast-no-cancel": ("broadcast", "B", False)}


@functools.cache
def distributed_runs(key: str, prompts: tuple, lengths: tuple) -> list:
    """Every strategy on every prompt through one S=3 process group (started once)."""
    from backends.torch.runtime import DistributedPipeline
    from backends.torch.worker import StageConfig
    prune, topology, cancel = DISTRIBUTED[key]
    cfg = StageConfig("tiny", 3, topology, timeout_s=60, prune=prune, cancel=cancel)
    with DistributedPipeline(cfg, "tiny-noisy", knobs=KNOBS) as pipe:
        return [pipe.run(s, Request(str(i), list(p), n))
                for s in STRATEGIES for i, (p, n) in enumerate(zip(prompts, lengths))]


def _runs(tiny, key):
    _, _, prompts, refs = tiny
    return distributed_runs(key, tuple(map(tuple, prompts)), tuple(map(len, refs)))


@pytest.mark.parametrize("key", list(DISTRIBUTED))
def test_distributed_lossless(tiny, key):
    refs = tiny[3]
    runs = _runs(tiny, key)
    assert [(r.strategy, r.output) for r in runs] == [
        (s, ref) for s in STRATEGIES for ref in refs]
    if DISTRIBUTED[key][0] != "broadcast":
        assert sum(r.cancelled for r in runs) == 0       # only broadcast can cancel


def test_broadcast_cancel_abandons_batches_mid_stage(tiny):
    """PipeDec at S=3 with a noisy draft: a miss kills the whole tree while later layers
    are still in the stages, so some stage is computing a batch whose rows all died; its
    broadcast notice overtakes the batch and the stage abandons it at a layer boundary
    (a "layer (cancelled)" slice on the timeline). The output stays the target's own."""
    runs = [r for r in _runs(tiny, "broadcast") if r.strategy == "pipedec"]
    assert sum(r.cancelled for r in runs) > 0
    labels = [s[3] for r in runs for s in r.slices if s[0].startswith("stage")]
    assert labels.count("layer (cancelled)") == sum(r.cancelled for r in runs)
    assert [r.output for r in runs] == tiny[3]


def test_broadcast_without_cancel_never_abandons(tiny):
    runs = _runs(tiny, "broadcast-no-cancel")
    assert sum(r.cancelled for r in runs) == 0
    assert not any("cancelled" in s[3] for r in runs for s in r.slices)
