"""SimPy model of the pipeline: a head (strategy + draft), S stages, links, a verifier.

Durations come from a calibration profile; proposals and target tokens from a trace
oracle. The strategy object is the shared sans-IO one: this module only executes its
actions and feeds back events, so every decision is the strategy's.

Topologies:
  A  the head is its own device before stage 1: it runs the draft and the LM head; the
     last stage sends hidden states back to it (a ring).
  B  the head and the draft share stage 1's device; the last stage runs the LM head and
     sends token ids back to stage 1.
Prune notices either go straight from the head to every KV holder ("broadcast", one
hop of latency) or ride along with the next injected batch ("piggyback").
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import simpy

from pipedec_sim.protocol.messages import (
    Batch,
    Commit,
    Draft,
    Drafted,
    EntryFree,
    Finish,
    Inject,
    Update,
    Verified,
)
from pipedec_sim.protocol.stage_state import StageState

TOKEN_BYTES = 8          # an int64 token id on the wire
HEADER_BYTES = 64        # fixed-shape metadata per message


@dataclass
class RequestRun:
    """What one simulated request did (times in ms)."""
    commits: list[tuple[float, int, int, str]] = field(default_factory=list)  # (t, n, drafted, outcome)
    end_ms: float = 0.0
    busy_ms: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)       # rows computed per actor
    batches: int = 0
    timeline: list[dict] = field(default_factory=list)


class Link:
    """A one-way hop: transfers serialise on bandwidth, then pay latency."""

    def __init__(self, env: simpy.Environment, latency_ms: float, bytes_per_ms: float):
        self.env, self.latency, self.bpms, self.free_at = env, latency_ms, bytes_per_ms, 0.0

    def send(self, nbytes: int, deliver) -> None:
        now = self.env.now
        start = max(now, self.free_at)
        self.free_at = start + (nbytes / self.bpms if self.bpms else 0.0)
        delay = self.free_at + self.latency - now
        if delay <= 0.0:
            deliver()
        else:
            self.env.timeout(delay).callbacks.append(lambda _e: deliver())


class Inbox:
    """A FIFO an actor waits on; cheaper than simpy.Store (no event per put/get when
    work is already queued), which matters at tens of thousands of steps per second."""

    def __init__(self, env: simpy.Environment):
        self.env, self.items, self.waiter = env, deque(), None

    def put(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None:
            waiter, self.waiter = self.waiter, None
            waiter.succeed()

    def get(self):
        """Generator: `item = yield from inbox.get()`."""
        if not self.items:
            self.waiter = self.env.event()
            yield self.waiter
        return self.items.popleft()


class CorePool:
    """`cores` CPU cores shared by processor sharing: n runnable jobs each progress at
    min(1, cores / n) ms of work per ms, as the OS time-slices runnable processes (a
    2-core machine running a head and S stage processes). A job needs `work` ms of one
    core. One pending wake-up per change in the job set (stale ones are ignored).

    With a measured `share` table (share[n-1]: the share of a core each of n busy
    processes got, foreign load included) the rate is share[n-1] / base, relative to the
    share `base` of the one process that measured the profile's durations (default
    share[0]: same conditions); past the table's end its last total is divided among n.
    `slowdown` (>= 1) divides the rate while more jobs run than there are cores: cache and
    memory contention that a time-share table (spin loops) does not see."""

    def __init__(self, env: simpy.Environment, cores: float, share=None,
                 base: float | None = None, slowdown: float = 1.0):
        self.env, self.cores = env, float(cores)
        if share:
            m = len(share)
            b = base or share[0]
            self.rates = [1.0] + [share[n - 1] / b if n <= m else share[-1] * m / n / b
                                  for n in range(1, 65)]
        else:
            self.rates = [1.0] + [min(1.0, self.cores / n) for n in range(1, 65)]
        if slowdown != 1.0:
            self.rates = [r / slowdown if n > self.cores else r
                          for n, r in enumerate(self.rates)]
        self.jobs: dict[int, list] = {}      # id -> [remaining work, done event]
        self.t = 0.0                         # when `remaining` was last brought up to date
        self.rate = 1.0
        self.gen = 0
        self.ids = 0

    def _advance(self) -> None:
        now = self.env.now
        dt = now - self.t
        if dt > 0.0 and self.jobs:
            w = dt * self.rate
            for job in self.jobs.values():
                job[0] -= w
        self.t = now

    def _reschedule(self) -> None:
        jobs = self.jobs
        n = len(jobs)
        rates = self.rates
        self.rate = rates[n] if n < len(rates) else rates[-1] * (len(rates) - 1) / n
        self.gen += 1
        if not n:
            return
        first = min(job[0] for job in jobs.values())
        gen = self.gen
        delay = max(first, 0.0) / self.rate
        self.env.timeout(delay).callbacks.append(lambda _e: self._due(gen))

    def _due(self, gen: int) -> None:
        if gen != self.gen:
            return                           # the job set changed since: a newer wake-up
        self._advance()
        for i in [i for i, job in self.jobs.items() if job[0] <= 1e-9]:
            self.jobs.pop(i)[1].succeed()
        self._reschedule()

    def busy(self) -> int:
        """Jobs running now."""
        return len(self.jobs)

    def start(self, work: float) -> tuple[int, simpy.Event]:
        self._advance()
        self.ids += 1
        done = self.env.event()
        self.jobs[self.ids] = [work, done]
        self._reschedule()
        return self.ids, done

    def stop(self, job: int) -> float:
        """Withdraw a job (its process was interrupted); returns the work it had left."""
        self._advance()
        left = self.jobs.pop(job)[0] if job in self.jobs else 0.0
        self._reschedule()
        return max(left, 0.0)


class Holder:
    """A KV holder's inbox of prune notices, applied lazily when work starts."""

    def __init__(self, latency_ms: float):
        self.state = StageState()
        self.latency = latency_ms
        self.notices: deque[tuple[float, Update]] = deque()

    def catch_up(self, now: float) -> bool:
        """Apply every notice that has arrived; True if KV rows were compacted."""
        compacted = False
        q = self.notices
        while q and q[0][0] <= now:
            compacted |= self.state.apply(q.popleft()[1], keep=False) is not None
        return compacted


class Pipeline:
    def __init__(self, profile, stages: int, *, topology: str = "A", prune: str = "broadcast",
                 cancel: bool = True, timeline: bool = False, core_share=None):
        if topology not in ("A", "B"):
            raise ValueError("topology must be 'A' or 'B'")
        if prune not in ("broadcast", "piggyback"):
            raise ValueError("prune must be 'broadcast' or 'piggyback'")
        self.profile, self.S, self.topology, self.prune = profile, stages, topology, prune
        self.layers = profile.stage_layers(stages)
        self.record = timeline
        self.cancel = cancel
        # The cores' share table now, if measured apart from the profile's (foreign load
        # changes): durations then scale by core_share[n-1] / profile.core_share[0].
        self.core_share = core_share
        self._layer_ms = profile.layer

    # ---- one request ------------------------------------------------------------------
    def run(self, strategy, oracle) -> RequestRun:
        self.env = env = simpy.Environment()
        self.strategy, self.oracle = strategy, oracle
        self.out = RequestRun()
        self.done = env.event()
        p = self.profile
        bpms = p.link.bandwidth_gbps * 1e9 / 8 / 1e3 if p.link.bandwidth_gbps else 0.0
        self._link = lambda: Link(env, p.link.latency_ms, bpms)
        S, A = self.S, self.topology == "A"
        # Devices: an exclusive device needs no resource; a shared one (B: stage 1 +
        # draft + head) or a host's shared cores serialise work.
        self.cores = self.pool = None
        if p.shared_cores:
            if p.core_sharing == "fifo":
                self.cores = simpy.Resource(env, p.shared_cores)
            else:
                share = self.core_share or p.core_share
                base = p.core_share[0] if (self.core_share and p.core_share) else None
                self.pool = CorePool(env, p.shared_cores, share, base, p.contention_slowdown)
        self.head_dev = simpy.Resource(env, 1)
        self.dev = {j: (self.head_dev if (j == 1 and not A) else None) for j in range(1, S + 1)}
        hop = p.link.latency_ms
        self.holders = {j: Holder(hop if (A or j > 1) else 0.0) for j in range(1, S + 1)}
        self.holders["draft"] = Holder(0.0)
        self.holders["verify"] = Holder(0.0 if A else hop)
        self.piggy: list[Update] = []
        self.acked = 0
        self.free_fed = False
        self.inbox = {j: Inbox(env) for j in range(1, S + 1)}
        self.links = {j: self._link() for j in range(1, S)}
        self.entry_link = self._link() if A else None
        self.back_link = self._link()                     # last stage -> head
        self.draft_box = Inbox(env)
        self.verify_box = Inbox(env) if A else None
        self.busy: dict[int, set | None] = {j: None for j in range(1, S + 1)}
        self.procs = {j: env.process(self._stage(j)) for j in range(1, S + 1)}
        env.process(self._draft())
        if A:
            env.process(self._verifier())
        self._dispatch(strategy.start())
        try:
            env.run(until=self.done)
        except RuntimeError as e:
            if self.done.triggered:
                raise
            # Nothing left to happen but the request is unfinished: a scheduler bug.
            raise RuntimeError(f"{strategy.name}: simulation stalled at t={env.now:.3f} ms "
                               f"after {len(strategy.output)} tokens ({e})") from None
        self.out.end_ms = env.now
        return self.out

    # ---- compute ------------------------------------------------------------------------
    def _compute(self, actor: str, device, ms: float, label: str, n: int, layers: int = 1):
        """Hold the device (and a core) for `ms`; record busy time and a slice. An
        interrupt (every row died) ends the work at the next layer boundary; returns
        whether the work completed."""
        env, out = self.env, self.out
        held, start, completed = [], None, True
        try:
            for res in (device, self.cores):          # device first: never idle a core
                if res is not None:
                    req = res.request()
                    held.append((res, req))
                    yield req
            start = env.now
            if self.pool is None:
                yield env.timeout(ms)
            else:                                     # processor sharing of the cores
                job, done = self.pool.start(ms)
                try:
                    yield done
                finally:
                    left = self.pool.stop(job) if not done.triggered else 0.0
        except simpy.Interrupt:
            completed = False
            if start is not None:                     # finish the layer that is running
                step = ms / layers
                spent = env.now - start if self.pool is None else ms - left
                rest = (math.ceil(spent / step - 1e-9) * step - spent) if step > 0 else 0.0
                if rest > 0:
                    if self.pool is None:
                        yield env.timeout(rest)
                    else:
                        _, done = self.pool.start(rest)
                        yield done
        finally:
            for res, req in held:
                req.cancel()                          # still queued: leave the queue
                res.release(req)
        if start is not None:
            ms = env.now - start
            out.busy_ms[actor] = out.busy_ms.get(actor, 0.0) + ms
            out.rows[actor] = out.rows.get(actor, 0) + (n if completed else 0)
            if self.record:
                out.timeline.append({"name": label if completed else f"{label} (cancelled)",
                                     "ph": "X", "ts": start * 1e3, "dur": ms * 1e3, "pid": 0,
                                     "tid": actor, "args": {"rows": n}})
        return completed

    def _stage_ms(self, j: int, n: int, ctx: int) -> float:
        ms = self.layers[j - 1] * self._layer_ms(n, ctx)
        return ms + self.profile.embed(n) if j == 1 else ms

    # ---- actors -------------------------------------------------------------------------
    def _stage(self, j: int):
        env, p, S = self.env, self.profile, self.S
        box, holder, dev = self.inbox[j], self.holders[j], self.dev[j]
        name = f"stage{j}"
        while True:
            batch, piggy = yield from box.get()
            if j == 1:
                self._entry_taken(box)
            wire_ms = self._wire_ms(len(piggy))
            if wire_ms > 0.0:                     # profiles without CPU-host fields: none
                yield from self._compute(f"wire{j}", dev, wire_ms, "wire", 0)
            for u in piggy:
                holder.notices.append((env.now, u))
            compacted = holder.catch_up(env.now)
            rows = holder.state.admit(batch.rows)
            if rows or compacted:
                ms = self._stage_ms(j, len(rows), holder.state.context) if rows else 0.0
                ms += p.kv_compact_ms if compacted else 0.0
                verify = rows[batch.verify_from:] if rows else []
                if j == S and self.topology == "B" and verify:
                    ms += p.lm_head(len(verify))
                self.busy[j] = {r.id for r in rows}
                done = yield from self._compute(name, dev, ms, batch.kind, len(rows),
                                                self.layers[j - 1])
                self.busy[j] = None
                if done:
                    holder.state.append(rows, batch.committed)
                else:
                    rows = []                     # abandoned: every row died meanwhile
            if not rows and not piggy and j < S:
                # Nothing to compute or carry: an empty batch goes on (header only, no
                # compute) so that the head learns the batch left the pipeline.
                self.links[j].send(HEADER_BYTES, lambda m=(Batch(batch.id, (), batch.kind),
                                   []), b=self.inbox[j + 1]: b.put(m))
                continue
            # Only speculative rows die and they sit after verify_from: indices hold.
            out = Batch(batch.id, tuple(rows), batch.kind, batch.verify_from, batch.committed)
            if j < S:
                nbytes = HEADER_BYTES + len(rows) * (p.hidden_bytes(1) + TOKEN_BYTES)
                self.links[j].send(nbytes, lambda m=(out, piggy), b=self.inbox[j + 1]: b.put(m))
            elif self.topology == "A":
                nv = max(len(out.rows) - out.verify_from, 0)
                self.back_link.send(HEADER_BYTES + nv * p.hidden_bytes(1),
                                    lambda m=out: self.verify_box.put(m))
            else:
                self.back_link.send(HEADER_BYTES + len(rows) * TOKEN_BYTES,
                                    lambda m=out: self._verified(m))

    def _wire_ms(self, notices: int) -> float:
        """A stage process's CPU for one message outside the compute (profile fields
        stage_message_ms, stage_notice_ms: the real runtime sends each notice on its own)."""
        p = self.profile
        ms = p.stage_message_ms + notices * p.stage_notice_ms
        if ms and self.pool is not None and self.pool.busy() + 1 > self.pool.cores:
            ms *= p.message_contention       # handled while the cores are oversubscribed
        return ms

    def _entry_taken(self, box: Inbox) -> None:
        """Stage 1 took a batch. Topology A: it acks each batch to the head (one hop), as
        the torch runtime does; B (the head shares stage 1's device): no hop. The head
        feeds EntryFree once every injected batch is acked."""
        hop = self.profile.link.latency_ms if self.topology == "A" else 0.0
        if hop > 0.0:
            self.env.timeout(hop).callbacks.append(self._acked)
        else:
            self._acked()

    def _acked(self, _e=None) -> None:
        self.acked += 1
        if not self.free_fed and self.acked == self.out.batches:
            self.free_fed = True
            self._event(EntryFree())

    def _verifier(self):
        """Topology A: the LM head on the head's device."""
        holder = self.holders["verify"]
        while True:
            batch = yield from self.verify_box.get()
            holder.catch_up(self.env.now)
            rows = holder.state.admit(batch.rows[batch.verify_from:])
            if rows:
                yield from self._compute("lm_head", self.head_dev, self.profile.lm_head(len(rows)),
                                         batch.kind, len(rows))
            self._verified(Batch(batch.id, tuple(rows), batch.kind))

    def _verified(self, batch: Batch) -> None:
        target = self.oracle.target
        rows = batch.rows[batch.verify_from:]
        self._event(Verified(batch.id, {r.id: target(r) for r in rows}))

    def _draft(self):
        env, holder, p = self.env, self.holders["draft"], self.profile
        while True:
            d: Draft = yield from self.draft_box.get()
            compacted = holder.catch_up(env.now)
            rows = holder.state.admit(d.rows)
            if rows:
                ms = p.draft_step(len(rows), holder.state.context)
                ms += p.kv_compact_ms if compacted else 0.0
                yield from self._compute("draft", self.head_dev, ms, "draft", len(rows))
                holder.state.append(rows, d.committed)
            alive = {r.id: r for r in rows}
            propose = self.oracle.propose
            self._event(Drafted(d.ticket, {i: propose(alive[i], d.k) for i in d.want if i in alive}))

    # ---- the head -----------------------------------------------------------------------
    def _event(self, event) -> None:
        if self.strategy.done:
            return
        actions = self.strategy.on(event)
        if self.profile.head_event_ms > 0.0:
            # CPU work on the head's core before the actions leave (FIFO on head_dev
            # keeps their order), then the optional pure delay.
            self.env.process(self._head_cpu(actions))
            return
        self._after_head(actions)

    def _head_cpu(self, actions):
        yield from self._compute("head", self.head_dev, self.profile.head_event_ms, "event", 0)
        self._after_head(actions)

    def _after_head(self, actions) -> None:
        delay = self.profile.head_overhead_ms
        if delay > 0.0 and actions:
            self.env.timeout(delay).callbacks.append(lambda _e: self._dispatch(actions))
        else:
            self._dispatch(actions)

    def _dispatch(self, actions) -> None:
        env, out = self.env, self.out
        for a in actions:
            if isinstance(a, Inject):
                self.oracle.observe(a.batch.rows)
                out.batches += 1
                self.free_fed = False
                msg = (a.batch, self.piggy)
                self.piggy = []
                if self.entry_link is not None:
                    nbytes = HEADER_BYTES + len(a.batch.rows) * 4 * TOKEN_BYTES
                    self.entry_link.send(nbytes, lambda m=msg: self.inbox[1].put(m))
                else:
                    self.inbox[1].put(msg)
            elif isinstance(a, Draft):
                self.oracle.observe(a.rows)
                self.draft_box.put(a)
            elif isinstance(a, Update):
                self._notify(a)
            elif isinstance(a, Commit):
                out.commits.append((env.now, len(a.tokens), a.drafted, a.outcome))
                if self.record:
                    out.timeline.append({"name": a.outcome, "ph": "i", "s": "g",
                                         "ts": env.now * 1e3, "pid": 0, "tid": "head",
                                         "args": {"tokens": list(a.tokens)}})
            elif isinstance(a, Finish):
                if not self.done.triggered:
                    self.done.succeed()

    def _notify(self, update: Update) -> None:
        now = self.env.now
        for key, h in self.holders.items():
            if self.prune == "piggyback" and isinstance(key, int):
                continue
            h.notices.append((now + h.latency, update))
            if self.cancel and isinstance(key, int) and update.kill:
                self._maybe_cancel(key, set(update.kill), now + h.latency)
        if self.prune == "piggyback":
            self.piggy.append(update)

    def _maybe_cancel(self, j: int, kill: set, at: float) -> None:
        """If every row stage j is computing dies, it abandons the batch on arrival."""
        busy = self.busy[j]
        if not busy or not busy <= kill:
            return

        def interrupt(_e=None):
            if self.busy[j] is busy:
                self.busy[j] = None
                self.procs[j].interrupt("pruned")
        if at <= self.env.now:
            interrupt()
        else:
            self.env.timeout(at - self.env.now).callbacks.append(interrupt)
