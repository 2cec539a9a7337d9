"""Decoding strategies as sans-IO state machines (see base.py)."""
from __future__ import annotations

from pipedec_sim.protocol.knobs import split_strategy_knobs
from pipedec_sim.protocol.policies import Eagle2Policy, LayerPolicy
from pipedec_sim.protocol.strategies.ar import AR
from pipedec_sim.protocol.strategies.base import Strategy
from pipedec_sim.protocol.strategies.pipedec import PipeDec
from pipedec_sim.protocol.strategies.tree_sd import TreeSD

STRATEGIES = {"ar": AR, "tree-sd": TreeSD, "pipedec": PipeDec}


def make_strategy(name: str, prompt, max_new_tokens: int, *, eos: int | None = None,
                  **knobs) -> Strategy:
    """Build a strategy by name with its knobs: those of PipeDecKnobs and TreeSDKnobs
    (pipedec_sim.protocol.knobs; missing ones take their defaults). Every knob given is
    checked; a strategy ignores the other strategy's knobs."""
    pipedec, tree_sd = split_strategy_knobs(knobs)
    if name == "ar":
        return AR(prompt, max_new_tokens, eos=eos)
    if name == "tree-sd":
        return TreeSD(prompt, max_new_tokens, eos=eos, policy=Eagle2Policy.of(tree_sd))
    if name == "pipedec":
        return PipeDec(prompt, max_new_tokens, eos=eos, window=pipedec.window,
                       policy=LayerPolicy.of(pipedec))
    raise ValueError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")


__all__ = ["AR", "PipeDec", "STRATEGIES", "Strategy", "TreeSD", "make_strategy"]
