"""Same-scheduler proof: the head records every event it feeds the strategy and every
action it gets back; replaying the events into a fresh strategy object, with no backend
at all, gives the very same actions. And both backends use the same strategy classes."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.torch.eventlog import read_records  # noqa: E402
from pipedec_sim.protocol.strategies import make_strategy  # noqa: E402

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One distributed run (S=2, all three strategies, hits and misses) with --record-events."""
    d = tmp_path_factory.mktemp("replay")
    (d / "p.txt").write_text("Hello, world! This is a test.\nabc def\n")
    rec = d / "events.jsonl"
    cmd = [sys.executable, "-m", "backends.torch.cli", "run", "--target", "tiny",
           "--draft", "tiny-noisy", "--stages", "2", "--prompts", str(d / "p.txt"),
           "--max-new-tokens", "16", "--width", "4", "--topk", "4", "--depth", "3",
           "--tree-topk", "4", "--total", "12", "--record-events", str(rec),
           "--out", str(d / "out"), "--timeline", str(d / "timeline.json"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return read_records(rec), d


def test_replay_gives_identical_actions(recorded):
    records, _ = recorded
    assert {r["request"]["strategy"] for r in records} == {"ar", "tree-sd", "pipedec"}
    for r in records:
        info = r["request"]
        s = make_strategy(info["strategy"], info["prompt_ids"], info["max_new_tokens"],
                          eos=info["eos"], **info["knobs"])
        assert s.start() == r["start"]
        for event, actions in r["steps"]:
            assert s.on(event) == actions
        assert s.done


def test_outputs_written(recorded):
    import json
    _, d = recorded
    lines = [json.loads(x) for x in (d / "out" / "outputs.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {"id", "strategy", "prompt_ids", "output_ids"} <= set(lines[0])
    by_req = {}
    for x in lines:       # lossless: every strategy commits the same tokens per request
        by_req.setdefault(x["id"], set()).add(tuple(x["output_ids"]))
    assert all(len(v) == 1 for v in by_req.values())
    import torch

    from backends.torch.models import load
    t = load("tiny")        # and it is the target's own greedy output (distributed, S=2)
    for x in lines:
        ref = t.model.generate(torch.tensor([x["prompt_ids"]]), do_sample=False,
                               max_new_tokens=16, pad_token_id=0)[0, len(x["prompt_ids"]):]
        assert x["output_ids"] == ref.tolist(), (x["strategy"], x["id"])
    assert (d / "out" / "summary.csv").read_text().startswith("strategy,")


def test_backends_share_strategy_classes():
    """No backend-specific subclass or fork: both import pipedec_sim.protocol.strategies."""
    import backends.simulated.replay as sim
    import backends.torch.head as real
    from pipedec_sim.protocol import strategies
    assert real.make_strategy is strategies.make_strategy
    s = real.make_strategy("pipedec", [1, 2, 3], 4)
    assert type(s) is strategies.PipeDec
    assert "pipedec_sim.protocol.strategies" in type(s).__module__
    from backends.torch import shard
    # one KV bookkeeping, too (the fast engine's ledger only counts what it would hold:
    # tests/test_engines.py holds it to the reference's StageStates)
    assert shard.StageState is sim.StageState


def test_timeline_has_every_stage_batch(recorded):
    """Per-stage slices: each stage handled every pipedec batch the head injected, inside
    the request's span. With broadcast prunes (the default) some batches die on the way or
    are cancelled at stage 2, but a dead batch still travels on (header only) and gets a
    slice (empty, or "layer (cancelled)"), so every stage has one per batch."""
    import json
    _, d = recorded
    events = json.loads((d / "timeline.json").read_text())["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("name") == "thread_name"}
    slices = [dict(e, track=names[(e["pid"], e["tid"])]) for e in events if e.get("ph") == "X"]
    assert {"stage1", "stage2", "draft", "lm_head"} <= {e["track"] for e in slices}
    assert all(e["dur"] >= 0 and e["ts"] > -1e3 for e in slices)
    per_run = {}
    for e in slices:
        if e["track"].startswith("stage") and e["name"] != "prune":
            per_run.setdefault((e["pid"], e["track"]), []).append(e)
    for pid in {p for p, _ in per_run}:
        s1, s2 = per_run[(pid, "stage1")], per_run[(pid, "stage2")]
        assert len(s1) == len(s2) > 0
        assert min(e["ts"] for e in s2) >= min(e["ts"] for e in s1)   # stage 2 after stage 1
    assert {"prefill", "layer"} <= {e["name"] for e in slices}
