"""The head: one request's strategy behind the shared pacer, the draft, the verifier, the clock.

The head only *executes* actions and feeds events back (as the SimPy backend does): the
strategy decides, `pipedec_sim.protocol.pacing.Pacer` applies the pipeline rules every
driver shares (EntryFree gate, prune delivery) and turns actions into calls of the
`Dispatch` protocol, which the head implements. What concerns the head's own KV holders
(draft, verifier), commits and the end it does itself; where batches and notices go is the
transport's business (`runtime.py`, across processes), which gives the head three calls:
`inject(batch, notices)`, `broadcast(updates)`, `inband(update)`. The broadcast notices of
one event (one strategy call's actions) leave together as one message per stage, ahead of
the next batch it injects (as if each had left at once) or after its dispatch. (The
inline driver needs no head: it is the simulator's pipeline with real models,
`inline.py`.)
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from backends.torch.eventlog import Recorder
from pipedec_sim.protocol.messages import Batch, Commit, Draft, Update
from pipedec_sim.protocol.pacing import DEFAULT_PRUNE, Pacer, check_prune
from pipedec_sim.protocol.strategies import make_strategy


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    max_new_tokens: int


@dataclass
class RunRecord:
    """What one request did under one strategy, in wall-clock ms from its start."""
    strategy: str
    request: Request
    output: list[int] = field(default_factory=list)
    commits: list[tuple[float, int, int, str]] = field(default_factory=list)
    end_ms: float = 0.0
    busy_ms: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    cancelled: int = 0       # batches a stage abandoned mid-compute (broadcast + cancel)
    # (actor, start ms, duration ms, label, rows): the head's own work and, from the
    # stages' reports, every batch and prune they computed (one host's monotonic clock)
    slices: list[tuple[str, float, float, str, int]] = field(default_factory=list)


@dataclass
class Flight:
    """One request in the pipeline: everything that lives from its start to its end."""
    seq: int                    # the request's sequence number (wire slot REQ)
    pacer: Pacer                # its strategy behind the pacing rules
    record: RunRecord
    t0: float                   # perf_counter() at its start
    drafts: deque = field(default_factory=deque)     # Draft actions not yet run
    kinds: dict[int, str] = field(default_factory=dict)   # batch id -> kind (slice labels)
    outgoing: list[Update] = field(default_factory=list)  # this dispatch's broadcasts


class Head:
    def __init__(self, draft_model, verifier, transport, *, prune: str = DEFAULT_PRUNE,
                 recorder: Recorder | None = None, eos: int | None = None,
                 knobs: dict | None = None):
        self.draft_model, self.verifier = draft_model, verifier
        self.holders = [h for h in (draft_model, verifier) if h is not None]
        self.transport = transport
        self.prune_mode = check_prune(prune)
        self.recorder = recorder or Recorder()
        self.eos, self.knobs = eos, dict(knobs or {})
        self.flight: Flight | None = None

    # ---- a request -----------------------------------------------------------------
    def begin(self, name: str, req: Request, seq: int = 0) -> Flight:
        strategy = make_strategy(name, req.prompt_ids, req.max_new_tokens, eos=self.eos,
                                 **self.knobs)
        for holder in self.holders:
            holder.reset()
        self.recorder.request(strategy=name, id=req.id, prompt_ids=list(req.prompt_ids),
                              max_new_tokens=req.max_new_tokens, eos=self.eos, knobs=self.knobs)
        pacer = Pacer(strategy, self, prune=self.prune_mode, recorder=self.recorder)
        f = self.flight = Flight(seq, pacer, RunRecord(name, req), time.perf_counter())
        self._dispatch(pacer.start())          # the pacer records what it is told and says
        return f

    @property
    def done(self) -> bool:
        return self.flight.pacer.done

    @property
    def t0(self) -> float:
        return self.flight.t0

    def now_ms(self) -> float:
        return (time.perf_counter() - self.flight.t0) * 1e3

    def busy(self, actor: str, since: float, rows: int, label: str = "") -> None:
        """`actor` computed `rows` from perf_counter() `since` until now."""
        r = self.flight.record
        ms = (time.perf_counter() - since) * 1e3
        r.busy_ms[actor] = r.busy_ms.get(actor, 0.0) + ms
        r.rows[actor] = r.rows.get(actor, 0) + rows
        r.slices.append((actor, (since - self.flight.t0) * 1e3, ms, label or actor, rows))

    def result(self) -> RunRecord:
        """The request's record, once it is done."""
        r = self.flight.record
        r.output = list(self.flight.pacer.strategy.output)
        if not r.end_ms:
            r.end_ms = self.now_ms()
        return r

    # ---- facts in: events to the strategy --------------------------------------------
    def feed(self, event) -> None:
        self._dispatch(self.flight.pacer.feed(event))   # nothing once the request is done

    def _dispatch(self, actions) -> None:
        """Execute one event's actions; its broadcast notices go as one message."""
        self.flight.pacer.dispatch(actions)
        self._broadcast_held()

    def _broadcast_held(self) -> None:
        f = self.flight
        if f.outgoing:
            updates, f.outgoing = tuple(f.outgoing), []
            self.transport.broadcast(updates)

    def entry_taken(self) -> None:
        """Stage 1 took a batch (its ack)."""
        event = self.flight.pacer.entry_taken()
        if event is not None:
            self.feed(event)

    def draft_step(self) -> bool:
        """Run one queued draft request; False if there was none."""
        f = self.flight
        if not f.drafts or f.pacer.done:
            return False
        d = f.drafts.popleft()
        t = time.perf_counter()
        props = self.draft_model.propose(d.rows, d.want, d.k, d.committed)
        self.busy("draft", t, len(d.rows))
        self.feed(f.pacer.drafted(d.ticket, props))
        return True

    def verify(self, batch_id: int, rows, verify_from: int, hidden) -> None:
        """Topology A: the LM head on the head (a batch may come back with no rows)."""
        tokens = {}
        if rows[verify_from:]:
            t = time.perf_counter()
            tokens = self.verifier.verify(rows, verify_from, hidden)
            self.busy("lm_head", t, len(tokens))
        self.verified(batch_id, tokens)

    def verified(self, batch_id: int, tokens: dict[int, int]) -> None:
        """Tokens for a batch back at the head (none if every row died)."""
        self.feed(self.flight.pacer.verified(batch_id, tokens))

    # ---- actions out: the pacer's Dispatch protocol ------------------------------------
    def inject(self, batch: Batch, notices: tuple[Update, ...]) -> None:
        f = self.flight
        f.record.batches += 1
        f.kinds[batch.id] = batch.kind
        self._broadcast_held()                 # the notices before it leave before it
        self.transport.inject(batch, notices)

    def draft(self, request: Draft) -> None:
        self.flight.drafts.append(request)     # run by draft_step, between transport polls

    def prune(self, update: Update) -> None:
        for holder in self.holders:
            holder.apply(update)

    def broadcast(self, update: Update) -> None:
        self.flight.outgoing.append(update)    # sent by `_broadcast_held`

    def inband(self, update: Update) -> None:
        self.transport.inband(update)

    def commit(self, commit: Commit) -> None:
        self.flight.record.commits.append((self.now_ms(), len(commit.tokens), commit.drafted,
                                           commit.outcome))

    def finish(self) -> None:
        self.flight.record.end_ms = self.now_ms()
