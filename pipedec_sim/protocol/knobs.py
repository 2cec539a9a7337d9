"""Every knob of the strategies and the pipeline, described once: default, bounds, help.

A knob group is a frozen dataclass whose fields are knobs (`knob(...)` puts a `Knob`
description in the field's metadata); constructing one checks every value:

* `PipeDecKnobs`: PipeDec's layer policy (`LayerPolicy`) and its in-flight window;
* `TreeSDKnobs`: tree-based SD's EAGLE-2 policy (`Eagle2Policy`);
* `PipelineKnobs`: where the LM head sits and how prune notices travel (`pacing`).

Everything else reads them from here: the policies' defaults, `make_strategy`, the flags
of `pipedec-sim run` / `tune` and `pipedec-real run` (flag, parser, default, help), the
sweep's grid keys and checks, the tuner's search space and `SimConfig`. Knob names are
unique across the groups: one name is the dataclass field, the keyword of
`make_strategy`, the sweep's grid key and (with `-` for `_`) the flag.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from pipedec_sim.protocol.pacing import DEFAULT_CANCEL, DEFAULT_PRUNE, PRUNE_MODES

STRATEGY_LABELS = {"pipedec": "PipeDec", "tree-sd": "tree-SD", "chain-sd": "chain-SD"}

# Upper bounds of the tree knobs: far past any useful tree, and low enough that one decode
# step stays cheap (tree-SD's work grows as tree_topk squared: 64 tokens at tree_topk 1024
# take 20 s to simulate, at 64 a tenth of a second). Flags, sweep grids and the tuner all
# check them. The window has none: it only caps the batches in flight (10**9: unbounded).
MAX_WIDTH = 1024                # PipeDec nodes per layer
MAX_TOPK = 1024                 # children per node (the most a trace or model proposes)
MAX_DEPTH = 64                  # tree-SD draft passes
MAX_TREE_TOPK = 64              # tree-SD nodes expanded per level
MAX_TOTAL = 4096                # tree-SD verified nodes
MAX_RUNNING = 4096              # serving: requests running at once
MAX_BATCHED_TOKENS = 1 << 20    # serving: rows per micro-batch
MAX_STEP_WIDTH = 1 << 16        # serving, pipedec-db: tree rows per step


@dataclass(frozen=True)
class Knob:
    """One knob: what it is, its default and the values it accepts.

    lo/hi bound a number (`lo_open`/`hi_open`: the bound itself is excluded); `choices`
    lists a string's values; `none` says what None means ("off"), and None is accepted
    only if it is set. `strategy` names the strategy the knob matters to (None: the
    pipeline's, every strategy's).
    """
    name: str
    kind: type                  # int, float, str or bool
    default: Any
    help: str                   # what it does; help_text() adds the strategy and default
    strategy: str | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    none: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def optional(self) -> bool:
        return self.none is not None

    def show(self, value) -> str:
        """A value as help text and messages write it."""
        if value is None:
            return self.none or "none"
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def help_text(self, note: str = "") -> str:
        """"PipeDec: nodes per tree layer, W (default 16)"; `note` goes after the default."""
        label = STRATEGY_LABELS.get(self.strategy or "")
        text = f"{label}: {self.help}" if label else self.help
        return f"{text} (default {self.show(self.default)}{note})"

    def problem(self, value) -> str | None:
        """What is wrong with `value` ("must be >= 1"), or None if it is fine."""
        if value is None:
            return None if self.optional else "must be given"
        if self.kind is bool:
            return None if isinstance(value, bool) else "expected true or false"
        if self.choices:
            return None if value in self.choices else f"choose from {', '.join(self.choices)}"
        if self.kind is str:
            return None if isinstance(value, str) else "expected a string"
        whole = self.kind is int
        if isinstance(value, bool) or not isinstance(
                value, numbers.Integral if whole else numbers.Real):
            return "expected an integer" if whole else "expected a number"
        if not whole and value != value:
            return "expected a number"              # NaN
        if not whole and not _finite(value):
            return "must be finite"
        return self._bounds_problem(value)

    def _bounds_problem(self, value) -> str | None:
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return f"must be {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return f"must be {'<' if self.hi_open else '<='} {self.hi:g}"
        return None

    def check(self, value, name: str | None = None):
        """`value` if it is fine, else ValueError("width: must be >= 1, got 0")."""
        msg = self.problem(value)
        if msg is not None:
            raise ValueError(f"{name or self.name}: {msg}, got {value!r}")
        return value

    def parse(self, text: str):
        """A value from the command line; ValueError("must be >= 1, got '0'") if bad."""
        if self.kind is bool:
            value = _parse_bool(text)
        elif self.kind is str:
            value = text
        else:
            try:
                value = self.kind(text)
            except ValueError:
                value = text            # problem() names the expected type
        msg = self.problem(value)
        if msg is not None:
            raise ValueError(f"{msg}, got {text!r}")
        return value


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:           # an int too large for a float
        return False


def _parse_bool(text: str):
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    return text


def knob(kind: type, default, help: str, **limits) -> Any:
    """A knob field of a group: `limits` are Knob's lo, hi, lo_open, hi_open, choices, none."""
    spec = Knob(name="", kind=kind, default=default, help=help, **limits)
    return field(default=default, metadata={"knob": spec})


@dataclass(frozen=True)
class KnobGroup:
    """Base of the knob groups (and of anything built from them, e.g. SimConfig):
    construction checks every knob field, naming it."""
    strategy: ClassVar[str | None] = None     # the strategy a group's knobs matter to

    def __post_init__(self):
        for f in fields(self):
            spec = f.metadata.get("knob")
            if spec is not None:
                spec.check(getattr(self, f.name), f.name)


@dataclass(frozen=True)
class PipeDecKnobs(KnobGroup):
    """PipeDec: the layer policy (`LayerPolicy`) and the batches in flight."""
    strategy: ClassVar[str | None] = "pipedec"
    width: int = knob(int, 16, "nodes per tree layer, W", lo=1, hi=MAX_WIDTH)
    topk: int = knob(int, 16, "children considered per frontier node, k", lo=1, hi=MAX_TOPK)
    floor: float = knob(float, 0.0, "drop nodes whose path probability is below this",
                        lo=0.0, hi=1.0, hi_open=True)
    coverage: float | None = knob(float, None, "adaptive width: stop a layer once it holds "
                                  "this fraction of the frontier's probability",
                                  lo=0.0, hi=1.0, lo_open=True, none="off")
    window: int | None = knob(int, None, "batches in flight at most", lo=1, none="stages + 1")


@dataclass(frozen=True)
class TreeSDKnobs(KnobGroup):
    """Tree-based SD: the EAGLE-2 dynamic tree (`Eagle2Policy`), and chain-SD's chain."""
    strategy: ClassVar[str | None] = "tree-sd"
    depth: int = knob(int, 6, "draft passes per tree, EAGLE-2's depth", lo=1, hi=MAX_DEPTH)
    tree_topk: int = knob(int, 10, "nodes expanded per level and children per node, "
                          "EAGLE-2's top_k", lo=1, hi=MAX_TREE_TOPK)
    total: int = knob(int, 60, "nodes kept in the verified tree, EAGLE-2's total_token", lo=1,
                      hi=MAX_TOTAL)
    # chain-SD (vLLM's draft-model speculation) is tree-SD with a chain: its one knob
    gamma: int = knob(int, 4, "draft tokens per pass, a chain (vLLM's num_speculative_tokens)",
                      lo=1, hi=MAX_DEPTH, strategy="chain-sd")


@dataclass(frozen=True)
class PipelineKnobs(KnobGroup):
    """Where the draft and the LM head sit, and how prune notices reach the stages."""
    topology: str = knob(str, "A", "A: draft and LM head on a head node before stage 1 (a "
                         "ring); B: draft beside stage 1, LM head on the last stage",
                         choices=("A", "B"))
    prune: str = knob(str, DEFAULT_PRUNE, "how prune notices reach the stages: broadcast "
                      "(from the head to every stage at once), inband (into stage 1's "
                      "stream, behind the batches sent), piggyback (just ahead of the next "
                      "batch)", choices=PRUNE_MODES)
    cancel: bool = knob(bool, DEFAULT_CANCEL, "cancellation: a stage computing a batch whose "
                        "rows have all died abandons it at the next layer boundary; "
                        "broadcast prune only")


@dataclass(frozen=True)
class ServeKnobs(KnobGroup):
    """Serving many requests (`protocol/serve/`): admission and micro-batch composition."""
    max_running: int = knob(int, 64, "requests running at once (vLLM's max_num_seqs); "
                            "later arrivals wait", lo=1, hi=MAX_RUNNING)
    max_batched_tokens: int = knob(int, 2048, "rows one micro-batch carries at most (vLLM's "
                                   "max_num_batched_tokens; pp, tree-sd, chain-sd)", lo=1,
                                   hi=MAX_BATCHED_TOKENS)
    micro_batches: int | None = knob(int, None, "micro-batches in flight at most (pp, tree-sd, "
                                     "chain-sd: vLLM's virtual engines)", lo=1, none="stages")
    chunked_prefill: bool = knob(bool, False, "chunked prefill: a prompt takes what a "
                                 "micro-batch's token budget leaves after the running "
                                 "requests' rows (pp)")
    step_width: int = knob(int, 64, "pipedec-db: tree rows per pipeline step, shared by the "
                           "running requests (each at most --width)", lo=1, hi=MAX_STEP_WIDTH)
    share: str = knob(str, "fair", "pipedec-db: how a step's rows are split: fair (an equal "
                      "quota each, the rest to the likeliest) or best (the likeliest paths of "
                      "all requests)", choices=("fair", "best"))


STRATEGY_GROUPS = (PipeDecKnobs, TreeSDKnobs)
GROUPS = STRATEGY_GROUPS + (PipelineKnobs,)


def knobs_of(group: type[KnobGroup]) -> tuple[Knob, ...]:
    """A group's knobs, in field order, named and with the group's strategy."""
    return tuple(replace(f.metadata["knob"], name=f.name,
                         strategy=f.metadata["knob"].strategy or group.strategy)
                 for f in fields(group) if "knob" in f.metadata)


def _by_name(groups) -> dict[str, Knob]:
    out: dict[str, Knob] = {}
    for g in groups:
        for k in knobs_of(g):
            if k.name in out:
                raise TypeError(f"knob {k.name!r} is in two groups")
            out[k.name] = k
    return out


KNOBS: dict[str, Knob] = _by_name(GROUPS)               # every knob, by name
STRATEGY_KNOBS: dict[str, Knob] = _by_name(STRATEGY_GROUPS)


def values_of(obj, groups=GROUPS) -> dict[str, Any]:
    """The values of `groups`' knobs read off `obj` (a group, SimConfig, parsed args)."""
    return {k.name: getattr(obj, k.name) for g in groups for k in knobs_of(g)}


def split_strategy_knobs(values: dict) -> tuple[PipeDecKnobs, TreeSDKnobs]:
    """Both strategies' knob groups from `values` (missing knobs: their defaults).
    TypeError for a name that is no strategy knob; ValueError for a bad value."""
    unknown = sorted(set(values) - set(STRATEGY_KNOBS))
    if unknown:
        raise TypeError(f"unknown strategy knob(s) {', '.join(unknown)}; "
                        f"known: {', '.join(STRATEGY_KNOBS)}")

    def given(group) -> dict:
        return {k.name: values[k.name] for k in knobs_of(group) if k.name in values}
    return PipeDecKnobs(**given(PipeDecKnobs)), TreeSDKnobs(**given(TreeSDKnobs))
