"""Serving many requests on one pipeline, sans-IO: SpecPipe-DB and its baselines.

`make_server` builds the scheduler of a serving strategy: `pp`, `tree-sd` and `chain-sd`
are vLLM-style micro-batches (`microbatch.py`), `pipedec-db` is SpecPipe-DB's mixed tree
layers (`layers.py`); every request keeps the single-request strategy named in `SINGLE`.
"""
from __future__ import annotations

from typing import Callable

from pipedec_sim.protocol.knobs import ServeKnobs
from pipedec_sim.protocol.serve.layers import SHARES, LayerServer, share
from pipedec_sim.protocol.serve.microbatch import MicroBatchServer
from pipedec_sim.protocol.serve.server import Send, ServeAction, ServeDispatch, Server
from pipedec_sim.protocol.strategies.base import Strategy

SERVE_STRATEGIES = ("pp", "tree-sd", "chain-sd", "pipedec-db")
# each serving strategy's requests run this single-request strategy
SINGLE = {"pp": "ar", "tree-sd": "tree-sd", "chain-sd": "chain-sd", "pipedec-db": "pipedec"}


def make_server(name: str, make: Callable[[int], Strategy], backend: ServeDispatch, *,
                stages: int, serve: ServeKnobs, prune: str, window: int) -> Server:
    """The scheduler of serving strategy `name`; make(r) builds request r's strategy
    (`SINGLE[name]`, pooled for pipedec-db); window: PipeDec's steps in flight."""
    if name == "pipedec-db":
        return LayerServer(make, backend, prune=prune,  # type: ignore[arg-type]
                           max_running=serve.max_running, window=window,
                           step_width=serve.step_width, share=serve.share)
    if name in SINGLE:
        return MicroBatchServer(make, backend, prune=prune, max_running=serve.max_running,
                                slots=serve.micro_batches or stages,
                                max_tokens=serve.max_batched_tokens,
                                chunked_prefill=serve.chunked_prefill, name=name)
    raise ValueError(f"unknown serving strategy {name!r} "
                     f"(choose from {', '.join(SERVE_STRATEGIES)})")


__all__ = ["SERVE_STRATEGIES", "SHARES", "SINGLE", "LayerServer", "MicroBatchServer", "Send",
           "ServeAction", "ServeDispatch", "Server", "make_server", "share"]
