"""What crosses a link between pipeline processes: fixed-shape int64 headers, then tensors.

Every message starts with an int64 header of HEADER_LEN slots (pickled objects cost ~4x a
tensor send over gloo, see ENV.md); the header says which tensors follow and their sizes.
Over gloo a message travels in one fixed-size frame as far as it fits (`frame`, `recv`):

  BATCH   rows int64 [n, 4] (id, parent, token, pos), and hidden [n, H] unless it comes
          from the head: over gloo ONE payload, the rows' and the float32 hidden states'
          bytes (`pack`); over NCCL the rows, then the hidden states in the model's dtype
          on the NCCL group (link.py);
          slots: batch id, n, verify_from, committed, and (serving) left: how many parts
          of the same step follow back to back (a stage computes a step once it has its
          last part, left = 0). n = 0: header only (every row died on the way; the next
          stage and the head still count it)
  TOKENS  (topology B, last stage -> head) one payload: rows int64 [n, 4], then the
          target's tokens int64 [n] (`pack_tokens`); n = 0: header only
  UPDATE  one or more prune notices, applied in order (`notices`, `recv_notices`): int64
          [n2] holding, per notice, its request, its commit and kill counts, then its
          ids (slot n = how many notices; REQ = the first one's request)
  RESET   a new request: empty every KV cache (slot REQ is the request's sequence number);
          slots n, n2 say how this request's notices travel (`reset`, `reset_mode`)
  REPORT  per-stage busy microseconds and rows computed, int64 [S, 2], filled on the way;
          then, if n > 0, the stages' timeline slices float64 [n, 6] (stage, kind, batch id,
          start, end on the host's monotonic clock, rows), each stage appending its own
  STOP    shut down cleanly
  FREE    (serving) request REQ is complete: its KV holders go (`serve_worker.py`)
Tags keep streams apart: DATA (the batch stream: head -> stage 1 -> ... -> stage S -> head),
ACK (stage 1 took a batch: the head's EntryFree) and CTRL (head -> every stage: broadcast
prune notices, one UPDATE per event the head handled carrying all its notices, then one
STOP).
"""
from __future__ import annotations

import math
import queue
import threading

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
    # one tensor from a list: an order of magnitude cheaper than zeros + 8 item writes
    return torch.tensor((kind, req, id, n, vfrom, committed, n2, left), dtype=torch.int64)


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


def notices(pairs) -> list[torch.Tensor]:
    """ONE UPDATE message carrying the (request, notice) `pairs` that have ids, in order;
    [] if none has. The head sends every notice of one event this way (one message per
    stage, not one per notice: each gloo message costs its receiver a fixed CPU price)."""
    body: list[int] = []
    k = first = 0
    for req, u in pairs:
        if not has_ids(u):
            continue
        first = req if not k else first
        k += 1
        body += (req, len(u.commit), len(u.kill), *u.commit, *u.kill)
    if not k:
        return []
    return [header(UPDATE, first, n=k, n2=len(body)), torch.tensor(body, dtype=torch.int64)]


def has_ids(update: Update) -> bool:
    return bool(update.commit or update.kill)


def recv_notices(h: torch.Tensor, src: int, tag: int = TAG_DATA
                 ) -> tuple[list[tuple[int, Update]], list[torch.Tensor]]:
    """The (request, notice) pairs of the UPDATE message whose header is `h`, in order,
    and the message itself as it came (to pass on unchanged)."""
    body = recv(int(h[N2]), torch.int64, src, tag)
    words, out, i = body.tolist(), [], 0
    while i < len(words):
        req, nc, nk = words[i:i + 3]
        ids = words[i + 3:i + 3 + nc + nk]
        out.append((req, Update(tuple(ids[:nc]), tuple(ids[nc:]))))
        i += 3 + nc + nk
    return out, [h, body]


class Outbox:
    """Non-blocking sends. The caller never waits on a send: waiting could deadlock the
    ring (head -> stage 1 ... last stage -> head), since a gloo send completes only once
    its receiver has posted the receive. Each tensor must stay alive until its send
    completes, and gloo's `is_completed()` stays False until someone waits (measured,
    torch 2.13); so a reaper thread waits on the sends in order and then lets them go.
    Nothing accumulates, and a send costs no scan of the sends before it. A failed send
    is raised on the next `send` or `flush`."""

    def __init__(self):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.reaper: threading.Thread | None = None

    def send(self, tensors, dst: int, tag: int = TAG_DATA, group=None) -> None:
        """Send ONE message, `tensors` in order (gloo: framed, `frame`; on another group,
        e.g. NCCL, each as it is)."""
        self._isend(frame(tensors, tag) if group is None else tensors, (dst,), tag, group)

    def send_notices(self, pairs, dsts, tag: int = TAG_DATA) -> None:
        """The (request, notice) `pairs` as ONE UPDATE message (`notices`) to every rank in
        `dsts` (gloo), framed once; nothing if none has ids."""
        message = notices(pairs)
        if message:
            self._isend(frame(message, tag), dsts, tag, None)

    def _isend(self, tensors, dsts, tag: int, group) -> None:
        if self.error is not None:
            raise self.error
        if self.reaper is None:
            self.reaper = threading.Thread(target=self._reap, name="outbox", daemon=True)
            self.reaper.start()
        for t in tensors:
            t = t.contiguous()
            for dst in dsts:
                self.queue.put((dist.isend(t, dst, group=group, tag=tag), t))

    def _reap(self) -> None:
        while True:
            item = self.queue.get()
            if isinstance(item, threading.Event):      # a flush: everything before is done
                item.set()
                continue
            try:
                item[0].wait()
            except Exception as e:                     # the peer is gone: say so on send
                self.error = self.error or e

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until every send so far has completed (at most `timeout_s`)."""
        if self.reaper is None:
            return
        done = threading.Event()
        self.queue.put(done)
        if not done.wait(timeout_s):
            raise TimeoutError(f"sends not completed within {timeout_s:g} s")
        if self.error is not None:
            raise self.error


# Frames. Every gloo message is one fixed-size int64 frame per tag (the receiver must know
# a receive's size in advance): two meta words (the bytes inline, the tensors that follow
# the frame), then the bytes of the message's leading tensors that fit, each padded to 8
# bytes; the tensors that do not fit (a batch's big payload) follow as they are. So a
# message that fits is one gloo operation, a big batch two. `recv` serves a message's
# tensors in the order they were sent, from its frame or off the wire, so callers read a
# message tensor by tensor whichever way it travelled. Each (source, tag) stream is read
# by one thread only, into one receive frame allocated once and reused for every message
# (so the state of the frame being read needs no lock).
FRAME_WORDS = {TAG_DATA: 2048, TAG_CTRL: 512, TAG_ACK: 8}   # 16 KB, 4 KB, 64 bytes
META_BYTES = 16
_frames: dict[tuple[int, int], torch.Tensor] = {}   # (src, tag) -> its receive frame
_reading: dict[tuple[int, int], list] = {}   # (src, tag) -> [frame bytes, offset, end, k]


def _padded(n: int) -> int:
    return (n + 7) // 8 * 8


def frame(tensors, tag: int) -> list[torch.Tensor]:
    """What goes on the wire for one message: its frame, then the tensors that spilled.
    The frame holds copies: a view of a receive frame (`recv`) may be passed on as it is."""
    f = torch.zeros(FRAME_WORDS[tag], dtype=torch.int64)
    b, off = f.view(torch.uint8), META_BYTES
    tensors = list(tensors)
    for k, t in enumerate(tensors):
        p = t.contiguous().view(-1).view(torch.uint8)
        if off + p.numel() > b.numel():
            f[1] = len(tensors) - k
            break
        b[off:off + p.numel()] = p
        off += _padded(p.numel())
    else:
        k = len(tensors)
    f[0] = off - META_BYTES
    return [f] + tensors[k:]


def recv(shape, dtype, src: int, tag: int = TAG_DATA, *, keep: bool = False) -> torch.Tensor:
    """The next tensor of the message being read from (src, tag) (`frame`). One read from
    the frame is a view of the stream's receive frame, valid until the stream's next
    message: `keep` returns a copy the caller may hold longer (or hand to another thread).
    A tensor that spilled is received on its own and is the caller's anyway."""
    key = (src, tag)
    state = _reading.get(key)
    if state is None:
        f = _frames.get(key)
        if f is None:
            f = _frames[key] = torch.empty(FRAME_WORDS[tag], dtype=torch.int64)
        _recv_raw(f, src, tag)
        inline, spilled = f[:2].tolist()
        state = _reading[key] = [f.view(torch.uint8), META_BYTES, META_BYTES + inline, spilled]
    buf, off, end, spilled = state
    if off < end:                                 # from the frame
        n = math.prod(shape if isinstance(shape, (tuple, list)) else (shape,)) * dtype.itemsize
        t = buf[off:off + n].view(dtype).view(shape)
        t = t.clone() if keep else t
        state[1] = off + _padded(n)
    else:                                         # spilled: straight off the wire
        state[3] = spilled = spilled - 1
        t = torch.empty(shape, dtype=dtype)
        _recv_raw(t, src, tag)
    if state[1] >= end and not spilled:
        del _reading[key]
    return t


def _recv_raw(t: torch.Tensor, src: int, tag: int) -> None:
    dist.recv(t, src, tag=tag)


# Every gloo send or receive costs a fixed ~0.05-0.3 ms of CPU here (benchmarks/
# wire_overhead.py), far more than its bytes: so a message is one frame where it fits, and
# a batch's rows and float32 hidden states are one payload where it does not.

def pack(rows: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """One payload of rows int64 [n, 4] and hidden float32 [n, H]: their bytes, in turn."""
    return torch.cat([rows.contiguous().view(-1).view(torch.uint8),
                      hidden.contiguous().view(-1).view(torch.uint8)])


def unpack(buf: torch.Tensor, n: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows [n, 4] and hidden states [n, h] of a `pack`ed payload (views, no copy)."""
    return buf[:n * 32].view(torch.int64).view(n, 4), buf[n * 32:].view(torch.float32).view(n, h)


def recv_packed(n: int, h: int, src: int, *, keep: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Receive a `pack`ed payload of n rows of hidden size h (`unpack`; `keep`: `recv`)."""
    return unpack(recv(n * 32 + n * h * 4, torch.uint8, src, keep=keep), n, h)


def pack_tokens(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """One payload of TOKENS: rows int64 [n, 4], then the n tokens."""
    return torch.cat([rows.reshape(-1), tokens])


def recv_tokens(n: int, src: int) -> tuple[torch.Tensor, list[int]]:
    """The rows [n, 4] and tokens of a TOKENS payload."""
    t = recv(n * 5, torch.int64, src)
    return t[:n * 4].view(n, 4), t[n * 4:].tolist()
