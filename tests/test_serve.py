"""Serving on the simulated pipeline: the schedulers (protocol/serve), the engine
(backends/simulated/serve.py) and `pipedec-sim serve`.

One request served equals one request run, to the bit, for every serving strategy and
its single-request strategy; the schedulers compose steps as documented (micro-batches,
token budget, chunked prefill, shared layers); the CLI rejects bad load flags."""
from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import pytest

from backends.simulated.oracle import TraceOracle
from backends.simulated.pipeline import Pipeline, Replay
from backends.simulated.serve import ServeSim
from pipedec_sim.inputs.arrivals import serve_workload
from pipedec_sim.inputs.profile import load_profile
from pipedec_sim.inputs.traces import read_trace
from pipedec_sim.programs.cli import main
from pipedec_sim.programs.serve import ServeConfig, serve, serve_once
from pipedec_sim.programs.simulate import SimConfig, prompt_tokens
from pipedec_sim.protocol.knobs import ServeKnobs
from pipedec_sim.protocol.messages import Draft
from pipedec_sim.protocol.serve import SERVE_STRATEGIES, SINGLE, make_server, share
from pipedec_sim.protocol.serve.microbatch import MicroBatchServer
from pipedec_sim.protocol.strategies import AR, make_strategy
from pipedec_sim.protocol.tree import Node

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "traces" / "real-mtbench.jsonl.gz"
TRACE = read_trace(REAL, max_requests=16)


# ------------------------------------------------------------ one request: exactly `run`

def single(profile, cfg: SimConfig, name: str, req):
    pipe = Pipeline(profile, cfg.stages, topology=cfg.topology, prune=cfg.prune,
                    cancel=cfg.cancel, engine="reference")
    s = make_strategy(SINGLE[name], prompt_tokens(req), len(req.output), **cfg.knobs())
    run = pipe.run(s, TraceOracle(req, seed=0))
    return run.commits, run.end_ms, run.busy_ms, run.rows, run.cancelled


def served(profile, cfg: SimConfig, name: str, req):
    pipe = Pipeline(profile, cfg.stages, topology=cfg.topology, prune=cfg.prune,
                    cancel=cfg.cancel)

    def make(r):
        return make_strategy(SINGLE[name], prompt_tokens(req), len(req.output),
                             pooled=name == "pipedec-db", **cfg.knobs())
    sim = ServeSim(pipe, lambda be: make_server(name, make, be, stages=cfg.stages,
                                                serve=ServeKnobs(), prune=cfg.prune,
                                                window=cfg.knobs()["window"]),
                   lambda r: Replay(TraceOracle(req, seed=0)), 1, arrivals_ms=[0.0])
    run = sim.run()
    one = run.requests[0]
    return one.commits, one.end_ms, run.pipeline.busy_ms, run.pipeline.rows, \
        run.pipeline.cancelled


CASES = [(p, t, m, c) for p, t, m, c in itertools.product(
    ("analytic-llama70b-1b", "cpu-smollm2"), ("A", "B"), ("broadcast", "inband", "piggyback"),
    (True, False)) if c or m == "broadcast"]


@pytest.mark.parametrize("profile, topology, prune, cancel", CASES)
def test_one_request_served_is_the_single_request_run(profile, topology, prune, cancel):
    prof = load_profile(profile)
    cfg = SimConfig(stages=4, topology=topology, prune=prune, cancel=cancel, width=8)
    for name in SERVE_STRATEGIES:
        req = TRACE.requests[1]
        a, b = single(prof, cfg, name, req), served(prof, cfg, name, req)
        assert a == b, name


def test_serve_cli_with_one_request_equals_run(tmp_path):
    """`serve --concurrency 1 --requests 1` and `run --max-requests 1`: the same TBT for
    every serving strategy and its single-request strategy."""
    args = ["--stages", "4", "--trace", str(REAL), "--quiet", "--workers", "1"]
    assert main(["serve", *args, "--concurrency", "1", "--requests", "1",
                 "--out", str(tmp_path / "s")]) == 0
    assert main(["run", *args, "--max-requests", "1", "--strategies",
                 "ar,tree-sd,chain-sd,pipedec", "--out", str(tmp_path / "r")]) == 0
    s = pd.read_csv(tmp_path / "s" / "requests.csv").set_index("strategy")
    r = pd.read_csv(tmp_path / "r" / "requests.csv").set_index("strategy")
    for name in SERVE_STRATEGIES:
        assert s.loc[name, "tbt_ms"] == r.loc[SINGLE[name], "tbt_ms"], name
        assert s.loc[name, "tokens"] == r.loc[SINGLE[name], "tokens"]


# ------------------------------------------------------------ many requests

def workload(n=16, **load):
    return serve_workload(TRACE.requests, n=n, rate=load.get("rate"),
                          concurrency=load.get("concurrency"), duration_s=None, seed=0)


def test_every_strategy_serves_every_request_losslessly_under_poisson_load():
    prof = load_profile("analytic-llama70b-1b")
    cfg = ServeConfig(stages=4, width=8)
    res = serve(TRACE.requests, prof, cfg, [{"rate": 2.0}, {"concurrency": 6}],
                lambda load: workload(16, **load))
    df, summary = res.requests, res.summary
    assert len(df) == 2 * 16 * len(SERVE_STRATEGIES) and df.end_ms.notna().all()
    lengths = {r.id: len(r.output) for r in TRACE.requests}
    assert (df.tokens == df.request.map(lengths)).all()       # outputs checked inside
    assert (df.ttft_ms > 0).all() and (df.e2e_ms >= df.ttft_ms).all()
    assert set(summary.strategy) == set(SERVE_STRATEGIES) and len(summary) == 8
    pp = summary[summary.strategy == "pp"]
    assert (pp.throughput_vs_pp == 1.0).all() and (pp.hit_rate == 0).all()
    busy = summary[summary.cfg_concurrency == 6]
    assert (busy.parts_per_step > 1).all()            # steps really carry several requests


def test_tables_are_the_same_for_any_number_of_workers():
    prof = load_profile("analytic-llama70b-1b")
    cfg = ServeConfig(stages=4, strategies=("pp", "pipedec-db"))
    loads = [{"concurrency": 4}, {"concurrency": 8}]

    def eight(load):
        return workload(8, **load)
    one = serve(TRACE.requests, prof, cfg, loads, eight)
    two = serve(TRACE.requests, prof, cfg, loads, eight, workers=2)
    pd.testing.assert_frame_equal(one.requests, two.requests)
    pd.testing.assert_frame_equal(one.summary, two.summary)


def test_pipedec_db_keeps_its_hit_rate_as_requests_pile_up():
    """Regression: roots passing a full window crowded every layer out from ~12 requests
    on and the hit rate fell from 0.39 to 0.05. With a fair share of 64 rows (4 each at
    16 requests) it must stay near the lone request's at width 4."""
    prof = load_profile("analytic-llama70b-1b")

    def hit_rate(cfg, **load):
        run, _ = serve_once(prof, cfg, "pipedec-db", workload(16, **load))
        drafted = sum(c[2] for s in run.requests.values() for c in s.commits)
        tokens = sum(c[1] for s in run.requests.values() for c in s.commits)
        return drafted / tokens, run.parts / run.pipeline.batches
    shared = ServeConfig(stages=8, strategies=("pipedec-db",), step_width=64)
    lone, _ = hit_rate(shared, concurrency=1)
    crowd, mixed = hit_rate(shared, concurrency=16)
    lone4, _ = hit_rate(ServeConfig(stages=8, strategies=("pipedec-db",), width=4),
                        concurrency=1)
    assert mixed > 8                           # most running requests in every layer
    assert crowd > 0.8 * lone4 and lone > crowd


# ------------------------------------------------------------ the schedulers, scripted

class Log:
    """A ServeDispatch that records what it is asked."""

    def __init__(self):
        self.steps, self.drafts, self.commits = [], [], []

    def inject(self, step, notices):
        self.steps.append(step)

    def draft(self, r, d):
        self.drafts.append((r, d))

    def prune(self, r, u):
        pass

    def broadcast(self, r, u):
        pass

    def inband(self, r, u):
        pass

    def commit(self, r, c):
        self.commits.append((r, c))

    def finish(self, r):
        pass


def micro(prompts, *, slots=2, max_tokens=2048, chunked=False, new=3):
    log = Log()
    server = MicroBatchServer(lambda r: AR(prompts[r], new), log, prune="broadcast",
                              max_running=8, slots=slots, max_tokens=max_tokens,
                              chunked_prefill=chunked)
    return server, log


def back(server, step):
    """The step returns; every verified row's next token is 7."""
    parts = [(r, b.id, {row.id: 7 for row in b.rows[b.verify_from:]}) for r, b in step.parts]
    server.dispatch(server.returned(step.id, parts))


def test_micro_batches_hold_their_requests_and_keep_one_step_each_in_flight():
    server, log = micro([[1, 2], [3], [4, 5, 6], [7]], slots=2)
    for r in range(4):
        server.dispatch(server.arrive(r))
    # requests 0 and 2 join micro-batch 0, 1 and 3 micro-batch 1; each sent its prompt
    # as soon as it came (its micro-batch was idle), later ones wait for the next step
    assert [[r for r, _ in s.parts] for s in log.steps] == [[0], [1]]
    back(server, log.steps[0])                 # 0's token; 2's prompt joins the step
    assert [r for r, _ in log.steps[2].parts] == [2, 0]
    back(server, log.steps[1])
    assert [r for r, _ in log.steps[3].parts] == [3, 1]
    assert len(server.busy) == 2               # one step per micro-batch in flight


def test_the_token_budget_defers_parts_and_chunked_prefill_cuts_prompts():
    server, log = micro([[1] * 5, [2] * 5], slots=1, max_tokens=5)
    server.dispatch(server.arrive(0))
    server.dispatch(server.arrive(1))          # the micro-batch is busy: 1 waits
    back(server, log.steps[0])
    assert [(r, len(b.rows)) for r, b in log.steps[1].parts] == [(1, 5)]  # 0's token: 5 + 1 > 5
    back(server, log.steps[1])
    assert [(r, len(b.rows)) for r, b in log.steps[2].parts] == [(0, 1), (1, 1)]

    server, log = micro([[1] * 10], slots=1, max_tokens=4, chunked=True)
    server.dispatch(server.arrive(0))
    sizes = []
    for _ in range(3):
        step = log.steps[-1]
        (_, b), = step.parts
        sizes.append((len(b.rows), len(b.rows[b.verify_from:])))
        back(server, step)
    assert sizes == [(4, 0), (4, 0), (2, 1)]   # only the last chunk asks for a token
    assert [len(c.tokens) for _, c in log.commits] == [1]


def node(i, score, proposals=()):
    n = Node(i, None, i, 0, score=score)
    n.proposals = proposals
    return n


def cands(r, scores):
    return [(s, node(100 * r + k, s), k, s) for k, s in enumerate(scores)]


def test_share_gives_fair_quotas_then_the_likeliest_and_best_the_likeliest_of_all():
    shallow, deep = cands(0, [-0.1, -0.2, -0.3, -0.4]), cands(1, [-3.0, -3.1, -3.2, -3.3])
    fair = share([(0, shallow), (1, deep)], 4, "fair")
    assert [(r, len(c)) for r, c in fair] == [(0, 2), (1, 2)]
    best = share([(0, shallow), (1, deep)], 4, "best")
    assert [(r, len(c)) for r, c in best] == [(0, 4)]          # the deep tree gets nothing
    # rows left after the quotas go to the likeliest candidates left
    assert [(r, len(c)) for r, c in share([(0, shallow), (1, deep[:1])], 4)] == [(0, 3), (1, 1)]
    # fewer rows than requests: one each, round robin from `start`
    offers = [(r, cands(r, [-1.0])) for r in range(5)]
    assert [r for r, _ in share(offers, 2, "fair", start=3)] == [3, 4]
    # one request gets its whole offer (up to the width): PipeDec's own layer
    assert share([(0, shallow)], 16) == [(0, shallow)]
    assert share([(0, shallow)], 3) == [(0, shallow[:3])]
    with pytest.raises(ValueError, match="share must be one of fair, best"):
        share([], 4, "greedy")


def test_pipedec_db_mixes_requests_in_one_layer_and_drafts_them_together():
    from pipedec_sim.protocol.serve.layers import LayerServer
    log = Log()
    prompts = [[1, 2, 3], [4, 5]]
    server = LayerServer(lambda r: make_strategy("pipedec", prompts[r], 4, pooled=True,
                                                 width=3),
                         log, prune="broadcast", max_running=4, window=5, step_width=4)
    server.dispatch(server.arrive(0))
    server.dispatch(server.arrive(1))          # with company: its prompt is parked
    assert [[r for r, _ in s.parts] for s in log.steps] == [[0]]
    server.dispatch(server.entry_taken())      # stage 1 took step 0; both wait for drafts,
    assert len(log.steps) == 1                 # so the prompt waits to ride with a layer
    props = ((10, -0.1), (11, -0.5), (12, -1.0), (13, -2.0))
    d0, d1 = log.drafts[0][1], log.drafts[1][1]
    server.dispatch(server.drafted([(0, d0.ticket, {d0.want[0]: props}),
                                    (1, d1.ticket, {d1.want[0]: props})]))
    kinds = [(r, b.kind, len(b.rows)) for r, b in log.steps[1].parts]
    assert kinds == [(1, "prefill", 2), (0, "layer", 2), (1, "layer", 2)]   # a fair 2 each
    assert [r for r, d in log.drafts[2:]] == [0, 1] and isinstance(log.drafts[2][1], Draft)
    server.dispatch(server.drafted([(0, log.drafts[2][1].ticket, {}),
                                    (1, log.drafts[3][1].ticket, {})]))
    assert len(log.steps) == 2                 # stage 1 has not taken step 1 yet


# ------------------------------------------------------------ the command

@pytest.mark.parametrize("argv, words", [
    ([], "exactly one of --rate, --concurrency and --arrivals"),
    (["--rate", "1", "--concurrency", "2"], "got --rate and --concurrency"),
    (["--rate", "0"], "must be > 0"),
    (["--rate", "1,x"], "expected a number"),
    (["--concurrency", "2", "--strategies", "pp,vllm"], "unknown serving strategy 'vllm'"),
    (["--concurrency", "2", "--share", "greedy"], "invalid choice"),
])
def test_bad_serve_flags_exit_2_with_one_line(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        code = main(["serve", "--trace", str(REAL), "--stages", "2", "--quiet",
                     "--out", str(tmp_path / "o"), *argv])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o").exists()


def test_batching_modes_price_a_step_of_several_requests(tmp_path):
    import dataclasses
    import json

    from pipedec_sim.inputs.profile import parse_profile
    p = load_profile("h100-llama70b-1b-kernels")
    parts = [(1, 512), (3, 128)]
    g = p.layer
    assert p.batching == "requests"
    assert p.batch_layer(parts) == pytest.approx(g(4, 0) + g(1, 512) - g(1, 0)
                                                 + g(3, 128) - g(3, 0))
    assert p.with_batching("sequential").batch_layer(parts) == g(1, 512) + g(3, 128)
    assert p.with_batching("flat").batch_layer(parts) == g(4, (512 + 3 * 128) / 4)
    for mode in ("sequential", "requests", "flat"):    # one request: the grid itself
        assert p.with_batching(mode).batch_layer([(3, 128)]) == g(3, 128)
    d = p.with_batching("sequential").to_dict()
    assert d["latency"]["batching"] == "sequential"
    assert parse_profile(d).batching == "sequential"
    assert "batching" not in p.to_dict()["latency"]
    d["latency"]["batching"] = "paged"
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps(d))
    assert main(["serve", "--trace", str(REAL), "--profile", str(bad), "--concurrency", "1",
                 "--quiet"]) == 2
    assert dataclasses.replace(p, batching="flat") == p.with_batching("flat")


def test_a_closed_loop_issues_each_request_once_when_finishes_coincide():
    """Identical requests finish at the same instants: the loop must issue the last one
    once (it used to run past the list) and end when all have finished."""
    prof = load_profile("analytic-llama70b-1b")
    import dataclasses

    from pipedec_sim.inputs.arrivals import ServeWorkload
    same = tuple(dataclasses.replace(TRACE.requests[0], id=f"r{i}") for i in range(7))
    w = ServeWorkload(same, None, 5, None, "7 identical requests, 5 outstanding")
    run, _ = serve_once(prof, ServeConfig(stages=1), "pp", w)   # one micro-batch
    ends = [s.end_ms for s in run.requests.values()]
    assert sorted(run.requests) == list(range(7))
    assert len(set(ends[:5])) < 4 and run.end_ms == max(ends)   # 1-4 finish at once
