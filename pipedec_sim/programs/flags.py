"""Flags and output helpers shared by the programs of both CLIs: the one-line argparse
error, value parsers, the policy flags, and the progress line."""
from __future__ import annotations

import argparse
import sys

DEFAULT_PROFILE = "analytic-llama70b-1b"
STRATEGY_NAMES = ("ar", "tree-sd", "pipedec")


class Parser(argparse.ArgumentParser):
    def error(self, message):            # argparse's own errors: same one-line shape, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive(kind=int):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}")
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return v
    return parse


def fraction(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return v


def coverage(text):
    v = positive(float)(text)
    if v > 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return v


def strategy_list(text):
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [n for n in names if n not in STRATEGY_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {', '.join(bad) or text!r}; choose from {', '.join(STRATEGY_NAMES)}")
    return names


def add_policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tree policies")
    g.add_argument("--width", type=positive(), default=16,
                   help="PipeDec: nodes per tree layer, W (default 16)")
    g.add_argument("--topk", type=positive(), default=16,
                   help="PipeDec: children considered per frontier node, k (default 16)")
    g.add_argument("--floor", type=fraction, default=0.0,
                   help="PipeDec: drop nodes whose path probability is below this (default 0)")
    g.add_argument("--coverage", type=coverage, default=None,
                   help="PipeDec adaptive width: stop a layer once it holds this fraction of "
                        "the frontier's probability (default off)")
    g.add_argument("--depth", type=positive(), default=6,
                   help="tree-SD (EAGLE-2): draft passes per tree (default 6)")
    g.add_argument("--tree-topk", type=positive(), default=10,
                   help="tree-SD: nodes expanded per level and children per node (default 10)")
    g.add_argument("--total", type=positive(), default=60,
                   help="tree-SD: nodes kept in the verified tree, total_token (default 60)")


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
