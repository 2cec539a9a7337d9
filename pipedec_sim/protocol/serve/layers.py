"""SpecPipe-DB (our reconstruction; the paper gives no details): PipeDec for many requests.

Every pipeline step injects one tree layer that mixes the rows of several requests. Each
running request keeps its own PipeDec state (tree, root, hits and misses, prunes); the
scheduler grows them together (`PipeDec(pooled=True)`): whenever stage 1 has taken every
step sent and fewer than `window` steps are in flight, every request whose frontier is
drafted offers its candidates (its own layer policy: at most `width` rows, its floor and
coverage), and `share` splits the step's `step_width` rows between the offers: a fair
quota each, the rest to the likeliest candidates left (or, `best`, the likeliest of all
offers, which favours shallow trees). A request that missed, finished or waits for its
draft offers nothing, so its share goes to the others. A new request's prompt and the
root after a miss ride in the next step (`queue`; alone, a request sends them at once as
PipeDec does). The draft answers the layer's requests in one pass (the backend batches
drafts across requests).

With one request this is PipeDec exactly: the same selection at the same moments.
"""
from __future__ import annotations

import heapq
from typing import Callable, Sequence

from pipedec_sim.protocol.messages import Batch, Inject
from pipedec_sim.protocol.policies import Candidate
from pipedec_sim.protocol.serve.server import ServeAction, ServeDispatch, Server
from pipedec_sim.protocol.strategies.pipedec import PipeDec


class LayerServer(Server):
    name = "pipedec-db"

    def __init__(self, make: Callable[[int], PipeDec], backend: ServeDispatch, *,
                 prune: str, max_running: int, window: int, step_width: int,
                 share: str = "fair"):
        super().__init__(make, backend, prune=prune, max_running=max_running)
        if window < 1 or step_width < 1:
            raise ValueError("window and step_width must be >= 1")
        self.window, self.step_width = window, step_width
        self.rule = share
        self.turn = 0                # fair share's round robin, when rows are scarce
        self.in_flight: set[int] = set()
        self.parked: list[tuple[int, Batch]] = []   # prompts and roots for the next step
        self.free = False            # stage 1 has taken every step sent (EntryFree)

    def queue(self, r: int, batch: Batch) -> list[ServeAction]:
        """A prompt or a miss's new root. Alone, a request sends it at once as a step of
        its own (PipeDec's rule: it jumps the queue at stage 1). With company it rides in
        the next step: a step of its own would cost every other request a stage time for
        one row, and misses would crowd the layers out of the window."""
        if len(self.running) == 1:
            return [self._step([(r, batch)])]
        self.parked.append((r, batch))
        return self.grow()

    def _step(self, parts: list[tuple[int, Batch]]) -> ServeAction:
        send = self.send(parts)
        self.in_flight.add(send.step.id)
        self.free = False
        return send

    def entry_free(self) -> list[ServeAction]:
        self.free = True
        return self.grow()

    def returned(self, step: int, parts: Sequence[tuple[int, int, dict[int, int]]]
                 ) -> list[ServeAction]:
        self.in_flight.discard(step)
        return super().returned(step, parts) + self.grow()

    def drafted(self, answers) -> list[ServeAction]:
        return super().drafted(answers) + self.grow()

    def grow(self) -> list[ServeAction]:
        """Send the next step once stage 1 can take it and the window has room: the parked
        prompts and roots, and the mixed layer. (Were roots to pass a full window, as a
        lone PipeDec's do, steps of roots alone would keep it full, no request's tree
        would grow, and every token would miss: a collapse seen from ~12 requests on.)"""
        if not self.free or len(self.in_flight) >= self.window:
            return []
        offers = []
        for r in self.running:
            s = self.pipedec(r)
            frontier = s.growable()
            if frontier:
                offers.append((r, s.policy.select(frontier)))
        granted = share(offers, self.step_width, self.rule, self.turn)
        if not granted and (not self.parked or self._drafting()):
            return []     # parked rows wait for the next layer: a step of roots alone
                          # would cost every request a stage time for a few rows
        self.turn += 1
        parts, self.parked = self.parked, []
        drafts: list[ServeAction] = []
        for r, chosen in granted:
            inject, draft = self.pipedec(r).grow(chosen)
            assert isinstance(inject, Inject)
            parts.append((r, inject.batch))
            drafts.append((r, draft))
        return [self._step(parts)] + drafts

    def _drafting(self) -> bool:
        """Some request waits for the draft's answer on its frontier (a layer will come)."""
        for r in self.running:
            s = self.pipedec(r)
            frontier = s.tree.frontier()
            if frontier[0].pos < s.last_pos and any(n.proposals is None for n in frontier):
                return True
        return False

    def pipedec(self, r: int) -> PipeDec:
        s = self.running[r]
        assert isinstance(s, PipeDec) and s.pooled, "pipedec-db runs pooled PipeDec requests"
        return s


SHARES = ("fair", "best")


def share(offers: Sequence[tuple[int, list[Candidate]]], width: int, rule: str = "fair",
          start: int = 0) -> list[tuple[int, list[Candidate]]]:
    """Split a step's `width` rows between the requests' offers (each best first, by the
    draft's log-probability of the path from that request's own root).

    best: the `width` best candidates of all requests (a deep tree's path probabilities
    are products of more guesses, so it gets fewer rows than a shallow one).
    fair: every request first gets its best width // n (at least 1; with more requests
    than rows, one each from request `start` on, round robin), then the rows left go to
    the best candidates that remain.

    A request gets a prefix of its offer; with one request both give its whole offer (up
    to `width`)."""
    if rule not in SHARES:
        raise ValueError(f"share must be one of {', '.join(SHARES)}, got {rule!r}")
    taken = [0] * len(offers)
    left = width
    if rule == "fair" and offers:
        quota = max(1, width // len(offers))
        for step in range(len(offers)):
            i = (start + step) % len(offers)
            taken[i] = min(quota, len(offers[i][1]), left)
            left -= taken[i]
    ranked = [(-c[0], i, k) for i, (_, cands) in enumerate(offers)
              for k, c in enumerate(cands) if k >= taken[i]]
    for _, i, k in heapq.nsmallest(left, ranked):
        taken[i] = max(taken[i], k + 1)
    return [(r, cands[:taken[i]]) for i, (r, cands) in enumerate(offers) if taken[i]]
