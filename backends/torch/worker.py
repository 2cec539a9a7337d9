"""A pipeline stage process: receive, drop dead rows, compute, pass on.

Rank j (1..S) holds stage j's decoder layers; rank 0 is the head. Messages are handled in
arrival order, so a prune notice (UPDATE) reaches a stage after every batch injected
before it: in-band pruning, the simulator's `--prune piggyback` family (see runtime.py).
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from backends.torch import wire
from backends.torch.checkpoint import load_stage, num_layers
from backends.torch.inline import run_stage, stage_bounds
from backends.torch.link import Links, connect, rank_device
from backends.torch.shard import Shard, rows_tensor, tensor_rows
from pipedec_sim.protocol.messages import Batch, Update

IDLE_TIMEOUT = timedelta(days=1)
SLICE_BATCH, SLICE_PRUNE = 0, 1  # what a stage's timeline slice was
FAULT_ENV = "PIPEDEC_FAULT"     # "stage=J,request=R[,mode=raise|exit]": test hook


@dataclass
class StageConfig:
    target: str
    stages: int
    topology: str = "A"
    device: str = "cpu"
    timeout_s: float = 60.0
    transport: str = "auto"      # stage-to-stage activations: auto | gloo | nccl (link.py)
    dtype: str = "float32"       # weights and activations, a torch dtype name

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def build_shard(cfg: StageConfig, j: int) -> Shard:
    """Stage j (1-based): read only its slice of the checkpoint, onto this rank's device."""
    lo, hi = stage_bounds(num_layers(cfg.target), cfg.stages)[j - 1]
    head = j == cfg.stages and cfg.topology == "B"
    device = rank_device(cfg.device, j)
    loaded = load_stage(cfg.target, lo, hi, embed=(j == 1), head=head, device=device,
                        dtype=cfg.torch_dtype)
    return Shard(loaded.model, lo, hi, embed=(j == 1), head=head, device=device)


def _fault(j: int):
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    kv = dict(p.split("=", 1) for p in spec.split(","))
    return (int(kv["request"]), kv.get("mode", "raise")) if int(kv["stage"]) == j else None


class Stage:
    def __init__(self, cfg: StageConfig, j: int, shard: Shard, links: Links):
        self.cfg, self.j, self.shard, self.links = cfg, j, shard, links
        self.S = cfg.stages
        self.prev = j - 1
        self.next = j + 1 if j < self.S else 0        # the last stage feeds the head
        self.out = wire.Outbox()
        self.req = -1
        self.busy_us = 0
        self.rows = 0
        self.slices: list[tuple] = []     # (stage, kind, batch id, start, end, rows) per job
        self.fault = _fault(j)

    def loop(self) -> None:
        while True:
            h = wire.recv(wire.HEADER_LEN, torch.int64, self.prev)
            kind = int(h[wire.KIND])
            if kind == wire.STOP:        # pass it on (the last stage: back to the head)
                self.out.send([h], self.next)
                if self.j == 1:              # and end the head's ACK reader
                    self.out.send([torch.tensor([-1, 0])], 0, wire.TAG_ACK)
                self.out.flush()
                return
            getattr(self, f"on_{('', 'batch', 'tokens', 'update', 'reset', 'report')[kind]}")(h)

    def on_reset(self, h) -> None:
        self.req = int(h[wire.REQ])
        self.shard.reset()
        self.busy_us = self.rows = 0
        self.slices = []
        if self.next != 0:
            self.out.send([h], self.next)

    def on_update(self, h) -> None:
        nc, nk = int(h[wire.N]), int(h[wire.N2])
        ids = wire.recv(nc + nk, torch.int64, self.prev).tolist()
        t = time.perf_counter()
        if self.shard.apply(Update(tuple(ids[:nc]), tuple(ids[nc:]))):
            self._slice(SLICE_PRUNE, -1, t, 0)
        self.busy_us += int((time.perf_counter() - t) * 1e6)
        if self.next != 0:
            self.out.send([h, torch.tensor(ids, dtype=torch.int64)], self.next)

    def on_report(self, h) -> None:
        """Fill in this stage's busy time and rows, append its slices to those of the
        stages before it, pass it on (the last stage: to the head)."""
        table = wire.recv((self.S, 2), torch.int64, self.prev)
        table[self.j - 1, 0], table[self.j - 1, 1] = self.busy_us, self.rows
        m = int(h[wire.N])
        mine = torch.tensor(self.slices, dtype=torch.float64).reshape(-1, 6)
        slices = torch.cat([wire.recv((m, 6), torch.float64, self.prev), mine]) if m else mine
        h = h.clone()
        h[wire.N] = len(slices)
        self.out.send([h, table] + ([slices] if len(slices) else []), self.next)

    def _slice(self, kind: int, batch_id: int, start: float, rows: int) -> None:
        self.slices.append((self.j, kind, batch_id, start, time.perf_counter(), rows))

    def on_batch(self, h) -> None:
        n = int(h[wire.N])
        rows = tensor_rows(wire.recv((n, 4), torch.int64, self.prev)) if n else ()
        hidden = self.links.recv(n, self.prev) if self.j > 1 and n else None
        if self.j == 1:       # tell the head stage 1 took it (the strategy's EntryFree)
            self.out.send([torch.tensor([int(h[wire.REQ]), int(h[wire.ID])])], 0, wire.TAG_ACK)
        if self.fault and self.fault[0] == self.req:
            self._crash()
        batch = Batch(int(h[wire.ID]), rows, "", int(h[wire.VFROM]), int(h[wire.COMMITTED]))
        t = time.perf_counter()
        out, hidden = run_stage(self.shard, batch, hidden)
        tokens = None
        if out is not None and self.next == 0 and self.cfg.topology == "B":
            tokens = self._lm_head(out, hidden)
        self.busy_us += int((time.perf_counter() - t) * 1e6)
        self._slice(SLICE_BATCH, batch.id, t, 0 if out is None else len(out.rows))
        if out is None:            # every row died: an empty batch (header only) goes on,
            self._send_empty(h)    # so that the head learns the batch left the pipeline
            return
        self.rows += len(out.rows)
        self._send_on(h, out, hidden, tokens)

    def _send_empty(self, h) -> None:
        h = h.clone()
        h[wire.N], h[wire.VFROM] = 0, 0
        if self.next == 0 and self.cfg.topology == "B":
            h[wire.KIND] = wire.TOKENS
        self.out.send([h], self.next)

    def _send_on(self, h, out: Batch, hidden, tokens) -> None:
        h = h.clone()
        h[wire.N] = len(out.rows)
        if self.next == 0 and not out.rows[out.verify_from:]:
            self._send_empty(h)                    # nothing to verify: header only
        elif tokens is not None:
            vrows = out.rows[out.verify_from:]
            h[wire.KIND], h[wire.N] = wire.TOKENS, len(vrows)
            self.out.send([h, rows_tensor(vrows), tokens], 0)
        elif self.next == 0:                       # topology A: only verified rows go back
            vrows = out.rows[out.verify_from:]
            h[wire.N], h[wire.VFROM] = len(vrows), 0
            self.out.send([h, rows_tensor(vrows)], 0)
            self.links.send(self.out, hidden[0, out.verify_from:], 0)
        else:
            self.out.send([h, rows_tensor(out.rows)], self.next)
            self.links.send(self.out, hidden[0], self.next)

    def _lm_head(self, batch: Batch, hidden) -> torch.Tensor:
        return self.shard.greedy(hidden[:, batch.verify_from:])

    def _crash(self) -> None:
        if self.fault[1] == "exit":
            os._exit(3)                              # a hard death: no traceback, no cleanup
        raise RuntimeError(f"injected fault ({FAULT_ENV}) on request {self.req}")


def stage_main(cfg: StageConfig, j: int, world: int, init_method: str, err_dir: str) -> None:
    """Entry point of a stage process (spawned locally, or one torchrun rank with
    init_method "env://")."""
    torch.set_num_threads(1)
    if "127.0.0.1" in init_method:     # spawned by a local launcher: die with it
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        _die_with_parent()
    try:
        shard = build_shard(cfg, j)
        # A gloo timeout closes the link for good, so an idle stage must never time out:
        # liveness is the head's job (it polls the stages and keeps its own deadlines).
        dist.init_process_group("gloo", init_method=init_method, rank=j, world_size=world,
                                timeout=IDLE_TIMEOUT)
        links = connect(j, world, cfg.device, cfg.transport, shard.model.config.hidden_size,
                        shard.dtype)
        Stage(cfg, j, shard, links).loop()
        dist.destroy_process_group()
    except BaseException as e:        # leave the reason where the launcher looks for it
        if err_dir:
            with open(os.path.join(err_dir, f"stage{j}.err"), "w") as fh:
                fh.write(f"{type(e).__name__}: {e}\n")
        traceback.print_exc(file=sys.stderr)
        sys.exit(1)


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (no orphans if the head is killed)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
