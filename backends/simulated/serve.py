"""Serving on the simulated pipeline: many requests on one SimPy calendar.

The reference engine's actors (`reference.py`: stages, draft, verifier, head, links,
devices, shared cores, prune delivery, cancellation) run steps of a serving scheduler
(`pipedec_sim.protocol.serve`) instead of one request's batches: a step's parts are
batches of several requests, every KV holder (stage, draft, verifier) keeps one
`StageState` per request, and a finished request's are dropped.

What batching costs (the profile's model, `Profile.batch_layer` / `batch_draft`): a
stage's step costs its layers at the step's total rows over no context plus, per
request, what its rows over its own context add (or, `batching` "flat", all rows
over their mean context); one request is exactly the grid. The draft answers every
queued draft request in one pass when several requests have one (a request's in its own
order); a lone request's are answered one pass each, as in a single-request run. A work
item that compacts the KV of several requests pays `kv_compact_ms` once: one batched
gather (the measured figure is mostly per-call overhead: 0.70 ms on the H100 for bytes
that move in ~15 us), not one per request, which would make every step of SpecPipe-DB,
whose hits prune every running request, pay for dozens.

With one request arriving at 0, every serving strategy gives what `Pipeline.run` gives
for its single-request strategy, to the bit (tests/test_serve.py). Serving always runs
this event-by-event engine (the fast engine is single-request only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import simpy

from backends.simulated.link import HEADER_BYTES, TOKEN_BYTES, Inbox
from backends.simulated.reference import RequestSim
from backends.simulated.replay import Holder, RequestRun, run_until_done
from pipedec_sim.protocol.messages import Batch, Commit, Draft, Step, Update
from pipedec_sim.protocol.pacing import cancels, stage_output, verify_rows


@dataclass
class Served:
    """One request of a serving run (times in ms, on the run's clock)."""
    arrival_ms: float
    commits: list[tuple[float, int, int, str]] = field(default_factory=list)
    end_ms: float = float("nan")
    batches: int = 0            # steps that carried a batch of it


@dataclass
class ServeRun:
    requests: dict[int, Served]
    pipeline: RequestRun        # busy time and rows per actor, steps, cancellations
    end_ms: float = 0.0
    parts: int = 0              # batches carried, summed over steps
    forwards: int = 0           # stage computes of steps, summed over stages: below
                                # parts x stages where steps computed requests together


class ServeSim(RequestSim):
    """The serving pipeline: `Dispatch` of a serving scheduler (`ServeDispatch`)."""

    def __init__(self, pipe, server_of: Callable, compute_of: Callable[[int], object],
                 n: int, *, arrivals_ms: Sequence[float] | None = None,
                 concurrency: int | None = None, duration_ms: float | None = None,
                 stage_step: Callable | None = None, draft_step: Callable | None = None):
        """server_of(backend) builds the scheduler; compute_of(r) request r's compute
        (`Replay` or real models). Open loop: `arrivals_ms` per request; closed loop:
        `concurrency` requests outstanding, the next issued when one finishes, none
        after `duration_ms`. stage_step(j, [(compute, batch, rows)]): computes a step's
        parts of several requests at stage j together (real models: one forward); by
        default each part's compute does its own (`compute.stage`). draft_step([(compute,
        Draft, rows)]) -> proposals per item: likewise for a draft pass over several
        requests (default: `compute.draft` each)."""
        if (arrivals_ms is None) == (concurrency is None):
            raise ValueError("give arrivals_ms or concurrency")
        self.pipe, self.profile, self.S, self.layers = pipe, pipe.profile, pipe.S, pipe.layers
        self.A = pipe.topology == "A"
        self.record = pipe.record
        self.env = env = simpy.Environment()
        self.out = RequestRun()
        self.done = env.event()
        self.server = server_of(self)
        self.compute_of, self.n = compute_of, n
        self.stage_step, self.draft_step = stage_step, draft_step
        self.arrivals, self.concurrency, self.duration = arrivals_ms, concurrency, duration_ms
        self._devices()
        self._links()
        S, p = self.S, self.profile
        # a broadcast notice takes one hop from the head (B: stage 1 shares its device)
        self.hop = {j: p.head_link(j, S).latency_ms if (self.A or j > 1) else 0.0
                    for j in range(1, S + 1)}
        self.computes: dict[int, Any] = {}       # running requests' computes
        self.holders: dict[object, dict[int, Holder]] = {
            a: {} for a in [*range(1, S + 1), "draft", "verify"]}
        self.inbox = {j: Inbox(env) for j in range(1, S + 1)}
        self.draft_box = Inbox(env)
        self.verify_box = Inbox(env) if self.A else None
        self.busy: dict[int, dict | None] = {j: None for j in range(1, S + 1)}
        self.head_last: tuple[str, float] = ("", -1.0)
        self.ctrl: dict[int, list] = {}
        self.served: dict[int, Served] = {}
        self.issued = self.ended = 0
        self.parts = self.forwards = 0

    # ---- requests ------------------------------------------------------------------------
    def run(self) -> ServeRun:
        env = self.env
        self.procs = {j: env.process(self._stage(j)) for j in range(1, self.S + 1)}
        env.process(self._draft())
        if self.A:
            env.process(self._verifier())
        times = (self.arrivals if self.arrivals is not None
                 else [0.0] * min(self.concurrency or 0, self.n))
        for t in times:
            self._issue(t)
        end = run_until_done(env, self.done, self.server.name,
                             lambda: f"{self.ended} of {self.issued} requests")
        self.out.end_ms = end
        return ServeRun(dict(sorted(self.served.items())), self.out, end, self.parts,
                        self.forwards)

    def _issue(self, at: float) -> None:
        """The next request arrives at `at` (now or later), if any is left (two closed-loop
        finishes at one instant both ask for the last one)."""
        if self.issued >= self.n:
            return
        r = self.issued
        self.issued += 1
        if at <= self.env.now:
            self._arrive(r)
        else:
            self.env.timeout(at - self.env.now).callbacks.append(lambda _e: self._arrive(r))

    def _arrive(self, r: int) -> None:
        self.served[r] = Served(self.env.now)
        self.computes[r] = self.compute_of(r)
        self._dispatch(self.server.arrive(r))

    def _holder(self, r: int, actor) -> Holder | None:
        """Request r's KV holder at `actor` (None once r has finished)."""
        at = self.holders[actor]
        h = at.get(r)
        if h is None and r in self.computes:
            latency = self.hop[actor] if isinstance(actor, int) else 0.0
            h = at[r] = Holder(actor, self.computes[r], latency)
        return h

    def _catch_up(self, actor, now: float) -> int:
        """Apply the notices that arrived at `actor`'s holders; how many compacted."""
        return sum(h.catch_up(now) for h in self.holders[actor].values())

    # ---- stages --------------------------------------------------------------------------
    def _stage(self, j: int):
        box = self.inbox[j]
        while True:
            step, notices = yield from box.get()
            if step is None:                          # in-band notices, on their own
                yield from self._stage_notices(j, notices)
                continue
            if j == 1:
                self._entry_taken()
            live = yield from self._stage_step(j, step, notices)
            out = Step(step.id, tuple((r, stage_output(b, rows)) for r, b, rows in live))
            self._pass_on(j, out, notices)

    def _stage_notices(self, j: int, notices):
        p = self.profile
        wire_ms = self._wire_ms(len(notices), batch=False)
        if wire_ms > 0.0:
            yield from self._compute(f"wire{j}", self.dev[j], wire_ms, "wire", 0)
        self._queue_notices(j, notices)
        compacted = self._catch_up(j, self.env.now)
        if compacted and p.kv_compact_ms:
            yield from self._compute(f"stage{j}", self.dev[j], p.kv_compact_ms, "prune", 0)
        if j < self.S:
            nbytes = HEADER_BYTES + sum(len(u.commit) + len(u.kill)
                                        for _, u in notices) * TOKEN_BYTES
            self.links[j].send(nbytes, lambda m=(None, notices), b=self.inbox[j + 1]: b.put(m))

    def _queue_notices(self, actor, notices) -> None:
        now = self.env.now
        for r, u in notices:
            h = self._holder(r, actor)
            if h is not None:
                h.notices.append((now, u))

    def _stage_step(self, j: int, step: Step, notices):
        """Stage j's work on one step: the notices that rode with it, then every part's
        live rows in one compute. Returns (request, batch, rows computed) per part."""
        env, p, dev = self.env, self.profile, self.dev[j]
        # the torch runtime sends a step's parts as messages of their own
        wire_ms = self._wire_ms(len(notices)) + (len(step.parts) - 1) * self._wire_ms(0)
        if wire_ms > 0.0:
            yield from self._compute(f"wire{j}", dev, wire_ms, "wire", 0)
        self._queue_notices(j, notices)
        compacted = self._catch_up(j, env.now)
        live, sizes = [], []
        for r, b in step.parts:
            h = self._holder(r, j)
            rows = h.state.admit(b.rows) if h is not None else ()
            live.append((r, b, rows))
            if rows:
                sizes.append((len(rows), h.state.context))    # type: ignore[union-attr]
        if not (sizes or compacted):
            return live
        n = sum(k for k, _ in sizes)
        ms = self._step_ms(j, sizes) if sizes else 0.0
        ms += p.kv_compact_ms if compacted else 0.0
        if j == self.S and not self.A and sizes:
            nv = sum(len(rows[b.verify_from:]) for _, b, rows in live)
            ms += self._lm_head_ms(nv) if nv else 0.0
        self.forwards += 1 if sizes else 0
        self.busy[j] = {r: {x.id for x in rows} for r, _, rows in live if rows}
        done = yield from self._compute(f"stage{j}", dev, ms, step.kind, n, self.layers[j - 1])
        self.busy[j] = None
        if not done:
            self.out.cancelled += 1
            return [(r, b, ()) for r, b, _ in live]  # abandoned: every row died meanwhile
        work = [(self.computes[r], b, rows) for r, b, rows in live
                if rows and r in self.computes]     # not: r finished meanwhile
        if self.stage_step is not None and len(work) > 1:
            self.stage_step(j, work)
        else:
            for compute, b, rows in work:
                compute.stage(j, b, rows)
        return live

    def _step_ms(self, j: int, sizes) -> float:
        """`_stage_ms` for a step: (rows, context) per request (`Profile.batch_layer`)."""
        p = self.profile
        ms = self.layers[j - 1] * (p.batch_layer(sizes) + p.cold_layer_ms) + p.cold_stage_ms
        return ms + p.embed(sum(k for k, _ in sizes)) if j == 1 else ms

    def _pass_on(self, j: int, out: Step, notices) -> None:
        p = self.profile
        rows = sum(len(b.rows) for _, b in out.parts)
        if j < self.S:
            nbytes = (HEADER_BYTES if not rows and not notices
                      else HEADER_BYTES + rows * (p.hidden_bytes(1) + TOKEN_BYTES))
            self.links[j].send(nbytes, lambda m=(out, notices), b=self.inbox[j + 1]: b.put(m))
        elif self.A:
            nv = sum(len(verify_rows(b)) for _, b in out.parts)
            self.back_link.send(HEADER_BYTES + nv * p.hidden_bytes(1),
                                lambda m=out: self.verify_box.put(m))   # type: ignore[union-attr]
        else:
            self.back_link.send(HEADER_BYTES + rows * TOKEN_BYTES, lambda m=out: self._returned(m))

    def _entry_taken(self) -> None:
        hop = self.hop[1] if self.A else 0.0
        if hop > 0.0:
            self.env.timeout(hop).callbacks.append(self._acked)
        else:
            self._acked()

    def _acked(self, _e=None) -> None:
        actions = self.server.entry_taken()
        if actions is not None:
            self._event(actions)

    # ---- verifier and draft --------------------------------------------------------------
    def _verifier(self):
        """Topology A: the LM head on the head's device, over every part's verified rows."""
        while True:
            step = yield from self.verify_box.get()    # type: ignore[union-attr]
            now, parts = self.env.now, []
            for r, b in step.parts:
                h = self._holder(r, "verify")
                rows = ()
                if h is not None:
                    h.catch_up(now)
                    rows = h.state.admit(verify_rows(b))
                parts.append((r, Batch(b.id, tuple(rows), b.kind)))
            n = sum(len(b.rows) for _, b in parts)
            if n:
                yield from self._compute("lm_head", self.head_dev, self._lm_head_ms(n),
                                         step.kind, n)
            self._returned(Step(step.id, tuple(parts)))

    def _returned(self, step: Step) -> None:
        answers = []
        for r, b in step.parts:
            compute = self.computes.get(r)
            tokens = compute.verify(b, verify_rows(b)) if (b.rows and compute) else {}
            answers.append((r, b.id, tokens))
        self._event(self.server.returned(step.id, answers), len(step.parts))

    def _draft(self):
        env, p = self.env, self.profile
        while True:
            first = yield from self.draft_box.get()
            work, sizes, compacted, now = [], [], 0, env.now
            for r, d in [first, *self._more_drafts(first[0])]:
                h = self._holder(r, "draft")
                rows = ()
                if h is not None:
                    compacted += h.catch_up(now)
                    rows = h.state.admit(d.rows)
                    if rows:
                        sizes.append((len(rows), h.state.context))
                work.append((r, d, rows))
            if sizes:
                ms = p.batch_draft(sizes)
                if self.head_last != ("draft", env.now):   # not back to back: cold caches
                    ms += p.cold_draft_ms
                ms += p.kv_compact_ms if compacted else 0.0
                yield from self._compute("draft", self.head_dev, ms, "draft",
                                         sum(k for k, _ in sizes))
            answers = [(r, d.ticket, pr) for (r, d, _), pr in zip(work, self._proposals(work))]
            self._event(self.server.drafted(answers))

    def _proposals(self, work) -> list[dict]:
        """The draft's proposals per (request, Draft, live rows) of a pass: one compute
        over all of them with `draft_step`, else each request's own."""
        out: list[dict] = [{} for _ in work]
        todo = [(k, self.computes[r], d, rows) for k, (r, d, rows) in enumerate(work)
                if rows and r in self.computes]       # not: r finished meanwhile
        if self.draft_step is not None and len(todo) > 1:
            got = self.draft_step([(c, d, rows) for _, c, d, rows in todo])
        else:
            got = [c.draft(d, rows) for _, c, d, rows in todo]
        for (k, *_), proposals in zip(todo, got):
            out[k] = proposals
        return out

    def _more_drafts(self, first: int) -> list[tuple[int, Draft]]:
        """What joins the first queued draft request in one pass: with other requests'
        waiting, every queued one (in order: a request's come in its own order); with
        only the first's request's, none (so one request drafts exactly as in `run`)."""
        items = self.draft_box.items
        if all(r == first for r, _ in items):
            return []
        take = list(items)
        items.clear()
        return take

    # ---- the head ------------------------------------------------------------------------
    def _event(self, actions, messages: int = 1) -> None:
        """The head handled an event whose answer is `actions` (the scheduler's), made of
        `messages` messages (a step comes back as one per part, as the torch runtime
        sends them: the head's CPU per event is paid for each)."""
        if self.done.triggered:
            return
        if self.profile.head_event_ms > 0.0:
            self.env.process(self._head_cpu(actions, messages))
            return
        self._after_head(actions)

    def _head_cpu(self, actions, messages: int = 1):     # type: ignore[override]
        ms = self.profile.head_event_ms * messages
        yield from self._compute("head", self.head_dev, ms, "event", 0)
        self._after_head(actions)

    def _after_head(self, actions) -> None:
        delay = self.profile.head_overhead_ms
        if delay > 0.0 and actions:
            self.env.timeout(delay).callbacks.append(lambda _e: self._dispatch(actions))
        else:
            self._dispatch(actions)

    def _dispatch(self, actions) -> None:
        """As `RequestSim._dispatch`: one control message per stage carries the broadcast
        notices of every request that this dispatch sends."""
        self.server.dispatch(actions)
        self.ctrl = {}

    # ---- ServeDispatch: what the scheduler's actions do ----------------------------------
    def inject(self, step: Step, notices) -> None:       # type: ignore[override]
        self.ctrl = {}          # the torch head sends held broadcasts ahead of a step
        for r, b in step.parts:
            self.computes[r].observe(b.rows)
            self.served[r].batches += 1
        self.out.batches += 1
        self.parts += len(step.parts)
        rows = sum(len(b.rows) for _, b in step.parts)
        self._into_stage1((step, list(notices)), rows * 4 * TOKEN_BYTES)

    def inband(self, r: int, update: Update) -> None:    # type: ignore[override]
        self._into_stage1((None, [(r, update)]),
                          (len(update.commit) + len(update.kill)) * TOKEN_BYTES)

    def draft(self, r: int, request: Draft) -> None:     # type: ignore[override]
        self.computes[r].observe(request.rows)
        self.draft_box.put((r, request))

    def prune(self, r: int, update: Update) -> None:     # type: ignore[override]
        now = self.env.now
        for actor in ("draft", "verify") if self.A else ("draft",):
            h = self._holder(r, actor)
            if h is not None:
                h.notices.append((now, update))

    def broadcast(self, r: int, update: Update) -> None:  # type: ignore[override]
        for j in range(1, self.S + 1):
            self._notice_to(j, (r, update), self.hop[j])

    def _land(self, j: int, item, at: float) -> None:    # type: ignore[override]
        r, update = item
        self._arrive_notice(j, r, update, at)

    def _arrive_notice(self, j: int, r: int, update: Update, at: float) -> None:
        h = self._holder(r, j)
        if h is None:
            return
        h.notices.append((at, update))
        if self.pipe.cancel and update.kill:
            self._maybe_cancel_part(j, r, update, at)

    def _maybe_cancel_part(self, j: int, r: int, update: Update, at: float) -> None:
        """If the notice kills every row of r that stage j is computing, r's part dies on
        arrival; once every part has died the stage abandons the step."""
        busy = self.busy[j]
        if not busy or not cancels(busy.get(r) or set(), update):
            return

        def arrive(_e=None):
            if self.busy[j] is busy and r in busy:
                del busy[r]
                if not busy:
                    self.busy[j] = None
                    self.procs[j].interrupt("pruned")
        if at <= self.env.now:
            arrive()
        else:
            self.env.timeout(at - self.env.now).callbacks.append(arrive)

    def commit(self, r: int, commit: Commit) -> None:    # type: ignore[override]
        now = self.env.now
        self.served[r].commits.append((now, len(commit.tokens), commit.drafted,
                                       commit.outcome))
        self.out.committed(now, commit, self.record)

    def finish(self, r: int) -> None:                    # type: ignore[override]
        """Request r is complete: its KV goes; a closed loop issues the next request."""
        self.served[r].end_ms = self.env.now
        self.ended += 1
        del self.computes[r]
        for at in self.holders.values():
            at.pop(r, None)
        more = self.issued < self.n and (self.duration is None or self.env.now < self.duration)
        if self.concurrency is not None and more:
            self.env.timeout(0.0).callbacks.append(lambda _e: self._issue(self.env.now))
        elif self.ended == self.issued and (self.arrivals is not None or not more):
            if not self.done.triggered:
                self.done.succeed()
