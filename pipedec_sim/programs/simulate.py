"""Run strategies over a trace on the simulated pipeline: the engine behind `pipedec-sim run`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from backends.simulated.oracle import TraceOracle
from pipedec_sim.programs.flags import DEFAULT_ENGINE, DEFAULT_STAGES, ENGINES
from pipedec_sim.protocol.knobs import (
    STRATEGY_GROUPS,
    PipeDecKnobs,
    PipelineKnobs,
    TreeSDKnobs,
    values_of,
)
from pipedec_sim.protocol.pacing import window_for
from pipedec_sim.protocol.strategies import DEFAULT_STRATEGIES, make_strategy
from pipedec_sim.results.metrics import (
    RequestMetrics,
    request_metrics,
    requests_frame,
    summarize,
)

# ENGINES, DEFAULT_ENGINE (from programs.flags): the SimPy engines of backends.simulated,
# "fast" (the default) and "reference", the event-by-event model it must reproduce exactly.


@dataclass(frozen=True)
class SimConfig(PipelineKnobs, TreeSDKnobs, PipeDecKnobs):
    """What `simulate` runs: every knob (PipeDecKnobs, TreeSDKnobs, PipelineKnobs, with
    their defaults and checks) plus the pipeline's size, the strategies and the seed.
    Built with keywords: SimConfig(stages=4, width=8, prune="piggyback")."""
    stages: int = DEFAULT_STAGES
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    seed: int = 0
    engine: str = DEFAULT_ENGINE

    def __post_init__(self):
        super().__post_init__()
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")

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


def simulate(trace, profile, cfg: SimConfig, *, workers: int = 1, timeline_requests: int = 0,
             progress: Callable[[int, int], None] | None = None) -> SimResult:
    """Every (strategy, request) run of `cfg` on `trace`, in `workers` processes (chunks of
    a few requests per task); the frames are the same, row for row, for any `workers`.
    `progress(done, total)` counts request runs."""
    names = list(cfg.strategies)
    chunks = _chunks(trace.requests, workers)
    # a chunk's strategies one after another: the load stays mixed and the ETA honest
    order = [(s, c) for c in range(len(chunks)) for s in range(len(names))]
    tasks = [(profile, cfg, names[s], chunks[c], timeline_requests) for s, c in order]
    total = len(names) * len(trace.requests)
    done = [0]

    def finished(task, runs) -> None:
        done[0] += len(runs)
        if progress:
            progress(done[0], total)

    if progress:
        progress(0, total)
    if workers <= 1 or len(tasks) <= 1:
        results = []
        for task in tasks:
            results.append(_run_chunk(*task))
            finished(task, results[-1])
    else:
        from pipedec_sim.programs.pool import WorkerPool, results_in_order
        with WorkerPool(min(workers, len(tasks))) as wp:
            results = results_in_order(wp, _run_chunk, tasks, finished)
    runs = [run for _, chunk in sorted(zip(order, results)) for run in chunk]  # by strategy
    df = requests_frame([metrics for metrics, _ in runs])
    timelines = {(m.strategy, m.request): tl for m, tl in runs if tl is not None}
    return SimResult(df, summarize(df), timelines)


CHUNK = 4      # most requests per task: enough to amortise pickling, few for load balance


def _chunks(requests, workers: int) -> list[list[tuple[int, Any]]]:
    """(index, request) pairs in consecutive chunks: at least ~4 tasks per worker."""
    indexed = list(enumerate(requests))
    size = max(1, min(CHUNK, len(indexed) // (4 * max(workers, 1))))
    return [indexed[i:i + size] for i in range(0, len(indexed), size)]


def _run_chunk(profile, cfg: SimConfig, name: str, chunk, timeline_requests: int
               ) -> list[tuple[RequestMetrics, Any]]:
    """Worker entry point (module level: picklable under spawn): strategy `name` on each
    (index, request) of `chunk`; (metrics, timeline or None) per request."""
    from backends.simulated.pipeline import (
        Pipeline,  # SimPy stays out of the core import
    )
    out = []
    for i, req in chunk:
        record = i < timeline_requests
        pipe = Pipeline(profile, cfg.stages, topology=cfg.topology, prune=cfg.prune,
                        cancel=cfg.cancel, timeline=record, engine=cfg.engine)
        strategy = make_strategy(name, prompt_tokens(req), len(req.output), **cfg.knobs())
        run = pipe.run(strategy, TraceOracle(req, seed=cfg.seed))
        if strategy.output != list(req.output):      # lossless, or a bug: never hide it
            raise RuntimeError(f"{name} committed a different output for request {req.id}")
        out.append((request_metrics(name, req.id, cfg.stages, run.commits, run.end_ms,
                                    run.busy_ms, run.rows, run.batches,
                                    prompt_len=req.prompt_len),
                     run.timeline if record else None))
    return out
