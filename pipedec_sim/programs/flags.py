"""Flags and output helpers shared by the programs of both CLIs: the one-line argparse
error, value parsers (bounded numbers, the one seed parser), the knob flags (derived from
pipedec_sim.protocol.knobs), the --workers/--engine/--out-format flags, and the
progress bar."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from pipedec_sim.inputs.limits import MAX_MS, MAX_SEED, MAX_WORKERS, MIN_GBPS
from pipedec_sim.programs.pool import default_workers
from pipedec_sim.protocol.knobs import Knob, PipeDecKnobs, PipelineKnobs, TreeSDKnobs, knobs_of
from pipedec_sim.protocol.strategies import STRATEGIES
from pipedec_sim.results.tables import DEFAULT_OUT_FORMAT, OUT_FORMATS

DEFAULT_PROFILE = "analytic-llama70b-1b"
DEFAULT_STAGES = 14             # pipedec-sim's pipeline, as in the paper
STRATEGY_NAMES = tuple(STRATEGIES)          # every strategy; DEFAULT_STRATEGIES: run's default
# The SimPy engines (backends.simulated): "fast" (the default) and "reference", the
# event-by-event model it must reproduce exactly (pipedec_sim.programs.simulate uses these).
ENGINES = ("fast", "reference")
DEFAULT_ENGINE = "fast"


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


def file_path(text: str) -> Path:
    """An argparse type: a file or folder's path (an empty one would silently mean "here")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


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


def name_list(text: str, choices, what: str = "strategy") -> tuple[str, ...]:
    """Comma-separated names from `choices`, each once (a repeat would run, and count,
    its strategy twice), in the order given."""
    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    bad = [n for n in names if n not in choices]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(bad) or text!r}; choose from {', '.join(choices)}")
    return names


def strategy_list(text):
    return name_list(text, STRATEGY_NAMES)


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


def add_prompt_format_flag(g) -> None:
    """--format of a prompt file (pipedec-real's --prompts)."""
    from pipedec_sim.inputs.prompts import FORMATS
    g.add_argument("--format", choices=("auto",) + FORMATS, default="auto",
                   help="the prompt file's format (default auto: told from its content)")


def add_link_flags(g, *, latency: bool = True) -> None:
    """--link-gbps (and --link-latency-ms): the profile's link, overridden."""
    g.add_argument("--link-gbps", type=number(float, lo=MIN_GBPS), default=None,
                   help="override the profile's link bandwidth (Gbit/s; default the profile's)")
    if latency:
        g.add_argument("--link-latency-ms", type=number(float, lo=0, hi=MAX_MS), default=None,
                       help="override the profile's per-hop latency (ms; default the profile's)")


def add_sampling_flags(p: argparse.ArgumentParser):
    """How the target picks its tokens (pipedec_sim.protocol.sampling): greedy by default.
    `sampling_of(args)` turns them into a Sampling."""
    g = p.add_argument_group("target sampling")
    g.add_argument("--temperature", type=number(float, lo=0), default=0.0,
                   help="sample the target's tokens at this temperature with the core's "
                        "seeded sampler (default 0: greedy). Lossless: every strategy commits "
                        "the tokens the target alone would sample")
    g.add_argument("--top-p", type=number(float, lo=0, lo_open=True, hi=1), default=1.0,
                   help="nucleus sampling: keep the smallest set of tokens holding this "
                        "probability (default 1: all); only with --temperature > 0")
    g.add_argument("--top-k-sampling", type=number(int, lo=0), default=0,
                   help="sample among the target's k likeliest tokens (default 0: no limit); "
                        "only with --temperature > 0. Not the draft's --topk")
    g.add_argument("--seed", type=seed, default=0,
                   help="sampling seed: with the request id and the position it fixes the "
                        "target's token (default 0)")
    return g


def sampling_of(args):
    """The Sampling of `add_sampling_flags`' flags; top-p/top-k without a temperature is
    a mistake worth one line, not a silent greedy run."""
    from pipedec_sim.errors import InputError
    from pipedec_sim.protocol.sampling import Sampling
    if args.temperature == 0 and (args.top_p < 1 or args.top_k_sampling):
        raise InputError("--top-p and --top-k-sampling need --temperature > 0 (greedy ignores "
                         "them)", field="--temperature")
    return Sampling(temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k_sampling, seed=args.seed)


def add_engine_flag(g) -> None:
    """--engine, into parser or group `g` (the value lands in `args.engine`)."""
    g.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE,
                   help="simulation engine: fast (default) or reference, the event-by-event "
                        "SimPy model that the fast engine must reproduce exactly (the same "
                        "results, slower: for checking)")


def add_workers_flag(g, what: str) -> None:
    """--workers N (default: one per CPU): `what` says what runs in parallel."""
    g.add_argument("--workers", type=positive(hi=MAX_WORKERS), default=default_workers(),
                   help=f"worker processes for {what} (default: one per CPU, "
                        f"{default_workers()} here); the results are the same for any N")


def add_out_format_flag(g, tables: str) -> None:
    """--out-format csv|parquet: how `tables` are written (args.out_format)."""
    g.add_argument("--out-format", choices=OUT_FORMATS, default=DEFAULT_OUT_FORMAT,
                   help=f"file format of {tables}: csv (default) or parquet (keeps column "
                        "types; needs pyarrow: pip install 'pipedec-sim[parquet]')")


class Progress:
    """`progress(done, total)` on stderr. On a terminal a tqdm bar with rate and ETA; where
    stderr is a file or a pipe (a log) a line with the rate and ETA at every 10% (`lines`
    lines in all; None: a line per call); nothing when `quiet`. `close()` ends the bar (a
    context manager: closed on error too); `write(line)` prints a line (even when quiet)
    without breaking the bar; `note(text)` shows a status beside the bar."""

    def __init__(self, label: str, quiet: bool = False, *, unit: str = "it",
                 lines: int | None = 10):
        self.label, self.quiet, self.unit, self.lines = label, quiet, unit, lines
        self.stream = sys.stderr
        self.tty = not quiet and self.stream.isatty()
        self._bar = None
        self._start: tuple[float, int] | None = None    # (time, done) of the first call
        self._shown: int | None = None                  # the last line's step

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self._start is None:
            self._start = (time.monotonic(), done)
        if self.tty:
            self._draw(done, total)
            return
        step = done if self.lines is None else done * self.lines // max(total, 1)
        if step != self._shown:
            self._shown = step
            print(f"{self.label} {done}/{total}{self._rate(done, total)}", file=self.stream,
                  flush=True)

    def _draw(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm
            sized = min(_size(self.stream)) > 0    # a terminal may have no size (0 x 0)
            self._bar = tqdm(total=total, initial=done, desc=self.label.rstrip(":"),
                             unit=self.unit, file=self.stream, dynamic_ncols=sized,
                             ncols=None if sized else 120, nrows=None if sized else 24)
        if self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def _rate(self, done: int, total: int) -> str:
        """", 2.5 it/s, eta 0:40" once there is a rate to tell."""
        assert self._start is not None
        t0, d0 = self._start
        elapsed = time.monotonic() - t0
        if done <= d0 or elapsed <= 0:
            return ""
        rate = (done - d0) / elapsed
        eta = (total - done) / rate
        return f" ({done / max(total, 1):.0%}), {rate:.3g} {self.unit}/s, " \
               f"elapsed {_clock(elapsed)}, eta {_clock(eta)}"

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _size(stream) -> tuple[int, int]:
    """(columns, lines) of the terminal `stream` is, (0, 0) where unknown."""
    try:
        cols, lines = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, AttributeError):     # not a real terminal (tests)
        return (0, 0)
    return cols, lines


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def progress_bar(label: str, quiet: bool = False, *, unit: str = "it",
                 lines: int | None = 10) -> Progress:
    """The progress of a program (see Progress): `with progress_bar(...) as p: work(p)`."""
    return Progress(label, quiet, unit=unit, lines=lines)
