import math

import pytest

from pipedec_sim.protocol.policies import (
    Eagle2Policy,
    LayerPolicy,
    candidates,
    chain_policy,
)
from pipedec_sim.protocol.tree import Node, PredictionTree


def frontier():
    root = Node(0, None, 0, 0)
    t = PredictionTree(root)
    a = t.add(root, 1, math.log(0.6), 1)
    b = t.add(root, 2, math.log(0.25), 2)
    a.proposals = ((10, math.log(0.5)), (11, math.log(0.3)), (12, math.log(0.1)))
    b.proposals = ((20, math.log(0.9)), (21, math.log(0.05)))
    return t, a, b


def test_layer_takes_the_best_w_over_the_whole_frontier():
    t, a, b = frontier()
    got = LayerPolicy(width=3, topk=3).select([a, b])
    # path probs: a10 .30, a11 .18, a12 .06, b20 .225, b21 .0125
    assert [(c[1].id, c[2]) for c in got] == [(1, 10), (2, 20), (1, 11)]
    assert abs(got[0][0] - math.log(0.3)) < 1e-12


def test_topk_limits_children_per_parent():
    t, a, b = frontier()
    got = LayerPolicy(width=4, topk=1).select([a, b])
    assert [(c[1].id, c[2]) for c in got] == [(1, 10), (2, 20)]


def test_floor_drops_unlikely_paths():
    t, a, b = frontier()
    got = LayerPolicy(width=5, topk=3, floor=0.1).select([a, b])
    assert [c[2] for c in got] == [10, 20, 11]


def test_adaptive_width_stops_at_coverage():
    t, a, b = frontier()
    # frontier mass .85; goal .5 * .85 = .425: .30 + .225 reaches it with two nodes
    got = LayerPolicy(width=5, topk=3, coverage=0.5).select([a, b])
    assert [c[2] for c in got] == [10, 20]


def test_existing_children_are_not_proposed_twice():
    t, a, b = frontier()
    t.add(a, 10, math.log(0.5), 9)
    assert (10 not in [c[2] for c in candidates([a], 3)])


def test_eagle2_expand_and_final():
    p = Eagle2Policy(depth=2, topk=2, total=3)
    t, a, b = frontier()
    level = candidates([a, b], 2)
    assert [c[2] for c in p.expand(level)] == [10, 20]
    nodes = [t.add(par, tok, lp, 100 + i) for i, (_, par, tok, lp) in enumerate(level)]
    assert [n.token for n in p.final([a, b] + nodes)] == [1, 10, 2]
    assert chain_policy(5) == Eagle2Policy(depth=5, topk=1, total=5)


@pytest.mark.parametrize("kw, message", [
    (dict(width=0), "width: must be >= 1, got 0"), (dict(topk=0), "topk: must be >= 1, got 0"),
    (dict(floor=1.0), "floor: must be < 1, got 1.0"),
    (dict(coverage=0.0), "coverage: must be > 0, got 0.0"),
])
def test_bad_knobs_are_rejected(kw, message):
    with pytest.raises(ValueError) as e:
        LayerPolicy(**kw)
    assert str(e.value) == message


@pytest.mark.parametrize("kw", [dict(depth=0), dict(topk=0), dict(total=0)])
def test_bad_eagle2_knobs_are_rejected(kw):
    (name, value), = kw.items()
    with pytest.raises(ValueError, match=f"^{name}: must be >= 1, got {value}$"):
        Eagle2Policy(**kw)


def test_merge_equals_sorting_every_candidate():
    import random

    from pipedec_sim.protocol.policies import best, merge_best
    rng = random.Random(5)
    for _ in range(200):
        root = Node(0, None, 0, 0)
        t = PredictionTree(root)
        parents = []
        for i in range(rng.randint(1, 6)):
            p = t.add(root, i, math.log(rng.choice([0.1, 0.2, 0.2, 0.5])), i + 1)
            probs = sorted((rng.choice([0.05, 0.1, 0.1, 0.3]) for _ in range(rng.randint(0, 5))),
                           reverse=True)
            p.proposals = tuple((100 + k, math.log(q)) for k, q in enumerate(probs))
            if p.proposals and rng.random() < 0.3:
                t.add(p, 100, -1.0, 50 + i)      # an existing child is skipped
            parents.append(p)
        k, n = rng.randint(1, 5), rng.randint(1, 8)
        want = [(c[1].id, c[2]) for c in best(candidates(parents, k), n)]
        assert [(c[1].id, c[2]) for c in merge_best(parents, k, n)] == want
