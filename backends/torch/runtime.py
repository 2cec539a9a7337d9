"""The distributed pipeline: this process is rank 0 (the head), ranks 1..S are stages.

Topology A: the head runs the strategy, the draft and the final norm + LM head; stage S
sends the verified rows' hidden states back to it (a ring). Topology B: stage S runs the
LM head and sends token ids back. Transport is torch.distributed point-to-point over gloo
for control; activations between stages go GPU to GPU over NCCL where every stage has a GPU
of its own, else through host memory over gloo (`link.py`).

Pacing is the shared core's (`pipedec_sim.protocol.pacing`): EntryFree comes from stage 1's
ACK per batch taken, through `Pacer.entry_taken`. Prune notices (`cfg.prune`, default
broadcast) go straight to every stage on the control tag (`broadcast`: one message per
event the head handled, carrying all its notices), into stage 1's
batch stream at once (`inband`), or just ahead of the next injected batch (`piggyback`);
with `cfg.cancel` (broadcast only) a stage abandons a batch whose rows all died at the next
layer boundary (worker.py). Each RESET tells the stages the request's mode.

Never hang: every wait polls the stage processes' liveness and a no-progress deadline; a
dead or raising stage ends the run with `StageFailed` naming it, and `close()` reaps every
child within bounded time (a stopped stage ignores SIGTERM: it gets SIGKILL after 1 s).

Local runs listen on loopback only: the rendezvous store's socket is bound to 127.0.0.1 here
(`loopback_store`) and gloo's pair sockets to `lo`. Stages are plain subprocesses
(`python -m backends.torch.worker`), not multiprocessing children: its spawn start method
runs a resource tracker process that holds the head's stderr open after the head exits.
"""
from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from backends.torch import wire
from backends.torch.checkpoint import load_stage
from backends.torch.graphs import make_draft
from backends.torch.head import Head, Request, RunRecord
from backends.torch.link import connect, rank_device
from backends.torch.models import load
from backends.torch.shard import (
    Shard,
    TargetSampler,
    Verifier,
    rows_tensor,
    tensor_rows,
)
from backends.torch.worker import (
    IDLE_TIMEOUT,
    SLICE_CANCEL,
    SLICE_PRUNE,
    StageConfig,
    reason,
)
from pipedec_sim.errors import InputError
from pipedec_sim.protocol.messages import Batch, Update
from pipedec_sim.protocol.pacing import window_for
from pipedec_sim.protocol.sampling import request_key


class StageFailed(RuntimeError):
    pass


LINK_ERRORS = ("Connection closed", "pair closure", "Connection reset", "Broken pipe")
START_TIMEOUT_S = 120.0     # stages import torch and load their weights: at least this long
ROOT = str(Path(__file__).resolve().parents[2])     # the checkout this code comes from


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_store(world: int):
    """(store, init_method) of a local run: the head's rendezvous store, listening on
    127.0.0.1 only, and the `tcp://` address its stages join as clients. TCPStore binds every
    interface whatever host it is given (measured, torch 2.13, libuv and classic backends),
    so the listening socket is made here and handed over (`master_listen_fd`). The stages'
    `init_process_group(init_method=tcp://...)` prefixes every key with "default_pg"; a
    store passed in is used as is, so the head adds the same prefix."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, world, is_master=True, timeout=IDLE_TIMEOUT,
                          wait_for_workers=False, master_listen_fd=sock.detach())
    return dist.PrefixStore("default_pg", store), f"tcp://127.0.0.1:{port}"


def launch_stage(cfg: StageConfig, j: int, world: int, init: str, err_dir: str,
                 module: str = "backends.torch.worker") -> subprocess.Popen:
    """Stage j of a local run as `python -P -m MODULE ...` (serving stages:
    backends.torch.serve_worker), importing this checkout's code (PYTHONPATH first, not
    the working directory), its gloo (and NCCL's bootstrap) on loopback."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-P", "-m", module, cfg.to_json(), str(j),
           str(world), init, err_dir]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)


def _wait_all(procs, seconds: float) -> None:
    end = time.monotonic() + seconds
    for p in procs:
        try:
            p.wait(max(end - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            pass


def _stopped(pid: int) -> bool:
    """Whether a process is stopped (SIGSTOP, SIGTSTP, a debugger)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


class DistributedPipeline:
    STAGE_MODULE = "backends.torch.worker"     # what each local stage process runs

    def __init__(self, cfg: StageConfig, draft_spec: str | None, *, knobs=None, recorder=None,
                 torchrun: bool = False):
        self.cfg, self.S = cfg, cfg.stages
        self.torchrun = torchrun
        self.device = rank_device(cfg.device, 0)
        # The head reads only the final norm + LM head (topology A), or no weights at all.
        self.dtype = cfg.torch_dtype
        target = load_stage(cfg.target, 0, 0, embed=False, head=(cfg.topology == "A"),
                            device=self.device, dtype=self.dtype)
        self.eos = target.eos
        self.verifier = None
        if cfg.topology == "A":
            self.verifier = Verifier(Shard(target.model, 0, 0, embed=False, head=True,
                                           device=self.device))
        draft = (make_draft(load(draft_spec).model.to(self.device, self.dtype), self.device,
                            cfg.cuda_graphs) if draft_spec else None)
        self.hidden_size = target.config.hidden_size
        knobs = dict(knobs or {})
        knobs["window"] = window_for(self.S, knobs.get("window"))
        self.head = Head(draft, self.verifier, self, prune=cfg.prune, recorder=recorder,
                         eos=self.eos, knobs=knobs)
        # Lifecycle (start .. close); a request's own state is the head's Flight.
        self.procs: list[subprocess.Popen] = []
        self.store = None             # a local run's rendezvous store (loopback_store)
        self.seq = 0                  # the last request's sequence number
        self.started = self.joined = False
        self.control_open = False     # stages listen on CTRL (a broadcast RESET was sent)
        self.err_dir = self.links = self.out = self.inbox = None
        self.readers: list[threading.Thread] = []

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> "DistributedPipeline":
        world = self.S + 1
        self.err_dir = tempfile.mkdtemp(prefix="pipedec-real-")
        init = "env://"               # torchrun: wherever the user's rendezvous says
        if not self.torchrun:
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
            self.store, init = loopback_store(world)
        self.started = True
        try:
            for j in range(1, world if not self.torchrun else 1):
                self.procs.append(launch_stage(self.cfg, j, world, init, self.err_dir,
                                               self.STAGE_MODULE))
            self._rendezvous(init, world)
        except BaseException:
            self.close(clean=False)       # reap the stages we spawned
            raise
        self.out = wire.Outbox()
        self.inbox = queue.Queue()
        self.readers = [threading.Thread(target=self._reader, args=(f, peer), daemon=True)
                        for f, peer in ((self._read_data, self.S), (self._read_ack, 1))]
        for t in self.readers:
            t.start()
        return self

    def _rendezvous(self, init: str, world: int) -> None:
        """init_process_group in a thread, so a stage dying while loading is noticed."""
        err: list = []

        def join():
            try:
                dist.init_process_group("gloo", init_method=None if self.store else init,
                                        store=self.store, rank=0, world_size=world,
                                        timeout=IDLE_TIMEOUT)
                self.links = connect(0, world, self.cfg.device, self.cfg.transport,
                                     self.hidden_size, self.dtype)
            except Exception as e:
                err.append(e)
        t = threading.Thread(target=join, daemon=True)
        t.start()
        limit = max(self.cfg.timeout_s, START_TIMEOUT_S)
        deadline = time.monotonic() + limit
        while t.is_alive():
            t.join(0.1)
            self.check_alive()
            if time.monotonic() > deadline:
                raise StageFailed(f"stages did not join within {limit:g} s{self._hint()}")
        self.joined = dist.is_initialized()
        if err and isinstance(err[0], InputError):
            raise err[0]                  # e.g. --transport nccl with stages sharing a GPU
        if err:
            raise StageFailed(f"rendezvous failed: {err[0]}")
        if self.cfg.device != "cpu":
            print(f"pipedec-real: activations between stages: {self.links.why}",
                  file=sys.stderr)

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        self.close(clean=exc_type is None)

    def close(self, clean: bool = True) -> None:
        """Stop the stages (politely if `clean`), reap every child, leave no orphans. If a
        signal interrupts it, calling it again (clean=False) finishes the job."""
        if not self.started:
            return
        if clean and self.joined:
            try:
                if self.control_open:        # end the stages' control readers first
                    for j in range(1, self.S + 1):
                        self.out.send([wire.header(wire.STOP, self.seq)], j, wire.TAG_CTRL)
                self.out.send([wire.header(wire.STOP, self.seq)], 1)
                self.out.flush(5.0)
            except Exception:
                clean = False
        _wait_all(self.procs, 10.0 if clean else 0.0)
        left = [p for p in self.procs if p.poll() is None]
        for p in left:
            p.terminate()
        _wait_all(left, 1.0)              # a stopped stage ignores SIGTERM
        for p in left:
            if p.poll() is None:
                p.kill()
        _wait_all(left, 5.0)
        for t in self.readers:
            t.join(2.0 if clean else 0.0)   # they end on STOP, or when the links close
        if self.joined and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        self.store = None
        shutil.rmtree(self.err_dir, ignore_errors=True)
        self.started = False

    # ---- liveness ------------------------------------------------------------------------
    def check_alive(self) -> None:
        dead = [(j, p.poll()) for j, p in enumerate(self.procs, 1) if p.poll() is not None]
        if dead:
            time.sleep(0.2)        # let a crash's neighbours notice too, then blame the cause
            raise StageFailed(self._why(dead))

    def _why(self, dead) -> str:
        """Name the stage that failed first: one with its own error, not a broken link."""
        reasons = []
        for j, code in dead:
            path = os.path.join(self.err_dir, f"stage{j}.err")
            text = open(path).read().strip() if os.path.exists(path) else ""
            if code is not None and code < 0:
                text = f"killed by signal {-code}"
            reasons.append((j, text or f"exit code {code}"))
        own = [r for r in reasons if not any(m in r[1] for m in LINK_ERRORS)]
        j, why = (own or reasons)[0]
        return f"stage {j} (rank {j}) failed: {why}"

    def _hint(self) -> str:
        """For a deadline's message: a local stage that is stopped, if any."""
        stopped = [j for j, p in enumerate(self.procs, 1) if _stopped(p.pid)]
        return f" (stage {stopped[0]}, rank {stopped[0]}, is stopped)" if stopped else ""

    # ---- inbound streams (reader threads: gloo recv cannot be polled) --------------------
    def _reader(self, read, peer: int) -> None:
        try:
            while True:
                item = read()
                if item is None:
                    return
                self.inbox.put(item)
        except Exception as e:
            self.inbox.put(("error", peer, e))

    def _read_data(self):
        h = wire.recv(wire.HEADER_LEN, torch.int64, self.S)
        kind, seq, bid, n = h[:wire.VFROM].tolist()
        if kind == wire.STOP:
            return None
        if kind == wire.REPORT:          # kept: the next receive reuses the frame (wire.recv)
            table = wire.recv((self.S, 2), torch.int64, self.S, keep=True)
            slices = wire.recv((n, 6), torch.float64, self.S, keep=True) if n else None
            return ("report", seq, table, slices)
        if n == 0:                   # a batch whose rows all died on the way (header only)
            if kind == wire.TOKENS:
                return ("tokens", seq, bid, (), [])
            return ("hidden", seq, bid, (), None)
        if kind == wire.TOKENS:
            t, tokens = wire.recv_tokens(n, self.S)
            return ("tokens", seq, bid, tensor_rows(t), tokens)
        t, hidden = self.links.recv_batch(n, self.S)
        return ("hidden", seq, bid, tensor_rows(t), hidden)

    def _read_ack(self):
        seq = int(wire.recv(2, torch.int64, 1, wire.TAG_ACK)[0])
        return None if seq < 0 else ("ack", seq)

    def _next(self, block: bool, wait_s: float = 0.05):
        """The next inbound item; None if none came (after up to `wait_s` if `block`)."""
        try:
            item = self.inbox.get(timeout=wait_s) if block else self.inbox.get_nowait()
        except queue.Empty:
            return None
        if item[0] == "error":
            _, peer, e = item
            lost = StageFailed(f"lost the link from stage {peer} (rank {peer}): "
                               f"{reason(e, kind=False)}")
            try:
                self.check_alive()
                time.sleep(1.0)      # a local stage that died: blame it by name instead
                self.check_alive()
            except KeyboardInterrupt:
                # torchrun stops the head (SIGTERM) once its node's stages fail on the same
                # lost link, often within this second: the link came first, name it
                raise lost from None
            raise lost
        return item

    # ---- the head's transport ----------------------------------------------------------
    def inject(self, batch: Batch, notices: tuple[Update, ...]) -> None:
        for u in notices:                 # piggyback: just ahead of the batch
            self.inband(u)
        self.out.send([wire.batch_header(wire.BATCH, self.seq, batch),
                       rows_tensor(batch.rows)], 1)

    def inband(self, update: Update) -> None:
        self.out.send_notices([(self.seq, update)], (1,))

    def broadcast(self, updates: Sequence[Update]) -> None:
        """One event's notices: one control message to every stage, applied in order."""
        self.out.send_notices([(self.seq, u) for u in updates], range(1, self.S + 1),
                              wire.TAG_CTRL)

    # ---- one request -------------------------------------------------------------------------
    def run(self, name: str, req: Request) -> RunRecord:
        self.seq += 1
        cfg = self.cfg
        key = request_key(req.id)
        if self.verifier is not None:
            self.verifier.sampler = TargetSampler(cfg.target_sampling(), key)
        self.out.send([wire.reset(self.seq, cfg.prune, cfg.cancel, key)], 1)
        self.control_open |= cfg.prune == "broadcast"
        head = self.head
        head.begin(name, req, self.seq)
        last = time.monotonic()
        while not head.done:
            item = self._next(block=not head.flight.drafts)
            if item is not None:
                self._handle(item)
            elif not head.draft_step():
                self.check_alive()
                if time.monotonic() - last > cfg.timeout_s:
                    raise StageFailed(f"{name}: no progress for {cfg.timeout_s:g} s"
                                      f"{self._hint()}")
                continue
            last = time.monotonic()
        run = head.result()
        self._collect_report(run)
        return run

    def _handle(self, item) -> None:
        kind, seq = item[0], item[1]
        if seq != self.seq or self.head.done:
            return                               # a finished request's leftovers
        if kind == "ack":
            self.head.entry_taken()
        elif kind == "tokens":                    # rows may be empty: they all died
            _, _, bid, rows, toks = item
            self.head.verified(bid, {r.id: t for r, t in zip(rows, toks)})
        elif kind == "hidden":
            _, _, bid, rows, hidden = item
            self.head.verify(bid, rows, 0, hidden)

    def _collect_report(self, run: RunRecord) -> None:
        """Ask every stage for its busy time; the answer also drains this request's
        in-flight results (FIFO), so the next request starts on a quiet pipeline."""
        self.out.send([wire.header(wire.REPORT, self.seq),
                       torch.zeros((self.S, 2), dtype=torch.int64)], 1)
        deadline = time.monotonic() + self.cfg.timeout_s
        while True:
            item = self._next(block=True)
            if item is not None and item[0] == "report" and item[1] == self.seq:
                break
            if item is None:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise StageFailed(f"no report from the last stage within "
                                      f"{self.cfg.timeout_s:g} s{self._hint()}")
        for j, (us, rows) in enumerate(item[2].tolist(), 1):
            run.busy_ms[f"stage{j}"] = us / 1e3
            run.rows[f"stage{j}"] = rows
        slices = [] if item[3] is None else item[3].tolist()
        run.cancelled = sum(1 for s in slices if s[1] == SLICE_CANCEL)
        if not self.links.one_host:
            return                       # other hosts' monotonic clocks are not ours
        t0 = self.head.t0                # one host: one monotonic clock for all ranks
        kinds = self.head.flight.kinds
        for j, kind, bid, start, end, rows in slices:
            label = "prune" if kind == SLICE_PRUNE else kinds.get(int(bid), "batch")
            if kind == SLICE_CANCEL:
                label += " (cancelled)"  # as the simulator's timeline says
            run.slices.append((f"stage{int(j)}", (start - t0) * 1e3, (end - start) * 1e3,
                               label, int(rows)))
