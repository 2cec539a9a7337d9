"""SimPy model of the pipeline: a head (strategy + draft), S stages, links, a verifier.

Durations come from a calibration profile; proposals and target tokens from a trace
oracle (`Replay`), or from real models (the torch inline driver's compute). The strategy
object is the shared sans-IO one and the pacing rules (EntryFree, the window, empty
batches, prune delivery, dispatch) are the core's (`pipedec_sim.protocol.pacing`): this
module only executes actions and reports facts.

Topologies:
  A  the head is its own device before stage 1: it runs the draft and the LM head; the
     last stage sends hidden states back to it (a ring).
  B  the head and the draft share stage 1's device; the last stage runs the LM head and
     sends token ids back to stage 1.
Prune notices reach the stages as the prune mode says (pacing.PRUNE_MODES): `broadcast`
(one hop from the head to every stage), `inband` (into stage 1's stream at once, passed
on by each stage in arrival order) or `piggyback` (in stage 1's stream with the next
batch). A stage's stream carries (batch or None, notices) items.

Two engines run this model (`Pipeline(engine=...)`): `reference.py`, event by event with
one SimPy process per actor (the model's definition), and `fast.py`, the same events
driven by callbacks with one KV ledger for all stages, which must give identical results
(tests/test_engines.py). The fast one covers profiles whose devices are exclusive; on
shared CPU cores (processor sharing couples every stage) the reference runs.
"""
from __future__ import annotations

from backends.simulated.fast import FastRequestSim, fast_model
from backends.simulated.reference import RequestSim
from backends.simulated.replay import Replay, RequestRun
from pipedec_sim.protocol.pacing import DEFAULT_CANCEL, DEFAULT_PRUNE, check_prune

ENGINES = ("fast", "reference")    # pipedec_sim.programs.flags.ENGINES names the same
__all__ = ["ENGINES", "Pipeline", "Replay", "RequestRun"]


class Pipeline:
    """The simulated pipeline's configuration; `run` simulates one request on it."""

    def __init__(self, profile, stages: int, *, topology: str = "A",
                 prune: str = DEFAULT_PRUNE, cancel: bool = DEFAULT_CANCEL,
                 timeline: bool = False, core_share=None, engine: str = "fast"):
        if topology not in ("A", "B"):
            raise ValueError("topology must be 'A' or 'B'")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self.engine = engine
        self.profile, self.S, self.topology = profile, stages, topology
        self.prune = check_prune(prune)
        self.layers = profile.stage_layers(stages)
        self.record = timeline
        self.cancel = cancel
        # The cores' share table now, if measured apart from the profile's (foreign load
        # changes): durations then scale by core_share[n-1] / profile.core_share[0].
        self.core_share = core_share
        self.memo: dict = {}        # the fast engine's duration lookups, by their arguments

    def run(self, strategy, oracle=None, *, compute=None, recorder=None) -> RequestRun:
        """Simulate one request: `compute` does the work (default: `Replay(oracle)`);
        `recorder` sees every event and the actions it gave (pacing.Pacer)."""
        compute = compute or Replay(oracle)
        if self.engine == "fast" and fast_model(self.profile, compute):
            return FastRequestSim(self, strategy, compute, recorder).run()
        return RequestSim(self, strategy, compute, recorder).run()


