"""The profile's batched forwards (issue 12): one forward over several requests' rows
(and one draft pass over several requests) equals their unbatched forwards;
`latency.batch` round-trips, is validated, and `Profile.batch_error` compares
`batch_layer` with it."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.profile import analytic_profile, load_profile, parse_profile, save_profile
from pipedec_sim.inputs.profile.model import BatchPoint

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "traces" / "synthetic-llama70b.jsonl"


# ---------------------------------------------------------------- one forward, many requests

def _request(model, lo, hi, ctx, spec, new, seed):
    """A shard holding `ctx` committed rows and `spec` speculative rows (a chain under the
    last committed row), plus `new` rows to run: a star and a chain below the last cached
    row (a tree: some rows see others of their batch). Returns (shard, rows, hidden)."""
    import torch

    from backends.torch.shard import Shard
    from pipedec_sim.protocol.messages import Row
    H = model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    sh = Shard(model, lo, hi, embed=False, head=False)
    if ctx:
        prefix = [Row(i, i - 1, 1, i) for i in range(ctx)]
        sh.forward(prefix, ctx, torch.randn(1, ctx, H, generator=g))
    last, pos = ctx - 1, ctx
    if spec:
        chain = [Row(1000 + k, last if k == 0 else 1000 + k - 1, 1, ctx + k) for k in range(spec)]
        sh.forward(chain, 0, torch.randn(1, spec, H, generator=g))
        last, pos = chain[-1].id, ctx + spec
    rows = []
    for k in range(new):                   # 0: child of last; then alternately siblings/chain
        parent = last if k % 2 == 0 or not rows else rows[-1].id
        rows.append(Row(5000 + k, parent, 1, pos if parent == last else rows[-1].pos + 1))
    return sh, rows, torch.randn(1, new, H, generator=g)


@pytest.mark.parametrize("lo,hi", [(0, 4), (1, 3)])
def test_one_forward_over_requests_equals_their_unbatched_forwards(lo, hi):
    torch = pytest.importorskip("torch")
    from backends.torch.batch import forward_requests
    from backends.torch.models import tiny_model
    model = tiny_model("tiny")                         # float32
    # (committed, speculative, new rows): mixed contexts incl. 0, mixed row counts
    spec = [(0, 0, 1), (7, 0, 4), (19, 3, 3), (12, 2, 1), (5, 0, 2)]
    together = [_request(model, lo, hi, c, s, n, seed) for seed, (c, s, n) in enumerate(spec)]
    alone = [_request(model, lo, hi, c, s, n, seed) for seed, (c, s, n) in enumerate(spec)]
    outs = forward_requests([r[0] for r in together], [r[1] for r in together],
                            [0] * len(spec), [r[2] for r in together])
    for b, ((sh, rows, _), (ref, _, h)) in enumerate(zip(together, alone)):
        assert outs[b].shape == (1, len(rows), model.config.hidden_size)
        assert torch.allclose(outs[b], ref.forward(rows, 0, h), atol=1e-4, rtol=1e-4), b
        assert sh.state.context == ref.state.context == sh.kv_len()
        for i in range(lo, hi):                        # each request's own KV, appended
            assert torch.allclose(sh.cache.layers[i].keys, ref.cache.layers[i].keys,
                                  atol=1e-4, rtol=1e-4)


def test_abandoned_forward_leaves_every_request_as_it_was():
    pytest.importorskip("torch")
    from backends.torch.batch import forward_requests
    from backends.torch.models import tiny_model
    model = tiny_model("tiny")
    reqs = [_request(model, 0, 4, c, 0, n, seed) for seed, (c, n) in enumerate([(3, 2), (0, 1)])]
    before = [(sh.state.context, sh.kv_len()) for sh, _, _ in reqs]
    asked = []
    out = forward_requests([r[0] for r in reqs], [r[1] for r in reqs], [0, 0],
                           [r[2] for r in reqs], between=lambda: asked.append(1) or len(asked) == 2)
    assert out is None and len(asked) == 2             # abandoned after the second layer
    assert [(sh.state.context, sh.kv_len()) for sh, _, _ in reqs] == before


def test_one_draft_pass_over_requests_equals_their_own_proposals():
    pytest.importorskip("torch")
    from backends.torch.batch import propose_requests
    from backends.torch.models import tiny_model
    from backends.torch.shard import DraftModel
    from pipedec_sim.protocol.messages import Draft, Row
    draft = tiny_model("tiny-draft")
    prompts = [[5, 9, 11], [7], [3, 3, 4, 8]]
    drafts = [Draft(0, tuple(Row(i, i - 1, t, i) for i, t in enumerate(p)), (len(p) - 1,), 3,
                    len(p)) for p in prompts]
    batched = [DraftModel(draft) for _ in prompts]
    got = propose_requests(list(zip(batched, drafts)))
    want = [DraftModel(draft).propose(d.rows, d.want, d.k, d.committed) for d in drafts]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for i in g:
            assert [t for t, _ in g[i]] == [t for t, _ in w[i]]
            assert [lp for _, lp in g[i]] == pytest.approx([lp for _, lp in w[i]], abs=1e-4)
    assert [m.shard.state.context for m in batched] == [len(p) for p in prompts]


def test_measure_batch_and_points():
    pytest.importorskip("torch")
    from backends.torch.models import tiny_model
    from backends.torch.profiler import QUICK, batch_points, measure_batch
    pts = batch_points(QUICK, quick=True)
    assert ((1, 1), (128, 128)) in pts and ((4,) * 8, (0, 18, 37, 55, 73, 91, 110, 128)) in pts
    got = measure_batch(tiny_model("tiny"), pts[:2], reps=1)
    assert [(tuple(g["rows"]), tuple(g["context"])) for g in got] == pts[:2]
    assert all(g["ms"] > 0 for g in got)


# ---------------------------------------------------------------- the profile section

def _with_layer_grid(data):
    data["latency"]["layer"] = {"tokens": [1, 4, 8], "context": [0, 100],
                                "ms": [[1.0, 2.0], [1.6, 3.0], [2.0, 5.0]]}
    return data


BATCH = [{"rows": [1, 1], "context": [0, 100], "ms": 2.0},
         {"rows": [4], "context": [100], "ms": 3.0},
         {"rows": [4, 4], "context": [100, 100], "ms": 4.0}]


def test_batch_error_on_a_hand_made_profile():
    p = parse_profile(_with_layer_grid(dict(analytic_profile(), latency={
        **analytic_profile()["latency"], "batch": BATCH})))
    errs = p.batch_error()
    # [1, 1] over [0, 100]: layer(2, 0) = 1.2, + (layer(1, 100) - layer(1, 0)) = 1.0 -> 2.2
    # [4] over [100]: one part is the grid itself, 3.0
    # [4, 4] over [100, 100]: layer(8, 0) = 2.0, + 2 * (3.0 - 1.6) -> 4.8
    assert [e.model_ms for e in errs] == pytest.approx([2.2, 3.0, 4.8])
    assert [e.error for e in errs] == pytest.approx([0.1, 0.0, 0.2])
    assert errs[0].point == BatchPoint((1, 1), (0, 100), 2.0)
    assert parse_profile(analytic_profile()).batch_error() == ()     # none measured


def test_batch_section_round_trips(tmp_path):
    data = analytic_profile()
    data["latency"]["batch"] = copy.deepcopy(BATCH)
    save_profile(data, tmp_path / "p.json")
    p = load_profile(tmp_path / "p.json")
    assert p.batch == tuple(BatchPoint(tuple(b["rows"]), tuple(b["context"]), b["ms"])
                            for b in BATCH)
    assert p.to_dict()["latency"]["batch"] == BATCH
    assert parse_profile(p.to_dict()) == p
    save_profile(p, tmp_path / "q.json")
    assert load_profile(tmp_path / "q.json") == p
    old = parse_profile(analytic_profile())            # older profiles: no section
    assert old.batch == () and "batch" not in old.to_dict()["latency"]


BAD = [
    ({"rows": [1]}, "latency.batch", "not a list"),
    ([], "latency.batch", "empty"),
    ([7], "latency.batch[0]", "not an object"),
    ([{"context": [0], "ms": 1.0}], "latency.batch[0].rows", "missing"),
    ([{"rows": [1, 0], "context": [0, 0], "ms": 1.0}], "latency.batch[0].rows[1]", "zero rows"),
    ([{"rows": [1], "context": [-1], "ms": 1.0}], "latency.batch[0].context[0]", "negative"),
    ([{"rows": [1], "context": [1.5], "ms": 1.0}], "latency.batch[0].context[0]", "float"),
    ([{"rows": [1, 1], "context": [0], "ms": 1.0}], "latency.batch[0].context", "lengths"),
    (BATCH + [{"rows": [1], "context": [0], "ms": 0}], "latency.batch[3].ms", "zero ms"),
    ([{"rows": [1], "context": [0], "ms": "fast"}], "latency.batch[0].ms", "a string"),
    ([{"rows": [1], "context": [0]}], "latency.batch[0].ms", "no ms"),
]


@pytest.mark.parametrize("value,fld,why", BAD, ids=[b[2] for b in BAD])
def test_malformed_batch_section(tmp_path, value, fld, why):
    data = analytic_profile()
    data["latency"]["batch"] = value
    file = tmp_path / "p.json"
    file.write_text(json.dumps(data))
    with pytest.raises(InputError) as e:
        load_profile(file)
    assert e.value.field == fld and e.value.file == str(file)
    assert str(file) in str(e.value) and f"field '{fld}'" in str(e.value)


def test_malformed_batch_section_exits_2_naming_the_field(tmp_path, capsys):
    from pipedec_sim.programs.cli import main
    data = analytic_profile()
    data["latency"]["batch"] = [{"rows": [2, 2], "context": [0], "ms": 1.0}]
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(data))
    assert main(["run", "--trace", str(TRACE), "--profile", str(file), "--quiet",
                 "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert "latency.batch[0].context" in err and str(file) in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "never").exists()


def test_batch_report_lines():
    pytest.importorskip("torch")
    from backends.torch.profiler import batch_report
    p = parse_profile(_with_layer_grid(dict(analytic_profile(), latency={
        **analytic_profile()["latency"], "batch": BATCH})))
    lines = batch_report(p)
    assert len(lines) == 4 and lines[0].startswith("  2 requests x 1 rows each, contexts 0..100")
    assert lines[0].endswith("measured 2 ms, model 2.2 ms (+10.0%)")
    assert "1 requests x 4 rows each, context 100 each" in lines[1] and "(+0.0%)" in lines[1]
    assert lines[-1].endswith("mean |error| 10.0%, max 20.0%")
    assert batch_report(parse_profile(analytic_profile())) == []
