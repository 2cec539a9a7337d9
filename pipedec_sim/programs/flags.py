"""Flags and output helpers shared by the programs of both CLIs: the one-line argparse
error, value parsers (bounded numbers, the one seed parser), the knob flags (derived from
pipedec_sim.protocol.knobs), and the progress line."""
from __future__ import annotations

import argparse
import math
import sys

from pipedec_sim.inputs.limits import MAX_SEED
from pipedec_sim.protocol.knobs import Knob, PipeDecKnobs, PipelineKnobs, TreeSDKnobs, knobs_of
from pipedec_sim.protocol.strategies import STRATEGIES

DEFAULT_PROFILE = "analytic-llama70b-1b"
DEFAULT_STAGES = 14             # pipedec-sim's pipeline, as in the paper
STRATEGY_NAMES = tuple(STRATEGIES)


class Parser(argparse.ArgumentParser):
    def error(self, message):            # argparse's own errors: same one-line shape, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind=int, *, lo: float | None = None, lo_open: bool = False,
           hi: float | None = None):
    """An argparse type: an int (or a finite float) >= lo (> lo if `lo_open`), <= hi."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, "
                                             f"got {text!r}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi} (the limit), got {text!r}")
        return v
    parse.__name__ = kind.__name__
    return parse


def positive(kind=int, hi: float | None = None):
    """An argparse type: a number > 0 (finite), at most `hi`."""
    return number(kind, lo=0, lo_open=True, hi=hi)


def seed_problem(v) -> str | None:
    """What is wrong with a seed, or None: the one rule for every program's seeds (flags
    and sweep grids alike): an integer in [0, MAX_SEED]."""
    if isinstance(v, bool) or not isinstance(v, int):
        return "expected an integer"
    if not 0 <= v <= MAX_SEED:
        return f"must be in [0, {MAX_SEED}]"
    return None


def seed(text: str) -> int:
    """The argparse type of every --seed (seed_problem's rule)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    problem = seed_problem(v)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
    return v


def strategy_list(text):
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [n for n in names if n not in STRATEGY_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {', '.join(bad) or text!r}; choose from {', '.join(STRATEGY_NAMES)}")
    return names


def knob_parser(k: Knob):
    """The argparse type of knob `k`: its own checks, as one line naming the flag."""
    def parse(text):
        try:
            return k.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = k.name
    return parse


def knob_flag_help(k: Knob) -> str:
    """The help of knob `k`'s flag; a switch that is on by default is a --no- flag."""
    if k.kind is bool and k.default:
        return f"turn off {k.help} (default on)"
    return k.help_text()


def add_knob_flag(g, k: Knob) -> None:
    """Knob `k` as a flag: `--name` (`--no-name` for a switch that is on by default)
    with the knob's default, checks and help; the value lands in `args.<name>`."""
    if k.kind is bool:
        flag = "--no-" + k.flag[2:] if k.default else k.flag
        g.add_argument(flag, dest=k.name, default=k.default, help=knob_flag_help(k),
                       action="store_false" if k.default else "store_true")
    elif k.choices:
        g.add_argument(k.flag, dest=k.name, choices=k.choices, default=k.default,
                       help=knob_flag_help(k))
    else:
        g.add_argument(k.flag, dest=k.name, type=knob_parser(k), default=k.default,
                       help=knob_flag_help(k))


def add_knob_flags(p: argparse.ArgumentParser, title: str, *groups):
    """One flag per knob of `groups`, in an argument group `title` (returned)."""
    g = p.add_argument_group(title)
    for group in groups:
        for k in knobs_of(group):
            add_knob_flag(g, k)
    return g


def add_policy_flags(p: argparse.ArgumentParser):
    """The strategies' knobs (PipeDecKnobs, TreeSDKnobs)."""
    return add_knob_flags(p, "tree policies", PipeDecKnobs, TreeSDKnobs)


def add_pipeline_flags(p: argparse.ArgumentParser):
    """The pipeline's knobs (PipelineKnobs); callers add their own flags to the group."""
    return add_knob_flags(p, "pipeline", PipelineKnobs)


def progress_printer(label: str, quiet: bool = False):
    """A progress line on stderr: redrawn on a terminal, every 10% otherwise."""
    if quiet:
        return None
    tty = sys.stderr.isatty()
    shown = [-1]

    def show(done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tty:
            end = "\n" if done == total else ""
            print(f"\r{label} {done}/{total}", end=end, file=sys.stderr, flush=True)
        elif tenth != shown[0]:
            shown[0] = tenth
            print(f"{label} {done}/{total}", file=sys.stderr, flush=True)
    return show
