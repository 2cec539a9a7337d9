"""A pipeline stage serving many requests at once: one KV holder per request.

`ServeStage` is `worker.Stage` (the single-request stage) with a holder per request
sequence number: the stage's loaded layers are read once, and each running request gets
its own `Shard` over those same modules (no weight is copied) with its own `StageState`,
KV cache and sampler, so one request never sees another's cache. The DATA messages mean:

  RESET   request REQ joins: an empty holder of its own (the others stay); its prune mode,
          cancel rule and sampling key as for one request (`wire.reset`)
  FREE    request REQ is complete: its holder and its KV go (`wire.FREE`)
  BATCH   one part of a serving step, computed through REQ's holder and passed on at once
  UPDATE  an in-band notice for REQ's holder
  REPORT  busy time, rows and timeline slices since the last REPORT (once per serving
          run), then the counters start again

A serving step travels as its parts, one BATCH message each, back to back; the stage
computes them one after another (no padded forward over several requests' rows), acks
each part it takes (stage 1) and passes each on as soon as it is done. Broadcast
notices (CTRL) go to their request's holder: a request's notices that arrive before its
RESET wait for it, those of a finished request are dropped. With cancel a part is
abandoned when a notice kills all of its rows (`pacing.cancels`), as one request's batch.

Launched by `serve_runtime.DistributedServer` as `python -m backends.torch.serve_worker`
(or as a torchrun rank of `pipedec-real serve`).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from backends.torch import wire
from backends.torch.shard import Shard, TargetSampler
from backends.torch.worker import (
    Control,
    Stage,
    StageConfig,
    stage_main,
)
from pipedec_sim.protocol.messages import Update


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
        r = int(h[wire.REQ])
        update = wire.recv_update(h, self.prev)
        if r in self.holders:
            self._apply_to(r, update)
        self._pass_on(wire.update_tensors(r, update))

    # ---- work ------------------------------------------------------------------------
    def on_batch(self, h) -> None:
        self._use(int(h[wire.REQ]))
        super().on_batch(h)

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
