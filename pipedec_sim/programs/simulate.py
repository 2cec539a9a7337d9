"""Run strategies over a trace on the simulated pipeline: the engine behind `pipedec-sim run`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from backends.simulated.oracle import TraceOracle
from pipedec_sim.programs.flags import DEFAULT_STAGES, STRATEGY_NAMES
from pipedec_sim.protocol.knobs import (
    STRATEGY_GROUPS,
    PipeDecKnobs,
    PipelineKnobs,
    TreeSDKnobs,
    values_of,
)
from pipedec_sim.protocol.pacing import window_for
from pipedec_sim.protocol.strategies import make_strategy
from pipedec_sim.results.metrics import (
    RequestMetrics,
    request_metrics,
    requests_frame,
    summarize,
)


@dataclass(frozen=True)
class SimConfig(PipelineKnobs, TreeSDKnobs, PipeDecKnobs):
    """What `simulate` runs: every knob (PipeDecKnobs, TreeSDKnobs, PipelineKnobs, with
    their defaults and checks) plus the pipeline's size, the strategies and the seed.
    Built with keywords: SimConfig(stages=4, width=8, prune="piggyback")."""
    stages: int = DEFAULT_STAGES
    strategies: tuple[str, ...] = STRATEGY_NAMES
    seed: int = 0

    def knobs(self) -> dict:
        """make_strategy's knobs, the window resolved (None: stages + 1)."""
        knobs = values_of(self, STRATEGY_GROUPS)
        knobs["window"] = window_for(self.stages, self.window)
        return knobs


@dataclass
class SimResult:
    requests: pd.DataFrame
    summary: pd.DataFrame
    timelines: dict = field(default_factory=dict)   # (strategy, request id) -> trace events


def prompt_tokens(req) -> list[int]:
    """Prompt ids if the trace has them; placeholders otherwise (only length matters)."""
    return list(req.prompt_ids) if req.prompt_ids else [0] * req.prompt_len


def simulate(trace, profile, cfg: SimConfig, *, timeline_requests: int = 0,
             progress: Callable[[int, int], None] | None = None) -> SimResult:
    from backends.simulated.pipeline import (
        Pipeline,  # SimPy stays out of the core import
    )

    items: list[RequestMetrics] = []
    timelines = {}
    total = len(cfg.strategies) * len(trace.requests)
    done = 0
    for name in cfg.strategies:
        for i, req in enumerate(trace.requests):
            record = i < timeline_requests
            pipe = Pipeline(profile, cfg.stages, topology=cfg.topology, prune=cfg.prune,
                            cancel=cfg.cancel, timeline=record)
            strategy = make_strategy(name, prompt_tokens(req), len(req.output), **cfg.knobs())
            run = pipe.run(strategy, TraceOracle(req, seed=cfg.seed))
            if strategy.output != list(req.output):      # lossless, or a bug: never hide it
                raise RuntimeError(f"{name} committed a different output for request {req.id}")
            items.append(request_metrics(name, req.id, cfg.stages, run.commits, run.end_ms,
                                         run.busy_ms, run.rows, run.batches,
                                         prompt_len=req.prompt_len))
            if record:
                timelines[(name, req.id)] = run.timeline
            done += 1
            if progress:
                progress(done, total)
    df = requests_frame(items)
    return SimResult(df, summarize(df), timelines)
