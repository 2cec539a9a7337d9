"""Serving on the distributed runtime is lossless: with one process per stage and several
requests in flight at once, every request of a serving workload commits exactly the
target's own greedy output (HF `generate(do_sample=False)`), for every serving strategy,
over 1, 2 and 4 stages, closed loop at concurrency 1, 3 and 8 and open loop (Poisson),
with each prune mode and both topologies among the configurations; sampled at T=0.7 (one
configuration), each request commits its own seeded samples (the target-alone reference).

`backends.torch.serve_runtime.DistributedServer`: each stage keeps a KV holder per
request (`serve_worker.ServeStage`), so a part computed through another request's cache,
a notice applied to the wrong request, or a holder not freed and reused, changes tokens.
The stage processes start once per configuration and serve every strategy and load on it
(request sequence numbers keep growing across the runs). Prompts differ in length and
requests in max_new_tokens, so requests finish at different times and new ones are
admitted while others are mid-flight. A stage that dies or hangs ends the run with
`StageFailed` naming it, within the no-progress deadline, and leaves no process behind.
"""
from __future__ import annotations

import dataclasses
import math
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.torch.generate import reference_output  # noqa: E402
from backends.torch.head import Request  # noqa: E402
from backends.torch.models import load  # noqa: E402
from backends.torch.runtime import StageFailed  # noqa: E402
from backends.torch.serve_runtime import DistributedServer  # noqa: E402
from backends.torch.worker import FAULT_ENV, StageConfig  # noqa: E402
from pipedec_sim.inputs.arrivals import poisson_arrivals  # noqa: E402
from pipedec_sim.protocol.sampling import GREEDY, Sampling  # noqa: E402
from pipedec_sim.protocol.serve import SERVE_STRATEGIES  # noqa: E402

pytestmark = pytest.mark.real
KNOBS = dict(width=4, topk=4, depth=4, tree_topk=4, total=16)
PROMPTS = [("Hello, world! This is a test.", 6), ("abc", 10),
           ("The quick brown fox jumps", 7), ("Once upon a time there was", 9),
           ("x", 5), ("Pipelines decode speculatively, layer by layer.", 8)]
POISSON = ("rate", 40.0)
SAMPLED = Sampling(temperature=0.7, seed=11)
# (stages, topology, prune, temperature) -> the loads served on that process group:
# ("concurrency", N) or ("rate", requests/s). Cancel is on (only broadcast cancels).
# Every S in {1, 2, 4} x concurrency {1, 3, 8} (the matrix), plus the rest.
MATRIX = [("concurrency", 1), ("concurrency", 3), ("concurrency", 8)]
CONFIGS = {(1, "A", "broadcast", 0.0): MATRIX,
           (2, "A", "broadcast", 0.0): MATRIX + [POISSON],
           (4, "A", "broadcast", 0.0): MATRIX,
           (2, "B", "inband", 0.7): [("concurrency", 3)],
           (3, "A", "piggyback", 0.0): [("concurrency", 3)]}
CASES = [(cfg, load) for cfg, loads in CONFIGS.items() for load in loads]


def greedy(target, prompt, n):
    out = target.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                                eos_token_id=target.eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def sampling_of(temperature: float) -> Sampling:
    return SAMPLED if temperature else GREEDY


@pytest.fixture(scope="module")
def tiny():
    """The requests and, per temperature, every request's reference output."""
    torch.set_num_threads(1)
    target = load("tiny")
    requests = [Request(str(i), target.encode(text), n) for i, (text, n) in enumerate(PROMPTS)]
    refs = {0.0: [greedy(target, r.prompt_ids, r.max_new_tokens) for r in requests],
            0.7: [reference_output(target, r.prompt_ids, r.max_new_tokens, SAMPLED, r.id)
                  for r in requests]}
    assert refs[0.0] != refs[0.7]
    return requests, refs


def arrivals_of(load, n: int):
    kind, value = load
    if kind == "rate":
        return dict(arrivals_ms=poisson_arrivals(n, rate_per_s=value, seed=5))
    return dict(concurrency=value)


_SERVED: dict = {}


def served(config: tuple, requests: list) -> dict:
    """Every (load, strategy) of `config` on one process group, started once per module:
    (run, outputs) each."""
    if config in _SERVED:
        return _SERVED[config]
    stages, topology, prune, temperature = config
    sampling = sampling_of(temperature)
    cfg = StageConfig("tiny", stages, topology, timeout_s=60, prune=prune,
                      sampling=None if sampling.greedy else dataclasses.asdict(sampling))
    out = {}
    with DistributedServer(cfg, "tiny-noisy", knobs=KNOBS) as pipe:
        for load in CONFIGS[config]:
            for name in SERVE_STRATEGIES:
                out[load, name] = pipe.serve(name, requests,
                                             **arrivals_of(load, len(requests)))
    _SERVED[config] = out
    return out


@pytest.mark.parametrize("strategy", SERVE_STRATEGIES)
@pytest.mark.parametrize("config, load", CASES, ids=[f"S{c[0]}-{c[1]}-{c[2]}-T{c[3]:g}-{k}{v:g}"
                                                     for c, (k, v) in CASES])
def test_distributed_serving_is_lossless(tiny, config, load, strategy):
    requests, refs = tiny[0], tiny[1][config[3]]
    run, outputs = served(config, requests)[load, strategy]
    assert outputs == dict(enumerate(refs))
    for r, ref in enumerate(refs):
        s = run.requests[r]
        assert math.isfinite(s.end_ms) and s.end_ms >= s.arrival_ms >= 0.0, r
        assert sum(c[1] for c in s.commits) == len(ref), r
        assert [c[0] for c in s.commits] == sorted(c[0] for c in s.commits), r
    stages = config[0]
    assert all(run.pipeline.busy_ms[f"stage{j}"] > 0 for j in range(1, stages + 1))
    assert all(run.pipeline.rows[f"stage{j}"] > 0 for j in range(1, stages + 1))
    assert run.forwards <= run.parts * stages
    if load[0] == "concurrency" and load[1] > stages:
        assert run.parts > run.pipeline.batches        # some steps carried several requests
        assert run.forwards < run.parts * stages       # ... computed in one forward
    if load == POISSON:
        arrivals = [run.requests[r].arrival_ms for r in range(len(requests))]
        assert arrivals == pytest.approx(list(poisson_arrivals(len(requests), 40.0, 5)))


def test_requests_overlap_in_flight(tiny):
    """Closed loop at 3: while one request runs, others run too (their first and last
    commits interleave), so several requests' KV holders live at once at every stage."""
    requests, _ = tiny
    run, _ = served((2, "A", "broadcast", 0.0), requests)[("concurrency", 3), "pipedec-db"]
    spans = [(s.commits[0][0], s.end_ms) for s in run.requests.values()]
    assert any(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans)
               for b0, b1 in spans[i + 1:])


@pytest.mark.parametrize("mode", ["exit", "stop"])
def test_failed_stage_ends_serving_with_its_name(tiny, monkeypatch, mode):
    """Stage 2 dies (os._exit) or hangs (SIGSTOP) on the third request: the head ends the
    serving run with StageFailed naming it, within 30 s, and close() reaps every stage."""
    requests, _ = tiny
    monkeypatch.setenv(FAULT_ENV, f"stage=2,request=3,mode={mode}")
    cfg = StageConfig("tiny", 2, timeout_s=5)
    pipe = DistributedServer(cfg, "tiny-noisy", knobs=KNOBS).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(StageFailed) as e:
            pipe.serve("pipedec-db", requests, concurrency=3)
        assert time.monotonic() - t0 < 30.0
    finally:
        pipe.close(clean=False)
    what = ("stage 2 (rank 2) failed: exit code 3" if mode == "exit" else
            "pipedec-db: no progress for 5 s (0 of 6 requests done) (stage 2, rank 2, is stopped)")
    assert what in str(e.value), str(e.value)
    assert all(p.poll() is not None for p in pipe.procs)


def test_a_step_forward_is_abandoned_only_once_every_part_died():
    """Cancel over one forward of several requests (`ServeStage._all_killed`): the arrived
    notices must kill every row of every part; a part still alive keeps the forward."""
    from backends.torch.serve_worker import Part, ServeStage
    from pipedec_sim.protocol.messages import Batch, Row, Update
    stage = ServeStage.__new__(ServeStage)         # only its notice bookkeeping is used
    stage.control = None
    rows = {0: (Row(5, 4, 1, 9), Row(6, 4, 2, 9)), 1: (Row(9, 8, 3, 7),)}
    group = [Part(r, Batch(1, rs, "layer"), None, rows=rs) for r, rs in rows.items()]
    between = stage._all_killed(group)
    stage.notices = [(0, Update(kill=(5, 6)))]
    assert not between()                           # request 1's part lives
    stage.notices.append((1, Update(kill=(8,))))   # its parent: not its row
    assert not between()
    stage.notices.append((1, Update(kill=(9,))))
    assert between()
