"""One pipeline in both worlds: for every prune mode, the simulator replaying a real run's
record decides exactly what the torch inline driver decided with real models.

The inline driver runs tiny real models (tree attention, KV compaction at every prune,
cancellation) on the simulator's clock (`backends.torch.inline.clock_profile`) and records
every event and action (`--record-events`). The simulator then replays that record with no
model at all: the target's tokens from the committed output, the draft's proposals from the
record by token path (`RecordedOracle`). Same pacing, same prune delivery: so every commit
(tokens, outcome, time), every prune notice, every batch and every cancellation must agree.
Any difference in what the real models computed under pruning (a stale KV row, a wrong
mask, a missed notice) changes a token or a proposal and shows here.
"""
from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.simulated.oracle import RecordedOracle  # noqa: E402
from backends.simulated.pipeline import Pipeline  # noqa: E402
from backends.torch.eventlog import Recorder, action_json, read_records  # noqa: E402
from backends.torch.head import Request  # noqa: E402
from backends.torch.inline import InlinePipeline, clock_profile  # noqa: E402
from backends.torch.models import load  # noqa: E402
from pipedec_sim.inputs.traces import TraceRequest  # noqa: E402
from pipedec_sim.protocol.messages import Commit, Update  # noqa: E402
from pipedec_sim.protocol.pacing import PRUNE_MODES  # noqa: E402
from pipedec_sim.protocol.strategies import make_strategy  # noqa: E402

pytestmark = pytest.mark.real
STRATEGIES = ("ar", "tree-sd", "pipedec")
KNOBS = dict(width=4, topk=4, depth=3, tree_topk=4, total=12)
PROMPTS = ["Hello, world! This is a test.", "The quick brown fox jumps"]
STAGES = 3


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return load("tiny"), load("tiny-noisy")


def decisions(actions) -> list:
    """What a request decided: commits (tokens, drafted, outcome) and prune notices."""
    return [action_json(a) for a in actions if isinstance(a, (Commit, Update))]


class Actions:
    """A recorder that keeps the actions in memory, for the simulated side."""

    def __init__(self):
        self.all: list = []

    def start(self, actions):
        self.all += actions

    def step(self, event, actions):
        self.all += actions


def replay(record: dict, run, pipe: Pipeline):
    """Simulate the recorded request with no model: tokens from the output, proposals
    from the record."""
    info = record["request"]
    n = len(run.output)
    req = TraceRequest(info["id"], len(info["prompt_ids"]), list(run.output),
                       [[0]] * n, [[1.0]] * n, list(info["prompt_ids"]))
    strategy = make_strategy(info["strategy"], info["prompt_ids"], info["max_new_tokens"],
                             eos=info["eos"], **info["knobs"])
    oracle, seen = RecordedOracle(req, record), Actions()
    sim = pipe.run(strategy, oracle, recorder=seen)
    return sim, seen.all, oracle


@pytest.mark.parametrize("topology", ["A", "B"])
@pytest.mark.parametrize("prune", PRUNE_MODES)
def test_simulator_replay_decides_what_real_models_decided(models, tmp_path, prune, topology):
    target, draft = models
    path = tmp_path / "events.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        inline = InlinePipeline(target, draft, STAGES, topology=topology, prune=prune,
                                knobs=KNOBS, recorder=Recorder(fh))
        runs = [inline.run(s, Request(str(i), target.encode(p), 20))
                for s in STRATEGIES for i, p in enumerate(PROMPTS)]
    records = read_records(path)
    assert len(records) == len(runs)
    pipe = Pipeline(clock_profile(target.model.config.num_hidden_layers), STAGES,
                    topology=topology, prune=prune)
    outcomes = set()
    for record, run in zip(records, runs):
        real = decisions(record["start"] + [a for _, acts in record["steps"] for a in acts])
        sim, sim_actions, oracle = replay(record, run, pipe)
        who = (run.strategy, run.request.id)
        assert oracle.fallback == 0, who          # every proposal came from the record
        assert decisions(sim_actions) == real, who
        assert sim.commits == run.commits, who    # the same simulated times
        assert (sim.rows, sim.batches, sim.cancelled) == (run.rows, run.batches,
                                                          run.cancelled), who
        outcomes |= {c[3] for c in run.commits}
    # the runs cover the mechanics worth comparing: hits and misses (prunes and flushes)
    assert {"hit", "miss", "accept", "token"} <= outcomes


def test_cancellation_is_part_of_what_agrees(models):
    """Broadcast + cancel on the inline clock abandons batches mid-stage (so the test
    above compares cancellations, not just their absence); in-band never does."""
    target, draft = models
    prompt = target.encode(PROMPTS[0])
    counts = {}
    for prune in ("broadcast", "inband"):
        inline = InlinePipeline(target, draft, STAGES, prune=prune, knobs=KNOBS)
        counts[prune] = inline.run("pipedec", Request("0", prompt, 20)).cancelled
    assert counts["broadcast"] > 0 and counts["inband"] == 0


def test_recorder_stream_round_trips(models):
    """The record the replay reads is exactly what the driver produced (JSON lines)."""
    target, draft = models
    buf = io.StringIO()
    InlinePipeline(target, draft, 2, knobs=KNOBS, recorder=Recorder(buf)).run(
        "pipedec", Request("0", target.encode(PROMPTS[1]), 8))
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith('{"request"') and lines[1].startswith('{"start"')
    assert all(x.startswith('{"event"') for x in lines[2:])
