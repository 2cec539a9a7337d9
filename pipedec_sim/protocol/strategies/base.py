"""The shared skeleton of every decoding strategy: ids, prompt rows, commits, stopping.

A strategy is a sans-IO state machine: `start()` and `on(event)` return actions; no
clock, no I/O, no torch. The simulated and the torch backend drive the very same objects.
"""
from __future__ import annotations

from typing import Sequence

from pipedec_sim.protocol.messages import (
    Action,
    Batch,
    Commit,
    Draft,
    Drafted,
    EntryFree,
    Event,
    Finish,
    Inject,
    Row,
    Verified,
)
from pipedec_sim.protocol.tree import Node


class Strategy:
    name = "base"

    def __init__(self, prompt: Sequence[int], max_new_tokens: int, *, eos: int | None = None):
        if not prompt:
            raise ValueError("empty prompt")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        self.prompt = list(prompt)
        self.max_new = max_new_tokens
        self.eos = eos
        self.output: list[int] = []
        self.done = False
        self._ids = len(self.prompt)      # prompt rows take ids 0..P-1
        self._batches = 0
        self._tickets = 0

    # ---- driving -----------------------------------------------------------------
    def start(self) -> list[Action]:
        raise NotImplementedError

    def on(self, event: Event) -> list[Action]:
        if self.done:
            return []
        if isinstance(event, Verified):
            return self.on_verified(event)
        if isinstance(event, Drafted):
            return self.on_drafted(event)
        if isinstance(event, EntryFree):
            return self.on_entry_free()
        raise TypeError(f"unknown event {event!r}")

    def on_verified(self, event: Verified) -> list[Action]:
        return []

    def on_drafted(self, event: Drafted) -> list[Action]:
        return []

    def on_entry_free(self) -> list[Action]:
        return []

    # ---- helpers -----------------------------------------------------------------
    def new_id(self) -> int:
        self._ids += 1
        return self._ids - 1

    def prompt_rows(self) -> tuple[Row, ...]:
        return tuple(Row(i, i - 1, t, i) for i, t in enumerate(self.prompt))

    def prompt_root(self) -> Node:
        """The last prompt token as a tree root, linked to the prompt row before it so
        that its row carries the right parent (the prompt is processed everywhere)."""
        p = len(self.prompt) - 1
        parent = None
        if p > 0:
            parent = Node(p - 1, None, self.prompt[p - 1], p - 1)
            parent.drafted = True
        return Node(p, parent, self.prompt[p], p)

    def inject(self, rows, kind: str, *, verify_from: int = 0, committed: int = 0) -> Inject:
        self._batches += 1
        return Inject(Batch(self._batches - 1, tuple(rows), kind, verify_from, committed))

    def draft(self, rows, want, k: int, *, committed: int = 0) -> Draft:
        self._tickets += 1
        return Draft(self._tickets - 1, tuple(rows), tuple(want), k, committed)

    @property
    def last_pos(self) -> int:
        """Position of the last output token the request needs."""
        return len(self.prompt) + self.max_new - 1

    def commit(self, tokens: Sequence[int], drafted: int, outcome: str) -> list[Action]:
        """Append tokens, stopping at max_new_tokens or EOS (inclusive)."""
        room = self.max_new - len(self.output)
        kept = list(tokens[:room])
        if self.eos is not None and self.eos in kept:
            kept = kept[: kept.index(self.eos) + 1]
        self.output.extend(kept)
        actions: list[Action] = [Commit(tuple(kept), min(drafted, len(kept)), outcome)]
        if len(self.output) >= self.max_new or (kept and kept[-1] == self.eos):
            self.done = True
            actions.append(Finish())
        return actions


def row(node: Node) -> Row:
    return Row(node.id, node.parent.id if node.parent is not None else -1, node.token, node.pos)


def undrafted_path(node: Node) -> list[Node]:
    """`node` and its ancestors the draft has not processed yet, oldest first."""
    out: list[Node] = []
    cur: Node | None = node
    while cur is not None and not cur.drafted:
        out.append(cur)
        cur = cur.parent
    out.reverse()
    return out
