"""Decoding strategies as sans-IO state machines (see base.py)."""
from __future__ import annotations

from pipedec_sim.protocol.policies import Eagle2Policy, LayerPolicy
from pipedec_sim.protocol.strategies.ar import AR
from pipedec_sim.protocol.strategies.base import Strategy
from pipedec_sim.protocol.strategies.pipedec import PipeDec
from pipedec_sim.protocol.strategies.tree_sd import TreeSD

STRATEGIES = {"ar": AR, "tree-sd": TreeSD, "pipedec": PipeDec}


def make_strategy(name: str, prompt, max_new_tokens: int, *, eos: int | None = None,
                  width: int = 16, topk: int = 16, floor: float = 0.0,
                  coverage: float | None = None, depth: int = 6, tree_topk: int = 10,
                  total: int = 60, window: int | None = None) -> Strategy:
    """Build a strategy by name with its policy knobs (unused knobs are ignored)."""
    if name == "ar":
        return AR(prompt, max_new_tokens, eos=eos)
    if name == "tree-sd":
        return TreeSD(prompt, max_new_tokens, eos=eos,
                      policy=Eagle2Policy(depth=depth, topk=tree_topk, total=total))
    if name == "pipedec":
        return PipeDec(prompt, max_new_tokens, eos=eos, window=window,
                       policy=LayerPolicy(width=width, topk=topk, floor=floor, coverage=coverage))
    raise ValueError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")


__all__ = ["AR", "PipeDec", "STRATEGIES", "Strategy", "TreeSD", "make_strategy"]
