"""Expansion policies: which draft proposals become tree nodes.

A candidate is (parent, token, logp); its score is the parent's cumulative log-prob plus
logp, i.e. the draft's probability of the whole path from the root. Ranking by it is
what both PipeDec (one layer per step) and EAGLE-2 (a whole tree per pass) do.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from heapq import heappop, heapreplace
from operator import itemgetter
from typing import Iterable

from pipedec_sim.protocol.knobs import KNOBS, PipeDecKnobs, TreeSDKnobs
from pipedec_sim.protocol.tree import Node

Candidate = tuple[float, Node, int, float]   # (score, parent, token, logp)


def candidates(parents: Iterable[Node], topk: int) -> list[Candidate]:
    """Each parent's top-k proposals that are not already its children."""
    out = []
    for parent in parents:
        for token, logp in (parent.proposals or ())[:topk]:
            if token not in parent.children:
                out.append((parent.score + logp, parent, token, logp))
    return out


_SCORE = itemgetter(0)


def best(cands: list[Candidate], n: int) -> list[Candidate]:
    # nlargest is stable, so ties keep frontier/proposal order: runs are reproducible.
    return heapq.nlargest(n, cands, key=_SCORE)


def merge_best(parents: list[Node], topk: int, n: int) -> list[Candidate]:
    """`best(candidates(parents, topk), n)` without building every candidate: each
    parent's proposals are sorted, so a heap over the parents' next proposals yields the
    winners in order (ties: parent order, then rank, exactly as `best`). A heap entry is
    (-score, parent index, rank, end of its top-k, parent): at most one entry per parent,
    so comparisons never get past the index."""
    heap: list[tuple[float, int, int, int, Node]] = []
    for i, p in enumerate(parents):
        props = p.proposals
        if props:
            end = min(topk, len(props))
            j = _next_free(props, p.children, 0, end) if p.children else 0
            if j < end:
                heap.append((-(p.score + props[j][1]), i, j, end, p))
    heapq.heapify(heap)
    out: list[Candidate] = []
    for _ in range(n):
        if not heap:
            break
        neg, i, j, end, p = heap[0]
        props = p.proposals or ()
        token, logp = props[j]
        out.append((-neg, p, token, logp))
        j += 1
        if p.children:                  # (a frontier node has none: no call per pop)
            j = _next_free(props, p.children, j, end)
        if j < end:                     # the parent's next proposal takes its place
            heapreplace(heap, (-(p.score + props[j][1]), i, j, end, p))
        else:
            heappop(heap)
    return out


def _next_free(props: tuple[tuple[int, float], ...], children: dict, j: int,
               end: int) -> int:
    """Index of the next proposal from j (before `end`) that is not already a child of
    its parent, else `end`."""
    while j < end and props[j][0] in children:
        j += 1
    return j


# The defaults live in the knob groups (pipedec_sim.protocol.knobs).
_PIPEDEC, _TREE_SD = PipeDecKnobs(), TreeSDKnobs()


@dataclass(frozen=True)
class LayerPolicy:
    """PipeDec: the next layer is the `width` best children over the whole frontier.

    floor: drop nodes whose path probability from the root is below it.
    coverage: adaptive width; stop once the chosen nodes hold this fraction of the
    frontier's path probability (None: always fill `width`).
    """
    width: int = _PIPEDEC.width
    topk: int = _PIPEDEC.topk
    floor: float = _PIPEDEC.floor
    coverage: float | None = _PIPEDEC.coverage

    def __post_init__(self):
        for name in ("width", "topk", "floor", "coverage"):
            KNOBS[name].check(getattr(self, name))

    @classmethod
    def of(cls, knobs: PipeDecKnobs) -> LayerPolicy:
        return cls(width=knobs.width, topk=knobs.topk, floor=knobs.floor,
                   coverage=knobs.coverage)

    def select(self, frontier: list[Node]) -> list[Candidate]:
        chosen = merge_best(frontier, self.topk, self.width)
        if self.floor > 0.0:
            log_floor = math.log(self.floor)
            chosen = [c for c in chosen if c[0] >= log_floor]
        if self.coverage is not None:
            chosen = self._adaptive(frontier, chosen, self.coverage)
        return chosen

    @staticmethod
    def _adaptive(frontier: list[Node], chosen: list[Candidate],
                  coverage: float) -> list[Candidate]:
        goal = coverage * sum(math.exp(n.score) for n in frontier)
        mass, out = 0.0, []
        for c in chosen:
            out.append(c)
            mass += math.exp(c[0])
            if mass >= goal:
                break
        return out


@dataclass(frozen=True)
class Eagle2Policy:
    """EAGLE-2 dynamic tree: `depth` draft passes; each expands the `topk` best nodes of
    the newest level; finally the `total` best nodes of everything proposed are kept
    (cumulative scores only fall along a path, so the kept set includes its ancestors)."""
    depth: int = _TREE_SD.depth
    topk: int = _TREE_SD.tree_topk
    total: int = _TREE_SD.total

    def __post_init__(self):
        KNOBS["depth"].check(self.depth)
        KNOBS["tree_topk"].check(self.topk, "topk")
        KNOBS["total"].check(self.total)

    @classmethod
    def of(cls, knobs: TreeSDKnobs) -> Eagle2Policy:
        return cls(depth=knobs.depth, topk=knobs.tree_topk, total=knobs.total)

    def expand(self, level: list[Candidate]) -> list[Candidate]:
        return best(level, self.topk)

    def final(self, pool: list[Node]) -> list[Node]:
        return heapq.nlargest(self.total, pool, key=lambda n: n.score)


def chain_policy(depth: int) -> Eagle2Policy:
    """Classic speculative decoding: a chain of `depth` greedy draft tokens."""
    return Eagle2Policy(depth=depth, topk=1, total=depth)
