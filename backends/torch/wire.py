"""What crosses a link between pipeline processes: fixed-shape int64 headers, then tensors.

Every message starts with an int64 header of HEADER_LEN slots (pickled objects cost ~4x a
tensor send over gloo, see ENV.md); the header says which tensors follow and their sizes:

  BATCH   rows int64 [n, 4] (id, parent, token, pos), then hidden [n, H] unless it comes
          from the head (float32 over gloo, or the model's dtype over NCCL: see link.py);
          slots: batch id, n, verify_from, committed, and (serving) left: how many parts
          of the same step follow back to back (a stage computes a step once it has its
          last part, left = 0). n = 0: header only (every row died on the way; the next
          stage and the head still count it)
  TOKENS  (topology B, last stage -> head) rows int64 [n, 4] + argmax tokens int64 [n]
          n = 0: header only
  UPDATE  ids int64 [n_commit + n_kill] (a prune notice; slots n, n2 = the two counts)
  RESET   a new request: empty every KV cache (slot REQ is the request's sequence number);
          slots n, n2 say how this request's notices travel (`reset`, `reset_mode`)
  REPORT  per-stage busy microseconds and rows computed, int64 [S, 2], filled on the way;
          then, if n > 0, the stages' timeline slices float64 [n, 6] (stage, kind, batch id,
          start, end on the host's monotonic clock, rows), each stage appending its own
  STOP    shut down cleanly
  FREE    (serving) request REQ is complete: its KV holders go (`serve_worker.py`)
Tags keep streams apart: DATA (the batch stream: head -> stage 1 -> ... -> stage S -> head),
ACK (stage 1 took a batch: the head's EntryFree) and CTRL (head -> every stage: broadcast
prune notices, UPDATE with slot REQ = the request they belong to, then one STOP).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pipedec_sim.protocol.messages import Batch, Update
from pipedec_sim.protocol.pacing import PRUNE_MODES

HEADER_LEN = 8
BATCH, TOKENS, UPDATE, RESET, REPORT, STOP, FREE = 1, 2, 3, 4, 5, 6, 7
KIND, REQ, ID, N, VFROM, COMMITTED, N2, LEFT = 0, 1, 2, 3, 4, 5, 6, 7   # header slots
TAG_DATA, TAG_ACK, TAG_CTRL = 1, 2, 3


def header(kind: int, req: int, *, id: int = 0, n: int = 0, vfrom: int = 0,
           committed: int = 0, n2: int = 0, left: int = 0) -> torch.Tensor:
    h = torch.zeros(HEADER_LEN, dtype=torch.int64)
    h[KIND], h[REQ], h[ID], h[N], h[VFROM], h[COMMITTED], h[N2], h[LEFT] = (
        kind, req, id, n, vfrom, committed, n2, left)
    return h


def batch_header(kind: int, req: int, batch: Batch, left: int = 0) -> torch.Tensor:
    """A BATCH/TOKENS header; `left`: the parts of its serving step after this one."""
    return header(kind, req, id=batch.id, n=len(batch.rows), vfrom=batch.verify_from,
                  committed=batch.committed, left=left)


def reset(req: int, prune: str, cancel: bool, key: int = 0) -> torch.Tensor:
    """RESET for request `req`, saying how its prune notices travel and the request's
    sampling key (`sampling.request_key`, for topology B's last stage). The stages take
    the mode from here rather than from their own flags, so a torchrun rank started with
    other flags cannot disagree with the head."""
    return header(RESET, req, id=key, n=PRUNE_MODES.index(prune) + 1, n2=int(cancel))


def reset_key(h: torch.Tensor) -> int:
    """The sampling key a RESET carries (0 from a sender that states none)."""
    return int(h[ID])


def reset_mode(h: torch.Tensor) -> tuple[str | None, bool]:
    """(prune mode, cancel) of a RESET; (None, False) from a sender that states none
    (the profiler's hand-made head: its notices come in-band)."""
    code = int(h[N])
    return (PRUNE_MODES[code - 1] if code else None), bool(int(h[N2]))


def update_tensors(req: int, update: Update) -> list[torch.Tensor]:
    """An UPDATE message. Callers send only notices with ids (`has_ids`)."""
    ids = list(update.commit) + list(update.kill)
    return [header(UPDATE, req, n=len(update.commit), n2=len(update.kill)),
            torch.tensor(ids, dtype=torch.int64)]


def has_ids(update: Update) -> bool:
    return bool(update.commit or update.kill)


def recv_update(h: torch.Tensor, src: int, tag: int = TAG_DATA) -> Update:
    """The ids that follow an UPDATE header `h`."""
    nc, nk = int(h[N]), int(h[N2])
    ids = recv(nc + nk, torch.int64, src, tag).tolist()
    return Update(tuple(ids[:nc]), tuple(ids[nc:]))


class Outbox:
    """Non-blocking sends: keep each tensor alive until its send completes. Never waiting
    on a send avoids ring deadlocks (head -> stage 1 ... last stage -> head)."""

    def __init__(self):
        self.pending: list[tuple] = []

    def send(self, tensors, dst: int, tag: int = TAG_DATA, group=None) -> None:
        for t in tensors:
            t = t.contiguous()
            self.pending.append((dist.isend(t, dst, group=group, tag=tag), t))
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()]

    def flush(self, timeout_s: float = 10.0) -> None:
        from datetime import timedelta
        for w, _ in self.pending:
            w.wait(timedelta(seconds=timeout_s))
        self.pending.clear()


def recv(shape, dtype, src: int, tag: int = TAG_DATA) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    dist.recv(t, src, tag=tag)
    return t
