"""A pipeline stage process: receive, drop dead rows, compute, pass on.

Rank j (1..S) holds stage j's decoder layers; rank 0 is the head. Data messages (the batch
stream, tag DATA) are handled in arrival order; an UPDATE among them (prune `inband` or
`piggyback`) is applied, then passed on, behind the batches before it. With prune
`broadcast` the head sends every notice straight to each stage (tag CTRL: one message per
event the head handled, carrying all its notices; read by a thread into a queue): the stage
applies the notices that have arrived, in order, when it starts its next message, and
with `cancel` it also looks between decoder layers and abandons a batch whose rows have
all died (`pacing.cancels`). Each RESET says which mode a request uses.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from backends.torch import wire
from backends.torch.checkpoint import load_stage, num_layers
from backends.torch.graphs import make_shard
from backends.torch.link import Links, connect, rank_device
from backends.torch.shard import GREEDY_TARGET, Shard, TargetSampler, rows_tensor, tensor_rows
from backends.torch.stage import lm_head, run_stage, stage_bounds
from pipedec_sim.protocol.messages import Batch, Update
from pipedec_sim.protocol.pacing import (
    DEFAULT_CANCEL,
    DEFAULT_PRUNE,
    cancels,
    check_prune,
    verify_rows,
)
from pipedec_sim.protocol.sampling import GREEDY, Sampling

IDLE_TIMEOUT = timedelta(days=1)
SLICE_BATCH, SLICE_PRUNE, SLICE_CANCEL = 0, 1, 2   # what a stage's timeline slice was
FAULT_ENV = "PIPEDEC_FAULT"     # "stage=J,request=R[,mode=raise|exit|stop]": test hook
# Seconds without progress before the head declares a run failed (--timeout): with the
# head's bounded clean-up (runtime.py) a hung stage is reported within 30 s.
NO_PROGRESS_S = 20.0


@dataclass
class StageConfig:
    target: str
    stages: int
    topology: str = "A"
    device: str = "cpu"
    timeout_s: float = NO_PROGRESS_S
    transport: str = "auto"      # stage-to-stage activations: auto | gloo | nccl (link.py)
    dtype: str = "float32"       # weights and activations, a torch dtype name
    prune: str = DEFAULT_PRUNE   # how prune notices reach the stages (pacing.PRUNE_MODES)
    cancel: bool = DEFAULT_CANCEL    # broadcast: abandon a batch whose rows all died
    # The target's sampling (pipedec_sim.protocol.sampling.Sampling's fields; none: greedy)
    sampling: dict | None = None
    cuda_graphs: bool = False    # static-buffer shards, CUDA graphs on CUDA (graphs.py)

    def __post_init__(self):
        check_prune(self.prune)
        self.target_sampling()                 # a bad setting fails here, not mid-run

    def target_sampling(self) -> Sampling:
        return Sampling(**self.sampling) if self.sampling else GREEDY

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def build_shard(cfg: StageConfig, j: int) -> Shard:
    """Stage j (1-based): read only its slice of the checkpoint, onto this rank's device."""
    lo, hi = stage_bounds(num_layers(cfg.target), cfg.stages)[j - 1]
    head = j == cfg.stages and cfg.topology == "B"
    device = rank_device(cfg.device, j)
    loaded = load_stage(cfg.target, lo, hi, embed=(j == 1), head=head, device=device,
                        dtype=cfg.torch_dtype)
    return make_shard(loaded.model, lo, hi, embed=(j == 1), head=head, device=device,
                      cuda_graphs=cfg.cuda_graphs)


def _fault(j: int):
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    kv = dict(p.split("=", 1) for p in spec.split(","))
    return (int(kv["request"]), kv.get("mode", "raise")) if int(kv["stage"]) == j else None


class Control:
    """The head's broadcast notices (tag CTRL), read by a thread into a queue. A gloo
    receive cannot be polled: `is_completed()` stays False even after the data has landed
    (measured, torch 2.13) and a timed `wait()` breaks the link; so a blocking reader
    feeds a queue that the stage polls between messages and between layers."""

    def __init__(self):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._read, name="control", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                h = wire.recv(wire.HEADER_LEN, torch.int64, 0, wire.TAG_CTRL)
                if int(h[wire.KIND]) == wire.STOP:
                    return
                self.queue.put(wire.recv_notices(h, 0, wire.TAG_CTRL)[0])   # one message
        except Exception as e:             # the head is gone: say so on the next poll
            self.queue.put(e)

    def arrived(self) -> list[tuple[int, Update]]:
        """The (request, notice) pairs that came since the last call, in order."""
        out: list[tuple[int, Update]] = []
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return out
            if isinstance(item, BaseException):
                raise item
            out += item


class Stage:
    def __init__(self, cfg: StageConfig, j: int, shard: Shard, links: Links):
        self.cfg, self.j, self.shard, self.links = cfg, j, shard, links
        self.S = cfg.stages
        self.prev = j - 1
        self.next = j + 1 if j < self.S else 0        # the last stage feeds the head
        self.out = wire.Outbox()
        self.req = -1
        self.cancel = False           # this request's: broadcast + cancel (from its RESET)
        self.sampler = GREEDY_TARGET      # this request's (B's last stage verifies)
        self.control: Control | None = None    # started by the first broadcast RESET
        self.notices: list[tuple[int, Update]] = []    # arrived broadcast notices, unapplied
        self.rows_in: torch.Tensor | None = None       # the batch's rows as received
        self.abandoned = False        # the batch being computed was cancelled
        self.busy_us = 0
        self.rows = 0
        self.slices: list[tuple] = []     # (stage, kind, batch id, start, end, rows) per job
        self.fault = _fault(j)
        # what each DATA message kind does (serve_worker.ServeStage adds RESET/FREE its way)
        self.handlers = {wire.BATCH: self.on_batch, wire.UPDATE: self.on_update,
                         wire.RESET: self.on_reset, wire.REPORT: self.on_report}

    def loop(self) -> None:
        while True:
            h = wire.recv(wire.HEADER_LEN, torch.int64, self.prev)
            kind = int(h[wire.KIND])
            if kind == wire.STOP:
                self._stop(h)
                return
            if kind not in self.handlers:
                raise RuntimeError(f"stage {self.j} got message kind {kind}")
            self._catch_up()
            self.handlers[kind](h)

    def _stop(self, h) -> None:
        """Pass STOP on (the last stage: back to the head); stage 1 also ends the head's
        ACK reader. The control reader ends on the STOP the head sent it first."""
        self.out.send([h], self.next)
        if self.j == 1:
            self.out.send([torch.tensor([-1, 0])], 0, wire.TAG_ACK)
        self.out.flush()
        if self.control is not None:
            self.control.thread.join(self.cfg.timeout_s)

    # ---- broadcast notices -------------------------------------------------------------
    def _collect(self) -> None:
        """Move arrived notices to `notices`: a newer request's wait for its RESET, an
        older request's are dropped."""
        if self.control is not None:
            self.notices += [(r, u) for r, u in self.control.arrived() if r >= self.req]

    def _catch_up(self) -> None:
        """Apply this request's arrived notices, in order (before the next message)."""
        self._collect()
        if not self.notices:
            return
        now = [u for r, u in self.notices if r == self.req]
        self.notices = [(r, u) for r, u in self.notices if r > self.req]
        for u in now:
            self._apply(u)

    def _between(self, ids: frozenset) -> bool:
        """Between decoder layers (cancel): abandon the batch if a notice that has arrived
        kills every row of it. Applied later, with the others (`_catch_up`)."""
        self._collect()
        if any(r == self.req and cancels(ids, u) for r, u in self.notices):
            self.abandoned = True
        return self.abandoned

    def _apply(self, update: Update) -> None:
        t = time.perf_counter()
        if self.shard.apply(update):
            self._slice(SLICE_PRUNE, -1, t, 0)
        self.busy_us += int((time.perf_counter() - t) * 1e6)

    # ---- messages ------------------------------------------------------------------------
    def on_reset(self, h) -> None:
        self.req = int(h[wire.REQ])
        self.sampler = TargetSampler(self.cfg.target_sampling(), wire.reset_key(h))
        prune, cancel = wire.reset_mode(h)
        self.cancel = cancel and prune == "broadcast"
        if prune == "broadcast" and self.control is None:
            self.control = Control()
        self.notices = [(r, u) for r, u in self.notices if r >= self.req]
        self.shard.reset()
        self.busy_us = self.rows = 0
        self.slices = []
        if self.next != 0:
            self.out.send([h], self.next)

    def on_update(self, h) -> None:
        """In-band notices (inband / piggyback): apply them in order, then pass them on."""
        pairs, message = wire.recv_notices(h, self.prev)
        for _, update in pairs:
            self._apply(update)
        if self.next != 0:
            self.out.send(message, self.next)

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
        batch, hidden = self._take(h)
        t = time.perf_counter()
        self.abandoned = False
        out, hidden = run_stage(self.shard, batch, hidden,
                                between=self._between if self.cancel else None)
        tokens = self._tokens(out, hidden)
        self._account(t, batch.id, len(out.rows))
        self._send_on(int(h[wire.REQ]), out, hidden, tokens, rows_in=self.rows_in)

    def _take(self, h) -> tuple[Batch, torch.Tensor | None]:
        """Receive the batch whose header is `h` (its rows, and past stage 1 its hidden
        states); stage 1 tells the head it took it (the strategy's EntryFree). Its rows
        tensor stays in `rows_in` until the next receive overwrites it (`wire.recv`)."""
        _, req, bid, n, vfrom, committed = h[:wire.N2].tolist()     # one decode
        rows, hidden, self.rows_in = (), None, None
        if n:
            self.rows_in, hidden = self.links.recv_batch(n, self.prev, hidden=self.j > 1)
            rows = tensor_rows(self.rows_in)
        if self.j == 1:
            self.out.send([torch.tensor((req, bid))], 0, wire.TAG_ACK)
        if self.fault and self.fault[0] == req:
            self._crash()
        return Batch(bid, rows, "", vfrom, committed), hidden

    def _tokens(self, out: Batch, hidden) -> dict[int, int] | None:
        """Topology B's last stage: the target's tokens after the rows to verify."""
        if self.next == 0 and self.cfg.topology == "B":
            return lm_head(self.shard, out, hidden, self.sampler)
        return None

    def _account(self, since: float, batch_id: int, rows: int) -> None:
        """One compute since `since`: busy time, rows, and its timeline slice."""
        self.busy_us += int((time.perf_counter() - since) * 1e6)
        self.rows += rows
        self._slice(SLICE_CANCEL if self.abandoned else SLICE_BATCH, batch_id, since, rows)

    def _send_on(self, req: int, out: Batch, hidden, tokens, left: int = 0,
                 rows_in: torch.Tensor | None = None) -> None:
        """The stage's output (`stage_output`: header only if every row died) to the next
        stage; from the last stage only the verified rows go back to the head, with their
        hidden states (topology A) or their tokens (B). left: as the part came (serving).
        rows_in: the batch's rows tensor as received, reused if every row survived."""
        if len(out.rows) != (0 if rows_in is None else len(rows_in)):
            rows_in = None                    # rows died: the survivors' tensor is new
        if self.next != 0:
            self.links.send_batch(self.out, wire.batch_header(wire.BATCH, req, out, left),
                                  _rows(out.rows, rows_in) if out.rows else None,
                                  hidden[0] if out.rows else None, self.next)
            return
        vrows = verify_rows(out)
        back = Batch(out.id, vrows, out.kind)
        vt = None if rows_in is None else rows_in[out.verify_from:]
        if tokens is not None:
            h = wire.batch_header(wire.TOKENS, req, back, left)
            toks = torch.tensor([tokens[r.id] for r in vrows], dtype=torch.int64)
            self.out.send([h] + ([wire.pack_tokens(_rows(vrows, vt), toks)] if vrows else []),
                          0)
            return
        self.links.send_batch(self.out, wire.batch_header(wire.BATCH, req, back, left),
                              _rows(vrows, vt) if vrows else None,
                              hidden[0, out.verify_from:] if vrows else None, 0)

    def _crash(self) -> None:
        if self.fault[1] == "exit":
            os._exit(3)                              # a hard death: no traceback, no cleanup
        if self.fault[1] == "stop":                  # a hang: alive, silent (until SIGCONT)
            self.fault = None
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        raise RuntimeError(f"injected fault ({FAULT_ENV}) on request {self.req}")


def _rows(rows, given: torch.Tensor | None) -> torch.Tensor:
    """`rows` as the wire's int64 [n, 4]: `given` if it already is that."""
    return rows_tensor(rows) if given is None else given


def stage_main(cfg: StageConfig, j: int, world: int, init_method: str, err_dir: str, *,
               stage_class=None) -> None:
    """Entry point of a stage process (launched locally by `runtime.DistributedPipeline`, or
    one torchrun rank with init_method "env://"). A failure is one line on stderr (and in
    err_dir/stageJ.err, where a local launcher looks for it), exit status 1. stage_class:
    what runs the loop (default `Stage`; serving: `serve_worker.ServeStage`)."""
    torch.set_num_threads(1)
    if "127.0.0.1" in init_method:     # launched by a local head: it decides when to stop
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        signal.signal(signal.SIGINT, signal.SIG_IGN)    # a terminal's Ctrl-C is the head's
        die_with_parent()
    try:
        shard = build_shard(cfg, j)
        # A gloo timeout closes the link for good, so an idle stage must never time out:
        # liveness is the head's job (it polls the stages and keeps its own deadlines).
        dist.init_process_group("gloo", init_method=init_method, rank=j, world_size=world,
                                timeout=IDLE_TIMEOUT)
        links = connect(j, world, cfg.device, cfg.transport, shard.model.config.hidden_size,
                        shard.dtype)
        (stage_class or Stage)(cfg, j, shard, links).loop()
        dist.destroy_process_group()
    except BaseException as e:        # one line, no traceback: the head names the cause
        why = reason(e)
        if err_dir:
            with open(os.path.join(err_dir, f"stage{j}.err"), "w") as fh:
                fh.write(why + "\n")
        print(f"pipedec-real: stage {j} (rank {j}) failed: {why}", file=sys.stderr, flush=True)
        sys.exit(1)


def reason(e: BaseException, *, kind: bool = True) -> str:
    """An exception as one line: its type (if `kind`) and its message, whitespace collapsed,
    without gloo's source location and advice ("[.../pair.cc:553] Connection closed by peer
    [127.0.0.1]:645. This is typically caused by ...")."""
    text = " ".join(str(e).split()).split(". This is typically")[0]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    if not kind:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def main(argv: list[str]) -> int:
    """`python -m backends.torch.worker CONFIG_JSON J WORLD INIT_METHOD ERR_DIR`: a stage
    launched by a local head (`runtime.DistributedPipeline`) as a plain subprocess."""
    config, j, world, init_method, err_dir = argv
    stage_main(StageConfig(**json.loads(config)), int(j), int(world), init_method, err_dir)
    return 0


def die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (no orphans if the head is killed)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
