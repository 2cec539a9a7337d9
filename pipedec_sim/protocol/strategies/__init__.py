"""Decoding strategies as sans-IO state machines (see base.py)."""
from __future__ import annotations

from pipedec_sim.protocol.knobs import split_strategy_knobs
from pipedec_sim.protocol.policies import Eagle2Policy, LayerPolicy
from pipedec_sim.protocol.strategies.ar import AR
from pipedec_sim.protocol.strategies.base import Strategy
from pipedec_sim.protocol.strategies.pipedec import PipeDec
from pipedec_sim.protocol.strategies.tree_sd import ChainSD, TreeSD

STRATEGIES = {"ar": AR, "tree-sd": TreeSD, "pipedec": PipeDec, "chain-sd": ChainSD}
# what `run`, `sweep` and `pipedec-real run` compare unless told otherwise
DEFAULT_STRATEGIES = ("ar", "tree-sd", "pipedec")


def make_strategy(name: str, prompt, max_new_tokens: int, *, eos: int | None = None,
                  pooled: bool = False, **knobs) -> Strategy:
    """Build a strategy by name with its knobs: those of PipeDecKnobs and TreeSDKnobs
    (pipedec_sim.protocol.knobs; missing ones take their defaults). Every knob given is
    checked; a strategy ignores the other strategies' knobs. pooled: PipeDec's tree is
    grown by a serving scheduler (SpecPipe-DB)."""
    pipedec, tree_sd = split_strategy_knobs(knobs)
    if name == "ar":
        return AR(prompt, max_new_tokens, eos=eos)
    if name == "tree-sd":
        return TreeSD(prompt, max_new_tokens, eos=eos, policy=Eagle2Policy.of(tree_sd))
    if name == "pipedec":
        return PipeDec(prompt, max_new_tokens, eos=eos, window=pipedec.window,
                       policy=LayerPolicy.of(pipedec), pooled=pooled)
    if name == "chain-sd":
        return ChainSD(prompt, max_new_tokens, eos=eos, gamma=tree_sd.gamma)
    raise ValueError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")


__all__ = ["AR", "ChainSD", "DEFAULT_STRATEGIES", "PipeDec", "STRATEGIES", "Strategy", "TreeSD",
           "make_strategy"]
