"""The head: the shared strategy object, the draft, the verifier, and the clock.

The head only *executes* actions and feeds events back (as the SimPy backend does);
every decision is the strategy's. Where batches go and when results come back is the
transport's business (`inline.py` in one process, `runtime.py` across processes), which
hands the head two callbacks: `inject(batch)` and `notify(update)`.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from backends.torch.eventlog import Recorder
from pipedec_sim.protocol.messages import (
    Commit,
    Draft,
    Drafted,
    Finish,
    Inject,
    Update,
    Verified,
)
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
    # (actor, start ms, duration ms, label, rows): the head's own work and, from the
    # stages' reports, every batch and prune they computed (one host's monotonic clock)
    slices: list[tuple[str, float, float, str, int]] = field(default_factory=list)


class Head:
    def __init__(self, draft, verifier, *, inject, notify, recorder: Recorder | None = None,
                 eos: int | None = None, knobs: dict | None = None):
        self.draft, self.verifier = draft, verifier
        self._inject, self._notify = inject, notify
        self.recorder = recorder or Recorder()
        self.eos, self.knobs = eos, dict(knobs or {})
        self.drafts: deque[Draft] = deque()
        self.strategy = None

    # ---- a request -----------------------------------------------------------------
    def begin(self, name: str, req: Request) -> None:
        self.strategy = make_strategy(name, req.prompt_ids, req.max_new_tokens, eos=self.eos,
                                      **self.knobs)
        self.run = RunRecord(name, req)
        self.drafts.clear()
        for holder in (self.draft, self.verifier):
            if holder is not None:
                holder.reset()
        self.recorder.request(strategy=name, id=req.id, prompt_ids=list(req.prompt_ids),
                              max_new_tokens=req.max_new_tokens, eos=self.eos, knobs=self.knobs)
        self.t0 = time.perf_counter()
        actions = self.strategy.start()
        self.recorder.start(actions)
        self.dispatch(actions)

    @property
    def done(self) -> bool:
        return self.strategy.done

    def now_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3

    def busy(self, actor: str, since: float, rows: int, label: str = "") -> None:
        """`actor` computed `rows` from perf_counter() `since` until now."""
        r = self.run
        ms = (time.perf_counter() - since) * 1e3
        r.busy_ms[actor] = r.busy_ms.get(actor, 0.0) + ms
        r.rows[actor] = r.rows.get(actor, 0) + rows
        r.slices.append((actor, (since - self.t0) * 1e3, ms, label or actor, rows))

    def finish(self) -> RunRecord:
        self.run.output = list(self.strategy.output)
        if not self.run.end_ms:
            self.run.end_ms = self.now_ms()
        return self.run

    # ---- events in, actions out ----------------------------------------------------
    def feed(self, event) -> None:
        if self.strategy.done:
            return
        actions = self.strategy.on(event)
        self.recorder.step(event, actions)
        self.dispatch(actions)

    def dispatch(self, actions) -> None:
        for a in actions:
            if isinstance(a, Inject):
                self.run.batches += 1
                self._inject(a.batch)
            elif isinstance(a, Draft):
                self.drafts.append(a)
            elif isinstance(a, Update):
                for holder in (self.draft, self.verifier):
                    if holder is not None:
                        holder.apply(a)
                self._notify(a)
            elif isinstance(a, Commit):
                self.run.commits.append((self.now_ms(), len(a.tokens), a.drafted, a.outcome))
            elif isinstance(a, Finish):
                self.run.end_ms = self.now_ms()

    def draft_step(self) -> bool:
        """Run one queued draft request; False if there was none."""
        if not self.drafts or self.strategy.done:
            return False
        d = self.drafts.popleft()
        t = time.perf_counter()
        props = self.draft.propose(d.rows, d.want, d.k, d.committed)
        self.busy("draft", t, len(d.rows))
        self.feed(Drafted(d.ticket, props))
        return True

    def verify(self, batch_id: int, rows, verify_from: int, hidden) -> None:
        """Topology A: the LM head on the head (a batch may come back with no rows)."""
        tokens = {}
        if rows[verify_from:]:
            t = time.perf_counter()
            tokens = self.verifier.verify(rows, verify_from, hidden)
            self.busy("lm_head", t, len(tokens))
        self.feed(Verified(batch_id, tokens))

    def verified(self, batch_id: int, tokens: dict[int, int]) -> None:
        """Topology B: tokens computed on the last stage (none if every row died)."""
        self.feed(Verified(batch_id, tokens))
