"""All stages in one process, stepped in a fixed order: the deterministic reference driver.

Each tick: the draft runs one queued request, then every stage, last first, takes one
item from its inbox, so a batch moves one stage per tick, as in a pipeline where all
stages take equally long. Prune notices (`pacing.PRUNE_MODES`) reach the stages
  - `broadcast`: every holder at once (the simulator's broadcast with zero latency);
  - `inband` / `piggyback`: as an item in stage 1's inbox (at once, or just ahead of the
    next injected batch), which each stage takes in order on its tick, applies and passes
    on, as the distributed runtime's stages do.
`cancel` has nothing to do here: a tick computes a batch atomically, so no notice can
arrive while a stage is computing. Used by the lossless tests and `--inline`.
"""
from __future__ import annotations

import time
from collections import deque

from backends.torch.head import Head, Request, RunRecord
from backends.torch.shard import DraftModel, Shard, Verifier
from pipedec_sim.inputs.profile import split_layers
from pipedec_sim.protocol.messages import Batch, Update
from pipedec_sim.protocol.pacing import (
    DEFAULT_CANCEL,
    DEFAULT_PRUNE,
    check_prune,
    stage_output,
    verify_rows,
    window_for,
)


def stage_bounds(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """[lo, hi) decoder layers per stage, vLLM-style split."""
    out, lo = [], 0
    for n in split_layers(n_layers, stages):
        out.append((lo, lo + n))
        lo += n
    return out


def run_stage(shard: Shard, batch: Batch, hidden, between=None):
    """A stage's work on one batch: drop dead rows, compute the rest. Returns what goes on
    (`stage_output`: empty if every row died, before or, with `between`, during the
    compute: see Shard.forward) and its hidden states (None if empty)."""
    rows, hidden = shard.admit(batch.rows, hidden) if batch.rows else ((), None)
    if rows:
        hidden = shard.forward(rows, batch.committed, hidden, between=between)
        if hidden is None:
            rows = ()                      # abandoned between layers
    return stage_output(batch, rows), (hidden if rows else None)


def lm_head(shard: Shard, batch: Batch, hidden) -> dict[int, int]:
    """Topology B's last stage: the target's token after each row to verify."""
    rows = verify_rows(batch)
    if not rows:
        return {}
    toks = shard.greedy(hidden[:, batch.verify_from:]).tolist()
    return {r.id: t for r, t in zip(rows, toks)}


class InlinePipeline:
    def __init__(self, target, draft=None, stages: int = 2, *, topology: str = "A",
                 prune: str = DEFAULT_PRUNE, cancel: bool = DEFAULT_CANCEL,
                 recorder=None, knobs=None, device="cpu", dtype=None):
        model = target.model.to(device, dtype)
        bounds = stage_bounds(model.config.num_hidden_layers, stages)
        S = len(bounds)
        self.shards = [Shard(model, lo, hi, embed=(j == 0), head=(j == S - 1), device=device)
                       for j, (lo, hi) in enumerate(bounds)]
        self.topology = topology
        self.prune = check_prune(prune)
        self.cancel = cancel            # accepted for symmetry; nothing to cancel here
        self.verifier = Verifier(self.shards[-1]) if topology == "A" else None
        self.draft = (DraftModel(draft.model.to(device, dtype), device) if draft is not None
                      else None)
        knobs = dict(knobs or {})
        knobs["window"] = window_for(S, knobs.get("window"))     # as the simulator's default
        self.head = Head(self.draft, self.verifier, self, prune=prune, recorder=recorder,
                         eos=target.eos, knobs=knobs)
        # Per stage: (batch, hidden) to compute, or (notice, None) to apply and pass on.
        self.inbox: list[deque] = [deque() for _ in self.shards]

    # ---- the head's transport --------------------------------------------------------
    def inject(self, batch: Batch, notices: tuple[Update, ...]) -> None:
        self.inbox[0].extend((u, None) for u in notices)
        self.inbox[0].append((batch, None))

    def inband(self, update: Update) -> None:
        self.inbox[0].append((update, None))

    def broadcast(self, update: Update) -> None:
        for j in range(len(self.shards)):
            self._apply(j, update)

    # ---- a request -------------------------------------------------------------------
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
        return head.result()

    def _stage_tick(self, j: int) -> bool:
        if not self.inbox[j]:
            return False
        item, hidden = self.inbox[j].popleft()
        if isinstance(item, Update):
            self._apply(j, item)
            self._pass_on(j, item, None)
        else:
            self._compute(j, item, hidden)
        return True

    def _apply(self, j: int, update: Update) -> None:
        t = time.perf_counter()
        if self.shards[j].apply(update):
            self.head.busy(f"stage{j + 1}", t, 0, "prune")

    def _compute(self, j: int, batch: Batch, hidden) -> None:
        head = self.head
        if j == 0:
            head.entry_taken()
        t = time.perf_counter()
        out, hidden = run_stage(self.shards[j], batch, hidden)
        tokens = None
        if j == len(self.shards) - 1 and self.topology == "B":
            tokens = lm_head(self.shards[j], out, hidden)
        head.busy(f"stage{j + 1}", t, len(out.rows), batch.kind or "batch")
        self._pass_on(j, out, hidden, tokens)

    def _pass_on(self, j: int, item, hidden, tokens=None) -> None:
        """To the next stage's inbox; from the last stage, a batch goes to the verifier
        (topology A) or its tokens to the head (B), and a notice ends there."""
        if j < len(self.shards) - 1:
            self.inbox[j + 1].append((item, hidden))
        elif isinstance(item, Update):
            return
        elif self.topology == "A":
            self.head.verify(item.id, item.rows, item.verify_from, hidden)
        else:
            self.head.verified(item.id, tokens)
