"""One KV ledger for all S stages of a simulated request (the fast engine's bookkeeping).

The reference engine keeps a `StageState` per stage, so every row is appended, checked and
killed S times. The simulator needs less from a stage's cache: how many rows it holds (the
context a layer's time depends on), whether a prune notice removed any (a compaction is
charged) and which rows of an arriving batch are dead. All three follow from counts:

* every stage applies the request's prune notices in the same order (the order the head
  dispatched them: one hop to each stage, or down the stream), so the kills a stage has
  seen are "notices 1..epoch", and a row is dead at a stage iff the notice that killed it
  has an index <= the stage's epoch;
* a batch visits the stages in order and loses rows on the way, never gains any, so the
  stages that computed a row are 1..depth(row); a stage's context is the rows it computed
  less the ones its notices removed, and a notice removes at stage j the killed rows with
  depth >= j (a row that had not reached j by then never will: it arrives dead);
* a batch's survivors change only when the epoch does, so they are filtered once per epoch
  (from the previous survivors) rather than once per stage.
"""
from __future__ import annotations

from pipedec_sim.protocol.messages import Row, Update

ALIVE = 1 << 62


class StageLedger:
    __slots__ = ("kill_at", "orphans", "depth", "computed", "removed", "epoch", "sent",
                 "groups", "batch_of", "survivors")

    def __init__(self, stages: int):
        self.kill_at: dict[int, int] = {}   # row id -> index (from 1) of the notice killing it
        self.orphans: dict[int, int] = {}   # row id -> that index of a killed ancestor's
        self.depth: dict[int, int] = {}     # row id -> deepest stage that computed it
        self.computed = [0] * (stages + 1)  # rows each stage computed
        self.removed = [0] * (stages + 1)   # of those, rows its notices removed
        self.epoch = [0] * (stages + 1)     # notices each stage has applied
        self.sent = 0                       # notices the head has dispatched
        # notice k's first kills, by batch: [(one of the rows, how many)]. Rows a notice
        # kills in one batch were alive together until then, so they share one depth.
        self.groups: list[list[tuple[int, int]]] = [[]]
        self.batch_of: dict[int, int] = {}             # row id -> its batch
        self.survivors: dict[int, tuple[int, tuple[Row, ...]]] = {}  # batch -> (epoch, rows)

    def injected(self, batch_id: int, rows: tuple[Row, ...]) -> None:
        """A batch entered the pipeline."""
        batch_of = self.batch_of
        for r in rows:                  # (a plain loop: cheaper than a comprehension here)
            batch_of[r.id] = batch_id

    def dispatched(self, update: Update) -> None:
        """The head dispatched `update` (every stage will apply it, in this order)."""
        self.sent += 1
        k, kill_at, batch_of = self.sent, self.kill_at, self.batch_of
        by_batch: dict = {}
        for i in update.kill:
            if i in kill_at:
                continue
            kill_at[i] = k
            b = batch_of.get(i)
            if b is not None:
                g = by_batch.get(b)
                by_batch[b] = (i, 1) if g is None else (g[0], g[1] + 1)
        self.groups.append(list(by_batch.values()))

    def apply(self, j: int, update: Update) -> bool:
        """Stage j applies its next notice; True if KV rows were removed (a compaction)."""
        self.epoch[j] = k = self.epoch[j] + 1
        depth = self.depth
        n = 0
        for i, count in self.groups[k]:
            if depth.get(i, 0) >= j:
                n += count
        self.removed[j] += n
        return n > 0

    def context(self, j: int) -> int:
        """Rows in stage j's KV cache."""
        return self.computed[j] - self.removed[j]

    def admit(self, j: int, batch_id: int, rows: tuple[Row, ...]) -> tuple[Row, ...]:
        """The rows of batch `batch_id` (sent with `rows`) still alive at stage j: not
        killed, nor a killed row's descendant (StageState.admit's rule)."""
        epoch = self.epoch[j]
        seen = self.survivors.get(batch_id)
        if seen is not None and seen[0] <= epoch:
            if seen[0] == epoch:
                return seen[1]
            rows = seen[1]                      # survivors only shrink as epochs grow
        alive = self._filter(rows, epoch)
        if seen is None or seen[0] <= epoch:
            self.survivors[batch_id] = (epoch, alive)
        return alive

    def _filter(self, rows: tuple[Row, ...], epoch: int) -> tuple[Row, ...]:
        """`rows` less those dead at `epoch` (`rows` itself if none is)."""
        out = []
        orphaned = False            # a row is alive but its parent is not
        if self.orphans:
            death = self._death
            for r in rows:
                if death(r.id) > epoch:
                    if death(r.parent) > epoch:
                        out.append(r)
                    else:
                        orphaned = True
        else:                       # the same, without a call per row
            get = self.kill_at.get
            for r in rows:
                if get(r.id, ALIVE) > epoch:
                    if get(r.parent, ALIVE) > epoch:
                        out.append(r)
                    else:
                        orphaned = True
        if orphaned:
            self._orphan(rows, epoch)
        return rows if len(out) == len(rows) else tuple(out)

    def _orphan(self, rows: tuple[Row, ...], epoch: int) -> None:
        """A dead row's descendants die too: from its epoch on (in batch order, so that a
        row orphaned here passes it on to its own children in the batch)."""
        death = self._death
        for r in rows:
            if death(r.id) > epoch and death(r.parent) <= epoch:
                self.orphans[r.id] = death(r.parent)

    def _death(self, i: int) -> int:
        """The epoch from which row i is dead (ALIVE while it lives)."""
        k = self.kill_at.get(i, ALIVE)
        return min(k, self.orphans.get(i, ALIVE)) if self.orphans else k

    def computed_rows(self, j: int, rows: tuple[Row, ...]) -> None:
        """Stage j computed `rows`: their KV sits in its cache."""
        self.computed[j] += len(rows)
        depth = self.depth
        for r in rows:
            depth[r.id] = j

    def left(self, batch_id: int) -> None:
        """The batch left the pipeline: forget its survivors."""
        self.survivors.pop(batch_id, None)

