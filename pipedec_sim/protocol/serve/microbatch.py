"""vLLM-style pipeline serving: continuous batching over a fixed set of micro-batches.

vLLM runs a pipeline-parallel deployment with one scheduler per micro-batch ("virtual
engine"): each running request belongs to one of them, and a micro-batch's next step is
composed from its requests once its previous step has come back, so up to `slots` (S by
default) steps fill the pipeline. Here each request keeps its single-request strategy:

* `pp` (plain PP): one token per running request per pass (the AR strategy);
* `tree-sd`: each request's EAGLE-2 tree rides in its micro-batch;
* `chain-sd`: vLLM's draft-model speculation, a chain of gamma draft tokens per request.

A micro-batch's step leaves when every request in it has its batch ready (a speculative
request waits for its draft passes, which the backend batches across requests), holding
at most `max_tokens` rows; what does not fit waits for the micro-batch's next step. New
requests join the micro-batch with the fewest requests. With `chunked_prefill` a prompt
takes only what the step's budget leaves after the running requests' rows, a chunk per
step (vLLM's chunked prefill); without it a prompt goes whole.
"""
from __future__ import annotations

from typing import Callable, Sequence

from pipedec_sim.protocol.messages import Batch, Verified
from pipedec_sim.protocol.serve.server import ServeAction, ServeDispatch, Server
from pipedec_sim.protocol.strategies.base import Strategy


class MicroBatchServer(Server):
    def __init__(self, make: Callable[[int], Strategy], backend: ServeDispatch, *,
                 prune: str, max_running: int, slots: int, max_tokens: int,
                 chunked_prefill: bool = False, name: str = "pp"):
        super().__init__(make, backend, prune=prune, max_running=max_running)
        if slots < 1 or max_tokens < 1:
            raise ValueError("slots and max_tokens must be >= 1")
        self.name = name
        self.slots, self.max_tokens = slots, max_tokens
        self.chunked = chunked_prefill
        self.slot_of: dict[int, int] = {}
        self.members: list[list[int]] = [[] for _ in range(slots)]
        self.pending: dict[int, Batch] = {}     # ready batches, oldest first
        self.rest: dict[int, Batch] = {}        # a prompt's rows after the chunk in flight
        self.busy: dict[int, int] = {}          # slot -> its step in flight
        self.composing = False                  # a returned step's parts are being fed

    def joined(self, r: int) -> None:
        slot = min(range(self.slots), key=lambda s: len(self.members[s]))
        self.slot_of[r] = slot
        self.members[slot].append(r)

    def left(self, r: int) -> None:
        self.members[self.slot_of.pop(r)].remove(r)
        self.pending.pop(r, None)

    def queue(self, r: int, batch: Batch) -> list[ServeAction]:
        self.pending[r] = batch
        return [] if self.composing else self.compose(self.slot_of[r])

    def returned(self, step: int, parts: Sequence[tuple[int, int, dict[int, int]]]
                 ) -> list[ServeAction]:
        slot = next(s for s, st in self.busy.items() if st == step)
        del self.busy[slot]
        out: list[ServeAction] = []
        self.composing = True                    # compose once every part is fed
        for r, batch, tokens in parts:
            rest = self.rest.pop(r, None)
            if rest is not None:                 # a prompt chunk: the next one is ready
                self.pending[r] = rest
                continue
            out += self.feed(r, Verified(batch, tokens))
        self.composing = False
        out += self.compose(slot)
        return out + self._compose_idle(slot)

    def _compose_idle(self, skip: int) -> list[ServeAction]:
        """Admissions during a step's return may have filled other idle micro-batches."""
        out: list[ServeAction] = []
        for slot in range(self.slots):
            if slot != skip:
                out += self.compose(slot)
        return out

    def compose(self, slot: int) -> list[ServeAction]:
        """Send the micro-batch's next step if it is idle and all its requests are ready."""
        members = self.members[slot]
        if slot in self.busy or not members or any(r not in self.pending for r in members):
            return []
        parts: list[tuple[int, Batch]] = []
        rows = 0
        order = [r for r in self.pending if self.slot_of.get(r) == slot]
        if self.chunked:                          # running requests first, prompts last
            order.sort(key=lambda r: self.pending[r].kind == "prefill")
        for r in order:
            batch = self.pending[r]
            room = self.max_tokens - rows
            if self.chunked and batch.kind == "prefill" and 0 < room < len(batch.rows):
                batch, self.rest[r] = chunk(batch, room)
            elif parts and len(batch.rows) > room:
                continue                          # waits for the micro-batch's next step
            del self.pending[r]
            parts.append((r, batch))
            rows += len(batch.rows)
        send = self.send(parts)
        self.busy[slot] = send.step.id
        return [send]


def chunk(batch: Batch, n: int) -> tuple[Batch, Batch]:
    """A prompt batch's first `n` rows (committed, nothing to verify) and the rest."""
    head = Batch(batch.id, batch.rows[:n], batch.kind, verify_from=n, committed=n)
    tail = Batch(batch.id, batch.rows[n:], batch.kind, verify_from=batch.verify_from - n,
                 committed=batch.committed - n)
    return head, tail
