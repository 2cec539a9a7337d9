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
import random
from typing import Iterable

from .messages import Row

_TINY = 1e-12


class TraceOracle:
    def __init__(self, request, *, seed: int = 0):
        self.P = request.prompt_len
        self.output = request.output
        self.ids = request.topk_ids
        self.logps = [tuple(math.log(max(p, _TINY)) for p in probs)
                      for probs in request.topk_probs]
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
            i = random.Random(self.seed * 1_000_003 + row.id).randrange(n)
        return tuple(zip(self.ids[i][:k], self.logps[i][:k]))

    def target(self, row: Row) -> int:
        """The target's greedy token after `row` (meaningful on the true path only)."""
        i = row.pos + 1 - self.P
        return self.output[min(max(i, 0), len(self.output) - 1)]
