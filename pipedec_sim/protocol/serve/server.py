"""The serving scheduler's common part: admission, one strategy per request, routing.

A serving scheduler runs many requests through one pipeline. Each running request keeps
its own single-request strategy (the sans-IO state machines of `protocol/strategies/`,
unchanged); the scheduler decides what enters stage 1: a `Step`, whose parts are batches
of several requests. The backend reports facts (`arrive`, `entry_taken`, `returned`,
`drafted`) and executes the actions that come back with `dispatch`, as with the
single-request `Pacer`, whose rules this follows (EntryFree once stage 1 has taken every
step sent, prune delivery as the prune mode says, piggyback notices ahead of the next
step). Subclasses say how steps are composed: `microbatch.py` (vLLM-style micro-batches:
pp, tree-sd, chain-sd) and `layers.py` (SpecPipe-DB: one mixed tree layer per step).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from pipedec_sim.protocol.messages import (
    Action,
    Batch,
    Commit,
    Draft,
    Drafted,
    Event,
    Finish,
    Inject,
    Step,
    Update,
    Verified,
)
from pipedec_sim.protocol.pacing import check_prune
from pipedec_sim.protocol.strategies.base import Strategy


@dataclass(frozen=True, slots=True)
class Send:
    """Inject a step into stage 1 (the serving scheduler's own action)."""
    step: Step


ServeAction = Send | tuple[int, Action]      # a step, or one request's action


class ServeDispatch(Protocol):
    """What a backend executes for the serving scheduler: `Dispatch` of `pacing.py`, with
    the request each action belongs to."""

    def inject(self, step: Step, notices: tuple[tuple[int, Update], ...]) -> None:
        """Send `notices` (piggyback), then `step`, into stage 1's stream."""

    def draft(self, request: int, draft: Draft) -> None: ...

    def prune(self, request: int, update: Update) -> None:
        """The head's own KV holders of `request` apply it now."""

    def broadcast(self, request: int, update: Update) -> None: ...

    def inband(self, request: int, update: Update) -> None: ...

    def commit(self, request: int, commit: Commit) -> None: ...

    def finish(self, request: int) -> None: ...


class Server:
    """Admission and routing; subclasses compose the steps (`queue`, `compose`)."""

    name = "server"

    def __init__(self, make: Callable[[int], Strategy], backend: ServeDispatch, *,
                 prune: str, max_running: int):
        """make(r): request r's strategy, built when it is admitted."""
        if max_running < 1:
            raise ValueError("max_running must be >= 1")
        self.make, self.backend = make, backend
        self.prune = check_prune(prune)
        self.max_running = max_running
        self.running: dict[int, Strategy] = {}      # admission order
        self.waiting: deque[int] = deque()
        self.finished = 0
        self.held: list[tuple[int, Update]] = []    # piggyback notices
        self.steps = 0
        self.injected = self.taken = 0               # steps sent, steps stage 1 took
        self.free_fed = True

    # ---- facts a backend reports -----------------------------------------------------
    def arrive(self, r: int) -> list[ServeAction]:
        """Request r arrived: it runs at once if there is room, else it waits."""
        self.waiting.append(r)
        return self._admit()

    def entry_taken(self) -> list[ServeAction] | None:
        """Stage 1 took a step. Once it has taken every step sent, the scheduler may send
        the next (`Pacer.entry_taken`'s rule, at most once per step sent): the actions of
        that EntryFree event, which the backend handles as an event (its head's CPU);
        None when no event is due."""
        self.taken += 1
        if not self.free_fed and self.taken == self.injected:
            self.free_fed = True
            return self.entry_free()
        return None

    def returned(self, step: int, parts: Sequence[tuple[int, int, dict[int, int]]]
                 ) -> list[ServeAction]:
        """Step `step` is back: (request, batch id, the target's tokens) per part."""
        out: list[ServeAction] = []
        for r, batch, tokens in parts:
            out += self.feed(r, Verified(batch, tokens))
        return out

    def drafted(self, answers: Sequence[tuple[int, int, dict]]) -> list[ServeAction]:
        """One draft pass answered (request, ticket, proposals) for several requests."""
        out: list[ServeAction] = []
        for r, ticket, proposals in answers:
            out += self.feed(r, Drafted(ticket, proposals))
        return out

    # ---- what subclasses decide ------------------------------------------------------
    def entry_free(self) -> list[ServeAction]:
        return []

    def queue(self, r: int, batch: Batch) -> list[ServeAction]:
        """Request r's strategy wants `batch` injected."""
        raise NotImplementedError

    def joined(self, r: int) -> None:
        """Request r was admitted (before its strategy starts)."""

    def left(self, r: int) -> None:
        """Request r finished."""

    # ---- routing ---------------------------------------------------------------------
    def feed(self, r: int, event: Event) -> list[ServeAction]:
        s = self.running.get(r)
        if s is None or s.done:              # finished: its late answers change nothing
            return []
        return self._route(r, s.on(event))

    def _admit(self) -> list[ServeAction]:
        out: list[ServeAction] = []
        while self.waiting and len(self.running) < self.max_running:
            r = self.waiting.popleft()
            s = self.running[r] = self.make(r)
            self.joined(r)
            out += self._route(r, s.start())
        return out

    def _route(self, r: int, actions: Sequence[Action]) -> list[ServeAction]:
        out: list[ServeAction] = []
        for a in actions:
            if isinstance(a, Inject):
                out += self.queue(r, a.batch)
            elif isinstance(a, Finish):
                out.append((r, a))
                del self.running[r]
                self.finished += 1
                self.left(r)
                out += self._admit()
            else:
                out.append((r, a))
        return out

    def send(self, parts: list[tuple[int, Batch]]) -> Send:
        """A new step of `parts`."""
        self.steps += 1
        return Send(Step(self.steps - 1, tuple(parts)))

    # ---- actions out -----------------------------------------------------------------
    def dispatch(self, actions: Sequence[ServeAction]) -> None:
        """Execute actions when they leave the head (`Pacer.dispatch`'s rules)."""
        b = self.backend
        for a in actions:
            if isinstance(a, Send):
                self.injected += 1
                self.free_fed = False
                held, self.held = tuple(self.held), []
                b.inject(a.step, held)
                continue
            r, act = a
            if isinstance(act, Draft):
                b.draft(r, act)
            elif isinstance(act, Update):
                b.prune(r, act)
                if self.prune == "broadcast":
                    b.broadcast(r, act)
                elif self.prune == "inband":
                    b.inband(r, act)
                else:
                    self.held.append((r, act))
            elif isinstance(act, Commit):
                b.commit(r, act)
            elif isinstance(act, Finish):
                b.finish(r)
