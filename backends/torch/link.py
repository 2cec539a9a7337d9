"""Links: how hidden states travel between pipeline processes, and which device each rank uses.

Control always goes over gloo (headers, rows, prune notices, acks: small int64 tensors). The
activations between consecutive *stages* go over NCCL, GPU to GPU in the model's dtype with no
host copy, when the run is on CUDA and every stage has a GPU of its own; otherwise over gloo
through host memory in float32. NCCL refuses two ranks of one communicator on the same GPU
("Duplicate GPU detected", NCCL >= 2.5), so `auto` falls back to gloo when stages share a GPU
and says why. The head (rank 0) never joins the NCCL group: it shares a GPU with a stage, and
what it exchanges with the stages is small (rows out; verified rows' hidden states back).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from backends.torch import wire
from pipedec_sim.errors import InputError

TRANSPORTS = ("auto", "gloo", "nccl")


def rank_device(device: str, rank: int) -> torch.device:
    """The device of `rank`: the CPU, or one GPU per rank round-robin. Under torchrun the
    node-local rank picks the GPU; a local launch puts stage j on GPU j-1 and the head on 0."""
    if device == "cpu":
        return torch.device("cpu")
    n = max(torch.cuda.device_count(), 1)
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % n)
    return torch.device("cuda", max(rank - 1, 0) % n)


def choose(transport: str, device: str, stage_places: list[tuple[str, str]]) -> tuple[str, str]:
    """(kind, why) for the stage-to-stage activations, given where each stage runs
    ((host, device) per stage, stage 1 first). Same inputs in every rank: same answer."""
    if device == "cpu" or transport == "gloo":
        return "gloo", "gloo: CPU run" if device == "cpu" else "gloo: --transport gloo"
    if len(stage_places) < 2:
        return "gloo", "gloo: one stage, no stage-to-stage activations"
    shared = _first_shared(stage_places)
    if shared is None:
        return "nccl", "nccl: one GPU per stage"
    why = (f"stages {shared[0]} and {shared[1]} share {stage_places[shared[0] - 1][1]} on "
           f"{stage_places[shared[0] - 1][0]} (NCCL needs one GPU per stage)")
    if transport == "nccl":
        raise InputError(f"cannot use NCCL: {why}", field="--transport")
    return "gloo", f"gloo through host memory: {why}"


def _first_shared(places) -> tuple[int, int] | None:
    seen: dict = {}
    for j, place in enumerate(places, 1):
        if place in seen:
            return seen[place], j
        seen[place] = j
    return None


@dataclass
class Links:
    """This rank's view: `send_batch`/`recv_batch` of batches with a neighbour."""
    rank: int
    kind: str                    # "gloo" | "nccl"
    device: torch.device
    hidden: int
    dtype: torch.dtype
    why: str = ""
    group: object = None
    one_host: bool = True        # every rank on one host: their monotonic clocks agree

    def _nccl(self, peer: int) -> bool:
        return self.kind == "nccl" and self.rank != 0 and peer != 0

    def send_batch(self, out: wire.Outbox, header: torch.Tensor, rows: torch.Tensor | None,
                   hidden: torch.Tensor | None, dst: int) -> None:
        """A BATCH message: the header, then its rows int64 [n, 4] (None: header only) and
        their hidden states [n, H] (None: none), packed into one payload over gloo; over
        NCCL the hidden states follow on the NCCL group."""
        if rows is None:
            out.send([header], dst)
        elif hidden is None:
            out.send([header, rows], dst)
        elif self._nccl(dst):
            out.send([header, rows], dst)
            out.send([hidden], dst, group=self.group)
        else:
            out.send([header, wire.pack(rows, hidden.float().cpu())], dst)

    def recv_batch(self, n: int, src: int, hidden: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A BATCH message's n rows [n, 4] and, if `hidden`, their hidden states [1, n, H]
        on this rank's device in the model's dtype (`send_batch`). The rows may be a view
        of the receive frame (`wire.recv`: decode them before the next receive); the
        hidden states are the caller's (a serving stage holds a step's parts)."""
        if not hidden:
            return wire.recv((n, 4), torch.int64, src), None
        if self._nccl(src):
            rows = wire.recv((n, 4), torch.int64, src)
            t = torch.empty((n, self.hidden), dtype=self.dtype, device=self.device)
            dist.recv(t, src, group=self.group)
            return rows, t.unsqueeze(0)
        same = self.device.type == "cpu" and self.dtype == torch.float32   # .to: no copy
        rows, t = wire.recv_packed(n, self.hidden, src, keep=same)
        return rows, t.to(self.device, self.dtype).unsqueeze(0)


def connect(rank: int, world: int, device: str, transport: str, hidden: int,
            dtype: torch.dtype) -> Links:
    """Collective over every rank, head included, after init_process_group: agree on the
    activations' transport and build the NCCL group if it is used."""
    here = rank_device(device, rank)
    if here.type == "cuda":
        torch.cuda.set_device(here)
    places: list = [None] * world
    dist.all_gather_object(places, (socket.gethostname(), str(here)))
    kind, why = choose(transport, device, [tuple(p) for p in places[1:]])
    group = dist.new_group(list(range(1, world)), backend="nccl") if kind == "nccl" else None
    return Links(rank, kind, here, hidden, dtype, why, group,
                 one_host=len({p[0] for p in places}) == 1)
