"""The reference engine: the simulated pipeline event by event, one SimPy process per actor.

Every stage, the draft and the verifier is a generator process that waits on its inbox,
holds its device for each compute and hands its output to a link; every KV holder keeps
its own `StageState`. It is the model's definition: the fast engine (`fast.py`) must
reproduce its results exactly (`pipedec-sim run --engine reference` runs it). See
`pipeline.py` for the model itself (topologies, prune modes, what a stage does).
"""
from __future__ import annotations

import math

import simpy

from backends.simulated.cores import CorePool
from backends.simulated.link import HEADER_BYTES, TOKEN_BYTES, Inbox, ring_hop
from backends.simulated.replay import Holder, RequestRun, run_until_done
from pipedec_sim.protocol.messages import Batch, Commit, Draft, Update
from pipedec_sim.protocol.pacing import Pacer, cancels, stage_output, verify_rows


class RequestSim:
    """One request on a fresh SimPy calendar: the actors, their inboxes and KV holders.
    It is the `Dispatch` of the request's pacer."""

    def __init__(self, pipe, strategy, compute, recorder=None):
        self.pipe, self.compute = pipe, compute
        self.profile, self.S, self.layers = pipe.profile, pipe.S, pipe.layers
        self.A = pipe.topology == "A"
        self.record = pipe.record
        self.env = env = simpy.Environment()
        self.out = RequestRun()
        self.done = env.event()
        self.pacer = Pacer(strategy, self, prune=pipe.prune, recorder=recorder)
        self._devices()
        self._links()
        S, p = self.S, self.profile
        # a broadcast notice takes one hop from the head (B: stage 1 shares its device)
        self.holders: dict = {j: Holder(j, compute, p.head_link(j, S).latency_ms
                                        if (self.A or j > 1) else 0.0)
                              for j in range(1, S + 1)}
        self.holders["draft"] = Holder("draft", compute, 0.0)
        if self.A:                                    # the LM head on the head
            self.holders["verify"] = Holder("verify", compute, 0.0)
        self.inbox = {j: Inbox(env) for j in range(1, S + 1)}
        self.draft_box = Inbox(env)
        self.verify_box = Inbox(env) if self.A else None
        self.busy: dict[int, set | None] = {j: None for j in range(1, S + 1)}
        self.head_last: tuple[str, float] = ("", -1.0)   # the head device's last job, its end
        self.ctrl: dict[int, list] = {}   # CPU hosts: this dispatch's control message per stage

    def _devices(self) -> None:
        """An exclusive device needs no resource; a shared one (B: stage 1 + draft + head)
        or a host's shared cores serialise work."""
        env, p = self.env, self.profile
        self.cores = self.pool = None
        if p.shared_cores:
            if p.core_sharing == "fifo":
                self.cores = simpy.Resource(env, p.shared_cores)
            else:
                share = self.pipe.core_share or p.core_share
                base = p.core_share[0] if (self.pipe.core_share and p.core_share) else None
                self.pool = CorePool(env, p.shared_cores, share, base, p.contention_slowdown)
        self.head_dev = simpy.Resource(env, 1)
        self.dev = {j: (self.head_dev if (j == 1 and not self.A) else None)
                    for j in range(1, self.S + 1)}

    def _links(self) -> None:
        self.links = {j: ring_hop(self.env, self.profile, j, self.S) for j in range(1, self.S)}
        self.entry_link = ring_hop(self.env, self.profile, 0, self.S) if self.A else None
        self.back_link = ring_hop(self.env, self.profile, self.S, self.S)   # last stage -> head

    def run(self) -> RequestRun:
        env, strategy = self.env, self.pacer.strategy
        self.procs = {j: env.process(self._stage(j)) for j in range(1, self.S + 1)}
        env.process(self._draft())
        if self.A:
            env.process(self._verifier())
        self._dispatch(self.pacer.start())
        self.out.end_ms = run_until_done(env, self.done, strategy.name,
                                         lambda: f"{len(strategy.output)} tokens")
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
            if device is self.head_dev:
                self.head_last = (actor, env.now)
            out.worked(actor, start, env.now, label, n, completed, self.record)
        return completed

    def _stage_ms(self, j: int, n: int, ctx: int) -> float:
        """Stage j's compute for n live rows over ctx cached ones. The grids are measured
        warm; a stage's batch in a pipeline starts cold (the other stages evicted its
        weights from the caches): the profile's cold_* extras, 0 when not measured."""
        p = self.profile
        ms = self.layers[j - 1] * (p.layer(n, ctx) + p.cold_layer_ms) + p.cold_stage_ms
        return ms + p.embed(n) if j == 1 else ms

    def _lm_head_ms(self, n: int) -> float:
        return self.profile.lm_head(n) + self.profile.cold_lm_head_ms

    # ---- actors -------------------------------------------------------------------------
    def _stage(self, j: int):
        box = self.inbox[j]
        while True:
            batch, notices = yield from box.get()
            if batch is None:                         # in-band notices, on their own
                yield from self._stage_notices(j, notices)
                continue
            if j == 1:
                self._entry_taken()
            rows = yield from self._stage_batch(j, batch, notices)
            self._pass_on(j, stage_output(batch, rows), notices)

    def _stage_notices(self, j: int, notices):
        """Apply notices that came in the stream (compacting KV if rows died), pass them on."""
        p, holder = self.profile, self.holders[j]
        wire_ms = self._wire_ms(len(notices), batch=False)
        if wire_ms > 0.0:
            yield from self._compute(f"wire{j}", self.dev[j], wire_ms, "wire", 0)
        for u in notices:
            holder.notices.append((self.env.now, u))
        if holder.catch_up(self.env.now) and p.kv_compact_ms:
            yield from self._compute(f"stage{j}", self.dev[j], p.kv_compact_ms, "prune", 0)
        if j < self.S:
            nbytes = HEADER_BYTES + sum(len(u.commit) + len(u.kill) for u in notices) * TOKEN_BYTES
            self.links[j].send(nbytes, lambda m=(None, notices), b=self.inbox[j + 1]: b.put(m))

    def _stage_batch(self, j: int, batch: Batch, notices):
        """Stage j's work on one batch: notices that rode with it first, then the live
        rows. Returns the rows it computed (none if all died or it abandoned them)."""
        env, p, holder, dev = self.env, self.profile, self.holders[j], self.dev[j]
        wire_ms = self._wire_ms(len(notices))
        if wire_ms > 0.0:                         # profiles without CPU-host fields: none
            yield from self._compute(f"wire{j}", dev, wire_ms, "wire", 0)
        for u in notices:
            holder.notices.append((env.now, u))
        compacted = holder.catch_up(env.now)
        rows = holder.state.admit(batch.rows)
        if not (rows or compacted):
            return rows
        ms = self._stage_ms(j, len(rows), holder.state.context) if rows else 0.0
        ms += p.kv_compact_ms if compacted else 0.0
        if j == self.S and not self.A and rows:
            verify = rows[batch.verify_from:]
            ms += self._lm_head_ms(len(verify)) if verify else 0.0
        self.busy[j] = {r.id for r in rows}
        done = yield from self._compute(f"stage{j}", dev, ms, batch.kind, len(rows),
                                        self.layers[j - 1])
        self.busy[j] = None
        if not done:
            self.out.cancelled += 1
            return []                             # abandoned: every row died meanwhile
        if rows:
            self.compute.stage(j, batch, rows)
        return rows

    def _pass_on(self, j: int, out: Batch, notices) -> None:
        """Send a stage's output on: to the next stage, or back to the head."""
        p = self.profile
        if j < self.S:
            if not out.rows and not notices:      # header only
                nbytes = HEADER_BYTES
            else:
                nbytes = HEADER_BYTES + len(out.rows) * (p.hidden_bytes(1) + TOKEN_BYTES)
            self.links[j].send(nbytes, lambda m=(out, notices), b=self.inbox[j + 1]: b.put(m))
        elif self.A:
            nv = len(verify_rows(out))
            self.back_link.send(HEADER_BYTES + nv * p.hidden_bytes(1),
                                lambda m=out: self.verify_box.put(m))
        else:
            self.back_link.send(HEADER_BYTES + len(out.rows) * TOKEN_BYTES,
                                lambda m=out: self._verified(m))

    def _wire_ms(self, notices: int, *, batch: bool = True) -> float:
        """A stage process's CPU for one message outside the compute (profile fields
        stage_message_ms per batch message, stage_notice_ms per notice message: in the
        stream the real runtime sends each notice in a message of its own, a broadcast
        one message per event, `_notice_to`)."""
        p = self.profile
        ms = (p.stage_message_ms if batch else 0.0) + notices * p.stage_notice_ms
        if ms and self.pool is not None and self.pool.busy() + 1 > self.pool.cores:
            ms *= p.message_contention       # handled while the cores are oversubscribed
        return ms

    def _entry_taken(self) -> None:
        """Stage 1 took a batch. Topology A: it acks each batch to the head (one hop), as
        the torch runtime does; B (the head shares stage 1's device): no hop."""
        hop = self.holders[1].latency if self.A else 0.0
        if hop > 0.0:
            self.env.timeout(hop).callbacks.append(self._acked)
        else:
            self._acked()

    def _acked(self, _e=None) -> None:
        event = self.pacer.entry_taken()
        if event is not None:
            self._event(event)

    def _verifier(self):
        """Topology A: the LM head on the head's device."""
        holder = self.holders["verify"]
        while True:
            batch = yield from self.verify_box.get()
            holder.catch_up(self.env.now)
            rows = holder.state.admit(verify_rows(batch))
            if rows:
                yield from self._compute("lm_head", self.head_dev,
                                         self._lm_head_ms(len(rows)), batch.kind, len(rows))
            self._verified(Batch(batch.id, tuple(rows), batch.kind))

    def _verified(self, batch: Batch) -> None:
        tokens = self.compute.verify(batch, verify_rows(batch)) if batch.rows else {}
        self._event(self.pacer.verified(batch.id, tokens))

    def _draft(self):
        env, holder, p = self.env, self.holders["draft"], self.profile
        while True:
            d: Draft = yield from self.draft_box.get()
            compacted = holder.catch_up(env.now)
            rows = holder.state.admit(d.rows)
            if rows:
                ms = p.draft_step(len(rows), holder.state.context)
                if self.head_last != ("draft", env.now):   # not back to back: cold caches
                    ms += p.cold_draft_ms
                ms += p.kv_compact_ms if compacted else 0.0
                yield from self._compute("draft", self.head_dev, ms, "draft", len(rows))
            proposals = self.compute.draft(d, rows) if rows else {}
            self._event(self.pacer.drafted(d.ticket, proposals))

    # ---- the head -----------------------------------------------------------------------
    def _event(self, event) -> None:
        if self.pacer.done:
            return
        actions = self.pacer.feed(event)
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
        """The head's actions leave; its broadcast notices among them share one control
        message per stage (`_notice_to`), as the torch head sends them."""
        self.pacer.dispatch(actions)
        self.ctrl = {}

    # ---- pacing.Dispatch: what the head's actions do -----------------------------------
    def inject(self, batch: Batch, notices) -> None:
        self.ctrl = {}          # the torch head sends held broadcasts ahead of a batch
        self.compute.observe(batch.rows)
        self.out.batches += 1
        self._into_stage1((batch, list(notices)), len(batch.rows) * 4 * TOKEN_BYTES)

    def inband(self, update: Update) -> None:
        self._into_stage1((None, [update]), (len(update.commit) + len(update.kill)) * TOKEN_BYTES)

    def _into_stage1(self, item, payload_bytes: int) -> None:
        if self.entry_link is not None:
            self.entry_link.send(HEADER_BYTES + payload_bytes, lambda: self.inbox[1].put(item))
        else:
            self.inbox[1].put(item)

    def draft(self, request: Draft) -> None:
        self.compute.observe(request.rows)
        self.draft_box.put(request)

    def prune(self, update: Update) -> None:
        now = self.env.now
        for key in ("draft", "verify"):
            if key in self.holders:
                self.holders[key].notices.append((now, update))

    def broadcast(self, update: Update) -> None:
        for j in range(1, self.S + 1):
            self._notice_to(j, update, self.holders[j].latency)

    def _notice_to(self, j: int, item, hop: float) -> None:
        """A broadcast notice (`item`; serving: (request, notice)) reaches stage j one hop
        from now. On a CPU host it rides in this dispatch's control message to j: the
        first notice of a dispatch sends it, the others join it until the dispatch ends
        or injects a batch (the torch head sends the message ahead of that batch)."""
        if self._wire_ms(1, batch=False) <= 0.0:
            self._land(j, item, self.env.now + hop)
            return
        message = self.ctrl.get(j)
        if message is None:
            message = self.ctrl[j] = []
            self.env.timeout(hop).callbacks.append(
                lambda _e, j=j, m=message: self.env.process(self._receive(j, m)))
        message.append(item)

    def _receive(self, j: int, message: list):
        """A control message reaches stage j once its control reader has received it:
        stage_notice_ms of CPU on the shared cores (beside the stage's compute) however
        many notices it carries, so under contention notices land late and dead rows get
        computed, as on the real runtime. Then its notices land, in order."""
        yield from self._compute(f"wire{j}", None, self._wire_ms(1, batch=False), "notice", 0)
        for item in message:
            self._land(j, item, self.env.now)

    def _land(self, j: int, update: Update, at: float) -> None:
        self._arrive(j, update, at)

    def _arrive(self, j: int, update: Update, at: float) -> None:
        self.holders[j].notices.append((at, update))
        if self.pipe.cancel and update.kill:
            self._maybe_cancel(j, update, at)

    def commit(self, commit: Commit) -> None:
        self.out.committed(self.env.now, commit, self.record)

    def finish(self) -> None:
        if not self.done.triggered:
            self.done.succeed()

    def _maybe_cancel(self, j: int, update: Update, at: float) -> None:
        """If every row stage j is computing dies, it abandons the batch on arrival."""
        busy = self.busy[j]
        if not cancels(busy or set(), update):
            return

        def interrupt(_e=None):
            if self.busy[j] is busy:
                self.busy[j] = None
                self.procs[j].interrupt("pruned")
        if at <= self.env.now:
            interrupt()
        else:
            self.env.timeout(at - self.env.now).callbacks.append(interrupt)
