import random

import numpy as np

from pipedec_sim.protocol.messages import Row, Update
from pipedec_sim.protocol.stage_state import StageState


def prompt(n):
    return [Row(i, i - 1, 100 + i, i) for i in range(n)]


def test_prefill_rows_become_the_committed_prefix():
    s = StageState()
    rows = prompt(3)
    m = s.mask(rows)
    assert m.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]     # causal
    s.append(rows, committed=3)
    assert (s.n_prefix, s.spec, s.context) == (3, [], 3)


def test_tree_rows_see_prefix_ancestors_and_self_only():
    s = StageState()
    s.append(prompt(2), committed=2)
    layer1 = [Row(10, 1, 7, 2), Row(11, 1, 8, 2)]
    s.append(layer1)
    layer2 = [Row(12, 10, 9, 3), Row(13, 11, 9, 3)]
    m = s.mask(layer2)
    #          p0 p1 n10 n11 n12 n13
    assert m.astype(int).tolist() == [[1, 1, 1, 0, 1, 0],
                                      [1, 1, 0, 1, 0, 1]]


def test_within_batch_ancestry_for_a_whole_tree():
    s = StageState()
    s.append(prompt(1), committed=1)
    rows = [Row(5, 0, 1, 1), Row(6, 5, 2, 2), Row(7, 5, 3, 2), Row(8, 6, 4, 3)]
    m = s.mask(rows)
    assert m.astype(int).tolist() == [[1, 1, 0, 0, 0],
                                      [1, 1, 1, 0, 0],
                                      [1, 1, 0, 1, 0],
                                      [1, 1, 1, 0, 1]]


def test_hit_prunes_siblings_and_promotes_the_new_root():
    s = StageState()
    s.append(prompt(2), committed=2)
    s.append([Row(10, 1, 7, 2), Row(11, 1, 8, 2)])
    s.append([Row(12, 10, 9, 3), Row(13, 11, 9, 3)])
    keep = s.apply(Update(commit=(10,), kill=(11, 13)))
    assert keep.tolist() == [0, 1, 2, 4]
    assert (s.n_prefix, s.spec) == (3, [12])
    # rows of killed nodes (and their descendants) are dropped on arrival
    arriving = [Row(14, 13, 1, 4), Row(15, 12, 1, 4), Row(16, 14, 1, 5)]
    assert [r.id for r in s.admit(arriving)] == [15]


def test_miss_flushes_to_the_committed_prefix():
    s = StageState()
    s.append(prompt(2), committed=2)
    s.append([Row(10, 1, 7, 2), Row(11, 1, 8, 2)])
    keep = s.apply(Update(kill=(10, 11)))
    assert keep.tolist() == [0, 1] and s.context == 2
    assert s.apply(Update(kill=(10,))) is None                # nothing left to remove


def test_commit_before_arrival_promotes_on_append():
    s = StageState()
    s.append(prompt(2), committed=2)
    s.apply(Update(commit=(20,)))
    s.append([Row(20, 1, 5, 2)])
    assert (s.n_prefix, s.spec) == (3, [])


def test_unknown_parent_is_an_error_not_a_silent_mask():
    s = StageState()
    s.append(prompt(2), committed=2)
    try:
        s.mask([Row(30, 99, 1, 3)])
    except KeyError as e:
        assert "99" in str(e)
    else:
        raise AssertionError("expected KeyError")


def test_keep_index_dtype():
    s = StageState()
    s.append(prompt(1), committed=1)
    s.append([Row(2, 0, 1, 1)])
    keep = s.apply(Update(kill=(2,)))
    assert keep.dtype == np.int64


def test_long_runs_keep_order_and_keep_indices():
    """A request's holder lives for hundreds of tokens: committed rows leave `parent`
    from the front and dead ones from the middle. Against a plain list model of the
    cache, every keep-index and the order must stay exact."""
    rng = random.Random(1)
    st = StageState()
    st.append(prompt(4), committed=4)
    cache, prefix, nid = list(range(4)), 4, 4   # cache: ids in KV order (prefix first)
    for _ in range(400):
        rows = []
        for _ in range(rng.randrange(1, 5)):    # a chain off the newest row
            parent = cache[-1] if cache else -1
            rows.append(Row(nid, parent if not rows else rows[-1].id, 0, nid))
            nid += 1
        st.append(rows)
        cache += [r.id for r in rows]
        spec = cache[prefix:]
        commit = spec[:rng.randrange(0, 2)]
        kill = spec[len(commit) + rng.randrange(0, 2):] if rng.random() < 0.5 else []
        keep = st.apply(Update(commit=tuple(commit), kill=tuple(kill)))
        expect = [k for k, i in enumerate(cache) if i not in set(kill)]
        assert (keep is None) == (not kill)
        if keep is not None:
            assert keep.tolist() == expect
        cache = [cache[k] for k in expect]
        prefix += len(commit)
        assert st.n_prefix == prefix and st.spec == cache[prefix:]
