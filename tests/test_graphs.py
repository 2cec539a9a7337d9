"""The static-buffer forward of `--cuda-graphs` (backends/torch/graphs.py), run eagerly on
the CPU: the same padded code a CUDA graph captures. It must compute what `Shard` and
`DraftModel` compute (tree batches, prompts beyond the buckets, prunes, cancels) and keep
every strategy lossless, in process and through the CLI's stage processes."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.torch.graphs import (  # noqa: E402
    GraphDraft,
    GraphShard,
    key_bucket,
    row_bucket,
)
from backends.torch.head import Request  # noqa: E402
from backends.torch.inline import InlinePipeline  # noqa: E402
from backends.torch.models import load  # noqa: E402
from backends.torch.shard import DraftModel, Shard  # noqa: E402
from pipedec_sim.protocol.messages import Row, Update  # noqa: E402

pytestmark = pytest.mark.real
KNOBS = dict(width=4, topk=4, depth=4, tree_topk=4, total=16)
PROMPTS = ["Hello, world! This is a test.", "abc", "The quick brown fox jumps"]


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load("tiny").model, load("tiny-draft").model


def prompt(n: int) -> list[Row]:
    return [Row(i, i - 1, 1 + 7 * i % 200, i) for i in range(n)]


def tree(base: int, parent: int, pos: int, n: int, fan: int = 3) -> list[Row]:
    """n rows: `fan` children of `parent`, then children of those, level by level."""
    rows = [Row(base + k, parent, 10 + k, pos) for k in range(min(fan, n))]
    while len(rows) < n:
        p = rows[len(rows) - fan]
        rows.append(Row(base + len(rows), p.id, 10 + len(rows) % 90, p.pos + 1))
    return rows


def test_buckets():
    assert [row_bucket(n) for n in (1, 3, 8, 9, 64, 65)] == [1, 4, 8, 16, 64, None]
    assert key_bucket(5, 1024) == 64 and key_bucket(65, 1024) == 128
    assert key_bucket(3000, 1024) == 1024


@pytest.mark.parametrize("stage", ["first", "middle"])
def test_stage_matches_shard_through_trees_prunes_and_growth(tiny, stage):
    """Prompt (beyond the buckets: exact path), tree batches of every bucket size (padded),
    prunes that compact mid-tree, and a context that outgrows the buffer."""
    model, _ = tiny
    embed = stage == "first"
    a = Shard(model, 0, 2, embed=embed, head=False)
    b = GraphShard(model, 0, 2, embed=embed, head=False, slots=128)
    gen = torch.Generator().manual_seed(0)

    def both(rows, committed):
        h = None if embed else torch.randn(1, len(rows), 256, generator=gen)
        return a.forward(rows, committed, h), b.forward(rows, committed, h)
    ha, hb = both(prompt(70), 70)
    assert rel(hb, ha) < 1e-4 and b.calls["exact"] == 1
    base, parent, pos = 1000, 69, 70
    for n in (1, 3, 8, 13, 30, 64):
        rows = tree(base, parent, pos, n)
        ha, hb = both(rows, 0)
        assert rel(hb, ha) < 1e-4, n
        keep = rows[0]
        kill = tuple(r.id for r in rows if r.id != keep.id and r.parent != keep.id)
        u = Update(commit=(keep.id,), kill=kill)
        assert a.apply(u) == b.apply(u) == bool(kill)
        assert a.kv_len() == b.kv_len()
        base, parent, pos = base + 100, keep.id, keep.pos + 1
    assert b.slots > 128 and b.calls["padded_eager"] == 6     # grew past its 128 slots
    ha, hb = both(tree(base, parent, pos, 5), 0)
    assert rel(hb, ha) < 1e-4


def test_cancel_leaves_nothing_behind(tiny):
    """`between` abandoning a padded batch (asked once, after it) or an exact one (between
    layers) records nothing; the next batch sees the cache as before."""
    model, _ = tiny
    a, b = (cls(model, 0, 4, embed=True, head=False) for cls in (Shard, GraphShard))
    for s in (a, b):
        s.forward(prompt(12), 12)
        assert s.forward(tree(500, 11, 12, 4), 0, between=lambda ids: True) is None
        assert s.forward(prompt(12)[:0] + tree(600, 11, 12, 80), 0,
                         between=lambda ids: True) is None
        assert s.kv_len() == 12
    assert rel(b.forward(tree(700, 11, 12, 6), 0), a.forward(tree(700, 11, 12, 6), 0)) < 1e-4


def test_draft_matches_draft_model(tiny):
    """Top-k children (captured k = KMAX; smaller k cut from it) as DraftModel's."""
    _, draft = tiny
    a, b = DraftModel(draft), GraphDraft(draft)
    assert a.propose(prompt(12), [11], 4, 12) .keys() == b.propose(prompt(12), [11], 4,
                                                                    12).keys()
    rows = tree(900, 11, 12, 12)
    want = [r.id for r in rows[::2]]
    pa, pb = a.propose(rows, want, 4, 0), b.propose(rows, want, 4, 0)
    assert pa.keys() == pb.keys() == set(want)
    for i in want:
        assert [t for t, _ in pa[i]] == [t for t, _ in pb[i]]
        assert max(abs(x - y) for (_, x), (_, y) in zip(pa[i], pb[i])) < 1e-4
    more = tree(950, rows[0].id, 13, 3)
    big = a.propose(more, [more[0].id], 20, 0), b.propose(more, [more[0].id], 20, 0)
    assert [t for t, _ in big[0][more[0].id]] == [t for t, _ in big[1][more[0].id]]


def greedy(t, ids, n):
    out = t.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n,
                           eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("strategy", ["ar", "tree-sd", "pipedec"])
@pytest.mark.parametrize("stages", [2, 4])
def test_inline_lossless_with_static_buffers(strategy, stages):
    torch.set_num_threads(1)
    t = load("tiny")
    pipe = InlinePipeline(t, load("tiny-noisy"), stages, knobs=KNOBS, cuda_graphs=True)
    assert all(type(s) is GraphShard for s in pipe.shards)
    assert type(pipe.draft) is GraphDraft
    for i, text in enumerate(PROMPTS):
        ids = t.encode(text)
        assert pipe.run(strategy, Request(str(i), ids, 20)).output == greedy(t, ids, 20)
    if strategy != "ar":
        assert pipe.draft.shard.calls["padded_eager"] > 0


def test_cli_run_with_cuda_graphs_on_cpu(tmp_path, capsys):
    """`pipedec-real run --cuda-graphs on` on the CPU: stage processes and the head's
    draft on the static path (eagerly, one note), every strategy lossless."""
    from tests.helpers import real_cli
    t = load("tiny")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    code, err = real_cli(["run", "--target", "tiny", "--draft", "tiny-noisy",
                               "--stages", "2", "--prompts", str(tmp_path / "p.txt"),
                               "--max-new-tokens", "12", "--cuda-graphs", "on",
                               "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert "--cuda-graphs on: no CUDA" in err
    for line in (tmp_path / "o" / "outputs.jsonl").read_text().splitlines():
        g = json.loads(line)
        assert g["output_ids"] == greedy(t, g["prompt_ids"], 12), g["strategy"]


class FakeGraph:
    """What a CUDA graph does, on the CPU: outputs fixed at capture, each replay recomputes
    them in place from the static inputs."""

    def __init__(self, shard, B, C):
        self.shard, self.B, self.C = shard, B, C
        self.outs = shard._body(B, C)

    def replay(self):
        for out, new in zip(self.outs, self.shard._body(self.B, self.C)):
            out.copy_(new)


def test_replay_path_with_prepared_buckets(tiny, monkeypatch):
    """The capture/replay plumbing (prepare's captures, static outputs cloned before the
    next replay overwrites them) with a stand-in graph: the same numbers as Shard."""
    model, draft = tiny
    monkeypatch.setattr(GraphShard, "_capture",
                        lambda self, B, C: (lambda g: (g, g.outs))(FakeGraph(self, B, C)))
    a = Shard(model, 0, 4, embed=True, head=False)
    b = GraphShard(model, 0, 4, embed=True, head=False, capture=True, slots=256)
    b.prepare()
    assert set(b.graphs) == {(B, C) for B in (1, 2, 4, 8, 16, 32, 64)
                             for C in (64, 128, 256) if C >= B}
    for s in (a, b):
        s.forward(prompt(20), 20)
    t1, t2 = tree(2000, 19, 20, 5), tree(3000, 19, 20, 5)
    a1, a2 = a.forward(t1, 0), a.forward(t2, 0)
    b1, b2 = b.forward(t1, 0), b.forward(t2, 0)        # same bucket: b1 must survive b2
    assert rel(b1, a1) < 1e-4 and rel(b2, a2) < 1e-4
    assert b.calls["replay"] == 3 and b.calls["padded_eager"] == 0     # prompt + 2 trees
    g = GraphDraft(draft, capture=True)
    rows = tree(4000, 19, 20, 6)
    want = [r.id for r in rows]
    pa = DraftModel(draft).propose(prompt(20) + rows, want, 4, 20)
    pb = g.propose(prompt(20), [], 4, 20) | g.propose(rows, want, 4, 0)
    assert {i: [t for t, _ in v] for i, v in pa.items()} == \
        {i: [t for t, _ in v] for i, v in pb.items()}
