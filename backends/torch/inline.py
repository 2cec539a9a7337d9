"""All stages in one process, stepped in a fixed order: the deterministic reference driver.

Each tick: the draft runs one queued request, then every stage, last first, takes one
batch from its inbox, so a batch moves one stage per tick, as in a pipeline where all
stages take equally long. Prune notices reach every KV holder at once (the simulator's
`--prune broadcast` with zero latency). Used by the lossless tests and `--inline`.
"""
from __future__ import annotations

import time
from collections import deque

from backends.torch.head import Head, Request, RunRecord
from backends.torch.shard import Draft, Shard, Verifier
from pipedec_sim.inputs.profile import split_layers
from pipedec_sim.protocol.messages import Batch, EntryFree


def stage_bounds(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """[lo, hi) decoder layers per stage, vLLM-style split."""
    out, lo = [], 0
    for n in split_layers(n_layers, stages):
        out.append((lo, lo + n))
        lo += n
    return out


def run_stage(shard: Shard, batch: Batch, hidden):
    """A stage's work on one batch: drop dead rows, compute the rest. Returns the batch
    of surviving rows and their hidden states (None if every row died)."""
    if not batch.rows:
        return None, None
    rows, hidden = shard.admit(batch.rows, hidden)
    if not rows:
        return None, None
    out = shard.forward(rows, batch.committed, hidden)
    # Only speculative rows die and they follow verify_from: the indices still hold.
    return Batch(batch.id, tuple(rows), batch.kind, batch.verify_from, batch.committed), out


class InlinePipeline:
    def __init__(self, target, draft=None, stages: int = 2, *, topology: str = "A",
                 recorder=None, knobs=None, device="cpu", dtype=None):
        model = target.model.to(device, dtype)
        bounds = stage_bounds(model.config.num_hidden_layers, stages)
        S = len(bounds)
        self.shards = [Shard(model, lo, hi, embed=(j == 0), head=(j == S - 1), device=device)
                       for j, (lo, hi) in enumerate(bounds)]
        self.topology = topology
        self.verifier = Verifier(self.shards[-1]) if topology == "A" else None
        self.draft = (Draft(draft.model.to(device, dtype), device) if draft is not None
                      else None)
        knobs = {"window": S + 1, **(knobs or {})}        # as the simulator's default
        self.head = Head(self.draft, self.verifier, inject=self._inject, notify=self._notify,
                         recorder=recorder, eos=target.eos, knobs=knobs)
        self.inbox: list[deque] = [deque() for _ in self.shards]

    def _inject(self, batch: Batch) -> None:
        self.inbox[0].append((batch, None))

    def _notify(self, update) -> None:
        for s in self.shards:
            t = time.perf_counter()
            if s.apply(update):
                self.head.busy(f"stage{self.shards.index(s) + 1}", t, 0, "prune")

    def run(self, name: str, req: Request) -> RunRecord:
        head = self.head
        for s in self.shards:
            s.reset()
        for box in self.inbox:
            box.clear()
        head.begin(name, req)
        while not head.done:
            progressed = head.draft_step()
            for j in reversed(range(len(self.shards))):
                if head.done:
                    break
                progressed |= self._stage_tick(j)
            if not progressed and not head.done:
                raise RuntimeError(f"{name}: the strategy stalled (no work queued, not done)")
        return head.finish()

    def _stage_tick(self, j: int) -> bool:
        box = self.inbox[j]
        if not box:
            return False
        batch, hidden = box.popleft()
        head, S = self.head, len(self.shards)
        if j == 0 and not box:
            head.feed(EntryFree())
        t = time.perf_counter()
        out, hidden = run_stage(self.shards[j], batch, hidden)
        if out is not None and j == S - 1 and self.topology == "B":
            tokens = self._lm_head(out, hidden)
        head.busy(f"stage{j + 1}", t, len(out.rows) if out else 0, batch.kind or "batch")
        if out is None:          # every row died: the batch goes on empty, so that the
            out = Batch(batch.id, (), batch.kind)    # head learns it left the pipeline
            tokens = {}
        if j < S - 1:
            self.inbox[j + 1].append((out, hidden))
        elif self.topology == "A":
            head.verify(out.id, out.rows, out.verify_from, hidden)
        else:
            head.verified(out.id, tokens)
        return True

    def _lm_head(self, batch: Batch, hidden) -> dict[int, int]:
        rows = batch.rows[batch.verify_from:]
        if not rows:
            return {}
        toks = self.shards[-1].greedy(hidden[:, batch.verify_from:]).tolist()
        return {r.id: t for r, t in zip(rows, toks)}
