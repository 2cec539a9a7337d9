"""The sans-IO protocol driven by hand: scripted events in, exact actions out, no backend.

Every strategy is a state machine (`start()`, `on(event)`); here the draft's proposals
and the target's verdicts are written out by hand, so each test states the whole
exchange a backend would see. The pacer's rules (pacing.py) are checked the same way
against a fake `Dispatch` that records its calls.
"""
from __future__ import annotations

import pytest

from pipedec_sim.protocol.messages import (
    Batch,
    Commit,
    Draft,
    Drafted,
    EntryFree,
    Finish,
    Inject,
    Row,
    Update,
    Verified,
)
from pipedec_sim.protocol.pacing import (
    PRUNE_MODES,
    Pacer,
    cancels,
    check_prune,
    stage_output,
    verify_rows,
    window_for,
)
from pipedec_sim.protocol.strategies import AR, PipeDec, TreeSD, make_strategy

PROMPT = [5, 6, 7]                       # rows 0, 1, 2; the last prompt token is id 2
P0, P1, P2 = Row(0, -1, 5, 0), Row(1, 0, 6, 1), Row(2, 1, 7, 2)
PROMPT_ROWS = (P0, P1, P2)


def inject(bid, rows, kind, verify_from=0, committed=0):
    return Inject(Batch(bid, tuple(rows), kind, verify_from, committed))


def draft(ticket, rows, want, k, committed=0):
    return Draft(ticket, tuple(rows), tuple(want), k, committed)


def on(s, event):
    """`s.on(event)` with each prune notice's kills sorted: their order carries no meaning."""
    return [Update(a.commit, tuple(sorted(a.kill))) if isinstance(a, Update) else a
            for a in s.on(event)]


# ---- plain pipeline parallelism ---------------------------------------------------------


def test_ar_prefills_then_sends_one_committed_token_per_verdict():
    s = make_strategy("ar", PROMPT, 3)
    assert isinstance(s, AR)
    assert s.start() == [inject(0, PROMPT_ROWS, "prefill", verify_from=2, committed=3)]
    assert on(s, Verified(0, {2: 42})) == [
        Commit((42,), 0, "token"),
        inject(1, [Row(3, 2, 42, 3)], "token", committed=1),
    ]
    assert on(s, Verified(1, {3: 43})) == [
        Commit((43,), 0, "token"),
        inject(2, [Row(4, 3, 43, 4)], "token", committed=1),
    ]
    assert on(s, Verified(2, {4: 44})) == [Commit((44,), 0, "token"), Finish()]
    assert s.output == [42, 43, 44] and s.done
    assert on(s, Verified(3, {5: 45})) == []          # nothing after Finish


def test_ar_ignores_draft_and_entry_events():
    s = make_strategy("ar", PROMPT, 3)
    s.start()
    assert on(s, EntryFree()) == []
    assert on(s, Drafted(0, {2: ((9, -0.1),)})) == []
    assert s.output == [] and not s.done


def test_ar_stops_at_eos_inclusive():
    s = make_strategy("ar", PROMPT, 10, eos=43)
    s.start()
    on(s, Verified(0, {2: 42}))
    assert on(s, Verified(1, {3: 43})) == [Commit((43,), 0, "token"), Finish()]
    assert s.output == [42, 43]


@pytest.mark.parametrize("prompt,n", [([], 3), ([1], 0)])
def test_bad_requests_are_rejected(prompt, n):
    with pytest.raises(ValueError):
        make_strategy("ar", prompt, n)


def test_unknown_strategy_and_unknown_event_are_errors():
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("beam", PROMPT, 3)
    s = make_strategy("ar", PROMPT, 3)
    s.start()
    with pytest.raises(TypeError):
        on(s, object())


# ---- tree speculative decoding (EAGLE-2 style) -----------------------------------------

ROOT_PROPS = {2: ((10, -0.1), (11, -0.5), (12, -1.0))}            # top-2 kept: 10, 11
LEVEL2_PROPS = {3: ((20, -0.2), (21, -0.3)), 4: ((30, -0.1),)}


def tree_sd(max_new=8, eos=None):
    s = make_strategy("tree-sd", PROMPT, max_new, eos=eos, depth=2, tree_topk=2, total=3)
    assert isinstance(s, TreeSD)
    return s


def drafted_tree(s):
    """Two draft passes: the root's children 3 (10) and 4 (11); then 3's children
    5 (20, path -0.3), 6 (21, -0.4) and 4's child 7 (30, -0.6). Keeps the best 3."""
    assert s.start() == [draft(0, PROMPT_ROWS, [2], 2, committed=3)]
    level1 = [Row(3, 2, 10, 3), Row(4, 2, 11, 3)]
    assert on(s, Drafted(0, ROOT_PROPS)) == [draft(1, level1, [3, 4], 2)]
    return on(s, Drafted(1, LEVEL2_PROPS))


def test_tree_sd_drafts_level_by_level_and_verifies_the_best_total_nodes():
    s = tree_sd()
    # total=3 keeps 3 (-0.1), 5 (-0.3), 6 (-0.4); 4 and 7 are pruned before sending.
    # The prompt prefix rides along (the target has not seen it); rows by (pos, id).
    assert drafted_tree(s) == [inject(0, [P0, P1, P2, Row(3, 2, 10, 3), Row(5, 3, 20, 4),
                                          Row(6, 3, 21, 4)], "tree", verify_from=2,
                                      committed=3)]


def test_tree_sd_commits_the_longest_accepted_path_plus_the_bonus_token():
    s = tree_sd()
    drafted_tree(s)
    # root -> 10 (node 3) -> 21 (node 6) -> the target says 50 after 6: bonus token.
    actions = on(s, Verified(0, {2: 10, 3: 21, 5: 99, 6: 50}))
    assert actions == [
        Update(commit=(3, 6), kill=(4, 5, 7)),
        Commit((10, 21, 50), 2, "accept"),
        # next round: node 6 was never drafted, so the draft gets it and the bonus (8)
        draft(2, [Row(6, 3, 21, 4), Row(8, 6, 50, 5)], [8], 2, committed=2),
    ]
    assert s.output == [10, 21, 50]


def test_tree_sd_rejecting_the_whole_tree_still_commits_the_target_token():
    s = tree_sd()
    drafted_tree(s)
    assert on(s, Verified(0, {2: 77, 3: 21, 5: 1, 6: 2})) == [
        Update(commit=(), kill=(3, 4, 5, 6, 7)),
        Commit((77,), 0, "accept"),
        draft(2, [Row(8, 2, 77, 3)], [8], 2, committed=1),
    ]


def test_tree_sd_second_round_sends_no_prompt_prefix():
    s = tree_sd()
    drafted_tree(s)
    on(s, Verified(0, {2: 77}))
    assert on(s, Drafted(2, {8: ((40, -0.1),)})) == [draft(3, [Row(9, 8, 40, 4)], [9], 2)]
    # one more pass (depth 2), then the tree: root 8 (committed) and its best nodes
    assert on(s, Drafted(3, {9: ((41, -0.2),)})) == [
        inject(1, [Row(8, 2, 77, 3), Row(9, 8, 40, 4), Row(10, 9, 41, 5)], "tree",
               verify_from=0, committed=1)]


def test_tree_sd_depth_stops_at_max_new_tokens():
    s = tree_sd(max_new=1)               # one token to go: one draft pass is enough
    s.start()
    assert on(s, Drafted(0, ROOT_PROPS)) == [inject(0, [P0, P1, P2, Row(3, 2, 10, 3),
                                                       Row(4, 2, 11, 3)], "tree",
                                                   verify_from=2, committed=3)]
    assert on(s, Verified(0, {2: 10, 3: 20, 4: 30})) == [
        Update(commit=(3,), kill=(4,)), Commit((10,), 1, "accept"), Finish()]
    assert s.output == [10]


def test_tree_sd_cuts_accepted_tokens_at_max_new_and_eos():
    s = tree_sd(max_new=2)
    drafted_tree(s)
    assert on(s, Verified(0, {2: 10, 3: 21, 6: 50})) == [
        Update(commit=(3, 6), kill=(4, 5, 7)), Commit((10, 21), 2, "accept"), Finish()]
    s = tree_sd(eos=10)
    drafted_tree(s)
    assert on(s, Verified(0, {2: 10, 3: 21, 6: 50})) == [
        Update(commit=(3, 6), kill=(4, 5, 7)), Commit((10,), 1, "accept"), Finish()]
    assert s.output == [10] and on(s, Drafted(2, {8: ((1, -0.1),)})) == []


# ---- PipeDec ----------------------------------------------------------------------------

L1 = [Row(3, 2, 10, 3), Row(4, 2, 11, 3)]                 # children of the root (id 2)
L1_PROPS = {3: ((20, -0.1), (21, -0.2)), 4: ((30, -0.1), (31, -0.2))}
L2 = [Row(5, 3, 20, 4), Row(6, 3, 21, 4)]                 # best two: both under node 3


def pipedec(max_new=8, eos=None, window=None):
    s = make_strategy("pipedec", PROMPT, max_new, eos=eos, width=2, topk=2, window=window)
    assert isinstance(s, PipeDec)
    return s


def started(s):
    assert s.start() == [inject(0, PROMPT_ROWS, "prefill", verify_from=2, committed=3),
                         draft(0, PROMPT_ROWS, [2], 2, committed=3)]
    return s


def two_layers(s):
    """Prefill in batch 0, layer 1 (nodes 3, 4) in batch 1, layer 2 (5, 6) in batch 2."""
    started(s)
    assert on(s, Drafted(0, {2: ((10, -0.1), (11, -0.5), (12, -1.0))})) == []   # stage 1 busy
    assert on(s, EntryFree()) == [inject(1, L1, "layer"), draft(1, L1, [3, 4], 2)]
    assert on(s, Drafted(1, L1_PROPS)) == []
    assert on(s, EntryFree()) == [inject(2, L2, "layer"), draft(2, L2, [5, 6], 2)]
    return s


def test_pipedec_injects_a_layer_once_drafted_and_stage_one_is_free_in_either_order():
    a = started(pipedec())
    assert on(a, EntryFree()) == []                       # the root is not drafted yet
    assert on(a, Drafted(0, {2: ((10, -0.1), (11, -0.5), (12, -1.0))})) == [
        inject(1, L1, "layer"), draft(1, L1, [3, 4], 2)]
    b = two_layers(pipedec())
    assert b.in_flight == {0, 1, 2}


def test_pipedec_waits_for_every_frontier_node_and_one_entry_per_layer():
    s = started(pipedec())
    on(s, Drafted(0, {2: ((10, -0.1), (11, -0.5))}))
    on(s, EntryFree())
    assert on(s, Drafted(1, {3: L1_PROPS[3]})) == []      # stage 1 busy
    assert on(s, EntryFree()) == []                      # node 4 has no proposals yet
    assert on(s, Drafted(1, {4: L1_PROPS[4]})) == [inject(2, L2, "layer"),
                                                  draft(2, L2, [5, 6], 2)]
    assert on(s, Drafted(2, {5: ((40, -0.1),), 6: ((41, -0.1),)})) == []   # entry used up


def test_pipedec_hit_prunes_siblings_and_commits():
    s = two_layers(pipedec())
    assert on(s, Verified(0, {2: 10})) == [Update(commit=(3,), kill=(4,)),
                                          Commit((10,), 1, "hit")]
    assert on(s, Verified(1, {3: 20})) == [Update(commit=(5,), kill=(6,)),
                                          Commit((20,), 1, "hit")]
    assert s.output == [10, 20] and s.in_flight == {2}


def test_pipedec_miss_flushes_and_restarts_from_the_target_token():
    s = two_layers(pipedec())
    on(s, Verified(0, {2: 10}))
    new = Row(7, 3, 77, 4)
    assert on(s, Verified(1, {3: 77})) == [
        Update(kill=(5, 6)), Commit((77,), 0, "miss"),
        inject(3, [new], "token", committed=1), draft(3, [new], [7], 2, committed=1)]
    assert s.output == [10, 77] and s.tree.root.id == 7 and set(s.tree.nodes) == {7}


def test_pipedec_ignores_stale_proposals_for_pruned_nodes():
    s = two_layers(pipedec())
    on(s, Verified(0, {2: 10}))
    on(s, Verified(1, {3: 77}))                           # nodes 5 and 6 die
    assert on(s, Drafted(2, {5: ((40, -0.1),), 6: ((41, -0.1),)})) == []
    assert on(s, EntryFree()) == []                       # the new root 7 is not drafted yet
    layer = [Row(8, 7, 50, 5)]
    assert on(s, Drafted(3, {7: ((50, -0.3),), 5: ((40, -0.1),)})) == [
        inject(4, layer, "layer"), draft(4, layer, [8], 2)]


def test_pipedec_after_a_miss_the_next_layer_waits_for_the_token_batch_to_enter():
    s = two_layers(pipedec())
    s.on(Verified(0, {2: 10}))
    assert on(s, EntryFree()) == []                      # stage 1 free, 5 and 6 undrafted
    s.on(Verified(1, {3: 77}))                           # miss: token batch 3 (node 7)
    assert on(s, Drafted(3, {7: ((50, -0.3),)})) == []   # the free entry went to batch 3
    layer = [Row(8, 7, 50, 5)]
    assert on(s, EntryFree()) == [inject(4, layer, "layer"), draft(4, layer, [8], 2)]


def test_pipedec_a_hit_on_a_node_that_regrew_later_is_a_stall():
    s = two_layers(pipedec())
    # 11 wins: node 4 (batch 1) becomes the root; 3, 5, 6 die; the frontier falls back
    assert on(s, Verified(0, {2: 11})) == [Update(commit=(4,), kill=(3, 5, 6)),
                                          Commit((11,), 1, "hit")]
    regrown = [Row(7, 4, 30, 4), Row(8, 4, 31, 4)]
    assert on(s, EntryFree()) == [inject(3, regrown, "layer"), draft(3, regrown, [7, 8], 2)]
    # node 7 rode in batch 3, not right behind its parent's batch 1: the commit stalled
    assert on(s, Verified(1, {4: 30})) == [Update(commit=(7,), kill=(8,)),
                                          Commit((30,), 1, "stall")]


def test_pipedec_an_empty_batch_back_only_frees_a_window_slot():
    s = two_layers(pipedec(window=3))
    on(s, Verified(0, {2: 11}))                           # batch 2's rows (5, 6) die
    on(s, Verified(1, {4: 30}))                           # miss: token 30 restarts at node 7
    assert s.in_flight == {2, 3}
    on(s, Drafted(3, {7: ((60, -0.1),)}))
    on(s, EntryFree())
    assert s.in_flight == {2, 3, 4}
    on(s, Drafted(4, {8: ((61, -0.1),)}))
    assert on(s, EntryFree()) == []                       # window full: 3 in flight
    layer = [Row(9, 8, 61, 6)]
    assert on(s, Verified(2, {})) == [inject(5, layer, "layer"), draft(5, layer, [9], 2)]
    assert s.output == [11, 30]                          # the empty batch committed nothing


def test_pipedec_window_holds_the_layer_until_a_batch_returns():
    s = started(pipedec(window=2))
    on(s, Drafted(0, {2: ((10, -0.1), (11, -0.5))}))
    assert on(s, EntryFree()) == [inject(1, L1, "layer"), draft(1, L1, [3, 4], 2)]
    on(s, Drafted(1, L1_PROPS))
    assert on(s, EntryFree()) == []                       # two in flight: window full
    assert on(s, Verified(0, {2: 10})) == [
        Update(commit=(3,), kill=(4,)), Commit((10,), 1, "hit"),
        inject(2, L2, "layer"), draft(2, L2, [5, 6], 2)]


def test_pipedec_rejects_a_window_below_one():
    with pytest.raises(ValueError, match="window"):
        pipedec(window=0)


def test_pipedec_stops_growing_at_max_new_tokens_and_finishes():
    s = started(pipedec(max_new=1))
    on(s, Drafted(0, {2: ((10, -0.1), (11, -0.5))}))
    assert on(s, EntryFree()) == [inject(1, L1, "layer"), draft(1, L1, [3, 4], 2)]
    on(s, Drafted(1, L1_PROPS))
    assert on(s, EntryFree()) == []                       # pos 3 is the last one needed
    assert on(s, Verified(0, {2: 10})) == [Update(commit=(3,), kill=(4,)),
                                          Commit((10,), 1, "hit"), Finish()]
    assert s.done and on(s, Verified(1, {3: 20})) == []


def test_pipedec_eos_on_a_hit_or_a_miss_finishes_without_a_restart():
    s = two_layers(pipedec(eos=10))
    assert on(s, Verified(0, {2: 10})) == [Update(commit=(3,), kill=(4,)),
                                          Commit((10,), 1, "hit"), Finish()]
    s = two_layers(pipedec(eos=99))
    assert on(s, Verified(0, {2: 99})) == [Update(kill=(3, 4, 5, 6)),
                                          Commit((99,), 0, "miss"), Finish()]
    assert s.output == [99]


# ---- pacing -----------------------------------------------------------------------------


class FakeDispatch:
    """Records every backend call in order."""

    def __init__(self):
        self.calls = []

    def inject(self, batch, notices):
        self.calls.append(("inject", batch.id, notices))

    def draft(self, request):
        self.calls.append(("draft", request.ticket))

    def prune(self, update):
        self.calls.append(("prune", update))

    def broadcast(self, update):
        self.calls.append(("broadcast", update))

    def inband(self, update):
        self.calls.append(("inband", update))

    def commit(self, commit):
        self.calls.append(("commit", commit.tokens))

    def finish(self):
        self.calls.append(("finish",))


def batch(bid, rows=(), kind="layer", verify_from=0, committed=0):
    return Batch(bid, tuple(rows), kind, verify_from, committed)


def test_window_for_defaults_to_one_more_than_the_stages():
    assert window_for(4) == 5
    assert window_for(4, 2) == 2
    assert window_for(1) == 2


def test_stage_output_keeps_survivors_or_sends_a_header_only_batch():
    b = batch(7, [P1, P2, Row(3, 2, 10, 3)], "tree", verify_from=1, committed=2)
    assert stage_output(b, [P1, P2]) == batch(7, [P1, P2], "tree", 1, 2)
    assert stage_output(b, []) == Batch(7, (), "tree")   # no verify_from, no committed
    assert verify_rows(b) == (P2, Row(3, 2, 10, 3))


def test_cancels_only_when_every_running_row_is_killed():
    assert cancels({3, 4}, Update(kill=(3, 4, 5)))
    assert not cancels({3, 4}, Update(kill=(3,)))
    assert not cancels({3, 4}, Update(commit=(3, 4)))
    assert not cancels(set(), Update(kill=(3,)))


def test_unknown_prune_mode_is_rejected():
    assert check_prune("inband") == "inband"
    with pytest.raises(ValueError, match="prune"):
        Pacer(make_strategy("ar", PROMPT, 3), FakeDispatch(), prune="later")


def test_entry_free_comes_once_stage_one_took_every_dispatched_batch():
    p = Pacer(make_strategy("ar", PROMPT, 3), FakeDispatch())
    p.dispatch([Inject(batch(0)), Inject(batch(1))])
    assert p.entry_taken() is None                       # batch 1 still waits
    assert p.entry_taken() == EntryFree()
    p.dispatch([Update(kill=(3,)), Commit((1,), 0, "token"), Inject(batch(2))])
    assert p.entry_taken() == EntryFree()
    p.dispatch([Inject(batch(3))])
    p.dispatch([Inject(batch(4))])                       # counted per dispatch, not per call
    assert p.entry_taken() is None
    assert p.entry_taken() == EntryFree()


@pytest.mark.parametrize("mode", PRUNE_MODES)
def test_dispatch_routes_each_action_by_prune_mode(mode):
    fake = FakeDispatch()
    p = Pacer(make_strategy("ar", PROMPT, 3), fake, prune=mode)
    u = Update(commit=(3,), kill=(4,))
    p.dispatch([u, Commit((10,), 1, "hit"), Inject(batch(1)), draft(1, [], [5], 2),
                Inject(batch(2)), Finish()])
    head = [("prune", u), ("commit", (10,))]
    if mode == "broadcast":
        want = [("prune", u), ("broadcast", u), ("commit", (10,)), ("inject", 1, ())]
    elif mode == "inband":
        want = [("prune", u), ("inband", u), ("commit", (10,)), ("inject", 1, ())]
    else:                                    # held for the next batch, then handed over
        want = head + [("inject", 1, (u,))]
    assert fake.calls == want + [("draft", 1), ("inject", 2, ()), ("finish",)]


def test_piggyback_hands_every_held_notice_to_the_next_inject_once():
    fake = FakeDispatch()
    p = Pacer(make_strategy("ar", PROMPT, 3), fake, prune="piggyback")
    u1, u2 = Update(kill=(4,)), Update(commit=(3,))
    p.dispatch([u1])
    p.dispatch([u2])
    p.dispatch([Inject(batch(1))])
    p.dispatch([Inject(batch(2))])
    assert fake.calls == [("prune", u1), ("prune", u2), ("inject", 1, (u1, u2)),
                          ("inject", 2, ())]


def test_pacer_paces_pipedec_one_layer_per_entry():
    fake = FakeDispatch()
    p = Pacer(pipedec(), fake)
    p.dispatch(p.start())
    assert fake.calls == [("inject", 0, ()), ("draft", 0)]
    p.dispatch(p.feed(p.drafted(0, {2: ((10, -0.1), (11, -0.5))})))
    assert fake.calls[2:] == []                          # stage 1 has not taken batch 0
    free = p.entry_taken()
    assert free == EntryFree()
    p.dispatch(p.feed(free))
    assert fake.calls[2:] == [("inject", 1, ()), ("draft", 1)]
    p.dispatch(p.feed(p.drafted(1, L1_PROPS)))
    assert fake.calls[4:] == []                          # batch 1 not taken yet
    p.dispatch(p.feed(p.verified(0, {2: 10})))
    u = Update(commit=(3,), kill=(4,))
    assert fake.calls[4:] == [("prune", u), ("broadcast", u), ("commit", (10,))]
    p.dispatch(p.feed(p.entry_taken()))                  # stage 1 took batch 1: next layer
    assert fake.calls[7:] == [("inject", 2, ()), ("draft", 2)]


def test_pacer_feeds_nothing_once_the_request_is_done():
    p = Pacer(make_strategy("ar", PROMPT, 1), FakeDispatch())
    p.start()
    assert p.feed(p.verified(0, {2: 42})) == [Commit((42,), 0, "token"), Finish()]
    assert p.done
    assert p.feed(p.verified(1, {3: 43})) == []
