"""Serving many requests with real models on the simulator's clock (the inline driver's
serving form).

`InlineServer` is `InlinePipeline` for a serving workload: the SimPy serving pipeline
(`backends.simulated.serve.ServeSim`, one calendar for every request) decides when each
stage, the draft and the verifier work, a serving scheduler (`pipedec_sim.protocol.serve`)
composes the steps, and the compute is real. The weights are loaded once; each request
gets, when it is admitted, its own `ModelCompute`: per-request `Shard`s, `Verifier` and
`DraftModel` that share the model's modules (no weights are copied) but own their
`StageState` and `DynamicCache`, so one request's KV never sees another's. ServeSim drops
a request's compute when it finishes, and its caches go with it.

A step that carries several requests is computed one request after the other by
default: ServeSim calls `ModelCompute.stage(j, batch, rows)` per part, so each part runs
one forward through its own request's cache. With `batched=True` a stage computes a
step's parts in ONE forward (`batched_stage`: `batch.forward_requests`, the weights once
and each request's attention over its own cache and tree), as the distributed serving
stages do, and a draft pass over several requests is one forward too (`batched_draft`).
The LM head stays one request at a time. Times in the results are simulated.
"""
from __future__ import annotations

from typing import Sequence

import torch

from backends.simulated.pipeline import Pipeline
from backends.simulated.serve import ServeRun, ServeSim
from backends.torch.batch import forward_requests, propose_live, rounds
from backends.torch.head import Request
from backends.torch.inline import ModelCompute, clock_profile
from backends.torch.shard import DraftModel, Shard, TargetSampler, Verifier, select_rows
from backends.torch.stage import stage_bounds
from pipedec_sim.inputs.profile import Profile
from pipedec_sim.protocol.knobs import ServeKnobs
from pipedec_sim.protocol.pacing import DEFAULT_CANCEL, DEFAULT_PRUNE, window_for
from pipedec_sim.protocol.sampling import GREEDY, Sampling, request_key
from pipedec_sim.protocol.serve import SINGLE, make_server
from pipedec_sim.protocol.strategies import make_strategy


class InlineServer:
    """A serving workload on one in-process pipeline: `InlinePipeline`'s arguments, plus
    `serve_knobs` (the fields of `ServeKnobs`)."""

    def __init__(self, target, draft=None, stages: int = 2, *, topology: str = "A",
                 knobs=None, serve_knobs: dict | None = None, device="cpu", dtype=None,
                 prune: str = DEFAULT_PRUNE, cancel: bool = DEFAULT_CANCEL,
                 profile: Profile | None = None, timeline: bool = False,
                 sampling: Sampling = GREEDY, batched: bool = False):
        self.model = target.model.to(device, dtype)
        self.draft_model = draft.model.to(device, dtype) if draft is not None else None
        n_layers = self.model.config.num_hidden_layers
        self.bounds = stage_bounds(n_layers, stages)
        self.device, self.topology = device, topology
        self.pipe = Pipeline(profile or clock_profile(n_layers), len(self.bounds),
                             topology=topology, prune=prune, cancel=cancel, timeline=timeline)
        self.eos, self.sampling = target.eos, sampling
        self.knobs = {**(knobs or {})}
        self.knobs["window"] = window_for(self.pipe.S, self.knobs.get("window"))
        self.serve_knobs = ServeKnobs(**(serve_knobs or {}))
        self.batched = batched

    def compute_for(self, req: Request) -> ModelCompute:
        """Request `req`'s own KV holders over the shared weights (cheap: modules are
        referenced, caches start empty)."""
        S = len(self.bounds)
        shards = [Shard(self.model, lo, hi, embed=(j == 0), head=(j == S - 1),
                        device=self.device) for j, (lo, hi) in enumerate(self.bounds)]
        verifier = Verifier(shards[-1]) if self.topology == "A" else None
        draft = (DraftModel(self.draft_model, self.device) if self.draft_model is not None
                 else None)
        return ModelCompute(shards, verifier, draft,
                            TargetSampler(self.sampling, request_key(req.id)))

    def serve(self, name: str, requests: Sequence[Request], *, arrivals_ms=None,
              concurrency: int | None = None) -> tuple[ServeRun, dict[int, list[int]]]:
        """Run `requests` (request r is requests[r]) under serving strategy `name`: open
        loop at `arrivals_ms`, or closed loop with `concurrency` outstanding. Returns the
        run and each request's output tokens."""
        strategies = {}

        def make(r: int):
            req = requests[r]
            s = strategies[r] = make_strategy(SINGLE[name], req.prompt_ids,
                                              req.max_new_tokens, eos=self.eos,
                                              pooled=(name == "pipedec-db"), **self.knobs)
            return s

        def server_of(backend):
            return make_server(name, make, backend, stages=self.pipe.S,
                               serve=self.serve_knobs, prune=self.pipe.prune,
                               window=self.knobs["window"])

        sim = ServeSim(self.pipe, server_of, lambda r: self.compute_for(requests[r]),
                       len(requests), arrivals_ms=arrivals_ms, concurrency=concurrency,
                       stage_step=batched_stage if self.batched else None,
                       draft_step=batched_draft if self.batched else None)
        run = sim.run()
        return run, {r: list(s.output) for r, s in sorted(strategies.items())}


def batched_stage(j: int, parts) -> None:
    """Stage j's compute of a step's parts, [(ModelCompute, batch, rows)], in one forward
    over their requests (`batch.forward_requests`); a request's second part of the step
    goes in a second forward (`batch.rounds`). Then, as `ModelCompute.stage` does per
    part, each request's output goes on."""
    for group in rounds(parts, key=lambda part: id(part[0])):
        if len(group) == 1:
            c, b, rows = group[0]
            c.stage(j, b, rows)
            continue
        shards = [c.shards[j - 1] for c, _, _ in group]
        hidden = None if j == 1 else [_stage_input(c, j, b, rows) for c, b, rows in group]
        outs = forward_requests(shards, [rows for _, _, rows in group],
                                [b.committed for _, b, _ in group], hidden)
        assert outs is not None
        for (c, b, rows), out in zip(group, outs):
            c.passed(j, b, rows, out)


def batched_draft(items) -> list[dict]:
    """The draft pass of several requests, [(ModelCompute, Draft, admitted rows)], in one
    forward (`batch.propose_live`)."""
    return propose_live([(c.draft_model, d, rows) for c, d, rows in items])


def _stage_input(c: ModelCompute, j: int, b, rows) -> torch.Tensor:
    """A part's hidden states [1, n, H] into stage j > 1: what stage j - 1 passed on
    (its live rows)."""
    rows_in, h = c.inputs.pop((j, b.id))
    return select_rows(rows_in, h, rows)
