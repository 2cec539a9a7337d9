"""Trace replay: what the draft proposes and what the target decides, from a recorded trace.

A trace holds, for every output position, the target's greedy token and the draft's
top-k given the *true* prefix. That decides acceptance exactly on the true path for any
tree policy. Nodes off the true path can never be accepted (their root would have to be
a wrong token), so their proposals only compete for width: we resample them from the
proposals recorded at another position of the same request (seeded), which keeps their
confidence distribution realistic without inventing a draft. The approximation is that
a draft conditioned on a wrong prefix is assumed as confident as on the true one.
"""
from __future__ import annotations

import math
from typing import Iterable

from pipedec_sim.protocol.messages import Draft, Drafted, Inject, Row

_TINY = 1e-12


class TraceOracle:
    def __init__(self, request, *, seed: int = 0):
        self.P = request.prompt_len
        self.output = request.output
        self.props = [tuple(zip(ids, (math.log(max(p, _TINY)) for p in probs)))
                      for ids, probs in zip(request.topk_ids, request.topk_probs)]
        self.seed = seed
        self.on_path: dict[int, bool] = {}

    def observe(self, rows: Iterable[Row]) -> None:
        """Learn which rows lie on the true path (parents come before children)."""
        on_path, out, P = self.on_path, self.output, self.P
        for r in rows:
            if r.id in on_path:
                continue
            if r.pos < P:
                on_path[r.id] = True
            else:
                i = r.pos - P
                on_path[r.id] = (on_path.get(r.parent, False) and i < len(out)
                                 and out[i] == r.token)

    def propose(self, row: Row, k: int) -> tuple[tuple[int, float], ...]:
        """The draft's top-k children of `row`, best first."""
        i = row.pos + 1 - self.P
        n = len(self.output)
        if i >= n:
            return ()
        if not self.on_path.get(row.id, False):
            i = _mix(self.seed, row.id) % n
        props = self.props[i]
        return props if k >= len(props) else props[:k]

    def target(self, row: Row) -> int:
        """The target's greedy token after `row` (meaningful on the true path only)."""
        i = row.pos + 1 - self.P
        return self.output[min(max(i, 0), len(self.output) - 1)]


def _mix(seed: int, x: int) -> int:
    """A cheap, seeded integer hash (splitmix64 finaliser): deterministic resampling."""
    z = (x * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


class RecordedOracle(TraceOracle):
    """The trace oracle, except that the draft's proposals for a node come from a real
    run's event record (`pipedec-real run --record-events`) wherever the real draft was
    asked about the same token path.

    Nodes are keyed by their token path (a hash chain over (token, pos) from the first
    prompt token), not by id: ids depend on the order the strategy made nodes in. With it
    the simulator replays the real run's proposals exactly; paths the real draft was never
    asked about fall back to the trace (counted in `fallback`)."""

    def __init__(self, request, record: dict, *, seed: int = 0):
        super().__init__(request, seed=seed)
        self.table = proposals_by_path(record)
        self.keys: dict[int, int] = {}
        self.exact = self.fallback = 0

    def observe(self, rows) -> None:
        super().observe(rows)
        keys = self.keys
        for r in rows:
            if r.id not in keys:
                keys[r.id] = _path_key(keys.get(r.parent, -1), r.token, r.pos)

    def propose(self, row, k: int):
        props = self.table.get(self.keys.get(row.id, -1))
        if props is None:
            self.fallback += 1
            return super().propose(row, k)
        self.exact += 1
        return props[:k]


def _path_key(parent_key: int, token: int, pos: int) -> int:
    return hash((parent_key, token, pos))


def proposals_by_path(record: dict) -> dict[int, tuple]:
    """path key -> the draft's proposals, from one request's event record
    (`{"start": actions, "steps": [(event, actions), ...]}`)."""
    keys: dict[int, int] = {}
    table: dict[int, tuple] = {}

    def learn(actions):
        for a in actions:
            rows = (a.rows if isinstance(a, Draft) else
                    a.batch.rows if isinstance(a, Inject) else ())
            for r in rows:
                if r.id not in keys:
                    keys[r.id] = _path_key(keys.get(r.parent, -1), r.token, r.pos)
    learn(record["start"])
    for event, actions in record["steps"]:
        if isinstance(event, Drafted):
            for i, props in event.proposals.items():
                if i in keys and props:
                    table.setdefault(keys[i], tuple(props))
        learn(actions)
    return table
