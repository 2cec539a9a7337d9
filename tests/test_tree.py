from pipedec_sim.protocol.tree import Hit, Miss, Node, PredictionTree, path, subtree


def build():
    root = Node(0, None, 10, 5)
    t = PredictionTree(root)
    a = t.add(root, 1, -0.1, 1)
    b = t.add(root, 2, -1.0, 2)
    aa = t.add(a, 3, -0.2, 3)
    ab = t.add(a, 4, -0.5, 4)
    ba = t.add(b, 5, -0.1, 5)
    return t, root, a, b, aa, ab, ba


def test_nodes_carry_position_and_cumulative_score():
    t, root, a, b, aa, ab, ba = build()
    assert (a.pos, aa.pos) == (6, 7)
    assert abs(aa.score - (-0.3)) < 1e-12
    assert [n.id for n in t.frontier()] == [3, 4, 5]
    assert [n.id for n in path(aa, root)] == [1, 3]


def test_hit_keeps_the_matching_subtree_and_kills_the_rest():
    t, root, a, b, aa, ab, ba = build()
    v = t.advance(1)
    assert isinstance(v, Hit) and v.root is a
    assert sorted(v.killed) == [2, 5]
    assert t.root is a and set(t.nodes) == {1, 3, 4}
    assert [n.id for n in t.frontier()] == [3, 4]
    v2 = t.advance(4)
    assert isinstance(v2, Hit) and sorted(v2.killed) == [3]
    assert set(t.nodes) == {4} and t.frontier() == [ab]


def test_miss_kills_every_guess():
    t, root, *_ = build()
    v = t.advance(99)
    assert isinstance(v, Miss) and sorted(v.killed) == [1, 2, 3, 4, 5]
    assert set(t.nodes) == {0} and t.frontier() == [root] and root.children == {}


def test_frontier_falls_back_to_the_deepest_surviving_level():
    root = Node(0, None, 10, 0)
    t = PredictionTree(root)
    a = t.add(root, 1, -0.1, 1)
    b = t.add(root, 2, -0.2, 2)
    t.add(b, 3, -0.1, 3)               # only b's branch grew deeper
    t.advance(1)                       # a wins: the deepest level dies with b
    assert t.frontier() == [a]


def test_prune_to_drops_nodes_and_links():
    t, root, a, b, aa, ab, ba = build()
    killed = t.prune_to({1, 3})
    assert sorted(killed) == [2, 4, 5]
    assert set(root.children) == {1} and set(a.children) == {3}
    assert {n.id for n in subtree(root)} == {0, 1, 3}


def test_hit_on_random_trees_matches_the_survivors_rebuilt_from_scratch():
    """advance drops the dead instead of rebuilding the survivors: over random trees the
    nodes, the levels (in creation order) and the killed ids are what a rebuild gives."""
    import random
    rng = random.Random(7)
    for _ in range(200):
        root = Node(0, None, 0, 0)
        t = PredictionTree(root)
        live = [root]
        for i in range(1, rng.randint(2, 40)):
            parent = rng.choice(live)
            token = rng.randrange(6)
            if token not in parent.children:
                live.append(t.add(parent, token, -rng.random(), i))
        if not root.children:
            continue
        child = rng.choice(list(root.children.values()))
        keep = {n.id for n in subtree(child)}
        before = set(t.nodes)
        v = t.advance(child.token)
        assert isinstance(v, Hit) and v.root is child
        assert set(t.nodes) == keep and set(v.killed) == before - keep - {0}
        levels = {}
        for n in sorted(subtree(child), key=lambda n: n.id):
            levels.setdefault(n.pos, []).append(n)
        assert t._levels == levels and t.frontier() == levels[max(levels)]
