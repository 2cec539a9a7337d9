"""A pipeline stage serving many requests at once: one KV holder per request.

`ServeStage` is `worker.Stage` (the single-request stage) with a holder per request
sequence number: the stage's loaded layers are read once, and each running request gets
its own `Shard` over those same modules (no weight is copied) with its own `StageState`,
KV cache and sampler, so one request never sees another's cache. The DATA messages mean:

  RESET   request REQ joins: an empty holder of its own (the others stay); its prune mode,
          cancel rule and sampling key as for one request (`wire.reset`)
  FREE    request REQ is complete: its holder and its KV go (`wire.FREE`)
  BATCH   one part of a serving step, computed through REQ's holder and passed on at once
  UPDATE  in-band notices, each for its own request's holder (`wire.recv_notices`)
  REPORT  busy time, rows and timeline slices since the last REPORT (once per serving
          run), then the counters start again

A serving step travels as its parts, one BATCH message each, back to back, the header's
LEFT slot counting the parts still to come. The stage acks each part as it takes it
(stage 1), gathers them, then computes the step's live rows in ONE forward over their
requests (`batch.forward_requests`: the weights once, attention per request over its
own cache and tree; a request with two parts in the step gets its second in a second
forward), and passes every part on as its own message. Broadcast notices (CTRL: one
message per head event, with the notices of every request it prunes) go to
their request's holder: a request's notices that arrive before its RESET wait for it,
those of a finished request are dropped. With cancel the forward is abandoned once
notices have killed every row of every part in it (`pacing.cancels`), as the simulator
abandons a step.

Launched by `serve_runtime.DistributedServer` as `python -m backends.torch.serve_worker`
(or as a torchrun rank of `pipedec-real serve`).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import torch

from backends.torch import wire
from backends.torch.batch import forward_requests, rounds
from backends.torch.shard import Shard, TargetSampler
from backends.torch.worker import (
    Control,
    Stage,
    StageConfig,
    stage_main,
)
from pipedec_sim.protocol.messages import Batch, Update
from pipedec_sim.protocol.pacing import cancels, stage_output


@dataclass
class Part:
    """One request's part of the step being gathered, then computed."""
    r: int                       # its request (sequence number)
    batch: Batch
    hidden: torch.Tensor | None  # into this stage (None at stage 1: it embeds)
    rows: tuple = ()             # its live rows, once admitted
    out: torch.Tensor | None = None    # its output hidden states


@dataclass
class Holder:
    """One request's state at this stage."""
    shard: Shard                 # its KV and bookkeeping over the stage's shared layers
    sampler: TargetSampler       # its token rule (topology B's last stage)
    cancel: bool                 # broadcast + cancel, from its RESET


class ServeStage(Stage):
    def __init__(self, cfg: StageConfig, j: int, shard: Shard, links):
        super().__init__(cfg, j, shard, links)
        self.base = shard            # the loaded layers every holder shares
        self.shard = None            # the holder being worked on (`_use`), none between
        self.holders: dict[int, Holder] = {}
        self.opened = -1             # the newest request seen (RESETs come in seq order)
        self.gathered: list[Part] = []   # the parts of the step coming in
        self.handlers = {wire.BATCH: self.on_batch, wire.UPDATE: self.on_update,
                         wire.RESET: self.on_open, wire.FREE: self.on_free,
                         wire.REPORT: self.on_report}      # `Stage.loop` dispatches

    def _use(self, r: int) -> Holder:
        """Make request r's holder the one `Stage`'s methods work on."""
        holder = self.holders.get(r)
        if holder is None:
            raise RuntimeError(f"no KV holder for request {r} (never opened, or finished)")
        self.req, self.shard, self.sampler, self.cancel = (r, holder.shard, holder.sampler,
                                                           holder.cancel)
        return holder

    def _pass_on(self, tensors) -> None:
        if self.next != 0:           # the last stage has no one to tell
            self.out.send(tensors, self.next)

    # ---- requests joining and leaving ------------------------------------------------
    def on_open(self, h) -> None:
        r = int(h[wire.REQ])
        prune, cancel = wire.reset_mode(h)
        if prune == "broadcast" and self.control is None:
            self.control = Control()
        b = self.base
        shard = Shard(b.model, b.lo, b.hi, embed=b.has_embed, head=b.has_head, device=b.device)
        self.holders[r] = Holder(shard, TargetSampler(self.cfg.target_sampling(),
                                                      wire.reset_key(h)),
                                 cancel and prune == "broadcast")
        self.opened = max(self.opened, r)
        self._pass_on([h])

    def on_free(self, h) -> None:
        r = int(h[wire.REQ])
        self.holders.pop(r, None)
        self.notices = [(q, u) for q, u in self.notices if q != r]
        self.shard = None
        self._pass_on([h])

    # ---- notices ---------------------------------------------------------------------
    def _finished(self, r: int) -> bool:
        return r <= self.opened and r not in self.holders

    def _collect(self) -> None:
        """Arrived broadcast notices, less those of finished requests."""
        if self.control is not None:
            self.notices += [(r, u) for r, u in self.control.arrived() if not self._finished(r)]

    def _catch_up(self) -> None:
        """Apply every open request's arrived notices, in order; a request not opened yet
        keeps its notices for after its RESET."""
        self._collect()
        waiting = []
        for r, u in self.notices:
            if r in self.holders:
                self._apply_to(r, u)
            elif r > self.opened:
                waiting.append((r, u))
        self.notices = waiting

    def _apply_to(self, r: int, update: Update) -> None:
        self._use(r)
        self._apply(update)

    def on_update(self, h) -> None:
        pairs, message = wire.recv_notices(h, self.prev)
        for r, update in pairs:
            if r in self.holders:
                self._apply_to(r, update)
        self._pass_on(message)

    # ---- work ------------------------------------------------------------------------
    def on_batch(self, h) -> None:
        """One part of a step: kept until the step's last part has come (wire.LEFT = 0),
        then the step is computed (`_step`)."""
        r = int(h[wire.REQ])
        self._use(r)
        batch, hidden = self._take(h)
        self.gathered.append(Part(r, batch, hidden))
        if int(h[wire.LEFT]) == 0:
            parts, self.gathered = self.gathered, []
            self._step(parts)

    def _step(self, parts: list[Part]) -> None:
        """A step's parts: each request's dead rows dropped, its live rows computed, one
        forward per round (`batch.rounds`: a request's second part in the next), then
        every part sent on as its own message, in the order they came."""
        for p in parts:
            p.rows, p.hidden = self.holders[p.r].shard.admit(p.batch.rows, p.hidden)
        for group in rounds([p for p in parts if p.rows], key=lambda p: p.r):
            self._forward(group)
        for k, p in enumerate(parts):
            out = stage_output(p.batch, p.rows)
            self._use(p.r)
            t = time.perf_counter()
            tokens = self._tokens(out, p.out) if out.rows else None
            self.busy_us += int((time.perf_counter() - t) * 1e6)
            self._send_on(p.r, out, p.out, tokens, len(parts) - 1 - k)

    def _forward(self, group: list[Part]) -> None:
        """One forward over parts of distinct requests (a lone part: its request's own
        `Shard.forward`, as for one request). With cancel, the forward is abandoned once
        notices have killed every row of every part (`pacing.cancels`), as the
        simulator abandons a step; an abandoned part goes on with no rows."""
        t = time.perf_counter()
        self.abandoned = False
        if len(group) == 1:
            p = group[0]
            self._use(p.r)
            outs = [self.shard.forward(p.rows, p.batch.committed, p.hidden,
                                       between=self._between if self.cancel else None)]
            outs = None if outs[0] is None else outs
        else:
            cancel = all(self.holders[p.r].cancel for p in group)
            outs = forward_requests([self.holders[p.r].shard for p in group],
                                    [p.rows for p in group], [p.batch.committed for p in group],
                                    None if self.j == 1 else [p.hidden for p in group],
                                    between=self._all_killed(group) if cancel else None)
            self.abandoned = outs is None
        for k, p in enumerate(group):
            p.out = None if outs is None else outs[k]
            p.rows = p.rows if outs is not None else ()
        self._account(t, group[0].batch.id, sum(len(p.rows) for p in group))

    def _all_killed(self, group: list[Part]):
        """`forward_requests`' between-layer check: have arrived notices killed every row
        of every part?"""
        ids = [(p.r, frozenset(row.id for row in p.rows)) for p in group]

        def between() -> bool:
            self._collect()
            return all(any(q == r and cancels(rows, u) for q, u in self.notices)
                       for r, rows in ids)
        return between

    def on_report(self, h) -> None:
        """The serving run's totals (`Stage.on_report`), then a fresh count for the next."""
        super().on_report(h)
        self.busy_us = self.rows = 0
        self.slices = []


def serve_stage_main(cfg: StageConfig, j: int, world: int, init_method: str,
                     err_dir: str) -> None:
    """Entry point of a serving stage process: `worker.stage_main` with a `ServeStage`
    (the same start-up, links and one-line failure report)."""
    stage_main(cfg, j, world, init_method, err_dir, stage_class=ServeStage)


def main(argv: list[str]) -> int:
    """`python -m backends.torch.serve_worker CONFIG_JSON J WORLD INIT_METHOD ERR_DIR`."""
    config, j, world, init_method, err_dir = argv
    serve_stage_main(StageConfig(**json.loads(config)), int(j), int(world), init_method,
                     err_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
