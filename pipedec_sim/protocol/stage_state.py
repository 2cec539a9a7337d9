"""Per-stage KV bookkeeping by node id, shared by the simulator and the torch backend.

A KV holder (a target stage or the draft) keeps rows in arrival order: first the
committed prefix (`n_prefix` rows, never removed), then speculative rows (`spec`, by id).
Prune notices (`Update`) kill rows and promote committed ones; because a node always
arrives after its ancestors and kills take whole subtrees, the committed rows always
form the front of the cache once the kills are applied. The torch backend turns the
keep-index into `index_select` on its cache and `mask` into a tree-attention mask.
"""
from __future__ import annotations

import numpy as np

from pipedec_sim.protocol.messages import Row, Update


class StageState:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n_prefix = 0
        self.parent: dict[int, int] = {}       # speculative rows in KV order: id -> parent
        self.killed: set[int] = set()
        self.committed: set[int] = set()       # every id ever committed here
        self._pending: set[int] = set()        # committed but not yet promoted

    @property
    def spec(self) -> list[int]:
        """Speculative row ids in KV order."""
        return list(self.parent)

    @property
    def context(self) -> int:
        """Rows in the KV cache."""
        return self.n_prefix + len(self.parent)

    # ---- prune notices ---------------------------------------------------------------
    def apply(self, update: Update, *, keep: bool = True) -> np.ndarray | None:
        """Apply a prune notice. If rows were removed, return the KV rows to keep (or,
        with keep=False, for callers without tensors, an empty array)."""
        self.killed.update(update.kill)
        self.committed.update(update.commit)
        self._pending.update(update.commit)
        spec = self.parent
        dead = [i for i in update.kill if i in spec]
        out = None
        if dead:
            if keep:
                gone = set(dead)
                survivors = [j for j, i in enumerate(spec) if i not in gone]
                out = np.concatenate([np.arange(self.n_prefix, dtype=np.int64),
                                      self.n_prefix + np.asarray(survivors, np.int64)])
            else:
                out = np.empty(0, np.int64)
            for i in dead:
                del spec[i]
        self._promote()
        return out

    def _promote(self) -> None:
        spec, pending = self.parent, self._pending
        while spec and pending:
            first = next(iter(spec))
            if first not in pending:
                break
            pending.discard(first)
            del spec[first]
            self.n_prefix += 1

    # ---- arriving rows ---------------------------------------------------------------
    def admit(self, rows: tuple[Row, ...]) -> list[Row]:
        """Drop rows that are dead here (killed, or a killed node's descendants)."""
        killed = self.killed
        out = []
        for r in rows:
            if r.id in killed or r.parent in killed:
                killed.add(r.id)
            else:
                out.append(r)
        return out

    def append(self, rows: list[Row], committed: int = 0) -> None:
        """Record computed rows: their KV now sits at the end of the cache. The first
        `committed` rows were committed before they were sent (prompt, verified token)."""
        if committed:
            ids = [r.id for r in rows[:committed]]
            self.committed.update(ids)
            self._pending.update(ids)
        spec = self.parent
        for r in rows:
            spec[r.id] = r.parent
        self._promote()

    # ---- attention -------------------------------------------------------------------
    def mask(self, rows: list[Row]) -> np.ndarray:
        """Boolean [len(rows), context + len(rows)]: which KV rows each new row attends
        to, with the new rows appended after the current cache (call before `append`).
        A row sees the committed prefix, its speculative ancestors and itself."""
        n, ctx = len(rows), self.context
        mask = np.zeros((n, ctx + n), dtype=bool)
        mask[:, : self.n_prefix] = True
        col = {i: self.n_prefix + j for j, i in enumerate(self.parent)}
        anc: dict[int, np.ndarray] = {}       # id -> its ancestor columns (memo)
        for k, r in enumerate(rows):
            p = r.parent
            if p in anc or p in self.parent:
                mask[k] |= self._ancestry(p, col, anc, ctx + n)
            elif p != -1 and p not in self.committed:
                raise KeyError(f"row {r.id}: parent {p} is neither committed nor cached here")
            mask[k, ctx + k] = True
            col[r.id] = ctx + k
            anc[r.id] = mask[k]
        return mask

    def _ancestry(self, i: int, col: dict, anc: dict, width: int) -> np.ndarray:
        """Columns of speculative row `i` and its speculative ancestors."""
        chain = []
        while i not in anc and i in self.parent:
            chain.append(i)
            i = self.parent[i]
        row = anc[i] if i in anc else np.zeros(width, dtype=bool)
        for j in reversed(chain):
            row = row.copy()
            row[col[j]] = True
            anc[j] = row
        return row
