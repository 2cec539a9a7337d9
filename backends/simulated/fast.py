"""The fast engine: the reference engine's model and event order, driven by callbacks.

`reference.py` defines the model: one SimPy process per actor, one `StageState` per KV
holder, a `simpy.Resource` for the head's device. This engine runs the same actors on a
SimPy calendar and processes their work in exactly the reference's order, so that ties at
one instant resolve the same way and the results are identical, but does far less per
step:

* **Callbacks, not processes.** A stage is a FIFO of stream items plus the job it is
  computing; a job is one timed event.
* **Light events.** Timed work is a `Tick`, an event born triggered with one callback
  (`fn(arg)`, no closure), scheduled with `env.schedule` and processed by `env.run`:
  SimPy's heap and its (time, priority, insertion) order, without a `Timeout`, a
  generator switch or a callback list per event.
* **Work due "now" in a FIFO of its own.** Everything the reference schedules with no
  delay (an inbox waiter's wake-up, a resource grant or release, a zero-length compute)
  is a SimPy event it processes after the events already due at this instant, in the
  order they were made. Here such work goes to `now_q`, drained in that order once no
  SimPy event is due at this instant (a drain event is scheduled behind the ones that
  are), instead of an event and a process switch each.
* **One KV ledger for every stage** (`ledger.StageLedger`) instead of S StageStates.
* **Memoised duration lookups.**

It covers profiles whose devices are exclusive (`fast_model`); with shared CPU cores,
processor sharing couples every running job at every instant and per-message CPU costs
add processes on those cores, so those profiles run on the reference engine.
"""
from __future__ import annotations

import math
from collections import deque

import simpy
from simpy.events import NORMAL, URGENT

from backends.simulated.ledger import StageLedger
from backends.simulated.link import HEADER_BYTES, TOKEN_BYTES, Hop, ring_hop
from backends.simulated.replay import Holder, Replay, RequestRun, run_until_done
from pipedec_sim.protocol.messages import Batch, Commit, Draft, Update
from pipedec_sim.protocol.pacing import Pacer, stage_output, verify_rows


def fast_model(profile, compute) -> bool:
    """Whether the fast engine runs this request: trace replay (the stages' KV is only
    bookkeeping) on a profile without shared cores or per-message CPU costs."""
    p = profile
    return (isinstance(compute, Replay) and not p.shared_cores and not p.head_event_ms
            and not p.stage_message_ms and not p.stage_notice_ms)


class Tick(simpy.Event):
    """A call `fn(arg)` on the SimPy calendar: an event already triggered (a Timeout
    without its checks) whose one callback is the engine's `_tick`. `callbacks` is the
    engine's one list for all its ticks (SimPy's step only reads it)."""
    _ok, _value = True, None

    def __init__(self, callbacks: list, fn, arg):
        self.callbacks, self.fn, self.arg = callbacks, fn, arg


class Job:
    """One compute of `ms` on `device` (None: the actor's own); then `then(job, done)`."""
    __slots__ = ("actor", "device", "ms", "label", "n", "layers", "then", "start",
                 "stopped", "stage", "batch", "rows", "notices")

    def __init__(self, actor, device, ms, label, n, layers, then, stage=None, batch=None,
                 rows=(), notices=()):
        self.actor, self.device, self.ms, self.label = actor, device, ms, label
        self.n, self.layers, self.then = n, layers, then
        self.stage, self.batch, self.rows, self.notices = stage, batch, rows, notices
        self.start = None
        self.stopped = False        # interrupted: the first timer no longer counts


class Device:
    """The head's device: simpy.Resource(1)'s rules (FIFO grants; a release lets the next
    waiter in when its release event is processed, or at once when a new request comes)
    with its events on the engine's now_q."""
    __slots__ = ("sim", "user", "waiters")

    def __init__(self, sim):
        self.sim, self.user, self.waiters = sim, None, deque()

    def request(self, job: Job) -> None:
        self.waiters.append(job)
        self._grant()

    def _grant(self, _=None) -> None:
        if self.user is None and self.waiters:
            self.user = job = self.waiters.popleft()
            self.sim.now_q.append((self._granted, job))

    def _granted(self, job: Job) -> None:
        if not job.stopped:
            self.sim.hold(job)

    def release(self, job: Job) -> None:
        if self.user is job:
            self.user = None
        elif job in self.waiters:
            self.waiters.remove(job)
        self.sim.now_q.append((self._grant, None))


class Stage:
    """Stage j: its stream (FIFO of (batch or None, notices)), its prune-notice inbox and
    the job it is running."""
    __slots__ = ("j", "actor", "stream", "waiting", "notices", "job", "device", "layers",
                 "first", "last", "link", "next", "memo")

    def __init__(self, j: int, layers: int, last: bool, device, link: Hop, memo: dict):
        self.j, self.actor, self.layers, self.memo = j, f"stage{j}", layers, memo
        self.first, self.last, self.device, self.link = j == 1, last, device, link
        self.stream: deque = deque()
        self.waiting = False        # the reference's process is blocked on its inbox
        self.notices: deque[tuple[float, Update]] = deque()
        self.job: Job | None = None
        self.next: Stage | None = None      # the stage after it (None: the last)


class FastRequestSim:
    """One request on a fresh SimPy calendar: the fast engine's `RequestSim`."""

    def __init__(self, pipe, strategy, compute: Replay, recorder=None):
        self.pipe, self.compute = pipe, compute
        self.profile, self.S, self.layers = pipe.profile, pipe.S, pipe.layers
        self.A = pipe.topology == "A"
        self.record = pipe.record
        self.env = env = simpy.Environment()
        self.ticks = [self._tick]           # every Tick's callback list
        self.now_q: deque = deque()         # (fn, arg) due now, behind SimPy's events
        self.drain_due = False
        self.out = RequestRun()
        self.done = env.event()
        self.pacer = Pacer(strategy, self, prune=pipe.prune, recorder=recorder)
        self.ledger = StageLedger(self.S)
        self.memo = pipe.memo
        p, S = self.profile, self.S
        self.row_bytes = p.hidden_bytes(1) + TOKEN_BYTES    # a row's hidden state and id
        # a broadcast notice takes one hop from the head (B: stage 1 shares its device)
        self.latency = [0.0] + [p.head_link(j, S).latency_ms if (self.A or j > 1) else 0.0
                                for j in range(1, S + 1)]
        self.head_dev = Device(self)
        self.links = [ring_hop(env, p, j, S) for j in range(S + 1)]   # j -> j+1 (0 unused)
        # a stage's durations depend on its layers and whether it embeds (stage 1)
        self.stages = [Stage(j, self.layers[j - 1], j == S,
                             self.head_dev if (j == 1 and not self.A) else None,
                             self.links[j],
                             self.memo.setdefault(("stage", self.layers[j - 1], j == 1), {}))
                       for j in range(1, S + 1)]
        for st, after in zip(self.stages, self.stages[1:]):
            st.next = after
        self.head_last: tuple[str, float] = ("", -1.0)
        self.draft_holder = Holder("draft", compute, 0.0)
        self.verify_holder = Holder("verify", compute, 0.0) if self.A else None
        self.drafts: deque[Draft] = deque()
        self.verifies: deque[Batch] = deque()
        self.waiting = {"draft": False, "verify": False}
        self.entry_link = ring_hop(env, p, 0, S) if self.A else None
        self.back_link = self.links[S]                     # last stage -> head

    def run(self) -> RequestRun:
        # The reference starts one process per actor (an urgent event each), then injects.
        for st in self.stages:
            self._urgent(self._stage_next, st)
        self._urgent(self._draft_next, None)
        if self.A:
            self._urgent(self._verify_next, None)
        self.pacer.dispatch(self.pacer.start())
        strategy = self.pacer.strategy
        self.out.end_ms = run_until_done(self.env, self.done, strategy.name,
                                         lambda: f"{len(strategy.output)} tokens")
        return self.out

    # ---- the calendar -------------------------------------------------------------------
    def _tick(self, ev: Tick) -> None:
        ev.fn(ev.arg)
        if self.now_q:
            self._drain()

    def _drain(self) -> None:
        """Run the work due now in order, behind any SimPy event due at this instant."""
        q, env = self.now_q, self.env
        while q:
            if env.peek() <= env.now:           # an event due now goes first
                if not self.drain_due:
                    self.drain_due = True
                    env.schedule(Tick(self.ticks, self._drained, None), NORMAL)
                return
            fn, arg = q.popleft()
            fn(arg)

    def _drained(self, _) -> None:
        """The drain event's own work: none but to be one (its tick drains now_q)."""
        self.drain_due = False

    def _at(self, delay: float, fn, arg) -> None:
        """`fn(arg)` after `delay` ms (the reference's `env.timeout(delay)`); a delay too
        small to move the clock is due now, behind the work already due now."""
        env = self.env
        now = env.now
        if now + delay == now:
            self.now_q.append((fn, arg))
        else:
            env.schedule(Tick(self.ticks, fn, arg), NORMAL, delay)

    def _urgent(self, fn, arg) -> None:
        """Work in an urgent event now (a process start or an interruption)."""
        self.env.schedule(Tick(self.ticks, fn, arg), URGENT)

    def _send(self, hop: Hop, nbytes: int, deliver, arg) -> None:
        """Hop.send."""
        delay = hop.delay(nbytes)
        if delay <= 0.0:
            deliver(arg)
        else:
            self._at(delay, deliver, arg)

    # ---- compute ------------------------------------------------------------------------
    def _compute(self, job: Job) -> None:
        """The reference's `_compute`: wait for the device (if shared), hold it for ms."""
        if job.device is None:
            self.hold(job)
        else:
            job.device.request(job)

    def hold(self, job: Job) -> None:
        job.start = self.env.now
        self._at(job.ms, self._timer, job)

    def _timer(self, job: Job) -> None:
        if not job.stopped:
            self._end(job, True)

    def _stage_timer(self, job: Job) -> None:
        """`_timer` of a stage's job on its own device (most jobs): `_end` without the
        device's part."""
        if not job.stopped:
            self.out.worked(job.actor, job.start, self.env.now, job.label, job.n, True,
                            self.record)
            self._stage_done(job, True)

    def _interrupt(self, job: Job) -> None:
        """Every row `job` computes died: it stops at the next layer boundary."""
        if job.start is None:                         # still waiting for the device
            self._end(job, False)
            return
        step = job.ms / job.layers
        spent = self.env.now - job.start
        rest = (math.ceil(spent / step - 1e-9) * step - spent) if step > 0 else 0.0
        if rest > 0:
            self._at(rest, self._cut, job)
        else:
            self._end(job, False)

    def _cut(self, job: Job) -> None:
        self._end(job, False)

    def _end(self, job: Job, completed: bool) -> None:
        device = job.device
        if device is not None:
            device.release(job)
        if job.start is not None:
            if device is self.head_dev:
                self.head_last = (job.actor, self.env.now)
            self.out.worked(job.actor, job.start, self.env.now, job.label, job.n, completed,
                            self.record)
        job.then(job, completed)

    def _stage_ms(self, st: Stage, n: int, ctx: int) -> float:
        memo = st.memo                  # this stage's shape's: keyed (rows, context)
        ms = memo.get((n, ctx))
        if ms is None:
            p = self.profile
            ms = st.layers * (p.layer(n, ctx) + p.cold_layer_ms) + p.cold_stage_ms
            ms = memo[n, ctx] = ms + p.embed(n) if st.first else ms
        return ms

    def _lm_head_ms(self, n: int) -> float:
        key = ("lm", n)
        ms = self.memo.get(key)
        if ms is None:
            ms = self.memo[key] = self.profile.lm_head(n) + self.profile.cold_lm_head_ms
        return ms

    def _draft_ms(self, n: int, ctx: int) -> float:
        key = ("draft", n, ctx)
        ms = self.memo.get(key)
        if ms is None:
            ms = self.memo[key] = self.profile.draft_step(n, ctx)
        return ms

    # ---- stages -------------------------------------------------------------------------
    def _arrive(self, to) -> None:
        """An item reaches a stage's stream (the reference's Inbox.put); `to` is
        (stage, item)."""
        st, item = to
        st.stream.append(item)
        if st.waiting:
            st.waiting = False
            self.now_q.append((self._stage_next, st))

    def _deliver(self, to) -> None:
        """`_arrive` as a hop's delivery: a SimPy event or work due now, so what follows
        it is the drain of now_q. A waiting stage with nothing due before it therefore
        starts at once, as the drain would start it next."""
        st, item = to
        st.stream.append(item)
        if st.waiting:
            st.waiting = False
            env = self.env
            if self.now_q or env.peek() <= env.now:
                self.now_q.append((self._stage_next, st))
            else:
                self._stage_next(st)

    def _stream_send(self, hop: Hop, nbytes: int, to) -> None:
        """Hop.send of a stream item; `to` is (stage, item)."""
        delay = hop.delay(nbytes)
        if delay <= 0.0:
            self._arrive(to)
        else:
            self._at(delay, self._deliver, to)

    def _stage_next(self, st: Stage) -> None:
        """The reference's stage loop: work through the stream until a job starts."""
        stream = st.stream
        while stream:
            batch, notices = stream.popleft()
            if batch is None:
                started = self._stage_notices(st, notices)
            else:
                if st.first:
                    self._entry_taken()
                started = self._stage_batch(st, batch, notices)
            if started:
                return
        st.waiting = True

    def _catch_up(self, st: Stage) -> bool:
        """Apply the broadcast notices that have reached the stage; True if KV rows were
        removed."""
        q, now, ledger, j = st.notices, self.env.now, self.ledger, st.j
        compacted = False
        while q and q[0][0] <= now:
            compacted |= ledger.apply(j, q.popleft()[1])
        return compacted

    def _stage_notices(self, st: Stage, notices) -> bool:
        """In-band notices on their own: apply (compacting if rows died), pass them on.
        Returns whether a job started (the stream waits for it)."""
        now, p = self.env.now, self.profile
        for u in notices:
            st.notices.append((now, u))
        if self._catch_up(st) and p.kv_compact_ms:
            self._compute(Job(st.actor, st.device, p.kv_compact_ms, "prune", 0, 1,
                              self._notices_done, stage=st, notices=notices))
            return True
        self._notices_on(st, notices)
        return False

    def _notices_done(self, job: Job, _completed: bool) -> None:
        self._notices_on(job.stage, job.notices)
        self._stage_next(job.stage)

    def _notices_on(self, st: Stage, notices) -> None:
        if st.next is not None:
            nbytes = HEADER_BYTES + sum(len(u.commit) + len(u.kill) for u in notices) * TOKEN_BYTES
            self._stream_send(st.link, nbytes, (st.next, (None, notices)))

    def _stage_batch(self, st: Stage, batch: Batch, notices) -> bool:
        """The reference's `_stage_batch`; returns whether a job started."""
        q, now = st.notices, self.env.now
        if notices:
            for u in notices:
                q.append((now, u))
        # notices due by now (checked here to spare a call when none is)
        compacted = self._catch_up(st) if q and q[0][0] <= now else False
        ledger = self.ledger
        rows = ledger.admit(st.j, batch.id, batch.rows)
        if not (rows or compacted):
            self._pass_on(st, stage_output(batch, rows), notices)
            return False
        ms = self._stage_ms(st, len(rows), ledger.context(st.j)) if rows else 0.0
        ms += self.profile.kv_compact_ms if compacted else 0.0
        if st.last and rows and not self.A:
            verify = rows[batch.verify_from:]
            ms += self._lm_head_ms(len(verify)) if verify else 0.0
        st.job = job = Job(st.actor, st.device, ms, batch.kind, len(rows), st.layers,
                           self._stage_done, st, batch, rows, notices)
        if st.device is None:
            job.start = now                         # hold(job), without the calls
            self._at(ms, self._stage_timer, job)
        else:
            st.device.request(job)
        return True

    def _stage_done(self, job: Job, completed: bool) -> None:
        batch, rows, st = job.batch, job.rows, job.stage
        st.job = None
        if not completed:
            self.out.cancelled += 1
            rows = ()
        elif rows:
            self.ledger.computed_rows(st.j, rows)
        out = batch if rows is batch.rows else stage_output(batch, rows)
        self._pass_on(st, out, job.notices)
        self._stage_next(st)

    def _pass_on(self, st: Stage, out: Batch, notices) -> None:
        if st.next is not None:
            rows = out.rows
            nbytes = HEADER_BYTES + len(rows) * self.row_bytes if (rows or notices) \
                else HEADER_BYTES
            self._stream_send(st.link, nbytes, (st.next, (out, notices)))
        elif self.A:
            nv = len(verify_rows(out))
            self._send(self.back_link, HEADER_BYTES + nv * self.profile.hidden_bytes(1),
                       self._verify_put, out)
        else:
            self._send(self.back_link, HEADER_BYTES + len(out.rows) * TOKEN_BYTES,
                       self._verified, out)

    def _entry_taken(self) -> None:
        ack = self.latency[1] if self.A else 0.0       # stage 1 -> head, one hop
        if ack > 0.0:
            self._at(ack, self._acked, None)
        else:
            self._acked(None)

    def _acked(self, _) -> None:
        event = self.pacer.entry_taken()
        if event is not None:
            self._event(event)

    # ---- the head's actors: verifier (topology A) and draft -----------------------------
    def _verify_put(self, batch: Batch) -> None:
        self.verifies.append(batch)
        if self.waiting["verify"]:
            self.waiting["verify"] = False
            self.now_q.append((self._verify_next, None))

    def _verify_next(self, _) -> None:
        holder = self.verify_holder
        assert holder is not None
        while self.verifies:
            batch = self.verifies.popleft()
            holder.catch_up(self.env.now)
            rows = holder.state.admit(verify_rows(batch))
            out = Batch(batch.id, tuple(rows), batch.kind)
            if rows:
                self._compute(Job("lm_head", self.head_dev, self._lm_head_ms(len(rows)),
                                  batch.kind, len(rows), 1, self._lm_head_done, batch=out))
                return
            self._verified(out)
        self.waiting["verify"] = True

    def _lm_head_done(self, job: Job, _completed: bool) -> None:
        self._verified(job.batch)
        self._verify_next(None)

    def _verified(self, batch: Batch) -> None:
        self.ledger.left(batch.id)
        tokens = self.compute.verify(batch, verify_rows(batch)) if batch.rows else {}
        self._event(self.pacer.verified(batch.id, tokens))

    def _draft_next(self, _) -> None:
        now, holder = self.env.now, self.draft_holder
        while self.drafts:
            d = self.drafts.popleft()
            compacted = holder.catch_up(now)
            rows = holder.state.admit(d.rows)
            if rows:
                ms = self._draft_ms(len(rows), holder.state.context)
                if self.head_last != ("draft", now):   # not back to back: cold caches
                    ms += self.profile.cold_draft_ms
                ms += self.profile.kv_compact_ms if compacted else 0.0
                self._compute(Job("draft", self.head_dev, ms, "draft", len(rows), 1,
                                  self._draft_done, batch=d, rows=rows))
                return
            self._drafted(d, rows)
        self.waiting["draft"] = True

    def _draft_done(self, job: Job, _completed: bool) -> None:
        self._drafted(job.batch, job.rows)
        self._draft_next(None)

    def _drafted(self, d: Draft, rows) -> None:
        proposals = self.compute.draft(d, rows) if rows else {}
        self._event(self.pacer.drafted(d.ticket, proposals))

    def _event(self, event) -> None:
        if self.pacer.done:
            return
        actions = self.pacer.feed(event)
        delay = self.profile.head_overhead_ms
        if delay > 0.0 and actions:
            self._at(delay, self.pacer.dispatch, actions)
        else:
            self.pacer.dispatch(actions)

    # ---- pacing.Dispatch ----------------------------------------------------------------
    def inject(self, batch: Batch, notices) -> None:
        self.compute.observe(batch.rows)
        self.ledger.injected(batch.id, batch.rows)
        self.out.batches += 1
        self._into_stage1((batch, list(notices)), len(batch.rows) * 4 * TOKEN_BYTES)

    def inband(self, update: Update) -> None:
        self._into_stage1((None, [update]), (len(update.commit) + len(update.kill)) * TOKEN_BYTES)

    def _into_stage1(self, item, payload_bytes: int) -> None:
        to = (self.stages[0], item)
        if self.entry_link is not None:
            self._stream_send(self.entry_link, HEADER_BYTES + payload_bytes, to)
        else:
            self._arrive(to)

    def draft(self, request: Draft) -> None:
        self.compute.observe(request.rows)
        self.drafts.append(request)
        if self.waiting["draft"]:
            self.waiting["draft"] = False
            self.now_q.append((self._draft_next, None))

    def prune(self, update: Update) -> None:
        now = self.env.now
        self.ledger.dispatched(update)
        self.draft_holder.notices.append((now, update))
        if self.verify_holder is not None:
            self.verify_holder.notices.append((now, update))

    def broadcast(self, update: Update) -> None:
        now = self.env.now
        kill = set(update.kill) if (self.pipe.cancel and update.kill) else None
        for st in self.stages:
            at = now + self.latency[st.j]
            st.notices.append((at, update))
            if kill is not None and st.job is not None:
                self._maybe_cancel(st, kill, at)

    def commit(self, commit: Commit) -> None:
        self.out.committed(self.env.now, commit, self.record)

    def finish(self) -> None:
        # The reference's done event is due now, behind the work already due now.
        self.now_q.append((self._stop, None))

    def _stop(self, _) -> None:
        self.now_q.clear()              # what would follow the done event never runs
        if not self.done.triggered:
            self.done.succeed()

    def _maybe_cancel(self, st: Stage, kill: set[int], at: float) -> None:
        """If every row stage j is computing dies, it abandons the batch on arrival
        (pacing.cancels: the rows running when the notice left the head)."""
        job = st.job
        assert job is not None
        if job.stopped or not job.rows:
            return
        for r in job.rows:              # (a loop: cheaper than any() over a generator)
            if r.id not in kill:
                return
        if at <= self.env.now:
            self._cancel(job)
        else:
            self._at(at - self.env.now, self._cancel, job)

    def _cancel(self, job: Job) -> None:
        """The notice reaches the stage: if it still computes `job`, it abandons it."""
        if job.stage.job is job and not job.stopped:
            job.stopped = True              # the reference clears `busy` here
            self._urgent(self._interrupt, job)
