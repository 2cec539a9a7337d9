"""A stage's work on one batch, shared by the distributed stages and the profiler."""
from __future__ import annotations

from backends.torch.shard import GREEDY_TARGET, Shard, TargetSampler
from pipedec_sim.inputs.profile import split_layers
from pipedec_sim.protocol.messages import Batch
from pipedec_sim.protocol.pacing import stage_output, verify_rows


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


def lm_head(shard: Shard, batch: Batch, hidden, sampler: TargetSampler = GREEDY_TARGET
            ) -> dict[int, int]:
    """Topology B's last stage: the target's token after each row to verify."""
    rows = verify_rows(batch)
    if not rows:
        return {}
    toks = sampler.tokens(shard, hidden[:, batch.verify_from:], rows)
    return {r.id: t for r, t in zip(rows, toks)}
