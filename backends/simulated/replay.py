"""What both SimPy engines share: a request's outcome, the trace-replay compute and the
KV holders' notice inboxes."""
from __future__ import annotations

import gc
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

from pipedec_sim.protocol.messages import Batch, Commit, Draft, Update
from pipedec_sim.protocol.stage_state import StageState


@dataclass
class RequestRun:
    """What one simulated request did (times in ms)."""
    # (t, tokens, drafted, outcome) per commit
    commits: list[tuple[float, int, int, str]] = field(default_factory=list)
    end_ms: float = 0.0
    busy_ms: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)       # rows computed per actor
    batches: int = 0
    cancelled: int = 0       # batches a stage abandoned mid-compute (broadcast + cancel)
    timeline: list[dict] = field(default_factory=list)

    def worked(self, actor, start: float, end: float, label: str, rows: int,
               completed: bool, record: bool) -> None:
        """An actor's compute from `start` to `end` (`completed`, or cut short)."""
        ms = end - start
        self.busy_ms[actor] = self.busy_ms.get(actor, 0.0) + ms
        self.rows[actor] = self.rows.get(actor, 0) + (rows if completed else 0)
        if record:
            self.timeline.append({"name": label if completed else f"{label} (cancelled)",
                                  "ph": "X", "ts": start * 1e3, "dur": ms * 1e3, "pid": 0,
                                  "tid": actor, "args": {"rows": rows}})

    def committed(self, now: float, commit: Commit, record: bool) -> None:
        self.commits.append((now, len(commit.tokens), commit.drafted, commit.outcome))
        if record:
            self.timeline.append({"name": commit.outcome, "ph": "i", "s": "t",
                                  "ts": now * 1e3, "pid": 0, "tid": "head",
                                  "args": {"tokens": list(commit.tokens)}})


class Replay:
    """The simulator's compute: KV bookkeeping only, with the draft's proposals and the
    target's tokens from a trace oracle. Another compute (the torch inline driver's real
    models) can stand in: the same calls at the same simulated moments."""

    def __init__(self, oracle):
        self.oracle = oracle
        self.states: dict = {}

    def state(self, actor) -> StageState:
        """The KV bookkeeping of one holder: stage j, "draft" or "verify"."""
        return self.states.setdefault(actor, StageState())

    def apply(self, actor, update: Update) -> bool:
        """Apply a prune notice; True if KV rows were compacted."""
        return self.states[actor].apply(update, keep=False) is not None

    def observe(self, rows) -> None:
        self.oracle.observe(rows)

    def stage(self, j: int, batch: Batch, rows) -> None:
        """Stage j computed `rows` (the live rows of `batch`)."""
        self.states[j].append(rows, batch.committed)

    def verify(self, batch: Batch, rows) -> dict[int, int]:
        """The target's next token after each verified row."""
        target = self.oracle.target
        return {r.id: target(r) for r in rows}

    def draft(self, request: Draft, rows) -> dict:
        """The draft computed `rows` (live rows of `request`): proposals of the wanted ones."""
        self.states["draft"].append(rows, request.committed)
        alive = {r.id: r for r in rows}
        propose = self.oracle.propose
        return {i: propose(alive[i], request.k) for i in request.want if i in alive}


# Young objects the cyclic collector lets pile up before it runs (CPython: 700). A run
# makes and drops events, rows and tree nodes by the hundred thousand; at 700 the collector
# runs every few events and keeps rescanning the survivors (the tree, the calendar). The
# tree's parent-child cycles still need it, so it runs, just 70 times less often.
YOUNG_OBJECTS = 50_000


@contextmanager
def fewer_collections():
    """The cyclic collector's first threshold at YOUNG_OBJECTS, restored after."""
    saved = gc.get_threshold()
    gc.set_threshold(max(saved[0], YOUNG_OBJECTS), *saved[1:])
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def run_until_done(env, done, name: str, progress) -> float:
    """Run a calendar until `done`; returns the end time. A calendar that empties first
    means nothing is left to happen with the work unfinished: a scheduler bug, reported
    as a stall (`progress()` says how far it got, e.g. "12 tokens")."""
    try:
        with fewer_collections():
            env.run(until=done)
    except RuntimeError as e:
        if done.triggered or "No scheduled events left" not in str(e):
            raise
        raise RuntimeError(f"{name}: simulation stalled at t={env.now:.3f} ms "
                           f"after {progress()} ({e})") from None
    return env.now


class Holder:
    """A KV holder's inbox of prune notices, applied lazily when work starts."""

    def __init__(self, actor, compute, latency_ms: float):
        self.actor, self.compute = actor, compute
        self.state = compute.state(actor)
        self.latency = latency_ms
        self.notices: deque[tuple[float, Update]] = deque()

    def catch_up(self, now: float) -> bool:
        """Apply every notice that has arrived; True if KV rows were compacted."""
        compacted = False
        q = self.notices
        while q and q[0][0] <= now:
            compacted |= self.compute.apply(self.actor, q.popleft()[1])
        return compacted
