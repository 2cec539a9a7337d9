"""Pacing: the pipeline rules around a strategy that every driver shares.

A strategy decides *what* to do; these rules say *when* its events are due and how its
actions reach the pipeline, the same way in the SimPy backend, the torch distributed
runtime and the torch inline driver:

* **EntryFree gate.** Stage 1 reports each batch it takes (`Pacer.entry_taken`); once it
  has taken every batch injected so far, the strategy gets one `EntryFree` (at most one
  per injection). This paces PipeDec to one layer per pipeline step without a clock.
* **Window.** PipeDec keeps at most `window` batches in flight; the default is S + 1
  (`window_for`), so a stage slower than stage 1 cannot queue layers without bound.
* **Empty batches.** A batch whose rows all died still travels on, header only, so that
  the head learns it left the pipeline (`stage_output`); strategies count batches back.
* **Prune delivery** (`PRUNE_MODES`). The head's own KV holders (the draft, a verifier on
  the head) apply each notice at once. The stages get it
    - `broadcast`: straight from the head, one hop to each stage;
    - `inband`: into stage 1's stream at once, behind the batches already sent; each stage
      applies it in arrival order and passes it on;
    - `piggyback`: held at the head and sent in stage 1's stream just ahead of the next
      injected batch (the pacer holds it; `Dispatch.inject` gets the held notices).
  With `cancel`, a stage that is computing a batch whose rows have all died abandons it
  at the next layer boundary. Only a broadcast notice can overtake the batch a stage is
  computing, so cancellation applies to `broadcast` only.
* **Dispatch.** `Pacer.dispatch` is the one place actions turn into backend calls.

The pacer does no I/O and keeps no clock: backends report facts (`entry_taken`,
`verified`, `drafted`) and execute what comes back.
"""
from __future__ import annotations

from typing import Protocol, Sequence

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
    Update,
    Verified,
)

PRUNE_MODES = ("broadcast", "inband", "piggyback")
# The paper's step has "pruning propagation" as its own phase, between the nodes'
# computation and their communication: every node learns the verdict in that phase rather
# than when the next batch reaches it. That is a notice sent to every node at once.
DEFAULT_PRUNE = "broadcast"
DEFAULT_CANCEL = True


def window_for(stages: int, window: int | None = None) -> int:
    """PipeDec's in-flight limit: `window` if given, else S + 1 (one batch per stage plus
    the one that is entering)."""
    return window if window is not None else stages + 1


def check_prune(mode: str) -> str:
    if mode not in PRUNE_MODES:
        raise ValueError(f"prune must be one of {', '.join(PRUNE_MODES)}, got {mode!r}")
    return mode


def stage_output(batch: Batch, rows: Sequence[Row]) -> Batch:
    """What a stage passes on after computing the surviving `rows` of `batch`: the batch
    with those rows, or, if none survived, an empty batch (header only) that still tells
    the head the batch left the pipeline. Only speculative rows die and they sit after
    verify_from, so the survivors keep the batch's indices."""
    if not rows:
        return Batch(batch.id, (), batch.kind)
    return Batch(batch.id, tuple(rows), batch.kind, batch.verify_from, batch.committed)


def verify_rows(batch: Batch) -> tuple[Row, ...]:
    """The rows whose next token the target must give (the LM head's input)."""
    return batch.rows[batch.verify_from:]


def cancels(running: set[int] | frozenset[int], update: Update) -> bool:
    """A stage computing rows `running` abandons them once `update` kills them all."""
    return bool(running) and running <= set(update.kill)


class Dispatch(Protocol):
    """What a backend executes for the pacer. A notice reaches the head's own KV holders
    through `prune` at once, and the stages through `broadcast`, `inband`, or ahead of the
    next batch in `inject` (piggyback), as the prune mode says."""

    def inject(self, batch: Batch, notices: tuple[Update, ...]) -> None:
        """Send `notices` (piggyback), then `batch`, into stage 1's stream."""

    def draft(self, request: Draft) -> None: ...

    def prune(self, update: Update) -> None:
        """The head's own KV holders (draft; verifier in topology A) apply it now."""

    def broadcast(self, update: Update) -> None:
        """Send it straight to every stage."""

    def inband(self, update: Update) -> None:
        """Send it into stage 1's stream now, behind the batches already sent."""

    def commit(self, commit: Commit) -> None: ...

    def finish(self) -> None: ...


class Pacer:
    """One request's strategy behind the shared pacing rules.

    `feed(event)` returns the strategy's actions; the backend executes them with
    `dispatch(actions)` when they leave the head (the simulator may delay them by the
    head's CPU time). Injections are counted when dispatched, since stage 1 can only
    take what was sent.
    """

    def __init__(self, strategy, backend: Dispatch, *, prune: str = DEFAULT_PRUNE,
                 recorder=None):
        """recorder: optional, told `start(actions)` and `step(event, actions)` (the
        torch backend's `--record-events`)."""
        self.strategy = strategy
        self.backend = backend
        self.prune = check_prune(prune)
        self.recorder = recorder
        self.injected = 0           # batches dispatched into stage 1
        self.taken = 0              # batches stage 1 has reported taking
        self.free_fed = True        # EntryFree given since the last injection
        self.held: list[Update] = []    # piggyback notices waiting for the next batch

    @property
    def done(self) -> bool:
        return self.strategy.done

    def start(self) -> list[Action]:
        actions = self.strategy.start()
        if self.recorder is not None:
            self.recorder.start(actions)
        return actions

    def feed(self, event: Event) -> list[Action]:
        """The strategy's answer to one event (nothing once the request is done)."""
        if self.strategy.done:
            return []
        actions = self.strategy.on(event)
        if self.recorder is not None:
            self.recorder.step(event, actions)
        return actions

    # ---- facts a backend reports ---------------------------------------------------
    def entry_taken(self) -> EntryFree | None:
        """Stage 1 took a batch. Returns the EntryFree event now due, if any: the
        backend feeds it (through its own path, e.g. after the ack's hop)."""
        self.taken += 1
        if not self.free_fed and self.taken == self.injected:
            self.free_fed = True
            return EntryFree()
        return None

    def verified(self, batch_id: int, tokens: dict[int, int]) -> Verified:
        return Verified(batch_id, tokens)

    def drafted(self, ticket: int, proposals: dict) -> Drafted:
        return Drafted(ticket, proposals)

    # ---- actions out ---------------------------------------------------------------
    def dispatch(self, actions: Sequence[Action]) -> None:
        b = self.backend
        for a in actions:
            if isinstance(a, Inject):
                self.injected += 1
                self.free_fed = False
                held, self.held = tuple(self.held), []
                b.inject(a.batch, held)
            elif isinstance(a, Draft):
                b.draft(a)
            elif isinstance(a, Update):
                b.prune(a)
                if self.prune == "broadcast":
                    b.broadcast(a)
                elif self.prune == "inband":
                    b.inband(a)
                else:
                    self.held.append(a)
            elif isinstance(a, Commit):
                b.commit(a)
            elif isinstance(a, Finish):
                b.finish()
