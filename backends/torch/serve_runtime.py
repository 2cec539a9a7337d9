"""Serving on the distributed runtime: many requests in flight through the stage processes.

`DistributedServer` is `runtime.DistributedPipeline` (launch, rendezvous, liveness, the
head's reader threads, clean-up) whose stages are `serve_worker.ServeStage`s (a KV holder
per request) and whose head runs a serving scheduler (`pipedec_sim.protocol.serve`)
instead of one request's `Pacer`. `serve(name, requests, ...)` serves one workload and
may be called again on the same processes (request sequence numbers keep growing).

`ServingRun` is the scheduler's `ServeDispatch` on the head, the real counterpart of the
simulator's `backends.simulated.serve.ServeSim`:

* admission: the request's RESET goes into stage 1's stream (every stage opens a holder
  for it) and the head gives it its own `DraftModel` and `Verifier` over the head's
  weights; when it finishes, a FREE drops its holders everywhere;
* a step travels as its parts, one BATCH message each (REQ = the request's sequence
  number, LEFT = the parts after it), back to back; every stage computes a step in one
  forward over its requests (`serve_worker.ServeStage`). Stage 1 acks every part it
  takes; once it has taken all of a step's parts the scheduler hears `entry_taken()`.
  Parts come back from the last stage in the order they were sent; once a step's parts
  are all back (verified on the head in topology A) it hears `returned(step, parts)`;
* the draft: one pass answers the oldest pending Draft of each request (as ServeSim),
  in one forward over those requests (`batch.propose_requests`), then one
  `drafted(answers)`;
* prune notices: the head's own holders at once; the stages by broadcast (CTRL: the
  notices of one event, every request's, in one message per stage, each tagged with its
  request), in-band, or piggyback (ahead of the next step), as the prune mode says;
* commits on the head's wall clock, in ms from the run's start; arrivals open loop (each
  request at its time from the start; one due while the head computes waits for the head)
  or closed loop (`concurrency` outstanding, the next issued as one finishes);
* at the end a REPORT walks the ring: each stage's busy time, rows and abandoned parts
  over the run. It travels behind the parts of finished requests still in flight, so
  the next run starts on a quiet pipeline.

Never hang: every wait polls the stages (`check_alive`) and keeps the `timeout_s`
no-progress deadline while a request is outstanding, as the single-request runtime does.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import torch

from backends.simulated.replay import RequestRun
from backends.simulated.serve import Served, ServeRun
from backends.torch import wire
from backends.torch.batch import propose_requests
from backends.torch.head import Request
from backends.torch.runtime import DistributedPipeline, StageFailed
from backends.torch.shard import DraftModel, TargetSampler, Verifier, rows_tensor
from backends.torch.worker import SLICE_BATCH, SLICE_CANCEL, SLICE_PRUNE, StageConfig
from pipedec_sim.protocol.knobs import ServeKnobs
from pipedec_sim.protocol.messages import Commit, Draft, Step, Update
from pipedec_sim.protocol.sampling import request_key
from pipedec_sim.protocol.serve import SINGLE, make_server
from pipedec_sim.protocol.strategies import make_strategy

POLL_S = 0.05       # the longest the head waits for an inbound message between checks


@dataclass
class HeadHolders:
    """One request's KV holders on the head."""
    draft: DraftModel | None
    verifier: Verifier | None      # topology A


class DistributedServer(DistributedPipeline):
    """The stage processes and the head of a serving deployment. For one request at a
    time (`run`) use `DistributedPipeline`: its stages reset their only holder."""
    STAGE_MODULE = "backends.torch.serve_worker"

    def __init__(self, cfg: StageConfig, draft_spec: str | None, *, knobs=None,
                 serve_knobs: dict | None = None, torchrun: bool = False,
                 timeline: bool = False):
        """timeline: each run keeps its commits, the head's work and (stages on the head's
        host) every stage's computes as timeline events (`ServeRun.pipeline.timeline`)."""
        super().__init__(cfg, draft_spec, knobs=knobs, torchrun=torchrun)
        self.serve_knobs = ServeKnobs(**(serve_knobs or {}))
        self.timeline = timeline

    def serve(self, name: str, requests: Sequence[Request], *, arrivals_ms=None,
              concurrency: int | None = None) -> tuple[ServeRun, dict[int, list[int]]]:
        """Serve `requests` (request r is requests[r]) under serving strategy `name`: open
        loop at `arrivals_ms` (ms from the start), or closed loop with `concurrency`
        outstanding. Returns the run (wall-clock times) and each request's output."""
        return ServingRun(self, name, requests, arrivals_ms, concurrency).run()

    # ---- what a serving run needs of the pipeline --------------------------------------
    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def holders_for(self, req: Request) -> HeadHolders:
        """Request `req`'s own draft and verifier over the head's weights (the modules are
        shared, the caches and bookkeeping are its own)."""
        draft = (DraftModel(self.head.draft_model.shard.model, self.device)
                 if self.head.draft_model is not None else None)
        verifier = None
        if self.verifier is not None:
            verifier = Verifier(self.verifier.shard)
            verifier.sampler = TargetSampler(self.cfg.target_sampling(), request_key(req.id))
        return HeadHolders(draft, verifier)

    def poll(self, seconds: float):
        """The next inbound item, waiting up to `seconds`; None if none came."""
        return self._next(seconds > 0, seconds)


class ServingRun:
    """One serving workload on a started `DistributedServer`: the scheduler's
    `ServeDispatch` and the head's event loop."""

    def __init__(self, pipe: DistributedServer, name: str, requests: Sequence[Request],
                 arrivals_ms, concurrency: int | None):
        if (arrivals_ms is None) == (concurrency is None):
            raise ValueError("give arrivals_ms or concurrency")
        if name not in SINGLE:
            raise ValueError(f"unknown serving strategy {name!r}")
        self.pipe, self.name, self.requests = pipe, name, list(requests)
        self.arrivals = None if arrivals_ms is None else list(arrivals_ms)
        self.concurrency, self.n = concurrency, len(self.requests)
        self.server = make_server(name, self._make, self, stages=pipe.S,
                                  serve=pipe.serve_knobs, prune=pipe.cfg.prune,
                                  window=pipe.head.knobs["window"])
        self.out = RequestRun()                 # busy time, rows, steps, commits
        self.served: dict[int, Served] = {}
        self.strategies: dict = {}
        self.seq_of: dict[int, int] = {}        # request -> sequence number (wire REQ)
        self.r_of: dict[int, int] = {}          # and back: this run's requests only
        self.holders: dict[int, HeadHolders] = {}
        self.drafts: deque[tuple[int, Draft]] = deque()
        self.taking: deque[tuple[int, int]] = deque()  # (seq, step) per part, as sent
        self.untaken: dict[int, int] = {}       # step -> its parts stage 1 has not taken
        self.back: dict[tuple[int, int], tuple[int, int]] = {}  # (seq, batch) -> (step, part)
        self.returning: dict[int, list] = {}    # step -> [answers by part, parts not back]
        self.issued = self.ended = self.parts = self.forwards = 0
        self.outgoing: list[tuple[int, Update]] = []    # this dispatch's broadcasts
        self.t0 = time.perf_counter()

    def now_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3

    # ---- the head's loop -------------------------------------------------------------
    def run(self) -> tuple[ServeRun, dict[int, list[int]]]:
        self.t0 = time.perf_counter()
        last = time.monotonic()
        while self.ended < self.n:
            issued = self._issue()
            item = self.pipe.poll(self._wait_s())
            if item is not None:
                self._handle(item)
            elif not self._draft_pass() and not issued:
                self._idle(last)
                continue
            last = time.monotonic()
        end = self.now_ms()
        self._report()
        self.out.end_ms = end
        outputs = {r: list(s.output) for r, s in sorted(self.strategies.items())}
        run = ServeRun(dict(sorted(self.served.items())), self.out, end, self.parts,
                       self.forwards)
        return run, outputs

    def _wait_s(self) -> float:
        """How long the loop may wait for a message: not at all with drafts to run, and
        not past the next open-loop arrival."""
        if self.drafts:
            return 0.0
        if self.arrivals is not None and self.issued < self.n:
            return min(POLL_S, max(0.0, (self.arrivals[self.issued] - self.now_ms()) / 1e3))
        return POLL_S

    def _idle(self, last: float) -> None:
        """Nothing came: a failed stage, or no progress for timeout_s while a request is
        outstanding (between open-loop arrivals an idle pipeline is no fault)."""
        self.pipe.check_alive()
        waiting = self.issued > self.ended
        limit = self.pipe.cfg.timeout_s
        if waiting and time.monotonic() - last > limit:
            raise StageFailed(f"{self.name}: no progress for {limit:g} s ({self.ended} of "
                              f"{self.n} requests done){self.pipe._hint()}")

    def _issue(self) -> bool:
        """Issue the requests that are due; whether any was."""
        before = self.issued
        if self.arrivals is None:
            while self.issued < self.n and self.issued - self.ended < self.concurrency:
                self._arrive(self.now_ms())
        else:
            while self.issued < self.n and self.arrivals[self.issued] <= self.now_ms():
                self._arrive(self.arrivals[self.issued])
        return self.issued > before

    def _dispatch(self, actions) -> None:
        """Execute one event's actions (a step back, a draft pass, an ack, an arrival); its
        broadcast notices, of every request, go as one control message per stage (ahead
        of a step it sends, as if each had left at once)."""
        self.server.dispatch(actions)
        self._broadcast_held()

    def _broadcast_held(self) -> None:
        """The broadcast notices held so far, as one message to every stage."""
        held, self.outgoing = self.outgoing, []
        self.pipe.out.send_notices(held, range(1, self.pipe.S + 1), wire.TAG_CTRL)

    def _arrive(self, at_ms: float) -> None:
        r = self.issued
        self.issued += 1
        self.served[r] = Served(at_ms)
        self._dispatch(self.server.arrive(r))

    def _make(self, r: int):
        """Request r is admitted: its holders everywhere, then its strategy."""
        pipe, req = self.pipe, self.requests[r]
        seq = self.seq_of[r] = pipe.next_seq()
        self.r_of[seq] = r
        cfg = pipe.cfg
        pipe.out.send([wire.reset(seq, cfg.prune, cfg.cancel, request_key(req.id))], 1)
        pipe.control_open |= cfg.prune == "broadcast"
        self.holders[r] = pipe.holders_for(req)
        s = self.strategies[r] = make_strategy(
            SINGLE[self.name], req.prompt_ids, req.max_new_tokens, eos=pipe.eos,
            pooled=self.name == "pipedec-db", **pipe.head.knobs)
        return s

    # ---- facts in --------------------------------------------------------------------
    def _handle(self, item) -> None:
        r = self.r_of.get(item[1])
        if r is None:
            return              # an earlier run's leftovers (acks behind its REPORT)
        if item[0] == "ack":
            self._taken(item[1])
        elif item[0] in ("hidden", "tokens"):
            self._back(r, *item)

    def _taken(self, seq: int) -> None:
        """Stage 1 took a part (acks come in the order the parts were sent)."""
        expected, step = self.taking.popleft()
        if seq != expected:
            raise RuntimeError(f"stage 1 acked a part of request {seq}, expected {expected}")
        self.untaken[step] -= 1
        if self.untaken[step] == 0:
            del self.untaken[step]
            actions = self.server.entry_taken()
            if actions is not None:
                self._dispatch(actions)

    def _back(self, r: int, kind: str, seq: int, batch_id: int, rows, payload) -> None:
        """A part left the last stage: hidden states to verify here (A) or tokens (B)."""
        step, i = self.back.pop((seq, batch_id))
        tokens: dict[int, int] = {}
        holders = self.holders.get(r)          # None: r finished meanwhile
        if kind == "tokens":
            tokens = {row.id: t for row, t in zip(rows, payload)}
        elif rows and holders is not None:
            t = time.perf_counter()
            tokens = holders.verifier.verify(rows, 0, payload)
            self._busy("lm_head", t, len(tokens))
        answers = self.returning[step]
        answers[0][i] = (r, batch_id, tokens)
        answers[1] -= 1
        if answers[1] == 0:
            del self.returning[step]
            self._dispatch(self.server.returned(step, answers[0]))

    def _draft_pass(self) -> bool:
        """Run one draft pass (the oldest pending Draft of each request); False if none
        was pending."""
        if not self.drafts:
            return False
        work, keep, seen = [], deque(), set()
        for r, d in self.drafts:
            (keep if r in seen else work).append((r, d))
            seen.add(r)
        self.drafts = keep
        todo = [(k, self.holders[r].draft, d) for k, (r, d) in enumerate(work)
                if r in self.holders and self.holders[r].draft is not None]
        got: list[dict] = [{} for _ in work]     # none: r finished meanwhile
        if todo:
            t = time.perf_counter()
            for (k, _, _), proposals in zip(todo, propose_requests([x[1:] for x in todo])):
                got[k] = proposals
            self._busy("draft", t, sum(len(d.rows) for _, _, d in todo))
        self._dispatch(self.server.drafted(
            [(r, d.ticket, g) for (r, d), g in zip(work, got)]))
        return True

    def _busy(self, actor: str, since: float, rows: int) -> None:
        """The head's `actor` (draft, lm_head) worked from `since` until now."""
        self.out.worked(actor, (since - self.t0) * 1e3, self.now_ms(), actor, rows, True,
                        self.pipe.timeline)

    def _report(self) -> None:
        """Every stage's busy time and rows over the run (REPORT walks the ring behind the
        parts still in flight, which are dropped here: their requests are done)."""
        pipe = self.pipe
        pipe.out.send([wire.header(wire.REPORT, pipe.seq),
                       torch.zeros((pipe.S, 2), dtype=torch.int64)], 1)
        deadline = time.monotonic() + pipe.cfg.timeout_s
        while True:
            item = pipe.poll(POLL_S)
            if item is not None and item[0] == "report":
                break
            if item is None:
                pipe.check_alive()
                if time.monotonic() > deadline:
                    raise StageFailed(f"no report from the last stage within "
                                      f"{pipe.cfg.timeout_s:g} s{pipe._hint()}")
        slices = [] if item[3] is None else item[3].tolist()
        self.out.cancelled = sum(1 for s in slices if s[1] == SLICE_CANCEL)
        self.forwards = sum(1 for s in slices if s[1] in (SLICE_BATCH, SLICE_CANCEL))
        if pipe.timeline and pipe.links.one_host:   # one host: one monotonic clock
            self._stage_events(slices)
        for j, (us, rows) in enumerate(item[2].tolist(), 1):   # the stages' own totals
            self.out.busy_ms[f"stage{j}"] = us / 1e3
            self.out.rows[f"stage{j}"] = rows

    def _stage_events(self, slices) -> None:
        """The stages' timeline slices as timeline events on the run's clock (their busy
        time and rows are then replaced by the stages' totals)."""
        labels = {SLICE_BATCH: "step", SLICE_PRUNE: "prune", SLICE_CANCEL: "step"}
        for j, kind, _, start, end, rows in slices:
            self.out.worked(f"stage{int(j)}", (start - self.t0) * 1e3, (end - self.t0) * 1e3,
                            labels[int(kind)], int(rows), kind != SLICE_CANCEL, True)

    # ---- ServeDispatch: the scheduler's actions --------------------------------------
    def inject(self, step: Step, notices: tuple[tuple[int, Update], ...]) -> None:
        assert step.parts, "a step carries at least one part"
        self._broadcast_held()                 # the notices before it leave before it
        for r, u in notices:                   # piggyback: just ahead of the step
            self.inband(r, u)
        k = len(step.parts)
        self.untaken[step.id] = k
        self.returning[step.id] = [[None] * k, k]
        for i, (r, b) in enumerate(step.parts):
            seq = self.seq_of[r]
            assert (seq, b.id) not in self.back, "two parts of one batch in flight"
            self.back[(seq, b.id)] = (step.id, i)
            self.taking.append((seq, step.id))
            self.served[r].batches += 1
            self.pipe.out.send([wire.batch_header(wire.BATCH, seq, b, k - 1 - i)]
                               + ([rows_tensor(b.rows)] if b.rows else []), 1)
        self.out.batches += 1
        self.parts += k

    def draft(self, r: int, request: Draft) -> None:
        self.drafts.append((r, request))

    def prune(self, r: int, update: Update) -> None:
        holders = self.holders.get(r)
        if holders is None:
            return
        for holder in (holders.draft, holders.verifier):
            if holder is not None:
                holder.apply(update)

    def broadcast(self, r: int, update: Update) -> None:
        self.outgoing.append((self.seq_of[r], update))    # sent after the dispatch

    def inband(self, r: int, update: Update) -> None:
        self.pipe.out.send_notices([(self.seq_of[r], update)], (1,))

    def commit(self, r: int, commit: Commit) -> None:
        now = self.now_ms()
        self.served[r].commits.append((now, len(commit.tokens), commit.drafted,
                                       commit.outcome))
        self.out.committed(now, commit, self.pipe.timeline)

    def finish(self, r: int) -> None:
        """Request r is complete: its holders go, on the head and at every stage."""
        self.served[r].end_ms = self.now_ms()
        self.ended += 1
        self.holders.pop(r, None)
        self.pipe.out.send([wire.header(wire.FREE, self.seq_of[r])], 1)
