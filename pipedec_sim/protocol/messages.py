"""What crosses the boundary between a strategy and a backend, and what crosses a link.

Strategies are sans-IO: they take *events* (what the draft proposed, what the target
decided, that stage 1 can take more work) and return *actions* (draft these rows, inject
this batch, prune these nodes, commit these tokens). Backends execute actions and feed
events back; they never decide anything themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# ---- what travels -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One token row of a batch: a prompt token, a committed token or a tree node."""
    id: int        # unique within a request; KV rows are keyed by it
    parent: int    # id of the row it follows (-1 for the first prompt token)
    token: int
    pos: int       # position id: committed length + depth


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows that enter stage 1 together and leave the last stage together."""
    id: int
    rows: tuple[Row, ...]
    kind: str               # "prefill" | "token" | "layer" | "tree" (timeline labels, metrics)
    verify_from: int = 0    # rows[verify_from:] need the target's next token (LM head)
    committed: int = 0      # rows[:committed] are committed already (prompt, a verified token)


@dataclass(frozen=True, slots=True)
class Step:
    """A micro-batch of a serving pipeline: batches of several requests that enter stage 1
    together and leave the last stage together (`parts`: (request, batch) pairs; each
    batch's rows are its request's, with that request's ids). One request: one part."""
    id: int
    parts: tuple[tuple[int, Batch], ...]

    @property
    def kind(self) -> str:
        """The parts' kind if they agree, else "mixed" (timeline labels)."""
        kinds = {b.kind for _, b in self.parts}
        return kinds.pop() if len(kinds) == 1 else "mixed"


# ---- actions (strategy -> backend) --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Draft:
    """Run the draft model over `rows` (new to it) and propose top-k children of `want`."""
    ticket: int
    rows: tuple[Row, ...]
    want: tuple[int, ...]
    k: int
    committed: int = 0      # rows[:committed] are committed already


@dataclass(frozen=True, slots=True)
class Inject:
    """Send a batch into stage 1."""
    batch: Batch


@dataclass(frozen=True, slots=True)
class Update:
    """Prune notice for every KV holder (stages, draft): `commit` ids joined the committed
    prefix, `kill` ids are dead (their rows leave the KV; arriving rows are dropped)."""
    commit: tuple[int, ...] = ()
    kill: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Commit:
    """Tokens appended to the output. `drafted` of them were in the draft's tree (hits,
    accepted tokens); the rest came from the target alone (misses, bonus tokens)."""
    tokens: tuple[int, ...]
    drafted: int
    outcome: str            # "hit" | "stall" (a hit whose node was not in the next batch)
                            # | "miss" | "accept" (tree-SD) | "token" (plain PP)


@dataclass(frozen=True, slots=True)
class Finish:
    """The request is complete; nothing further will be asked."""


Action = Draft | Inject | Update | Commit | Finish

# ---- events (backend -> strategy) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drafted:
    """Top-k children per wanted row, best first: id -> ((token, logprob), ...)."""
    ticket: int
    proposals: dict[int, tuple[tuple[int, float], ...]] = field(hash=False)


@dataclass(frozen=True, slots=True)
class Verified:
    """Batch `batch` is back at the head: the target's greedy next token after each of
    its surviving verified rows (none if every row died on the way)."""
    batch: int
    tokens: dict[int, int] = field(hash=False)


@dataclass(frozen=True, slots=True)
class EntryFree:
    """Stage 1 has taken every batch injected so far: it can take another."""


Event = Drafted | Verified | EntryFree
