"""All stages in one process on the simulator's clock: the deterministic reference driver.

The pipeline's mechanics (pacing, prune delivery, cancellation, links, devices) are the
SimPy backend's own (`backends.simulated.pipeline`), timed by a calibration profile; only
the compute is real: `ModelCompute` runs the target's shards, the verifier and the draft
at the very moments the simulator schedules them, with the same KV bookkeeping. So the
inline driver decides exactly what the simulator decides for the same proposals and
tokens (tests/test_sim_vs_inline.py), and its lossless tests cover every prune timing
the simulator can produce. Times in its records are simulated, not wall-clock. Used by
the lossless tests and `pipedec-real run --inline`.
"""
from __future__ import annotations

import dataclasses

from backends.simulated.pipeline import Pipeline
from backends.torch.graphs import make_draft, make_shard
from backends.torch.head import Request, RunRecord
from backends.torch.shard import (
    GREEDY_TARGET,
    DraftModel,
    Shard,
    TargetSampler,
    Verifier,
    select_rows,
)
from backends.torch.stage import stage_bounds
from pipedec_sim.inputs.profile import Grid2D, Profile, constant_profile
from pipedec_sim.protocol.messages import Batch, Draft, Update
from pipedec_sim.protocol.pacing import DEFAULT_CANCEL, DEFAULT_PRUNE, window_for
from pipedec_sim.protocol.sampling import GREEDY, Sampling, request_key
from pipedec_sim.protocol.stage_state import StageState
from pipedec_sim.protocol.strategies import make_strategy


def clock_profile(n_layers: int) -> Profile:
    """The inline driver's default clock: a decoder layer takes 1 ms plus 0.05 ms per row
    and 0.002 ms per cached row, a draft step 0.5 ms plus as much per row and cached row,
    a hop 0.2 ms. Hops make broadcast notices land mid-stage, so cancellation and late
    prunes happen as on hardware; times that grow with rows and context make the
    decisions depend on every holder's KV bookkeeping."""
    tokens, context = (1, 64), (0, 1024)

    def grid(base: float) -> Grid2D:
        return Grid2D(tokens, context, [[base + 0.05 * n + 0.002 * c for c in context]
                                        for n in tokens])
    flat = constant_profile(layers=n_layers, lm_head_ms=0.1, link_latency_ms=0.2)
    return dataclasses.replace(flat, name="inline-clock", layer=grid(1.0),
                               draft_step=grid(0.5))


class ModelCompute:
    """The simulator's compute interface (`backends.simulated.pipeline.Replay`) on real
    models: hidden states follow each batch from stage to stage."""

    def __init__(self, shards: list[Shard], verifier: Verifier | None,
                 draft: DraftModel | None, sampler: TargetSampler = GREEDY_TARGET):
        self.shards, self.verifier, self.draft_model = shards, verifier, draft
        self.sampler = sampler                   # the target's token rule, this request
        self.no_draft = StageState()             # plain PP asks no draft
        self.inputs: dict[tuple[int, int], tuple] = {}   # (stage, batch) -> (rows, hidden)
        self.outputs: dict[int, tuple] = {}              # batch -> last stage's (rows, hidden)

    def state(self, actor) -> StageState:
        if actor == "draft":
            return self.draft_model.shard.state if self.draft_model else self.no_draft
        if actor == "verify":
            return self.verifier.state
        return self.shards[actor - 1].state

    def apply(self, actor, update: Update) -> bool:
        if actor == "draft":
            return self.draft_model.apply(update) if self.draft_model else False
        if actor == "verify":
            self.verifier.apply(update)
            return False                          # the verifier holds no KV
        return self.shards[actor - 1].apply(update)

    def observe(self, rows) -> None:
        pass

    def stage(self, j: int, batch: Batch, rows) -> None:
        hidden = None
        if j > 1:
            rows_in, h = self.inputs.pop((j, batch.id))
            hidden = select_rows(rows_in, h, rows)
        out = self.shards[j - 1].forward(list(rows), batch.committed, hidden)
        self.passed(j, batch, rows, out)

    def passed(self, j: int, batch: Batch, rows, out) -> None:
        """Stage j computed `rows` of `batch` (hidden out [1, n, H]): on to stage j + 1,
        or kept for the LM head."""
        if j < len(self.shards):
            self.inputs[(j + 1, batch.id)] = (rows, out)
        else:
            self.outputs[batch.id] = (rows, out)

    def verify(self, batch: Batch, rows) -> dict[int, int]:
        rows_out, hidden = self.outputs.pop(batch.id)
        tokens = self.sampler.tokens(self.shards[-1], select_rows(rows_out, hidden, rows),
                                     rows)
        return {r.id: t for r, t in zip(rows, tokens)}

    def draft(self, request: Draft, rows) -> dict:
        return self.draft_model.propose_live(list(rows), request.want, request.k,
                                             request.committed)


class InlinePipeline:
    def __init__(self, target, draft=None, stages: int = 2, *, topology: str = "A",
                 recorder=None, knobs=None, device="cpu", dtype=None,
                 prune: str = DEFAULT_PRUNE, cancel: bool = DEFAULT_CANCEL,
                 profile: Profile | None = None, timeline: bool = True,
                 sampling: Sampling = GREEDY, cuda_graphs: bool = False):
        model = target.model.to(device, dtype)
        n_layers = model.config.num_hidden_layers
        bounds = stage_bounds(n_layers, stages)
        S = len(bounds)
        # cuda_graphs: static-buffer shards (graphs.py), captured on CUDA
        self.shards = [make_shard(model, lo, hi, embed=(j == 0), head=(j == S - 1),
                                  device=device, cuda_graphs=cuda_graphs)
                       for j, (lo, hi) in enumerate(bounds)]
        self.verifier = Verifier(self.shards[-1]) if topology == "A" else None
        self.draft = (make_draft(draft.model.to(device, dtype), device, cuda_graphs)
                      if draft is not None else None)
        self.pipe = Pipeline(profile or clock_profile(n_layers), S, topology=topology,
                             prune=prune, cancel=cancel, timeline=timeline)
        self.eos, self.recorder = target.eos, recorder
        self.sampling = sampling
        self.knobs = {**(knobs or {})}
        self.knobs.setdefault("window", None)

    def run(self, name: str, req: Request) -> RunRecord:
        for holder in [*self.shards, self.verifier, self.draft]:
            if holder is not None:
                holder.reset()
        knobs = {**self.knobs, "window": window_for(self.pipe.S, self.knobs["window"])}
        strategy = make_strategy(name, req.prompt_ids, req.max_new_tokens, eos=self.eos,
                                 **knobs)
        if self.recorder is not None:
            self.recorder.request(strategy=name, id=req.id, prompt_ids=list(req.prompt_ids),
                                  max_new_tokens=req.max_new_tokens, eos=self.eos, knobs=knobs)
        compute = ModelCompute(self.shards, self.verifier, self.draft,
                               TargetSampler(self.sampling, request_key(req.id)))
        out = self.pipe.run(strategy, compute=compute, recorder=self.recorder)
        return RunRecord(name, req, output=list(strategy.output), commits=out.commits,
                         end_ms=out.end_ms, busy_ms=out.busy_ms, rows=out.rows,
                         batches=out.batches, cancelled=out.cancelled,
                         slices=slices(out.timeline))


def slices(timeline: list[dict]) -> list[tuple[str, float, float, str, int]]:
    """The simulator's timeline slices as RunRecord slices (actor, start, ms, label, rows)."""
    return [(e["tid"], e["ts"] / 1e3, e["dur"] / 1e3, e["name"], e["args"]["rows"])
            for e in timeline if e.get("ph") == "X"]
