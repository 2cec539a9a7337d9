"""`pipedec-sim sweep`: run a grid of configurations in worker processes, resumably.

A grid comes from a TOML file (top-level keys, each a value or a list of values) and/or
flags (comma-separated lists); a flag replaces the file's key. Example::

    stages     = [4, 8, 14]
    strategies = ["ar", "tree-sd", "pipedec"]
    width      = [4, 16, 64]
    trace      = "../traces/synthetic-llama70b.jsonl"   # relative to this file
    max_requests = 8

The grid expands into *configurations*: one strategy with the knobs that matter to it
(plain PP ignores the tree knobs, tree-SD ignores PipeDec's, PipeDec ignores tree-SD's),
so `ar` runs once per pipeline setting however many widths are swept. Plain PP is always
added to every (stages, profile, link, trace, ...) group, because every speedup is
measured against it.

A grid with `rate` (Poisson arrivals, requests/s) or `concurrency` (a closed loop) is a
*serving* grid: each configuration is one `pipedec-sim serve` run, one serving strategy
(pp, tree-sd, chain-sd, pipedec-db; default all four, pp always added) at one load
point. Example::

    stages     = 8
    strategies = ["tree-sd", "pipedec-db"]
    rate       = [0.5, 1, 2, 4]          # or: concurrency = [1, 4, 16]
    requests   = 64                      # served per load point (drawn again past the file's)
    step_width = [32, 64]                # the serving knobs (pipedec-db's here)
    slo_tbt_ms = 50                      # goodput: one value, the runs do not depend on it
    trace      = "../traces/real-mtbench.jsonl.gz"

Its other keys are `duration` (seconds: no arrival after it) and the serving knobs
(max_running, max_batched_tokens, micro_batches, chunked_prefill, step_width, share,
slo_ttft_ms); stages default to serve's 8. A grid gives rate or concurrency, not both,
and runs serving strategies only (ar and pipedec are `run`'s). The summary has serve's
columns (throughput, latency percentiles, goodput) per configuration, with
throughput_vs_pp against the best pp of the same group and load point.

Results in DIR:
  parts/<config_id>.csv  one file per finished configuration, written by atomic rename:
                         a re-run skips them, an interrupted run loses none, and no row
                         can be written twice. A re-run checks every part (columns, one
                         row per request, a whole last line): a damaged one is set aside
                         as <config_id>.csv.damaged and its configuration runs again.
  requests.csv           one row per configuration and request (`config_id`, `cfg_*`).
  summary.csv            one row per configuration, with speedup vs plain PP and vs the
                         best tree-SD configuration of the same group (serving: the
                         serving summary and throughput vs pp); the two tables are
                         replaced together; .parquet instead with --out-format parquet;
                         the parts stay CSV.
  grid.json              the expanded grid (what each config_id means).
  .sweep.lock            held (flock) while a sweep writes here: a second sweep on the
                         same folder is refused, naming the first one's process.

Configurations run in worker processes (`--workers`, default one per CPU) that die with
the sweep (PR_SET_PDEATHSIG, and a pipe only the sweep holds open: programs/pool.py), so
a killed sweep leaves no orphans behind; or, with `--executor ray`, as Ray tasks
(programs/ray_tasks.py) whose frames the sweep writes as the same part files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipedec_sim.errors import InputError

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:             # pragma: no cover (3.10: pip install tomli)
    import tomli as tomllib

from pipedec_sim.inputs.limits import MAX_OUTPUT_LEN, MAX_STAGES
from pipedec_sim.programs.flags import (
    DEFAULT_ENGINE,
    DEFAULT_PROFILE,
    DEFAULT_STAGES,
    STRATEGY_NAMES,
    seed_problem,
)
from pipedec_sim.programs.serve import DEFAULT_SERVE_STAGES
from pipedec_sim.protocol.knobs import (
    KNOBS,
    PipeDecKnobs,
    PipelineKnobs,
    ServeKnobs,
    TreeSDKnobs,
    knobs_of,
)
from pipedec_sim.protocol.serve import SERVE_STRATEGIES
from pipedec_sim.protocol.strategies import DEFAULT_STRATEGIES

# The knobs' grid keys are their names (pipedec_sim.protocol.knobs); a strategy's
# configurations vary only the knobs that matter to it.
PIPEDEC_KNOBS = tuple(k.name for k in knobs_of(PipeDecKnobs))
TREE_SD_KNOBS = tuple(k.name for k in knobs_of(TreeSDKnobs) if k.strategy == "tree-sd")
CHAIN_SD_KNOBS = tuple(k.name for k in knobs_of(TreeSDKnobs) if k.strategy == "chain-sd")
POLICY_KNOBS = PIPEDEC_KNOBS + TREE_SD_KNOBS + CHAIN_SD_KNOBS
PIPELINE_KNOBS = tuple(k.name for k in knobs_of(PipelineKnobs))
KNOBS_OF = {"ar": (), "tree-sd": TREE_SD_KNOBS, "pipedec": PIPEDEC_KNOBS,
            "chain-sd": CHAIN_SD_KNOBS}
DEFAULTS: dict[str, Any] = {k.name: k.default for k in KNOBS.values()}
# settings that define a comparison group: every speedup is taken within one group
GROUP_KEYS = ("stages",) + PIPELINE_KNOBS + (
    "profile", "link_gbps", "link_latency_ms", "trace", "seed", "max_requests",
    "max_new_tokens", "acceptance")
# Serving grids (`pipedec-sim serve` runs): a load point (rate or concurrency, never both),
# how many requests and for how long, the serving knobs, and the SLOs of the summary.
SERVE_KNOBS: dict[str, Any] = {k.name: k for k in knobs_of(ServeKnobs)}
LOAD_KEYS = ("rate", "concurrency")
SLO_KEYS = ("slo_tbt_ms", "slo_ttft_ms")     # the summary's, not the runs': out of config_id
SERVE_AXES = LOAD_KEYS + ("requests", "duration") + tuple(SERVE_KNOBS) + SLO_KEYS
# serving knobs by the strategies they matter to: micro-batches (pp, tree-sd, chain-sd),
# shared tree layers (pipedec-db); max_running admits requests for all of them
MICRO_KNOBS = ("max_batched_tokens", "micro_batches", "chunked_prefill")
LAYER_KNOBS = ("step_width", "share")
SERVE_STRATEGY_KNOBS = MICRO_KNOBS + LAYER_KNOBS
SERVE_KNOBS_OF = {"pp": MICRO_KNOBS, "tree-sd": TREE_SD_KNOBS + MICRO_KNOBS,
                  "chain-sd": CHAIN_SD_KNOBS + MICRO_KNOBS,
                  "pipedec-db": PIPEDEC_KNOBS + LAYER_KNOBS}
SERVE_DEFAULTS: dict[str, Any] = {k: v.default for k, v in SERVE_KNOBS.items()}
SERVE_GROUP_EXTRA = ("requests", "duration", "max_running")   # after the load key
SERVE_STAGES = DEFAULT_SERVE_STAGES     # serving grids: `pipedec-sim serve`'s pipeline
AXES = ("strategies",) + POLICY_KNOBS + GROUP_KEYS + SERVE_AXES
ALIASES = {"strategy": "strategies", "link-gbps": "link_gbps",
           "link-latency-ms": "link_latency_ms", "max-requests": "max_requests",
           "max-new-tokens": "max_new_tokens", "profiles": "profile", "traces": "trace",
           "rates": "rate", "concurrencies": "concurrency", "slo-tbt-ms": "slo_tbt_ms",
           "slo-ttft-ms": "slo_ttft_ms",
           **{k.flag[2:]: k.name for k in (*KNOBS.values(), *SERVE_KNOBS.values())
              if k.flag[2:] != k.name}}
PATH_KEYS = ("trace", "acceptance")
CFG_COLUMNS = [f"cfg_{k}" for k in POLICY_KNOBS + GROUP_KEYS if k != "stages"]
# Knobs added after sweeps were first run: at their default they stay out of config_id,
# so the results of older grids keep their ids.
LATER_KNOBS = ("window",)


# --------------------------------------------------------------------------- values

def _key_line(text: str | None, key: str) -> int | None:
    if not text:
        return None
    m = re.search(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=", text, re.M)
    return text.count("\n", 0, m.start()) + 1 if m else None


class _Where:
    """Where a grid value came from, for error messages."""

    def __init__(self, file: Path | None = None, text: str | None = None):
        self.file, self.text = file, text
        self.from_flag: set[str] = set()

    def fail(self, key: str, message: str) -> InputError:
        if key in self.from_flag:
            return InputError(message, field="--" + key.replace("_", "-"))
        return InputError(message, file=self.file, line=_key_line(self.text, key), field=key)


def _check(key: str, v: Any, where: _Where) -> Any:
    def bad(msg):
        return where.fail(key, f"{msg}, got {v!r}")

    def intval(minimum=1, maximum=None):
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad("expected an integer")
        if v < minimum:
            raise bad(f"must be >= {minimum}")
        if maximum is not None and v > maximum:
            raise bad(f"must be <= {maximum} (the limit)")
        return v

    def num(lo=None, hi=None, lo_open=False, hi_open=False):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise bad("expected a number")
        if v in (math.inf, -math.inf) or (isinstance(v, int) and abs(v) > 2**53):
            raise bad("must be finite")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise bad(f"must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise bad(f"must be {'<' if hi_open else '<='} {hi}")
        return float(v)

    def choice(options):
        if v not in options:
            raise bad(f"choose from {', '.join(map(str, options))}")
        return v

    if key in KNOBS:
        return _check_knob(KNOBS[key], v, bad)
    if key == "strategies":
        return choice(STRATEGY_NAMES)
    if key == "stages":
        return intval(maximum=MAX_STAGES)
    if key == "max_new_tokens":
        return intval(maximum=MAX_OUTPUT_LEN)
    if key == "max_requests":
        return None if v in (0, None) else intval()   # 0 = all requests
    if key == "seed":
        problem = seed_problem(v)          # the same rule as every --seed flag
        if problem:
            raise bad(problem)
        return v
    if key == "link_gbps":
        return None if v in (0, None) else num(0.0, lo_open=True)         # 0 = the profile's
    if key == "link_latency_ms":
        return None if v is None else num(0.0)
    if key in ("profile", "trace", "acceptance"):
        if not isinstance(v, str) or not v:
            raise bad("expected a file name")
        return v
    return _check_serving(key, v, where, bad, intval, num)


def _check_serving(key: str, v: Any, where: _Where, bad, intval, num) -> Any:
    """A serving grid's value (0 = the default of requests, duration and the SLOs)."""
    from pipedec_sim.inputs.arrivals import MAX_SERVE_REQUESTS
    if key in SERVE_KNOBS:
        return _check_knob(SERVE_KNOBS[key], v, bad)
    if key == "rate":
        return num(0.0, lo_open=True)                       # requests/s
    if key == "concurrency":
        return intval(maximum=MAX_SERVE_REQUESTS)
    if key == "requests":
        return None if _zero(v) else intval(maximum=MAX_SERVE_REQUESTS)   # 0: the file's
    if key in ("duration",) + SLO_KEYS:
        return None if _zero(v) else num(0.0, lo_open=True)                # 0: none
    raise where.fail(key, "unknown key")      # pragma: no cover (filtered earlier)


def _zero(v: Any) -> bool:
    return v is None or (v == 0 and not isinstance(v, bool))


def _check_knob(knob, v: Any, bad) -> Any:
    """A grid value of a knob, by the knob's own checks. TOML has no null: 0 is the
    default of a knob whose default is None (coverage 0 = off, window 0 = stages + 1)."""
    if knob.optional and v == 0 and not isinstance(v, bool):
        return None
    msg = knob.problem(v)
    if msg is not None:
        raise bad(msg)
    return float(v) if knob.kind is float else v


@dataclass
class Grid:
    axes: dict[str, list]
    where: _Where
    base_dir: Path

    @property
    def serving(self) -> bool:
        """A serving grid: its configurations are `serve` runs at a load point."""
        return any(k in self.axes for k in LOAD_KEYS)

    @property
    def load(self) -> str | None:
        """The serving grid's load key: "rate" or "concurrency" (None: not serving)."""
        return next((k for k in LOAD_KEYS if k in self.axes), None)

    def configs(self) -> list[dict]:
        """Every configuration, de-duplicated, with plain PP in every group."""
        if self.serving:
            return self._serving_configs()
        import itertools
        group_axes = [(k, self.axes[k]) for k in GROUP_KEYS]
        out: dict[str, dict] = {}
        for gvals in itertools.product(*(v for _, v in group_axes)):
            group = dict(zip(GROUP_KEYS, gvals))
            strategies = list(dict.fromkeys(["ar"] + list(self.axes["strategies"])))
            for s in strategies:
                knobs = KNOBS_OF[s]
                for kvals in itertools.product(*(self.axes[k] for k in knobs)):
                    cfg = {"strategy": s, **{k: None for k in POLICY_KNOBS},
                           **dict(zip(knobs, kvals)), **group}
                    cid = config_id(cfg)
                    out.setdefault(cid, {"config_id": cid, **cfg})
        return list(out.values())

    def _serving_configs(self) -> list[dict]:
        """A serving strategy at a load point with the knobs that matter to it, de-duplicated,
        with pp in every (group, load point); the SLOs (one value each) ride along."""
        import itertools
        load = self.load
        assert load is not None
        keys = GROUP_KEYS + (load,) + SERVE_GROUP_EXTRA
        slo = {k: self.axes[k][0] for k in SLO_KEYS}
        out: dict[str, dict] = {}
        for gvals in itertools.product(*(self.axes[k] for k in keys)):
            group = dict(zip(keys, gvals))
            for s in dict.fromkeys(["pp"] + list(self.axes["strategies"])):
                knobs = SERVE_KNOBS_OF[s]
                for kvals in itertools.product(*(self.axes[k] for k in knobs)):
                    cfg: dict[str, Any] = {
                        "strategy": s, **{k: None for k in POLICY_KNOBS + SERVE_STRATEGY_KNOBS},
                        **dict(zip(knobs, kvals)), **group, **slo}
                    cid = config_id(cfg)
                    out.setdefault(cid, {"config_id": cid, **cfg})
        return list(out.values())


_FINGERPRINTS: dict[str, str] = {}


def _fingerprint(path: str | None) -> str | None:
    """Content hash of an input file, so edited inputs are never mistaken for finished."""
    if path is None:
        return None
    if path not in _FINGERPRINTS:
        p = Path(path)
        if p.is_file():
            _FINGERPRINTS[path] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        else:                                      # a bundled profile name
            from pipedec_sim.inputs.profile import bundled_profiles
            b = bundled_profiles().get(path)
            _FINGERPRINTS[path] = (hashlib.sha256(Path(b).read_bytes()).hexdigest()[:16]
                                   if b else path)
    return _FINGERPRINTS[path]


def config_id(cfg: dict) -> str:
    """A stable hash of a configuration and the contents of the files it reads (not of
    a serving grid's SLOs: they only change how the summary counts goodput)."""
    key = {k: cfg[k] for k in sorted(cfg) if k != "config_id" and k not in SLO_KEYS
           and not (k in LATER_KNOBS and cfg[k] is None)}
    for k in ("trace", "profile", "acceptance"):
        key[f"{k}#"] = _fingerprint(cfg.get(k))
        key[k] = None if cfg.get(k) is None else os.path.basename(cfg[k])
    blob = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, list) else [v]


def parse_grid_text(text: str, file: Path | None = None) -> dict[str, list]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        raise InputError(f"not valid TOML: {str(e).split(' (at line')[0]}", file=file,
                         line=int(m.group(1)) if m else None) from None
    where = _Where(file, text)
    out: dict[str, list] = {}
    for raw_key, value in data.items():
        key = ALIASES.get(raw_key, raw_key)
        if key not in AXES:
            raise InputError(f"unknown key; known keys: {', '.join(AXES)}", file=file,
                             line=_key_line(text, raw_key), field=raw_key)
        if isinstance(value, dict):
            raise where.fail(raw_key, "expected a value or a list of values, got a table")
        values = _as_list(value)
        if not values:
            raise where.fail(raw_key, "empty list")
        out[key] = values
    return out


def build_grid(grid_file: Path | None = None, overrides: dict[str, list] | None = None,
               check_files: bool = True) -> Grid:
    """Read, merge and validate a grid; every error names the file (or flag) and key."""
    text = None
    axes: dict[str, list] = {}
    if grid_file is not None:
        from pipedec_sim.inputs.files import read_text
        grid_file = Path(grid_file)
        text = read_text(grid_file)         # regular files only; names the file on error
        axes = parse_grid_text(text, grid_file)
    where = _Where(grid_file, text)
    base_dir = grid_file.parent if grid_file is not None else Path.cwd()
    for k, v in (overrides or {}).items():
        if v is not None:
            axes[k] = list(v)
            where.from_flag.add(k)
    if "trace" not in axes:
        raise InputError("no trace given: set `trace` in the grid file or pass --trace",
                         file=grid_file, field="trace")
    load = _serving_load(axes, where)
    defaults = {**{k: [v] for k, v in DEFAULTS.items()}, "strategies": list(DEFAULT_STRATEGIES),
                "stages": [DEFAULT_STAGES],
                "profile": [DEFAULT_PROFILE], "link_gbps": [None], "link_latency_ms": [None],
                "seed": [0], "max_requests": [None], "max_new_tokens": [256],
                "acceptance": [None]}
    if load is not None:
        defaults.update({k: [v] for k, v in SERVE_DEFAULTS.items()},
                        strategies=list(SERVE_STRATEGIES), stages=[SERVE_STAGES],
                        requests=[None], duration=[None], **{k: [None] for k in SLO_KEYS})
        keys = tuple(k for k in AXES if k not in LOAD_KEYS or k == load)
    else:
        keys = AXES[:-len(SERVE_AXES)]
    for k, v in defaults.items():
        axes.setdefault(k, v)
    checked: dict[str, list] = {}
    for k in keys:
        vals: list = ([_check_strategy(v, load, where) for v in axes[k]] if k == "strategies"
                      else [None if v is None else _check(k, v, where) for v in axes[k]])
        checked[k] = list(dict.fromkeys(vals))        # drop repeats, keep order
    _check_serving_grid(checked, load, where)
    grid = Grid(checked, where, base_dir)
    _resolve_files(grid, where, check_files)
    return grid


def _serving_load(axes: dict[str, list], where: _Where) -> str | None:
    """The load key of a serving grid (rate or concurrency), None for a `run` grid;
    InputError for both load keys, or a serving key without a load point."""
    given = [k for k in LOAD_KEYS if k in axes]
    if len(given) > 1:
        raise where.fail(given[-1], "a grid gives rate or concurrency, not both: each "
                                    "configuration serves at one load point (rate: Poisson "
                                    "arrivals; concurrency: a closed loop)")
    if given:
        return given[0]
    for k in SERVE_AXES:
        if k in axes:
            raise where.fail(k, "a serving key: it goes with rate or concurrency (a load "
                                "point), which make the grid's runs `serve` runs")
    return None


def _check_strategy(v: Any, load: str | None, where: _Where) -> str:
    """A strategy of a `run` grid (load None) or a serving grid: mixing is refused."""
    serving_only = [s for s in SERVE_STRATEGIES if s not in STRATEGY_NAMES]
    run_only = [s for s in STRATEGY_NAMES if s not in SERVE_STRATEGIES]
    if load is None and v in serving_only:
        raise where.fail("strategies", f"{v} is a serving strategy: serving strategies "
                                       f"({', '.join(SERVE_STRATEGIES)}) run in a grid with "
                                       f"rate or concurrency, and never beside "
                                       f"{' or '.join(run_only)} (`run`'s)")
    if load is not None and v in run_only:
        raise where.fail("strategies", f"{v} is not a serving strategy: a grid with {load} "
                                       f"runs serving strategies only (choose from "
                                       f"{', '.join(SERVE_STRATEGIES)}); {' and '.join(run_only)} "
                                       f"go in a grid without rate or concurrency")
    if load is not None and v not in SERVE_STRATEGIES:
        raise where.fail("strategies", f"choose from {', '.join(SERVE_STRATEGIES)} (a serving "
                                       f"grid), got {v!r}")
    return _check("strategies", v, where) if load is None else v


def _check_serving_grid(axes: dict[str, list], load: str | None, where: _Where) -> None:
    """One value per SLO; Poisson arrivals cut at a duration leave a request."""
    if load is None:
        return
    for k in SLO_KEYS:
        if len(axes[k]) > 1:
            raise where.fail(k, f"takes one value, got {len(axes[k])}: an SLO sets how the "
                                "summary counts goodput, not a run (run the sweep again with "
                                "another: its runs are reused)")
    if load == "rate":
        from pipedec_sim.inputs.arrivals import poisson_until
        for rate in axes["rate"]:
            for seed in axes["seed"]:
                for d in axes["duration"]:
                    if d is not None and not poisson_until(d * 1000.0, rate, seed, cap=1):
                        raise where.fail("duration", f"no request arrives within {d:g} s at "
                                                     f"rate {rate:g}/s (seed {seed}): "
                                                     "lengthen it or raise rate")


def _resolve_files(grid: Grid, where: _Where, check_files: bool) -> None:
    from pipedec_sim.inputs.files import file_problem
    from pipedec_sim.inputs.profile import bundled_profiles, load_profile

    def resolve(key: str, v: str) -> str:
        p = Path(v)
        base = Path.cwd() if key in where.from_flag else grid.base_dir
        full = p if p.is_absolute() else base / p
        problem = file_problem(full)
        if problem is None:
            return str(full.resolve())
        if key == "profile" and v in bundled_profiles():
            return v
        if os.path.lexists(full):                   # a folder, a FIFO: say what it is
            raise where.fail(key, f"{full}: {problem.removeprefix('cannot read: ')}")
        if key == "profile":
            raise where.fail(key, f"no such file or bundled profile: {v} (bundled: "
                                  f"{', '.join(sorted(bundled_profiles()))})")
        raise where.fail(key, f"no such file: {full}")

    for key in PATH_KEYS + ("profile",):
        grid.axes[key] = [None if v is None else resolve(key, v) for v in grid.axes[key]]
    if not check_files:
        return
    for prof in grid.axes["profile"]:
        profile = load_profile(prof)               # names the profile file on error
        for t in grid.axes["topology"]:
            try:
                profile.check_topology(t)
            except InputError as e:
                raise where.fail("topology", f"{e.message} (profile {prof})") from None
        for s in grid.axes["stages"]:
            try:
                profile.stage_layers(s)
            except InputError as e:
                raise where.fail("stages", f"{e.message} (profile {prof})") from None
            if s > profile.target.layers:
                raise where.fail("stages", f"{s} stages but the target in profile {prof} "
                                           f"has only {profile.target.layers} layers")
        for lat in grid.axes["link_latency_ms"]:
            for bw in grid.axes["link_gbps"]:
                try:
                    profile.with_link(bandwidth_gbps=bw, latency_ms=lat)
                except InputError as e:
                    key = "link_gbps" if e.field == "bandwidth_gbps" else "link_latency_ms"
                    raise where.fail(key, f"{e.message} (profile {prof})") from None
    from pipedec_sim.inputs.acceptance import load_acceptance
    for acc in grid.axes["acceptance"]:
        if acc is not None:
            load_acceptance(Path(acc))
    from pipedec_sim.inputs.prompts import load_workload
    for tr in grid.axes["trace"]:
        for mr in grid.axes["max_requests"]:
            load_workload(Path(tr), max_requests=mr, max_new_tokens=grid.axes["max_new_tokens"][0])


# --------------------------------------------------------------------------- running

_CACHE: dict[Any, Any] = {}


def _profile(cfg: dict):
    from pipedec_sim.inputs.profile import load_profile
    key = ("profile", cfg["profile"], cfg["link_gbps"], cfg["link_latency_ms"])
    if key not in _CACHE:
        p = load_profile(cfg["profile"])
        if cfg["link_gbps"] is not None or cfg["link_latency_ms"] is not None:
            p = p.with_link(bandwidth_gbps=cfg["link_gbps"], latency_ms=cfg["link_latency_ms"])
        _CACHE[key] = p
    return _CACHE[key]


def _trace(cfg: dict):
    from pipedec_sim.inputs.acceptance import load_acceptance
    from pipedec_sim.inputs.prompts import load_workload
    first = cfg.get("first_request", 0)       # the tuner's held-out requests start later
    key = ("trace", cfg["trace"], cfg["max_requests"], cfg["max_new_tokens"], cfg["seed"],
           cfg["acceptance"], first)
    if key not in _CACHE:
        acc = load_acceptance(Path(cfg["acceptance"])) if cfg["acceptance"] else None
        n = None if cfg["max_requests"] is None else first + cfg["max_requests"]
        trace = load_workload(Path(cfg["trace"]), max_requests=n,
                              max_new_tokens=cfg["max_new_tokens"], seed=cfg["seed"],
                              acceptance=acc)[0]
        if first:
            if len(trace.requests) <= first:
                raise InputError(f"the trace has only {len(trace.requests)} requests, none "
                                 f"left after the first {first}", file=cfg["trace"])
            trace = dataclasses.replace(trace, requests=trace.requests[first:])
        _CACHE[key] = trace
    return _CACHE[key]


def sim_config(cfg: dict, engine: str = DEFAULT_ENGINE):
    from pipedec_sim.programs.simulate import SimConfig
    knobs = {k: (DEFAULTS[k] if cfg.get(k) is None else cfg[k]) for k in POLICY_KNOBS}
    return SimConfig(stages=cfg["stages"], strategies=(cfg["strategy"],), seed=cfg["seed"],
                     engine=engine, **{k: cfg[k] for k in PIPELINE_KNOBS}, **knobs)


def run_config(cfg: dict, *, engine: str = DEFAULT_ENGINE, workers: int = 1,
               trace=None, profile=None):
    """Simulate one configuration (its requests in `workers` processes); its per-request
    frame with `config_id` and `cfg_*`. `trace` and `profile` default to the files the
    configuration names (Ray tasks get them from the object store instead)."""
    from pipedec_sim.programs.simulate import simulate
    profile = _profile(cfg) if profile is None else profile
    trace = _trace(cfg) if trace is None else trace
    result = simulate(trace, profile, sim_config(cfg, engine), workers=workers)
    df = result.requests
    df.insert(0, "config_id", cfg["config_id"])
    _add_cfg_columns(df, cfg, profile, CFG_COLUMNS)
    return df


def _add_cfg_columns(df, cfg: dict, profile, columns: list[str]) -> None:
    """The configuration's settings as cfg_* columns: the link the profile ends up with,
    file names without their folders (a profile's name if it is a file)."""
    for col in columns:
        k = col[4:]
        v = cfg[k]
        if k == "link_gbps":
            v = profile.link.bandwidth_gbps
        elif k == "link_latency_ms":
            v = profile.link.latency_ms
        elif k in ("trace", "acceptance", "profile") and v is not None:
            v = Path(v).name if k != "profile" else (profile.name if os.sep in v else v)
        df[col] = v


# --------------------------------------------------------------------------- serving

def is_serving(cfg: dict) -> bool:
    """A configuration of a serving grid (a `serve` run at a load point)."""
    return any(cfg.get(k) is not None for k in LOAD_KEYS)


def serve_columns(cfg: dict) -> list[str]:
    """A serving configuration's cfg_* columns in its part: every grid key but the SLOs
    (the merge adds those: they are not part of a run), with its one load key."""
    load = next(k for k in LOAD_KEYS if cfg.get(k) is not None)
    return CFG_COLUMNS + [f"cfg_{k}" for k in SERVE_AXES
                          if k not in SLO_KEYS and (k not in LOAD_KEYS or k == load)]


# what a served request's row has besides SERVED_COLUMNS (programs.serve.serve_task)
SERVED_EXTRA = ("stages", "steps", "parts", "stage_busy_ms", "run_ms")


def _workload(cfg: dict, trace=None):
    """The serving configuration's workload (its requests and arrivals), as `serve`
    builds it from the same flags; cached when the trace is the configuration's file
    (a Ray task's trace comes from the object store: built for it alone)."""
    from pipedec_sim.inputs.arrivals import serve_workload

    def build(tr):
        return serve_workload(tr.requests, n=cfg["requests"], rate=cfg.get("rate"),
                              concurrency=cfg.get("concurrency"), duration_s=cfg["duration"],
                              seed=cfg["seed"])
    if trace is not None:
        return build(trace)
    key = ("workload", cfg["trace"], cfg["max_requests"], cfg["max_new_tokens"],
           cfg["acceptance"], cfg.get("rate"), cfg.get("concurrency"), cfg["requests"],
           cfg["duration"], cfg["seed"])
    if key not in _CACHE:
        _CACHE[key] = build(_trace(cfg))
    return _CACHE[key]


def serve_config(cfg: dict, engine: str = DEFAULT_ENGINE):
    """The ServeConfig of one serving configuration (knobs it ignores: their defaults)."""
    from pipedec_sim.programs.serve import ServeConfig
    knobs = {k: (DEFAULTS[k] if cfg.get(k) is None else cfg[k]) for k in POLICY_KNOBS}
    serve = {k: (SERVE_DEFAULTS[k] if cfg.get(k) is None else cfg[k]) for k in SERVE_KNOBS}
    return ServeConfig(stages=cfg["stages"], strategies=(cfg["strategy"],), seed=cfg["seed"],
                       engine=engine, **{k: cfg[k] for k in PIPELINE_KNOBS}, **knobs, **serve)


def serve_run_config(cfg: dict, *, engine: str = DEFAULT_ENGINE, trace=None, profile=None):
    """Serve one serving configuration (`serve`'s run of its strategy at its load point);
    its per-request frame with `config_id` and `cfg_*`."""
    from pipedec_sim.programs.serve import serve_task
    from pipedec_sim.results.serving import served_frame
    profile = _profile(cfg) if profile is None else profile
    trace = _trace(cfg) if trace is None else trace
    rows = serve_task(profile, serve_config(cfg, engine), cfg["strategy"],
                       _workload(cfg, trace), {})
    df = served_frame(rows)
    df.insert(0, "config_id", cfg["config_id"])
    _add_cfg_columns(df, cfg, profile, serve_columns(cfg))
    return df


def _serve_part_rows(cfg: dict) -> tuple[int, bool]:
    """(requests of the workload, whether fewer may be served: a closed loop issues none
    after its duration)."""
    n = len(_workload(cfg).requests)
    return n, cfg.get("concurrency") is not None and cfg["duration"] is not None


def _part_path(out: Path, cid: str) -> Path:
    return out / "parts" / f"{cid}.csv"


def _attempt(cfg: dict, engine: str, trace=None, profile=None):
    """(config_id, seconds, frame or None, error or None): a failed configuration is
    reported by the sweep and the others go on. The Ray task (module level: picklable)."""
    t0 = time.perf_counter()
    run = serve_run_config if is_serving(cfg) else run_config
    try:
        df = run(cfg, engine=engine, trace=trace, profile=profile)
    except Exception as e:
        return cfg["config_id"], time.perf_counter() - t0, None, f"{type(e).__name__}: {e}"
    return cfg["config_id"], time.perf_counter() - t0, df, None


def _write_part(out: Path, cid: str, df) -> None:
    """A finished configuration's part file, whole or not at all (temp file, rename)."""
    from pipedec_sim.atomic import atomic_path
    with atomic_path(_part_path(Path(out), cid)) as tmp:
        df.to_csv(tmp, index=False)


def _run_and_commit(cfg: dict, out: str, engine: str = DEFAULT_ENGINE
                    ) -> tuple[str, float, str | None]:
    """Worker entry point (module level, picklable: safe under spawn): run a
    configuration and write its part file."""
    cid, seconds, df, err = _attempt(cfg, engine)
    if df is not None:
        _write_part(Path(out), cid, df)
    return cid, seconds, err


def finished_ids(out: Path) -> set[str]:
    """Configurations with a part file (whole or not: see check_parts)."""
    d = out / "parts"
    return {p.stem for p in d.glob("*.csv")} if d.is_dir() else set()


def _part_columns() -> list[str]:
    from pipedec_sim.results.metrics import RequestMetrics
    return (["config_id"] + [f.name for f in dataclasses.fields(RequestMetrics)]
            + ["tbt_ms", "hit_rate", "utilization"] + CFG_COLUMNS)


def _serve_part_columns(cfg: dict) -> list[str]:
    from pipedec_sim.results.serving import SERVED_COLUMNS
    return ["config_id", *SERVED_COLUMNS, *SERVED_EXTRA, *serve_columns(cfg)]


def part_problem(path: Path, cid: str, requests: int, *, columns: list[str] | None = None,
                 nullable: tuple[str, ...] = (), fewer: bool = False) -> str | None:
    """What is wrong with a configuration's part file, or None: it must be a whole CSV
    (ending in a newline) with every column (`columns`, default a `run` part's), its
    config_id on each row and one row per request of the configuration's workload (with
    `fewer`: at least one, at most `requests`), none of them short of a value (but the
    `nullable` columns: a served request without decode tokens has no TBT)."""
    import io

    import pandas as pd
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    if not data:
        return "is empty (0 bytes)"
    if not data.endswith(b"\n"):
        return "is cut short (no newline at the end)"
    try:
        df = pd.read_csv(io.BytesIO(data), keep_default_na=False, na_values=[""],
                         dtype={"config_id": str})      # ids like 8e0006296477 are not floats
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        return f"is not a CSV table ({str(e).strip().splitlines()[0]})"
    cols = _part_columns() if columns is None else columns
    missing = [c for c in cols if c not in df.columns]
    if missing:
        return f"lacks column(s) {', '.join(missing[:4])}"
    if fewer and not 1 <= len(df) <= requests:
        return f"has {len(df)} rows, expected 1 to {requests} (one per request issued)"
    if not fewer and len(df) != requests:
        return f"has {len(df)} rows, expected {requests} (one per request)"
    if (df.config_id.astype(str) != cid).any():
        return f"holds rows of another configuration than {cid}"
    metrics = [c for c in cols if c != "config_id" and not c.startswith("cfg_")
               and c not in nullable]
    if df[metrics].isna().any().any():
        return "has rows with missing values"
    return None


def _part_problem(path: Path, cfg: dict) -> str | None:
    """part_problem for a `run` or a serving configuration."""
    if not is_serving(cfg):
        return part_problem(path, cfg["config_id"], len(_trace(cfg).requests))
    n, fewer = _serve_part_rows(cfg)
    return part_problem(path, cfg["config_id"], n, columns=_serve_part_columns(cfg),
                        nullable=("tbt_ms",), fewer=fewer)


def check_parts(out: Path, configs: list[dict]) -> tuple[set[str], dict[str, str]]:
    """(ids of the configurations whose parts are whole, {id: problem} for damaged ones)."""
    out = Path(out)
    have = finished_ids(out)
    good, bad = set(), {}
    for cfg in configs:
        cid = cfg["config_id"]
        if cid not in have:
            continue
        problem = _part_problem(_part_path(out, cid), cfg)
        if problem is None:
            good.add(cid)
        else:
            bad[cid] = problem
    return good, bad


_LOCKED: set[Path] = set()          # folders this process holds the lock of


@contextlib.contextmanager
def sweep_lock(out: Path):
    """Hold DIR/.sweep.lock (flock: released however this process ends) while a sweep
    writes into DIR; InputError naming the other process if one already holds it.
    Re-entrant within this process (the CLI takes it first, run_sweep again)."""
    import fcntl
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if key in _LOCKED:
        yield
        return
    path = out / ".sweep.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            raise InputError(f"another sweep is writing into this folder ({holder}); wait "
                             "for it to finish or choose another --out",
                             file=out, field="--out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(sys.argv)[:300]}\n".encode("utf-8", "replace"), 0)
        _LOCKED.add(key)
        try:
            yield
        finally:
            _LOCKED.discard(key)
    finally:
        os.close(fd)                    # releases the lock


EXECUTORS = ("process", "ray")


@dataclass
class Execution:
    """How a sweep runs its configurations: `workers` processes (`executor` "process") or
    Ray tasks ("ray": a local instance of `workers` CPUs, or the cluster at `address`);
    the simulator's `engine`; the merged tables' `out_format`."""
    workers: int = 1
    executor: str = "process"
    address: str | None = None
    engine: str = DEFAULT_ENGINE
    out_format: str = "csv"


def run_sweep(configs: list[dict], out: Path, *, workers: int = 1,
              progress: Callable[[int, int], None] | None = None,
              on_error: Callable[[dict, str], None] | None = None,
              on_damaged: Callable[[Path, str], None] | None = None,
              execution: Execution | None = None) -> dict:
    """Run every configuration without a whole part in `out/parts`; merge; return counts.

    A damaged part is renamed to <id>.csv.damaged (reported to `on_damaged(path,
    problem)`) and its configuration runs again. InputError if another sweep holds `out`.
    `execution` (default: `workers` processes) says how the configurations run."""
    out = Path(out)
    ex = execution or Execution(workers=workers)
    with sweep_lock(out):
        return _run_locked(configs, out, ex, progress, on_error, on_damaged)


def _run_locked(configs, out: Path, ex: Execution, progress, on_error, on_damaged) -> dict:
    (out / "parts").mkdir(parents=True, exist_ok=True)
    for stale in (out / "parts").glob(".*.tmp"):      # torn writes of a killed run
        stale.unlink(missing_ok=True)
    from pipedec_sim.atomic import write_text
    write_text(out / "grid.json", json.dumps(configs, indent=1, default=str))
    done, damaged = check_parts(out, configs)
    for cid, problem in damaged.items():
        part = _part_path(out, cid)
        os.replace(part, part.with_suffix(".csv.damaged"))
        if on_damaged:
            on_damaged(part, problem)
    todo = [c for c in configs if c["config_id"] not in done]
    skipped = len(configs) - len(todo)
    by_id = {c["config_id"]: c for c in configs}
    failed: list[str] = []
    n_done = skipped
    if progress:
        progress(n_done, len(configs))

    def finish(cid, err):
        nonlocal n_done
        n_done += 1
        if err:
            failed.append(cid)
            if on_error:
                on_error(by_id[cid], err)
        if progress:
            progress(n_done, len(configs))

    # slowest first (PipeDec, many stages, wide) so the tail of the run stays busy
    todo.sort(key=lambda c: -(c["stages"] * (c["width"] or 4 if c["strategy"] == "pipedec"
                                             else 2)))
    try:
        _execute(todo, out, ex, finish)
    finally:
        merged = merge(out, configs, ex.out_format)
    return {"configs": len(configs), "skipped": skipped, "ran": len(todo) - len(failed),
            "failed": failed, "merged": merged, "damaged": sorted(damaged)}


def _execute(todo: list[dict], out: Path, ex: Execution, finish) -> None:
    """Run `todo`, calling finish(config_id, error or None) as each ends."""
    if not todo:
        return
    if ex.executor == "ray":
        _execute_ray(todo, out, ex, finish)
    elif ex.workers <= 1 or len(todo) <= 1:
        for c in todo:
            finish(*_run_and_commit(c, str(out), ex.engine)[::2])
    else:
        from pipedec_sim.programs.pool import WorkerPool, results_in_order
        with WorkerPool(min(ex.workers, len(todo))) as wp:
            results_in_order(wp, _run_and_commit, [(c, str(out), ex.engine) for c in todo],
                             lambda task, r: finish(r[0], r[2]))


def _execute_ray(todo: list[dict], out: Path, ex: Execution, finish) -> None:
    """Each configuration is a Ray task given its trace and profile (each put into the
    object store once); the driver writes the part files, as a worker process would."""
    from pipedec_sim.programs.ray_tasks import run_tasks
    tasks = [(c, ex.engine, _trace(c), _profile(c)) for c in todo]
    shared = list({id(o): o for t in tasks for o in t[2:]}.values())

    def done(task, result) -> None:
        cid, _, df, err = result
        if df is not None:
            _write_part(out, cid, df)
        finish(cid, err)

    run_tasks(_attempt, tasks, done, lambda task, msg: finish(task[0]["config_id"], msg),
              workers=ex.workers, address=ex.address, shared=shared)


def merge(out: Path, configs: list[dict], out_format: str = "csv") -> int:
    """Write the requests and summary tables (together: both or neither change; CSV or
    Parquet) from the finished parts of this grid; InputError naming a damaged part."""
    import pandas as pd

    from pipedec_sim.atomic import atomic_paths
    from pipedec_sim.results.tables import table_name, write_table
    out = Path(out)
    done, damaged = check_parts(out, configs)
    if damaged:
        cid, problem = next(iter(damaged.items()))
        raise InputError(f"{problem}: run the sweep again to recompute it",
                         file=_part_path(out, cid))
    frames = [pd.read_csv(_part_path(out, c["config_id"]), keep_default_na=False,
                          na_values=[""], dtype={"config_id": str})
              for c in configs if c["config_id"] in done]
    if not frames:
        return 0
    req = pd.concat(frames, ignore_index=True)
    req["request"] = req["request"].astype(str)
    if any(is_serving(c) for c in configs):
        for k in SLO_KEYS:                    # the grid's SLOs (one each: not in the parts)
            req[f"cfg_{k}"] = next((float(c[k]) for c in configs if c.get(k) is not None),
                                   float("nan"))
        req = _int_columns(req)
        summary = summarize_serving_sweep(req)
    else:
        req = _int_columns(req)
        summary = summarize_sweep(req)
    paths = [out / table_name("requests", out_format), out / table_name("summary", out_format)]
    with atomic_paths(paths) as (req_tmp, sum_tmp):
        write_table(req, req_tmp, out_format)
        write_table(summary, sum_tmp, out_format)
    return len(frames)


INT_CFG = tuple(f"cfg_{k.name}" for k in KNOBS.values() if k.kind is int) + (
    "cfg_seed", "cfg_max_requests", "cfg_max_new_tokens") + tuple(
    f"cfg_{k.name}" for k in SERVE_KNOBS.values() if k.kind is int) + (
    "cfg_concurrency", "cfg_requests")


def _int_columns(df):
    for c in INT_CFG:
        if c in df.columns:
            df[c] = df[c].astype("Int64")
    return df


def summarize_sweep(req):
    """One row per configuration; speedups within each comparison group."""
    import pandas as pd

    from pipedec_sim.results.metrics import SUMMARY_COLUMNS, summarize
    cfg_cols = [c for c in req.columns if c.startswith("cfg_")]
    rows = []
    for cid, g in req.groupby("config_id", sort=False):
        s = summarize(g.drop(columns=cfg_cols + ["config_id"])).iloc[0].to_dict()
        rows.append({"config_id": cid, **{c: g[c].iloc[0] for c in cfg_cols}, **s})
    out = _int_columns(pd.DataFrame(rows))
    group = ["stages"] + [f"cfg_{k}" for k in GROUP_KEYS if k != "stages"]
    group = [c for c in group if c in out.columns]
    out["speedup_vs_ar"] = float("nan")
    out["speedup_vs_tree_sd"] = float("nan")
    for _, g in out.groupby(group, dropna=False, sort=False):
        ar = g[g.strategy == "ar"]
        if len(ar):
            out.loc[g.index, "speedup_vs_ar"] = ar.tbt_ms.min() / g.tbt_ms
        sd = g[g.strategy == "tree-sd"]
        if len(sd):
            out.loc[g.index, "speedup_vs_tree_sd"] = sd.tbt_ms.min() / g.tbt_ms
    front = ["config_id", "strategy", "stages"]
    metric = [c for c in SUMMARY_COLUMNS if c in out.columns and c not in front]
    metric.insert(metric.index("speedup_vs_ar") + 1, "speedup_vs_tree_sd")
    return out[front + cfg_cols + metric]


def summarize_serving_sweep(req):
    """One row per serving configuration: `serve`'s summary columns (programs.serve.
    summarize_serving, with the grid's SLOs), throughput_vs_pp against the best pp of the
    same group and load point."""
    import pandas as pd

    from pipedec_sim.programs.serve import summarize_serving
    cfg_cols = [c for c in req.columns if c.startswith("cfg_")]
    rows, metrics = [], []
    for cid, g in req.groupby("config_id", sort=False):
        slo = {k: (None if pd.isna(g[f"cfg_{k}"].iloc[0]) else float(g[f"cfg_{k}"].iloc[0]))
               for k in SLO_KEYS}
        s = summarize_serving(g.drop(columns=cfg_cols + ["config_id"]), **slo).iloc[0]
        metrics = list(s.index)
        rows.append({"config_id": cid, "stages": g.stages.iloc[0],
                     **{c: g[c].iloc[0] for c in cfg_cols}, **s.to_dict()})
    out = _int_columns(pd.DataFrame(rows))
    load = next(f"cfg_{k}" for k in LOAD_KEYS if f"cfg_{k}" in out.columns)
    group = ["stages"] + [f"cfg_{k}" for k in GROUP_KEYS if k != "stages"] + [load] + [
        f"cfg_{k}" for k in SERVE_GROUP_EXTRA + SLO_KEYS]
    out["throughput_vs_pp"] = float("nan")
    for _, g in out.groupby([c for c in group if c in out.columns], dropna=False, sort=False):
        pp = g[g.strategy == "pp"]
        if len(pp):
            out.loc[g.index, "throughput_vs_pp"] = g.throughput_tok_s / pp.throughput_tok_s.max()
    front = ["config_id", "strategy", "stages"]
    return out[front + cfg_cols + [c for c in metrics if c not in front]]


# --------------------------------------------------------------------------- CLI

def _list_of(kind: Callable[[str], Any]):
    import argparse

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        out = []
        for t in items:
            try:
                out.append(kind(t))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected {kind.__name__} values, got {t!r}") from None
        return out
    return parse


def _bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_bool.__name__ = "true/false"


def _knob_axis(knob) -> tuple[str, str, Callable[[str], Any], str]:
    """A knob as a sweep axis: (flag, grid key, value parser, help with the default)."""
    if knob.kind is bool:
        return knob.flag, knob.name, _bool, knob.help_text("; true and/or false")
    note = f"; 0 = {knob.none}" if knob.optional else ""
    return knob.flag, knob.name, knob.kind, knob.help_text(note)


FLAG_AXES = [  # (flag, key, type, help)
    ("--stages", "stages", int, f"pipeline stages S, e.g. 4,8,14 (default {DEFAULT_STAGES})"),
    ("--strategies", "strategies", str, "subset of ar,tree-sd,pipedec,chain-sd (ar is always "
     "added); with --rate or --concurrency: of pp,tree-sd,chain-sd,pipedec-db (pp is always "
     "added; default all four)"),
    *(_knob_axis(k) for k in KNOBS.values()),
    ("--profile", "profile", str, "calibration profiles (files or bundled names)"),
    ("--link-gbps", "link_gbps", float, "link bandwidths in Gbit/s (0 = the profile's)"),
    ("--link-latency-ms", "link_latency_ms", float, "per-hop link latencies in ms"),
    ("--trace", "trace", str, "traces or prompt files"),
    ("--seed", "seed", int, "seeds"),
    ("--max-requests", "max_requests", int,
     "first N requests of each trace, read no further (0 = all)"),
    ("--max-new-tokens", "max_new_tokens", int, "output length for prompt files"),
    ("--acceptance", "acceptance", str, "acceptance model JSON for prompt files"),
    # serving (SERVE_AXES): a grid with rate or concurrency runs `serve` runs
    ("--rate", "rate", float, "Poisson arrival rates in requests/s, e.g. 0.5,1,2,4: each a "
     "load point of a serving grid"),
    ("--concurrency", "concurrency", int, "closed-loop load points (requests outstanding), "
     "e.g. 1,4,16; not with --rate"),
    ("--requests", "requests", int, "requests served per load point (0 = the trace's count; "
     "more are drawn from it again, seeded)"),
    ("--duration", "duration", float, "seconds: no request arrives (or is sent) after this "
     "(0 = no limit)"),
    *(_knob_axis(k) for k in SERVE_KNOBS.values()),
    ("--slo-tbt-ms", "slo_tbt_ms", float, "goodput counts requests whose TBT is at most this "
     "(one value; 0 = no SLO)"),
    ("--slo-ttft-ms", "slo_ttft_ms", float, "and whose time to first token is at most this "
     "(one value; 0 = no SLO)"),
]


def add_parser(sub) -> None:
    from pipedec_sim.programs.flags import (
        add_engine_flag,
        add_out_format_flag,
        add_workers_flag,
        file_path,
    )
    p = sub.add_parser("sweep", help="run a grid of configurations in parallel, resumably",
                       description=__doc__.split("\n\n")[0] + " A TOML grid file has one "
                       "top-level key per axis (a value or a list); flags take "
                       "comma-separated lists and replace the file's key. A grid with rate or "
                       "concurrency is a serving grid: each configuration is a `serve` run "
                       "of one serving strategy at one load point.")
    p.add_argument("--grid", type=file_path, default=None, help="TOML grid file")
    g = p.add_argument_group("axes (comma-separated; each replaces the grid file's key)")
    sv = p.add_argument_group(
        "serving axes (a grid with rate or concurrency runs `pipedec-sim serve` runs: a "
        "serving strategy at a load point each; stages default to 8)")
    for flag, key, kind, help_ in FLAG_AXES:
        (sv if key in SERVE_AXES else g).add_argument(flag, dest=f"axis_{key}",
                                                      type=_list_of(kind), default=None,
                                                      help=help_)
    p.add_argument("--out", type=file_path, default=Path("sweep-results"),
                   help="results folder (default sweep-results); re-running resumes")
    add_out_format_flag(p, "the merged requests and summary tables (the parts stay CSV)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the grid and list its configurations; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    x = p.add_argument_group("execution")
    add_workers_flag(x, "the configurations (with --executor ray and no --address: the CPUs "
                        "of the local Ray instance)")
    x.add_argument("--executor", choices=EXECUTORS, default="process",
                   help="process (default): a pool of worker processes on this machine; ray: "
                        "each configuration a Ray task, on a local Ray instance or the cluster "
                        "at --address (needs pip install 'pipedec-sim[ray]'); the same part "
                        "files, resume and tables either way")
    x.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="with --executor ray: the Ray cluster to join (its nodes need "
                        "pipedec-sim installed); default: start a local instance on loopback")
    add_engine_flag(x)


def _overrides(args) -> dict[str, list]:
    return {key: getattr(args, f"axis_{key}") for _, key, _, _ in FLAG_AXES}


SWEEP_TABLES = ("requests", "summary")


def sweep_files() -> tuple[str, ...]:
    """What a sweep writes into its folder besides parts/ (either table format)."""
    from pipedec_sim.results.tables import table_names
    return table_names(SWEEP_TABLES) + ("grid.json", ".sweep.lock")


def _check_execution(args) -> Execution:
    """The execution flags, checked before any work (InputError naming the flag)."""
    from pipedec_sim.results.tables import check_out_format
    check_out_format(args.out_format)
    if args.executor == "ray":
        from pipedec_sim.programs.ray_tasks import check_address, import_ray
        import_ray()
        if args.address is not None:
            check_address(args.address)
    return Execution(workers=args.workers, executor=args.executor, address=args.address,
                     engine=args.engine, out_format=args.out_format)


def cmd_sweep(args) -> int:
    from pipedec_sim.atomic import check_output
    if args.address is not None and args.executor != "ray":      # a dry run's flags too
        raise InputError("only goes with --executor ray", field="--address")
    if not args.dry_run:                          # before any work: can DIR be written?
        _check_execution(args)
        check_output(args.out, "--out", folder=True, files=sweep_files())
        check_output(args.out / "parts", "--out", folder=True)
    grid = build_grid(args.grid, _overrides(args))      # validates; writes nothing
    if args.dry_run:
        return _sweep(args, grid)
    with sweep_lock(args.out):                    # no other sweep writes into DIR meanwhile
        return _sweep(args, grid)


def _sweep(args, grid: Grid) -> int:
    configs = grid.configs()
    done, damaged = check_parts(args.out, configs)
    if not args.quiet or args.dry_run:
        names = SERVE_STRATEGIES if grid.serving else STRATEGY_NAMES
        n = {s: sum(c["strategy"] == s for c in configs) for s in names}
        counts = ", ".join(f"{v} {k}" for k, v in n.items() if v)
        bad = f" ({len(damaged)} more damaged: to run again)" if damaged else ""
        print(f"grid: {len(configs)} configurations ({counts}); {len(done)} already finished "
              f"in {args.out}{bad}", file=sys.stderr)
    if args.dry_run:
        for c in configs:
            if grid.serving:
                keys = (grid.load,) + SERVE_KNOBS_OF[c["strategy"]]
                knobs = ", ".join(f"{k}={c[k]}" for k in keys)
                print(f"{c['config_id']}  {c['strategy']:10s} S={c['stages']:<3d} {knobs}  "
                      f"{'done' if c['config_id'] in done else ''}")
                continue
            knobs = ", ".join(f"{k}={c[k]}" for k in KNOBS_OF[c["strategy"]])
            print(f"{c['config_id']}  {c['strategy']:8s} S={c['stages']:<3d} {knobs}  "
                  f"{'done' if c['config_id'] in done else ''}")
        return 0
    t0 = time.perf_counter()
    try:
        res = _run_with_progress(args, configs)
    except KeyboardInterrupt:
        n = len(finished_ids(args.out) & {c["config_id"] for c in configs})
        print(f"pipedec-sim: interrupted with {n}/{len(configs)} configurations finished "
              f"(kept in {args.out / 'parts'}); run the same command again to resume",
              file=sys.stderr)
        return 130
    from pipedec_sim.results.tables import table_name
    tables = [args.out / table_name(t, args.out_format) for t in SWEEP_TABLES]
    if not args.quiet:
        print(f"ran {res['ran']}, skipped {res['skipped']} finished, {len(res['failed'])} failed "
              f"in {time.perf_counter() - t0:.1f}s; wrote {tables[1]} and {tables[0]}",
              file=sys.stderr)
    if res["merged"]:
        (_print_serving if grid.serving else _print_summary)(tables[1], args.out_format)
    return 1 if res["failed"] else 0


def _run_with_progress(args, configs: list[dict]) -> dict:
    """run_sweep with the flags' execution, a progress bar and one line per problem."""
    from pipedec_sim.programs.flags import progress_bar
    with progress_bar("configurations:", args.quiet, unit="config") as bar:
        def on_error(cfg, err):
            bar.write(f"pipedec-sim: configuration {cfg['config_id']} ({cfg['strategy']}, "
                      f"S={cfg['stages']}) failed: {err}")

        def on_damaged(part, problem):
            bar.write(f"pipedec-sim: {part} {problem}: kept as {part.name}.damaged, running "
                      f"configuration {part.stem} again")

        return run_sweep(configs, args.out, progress=bar, on_error=on_error,
                         on_damaged=on_damaged, execution=_check_execution(args))


def _print_summary(path: Path, out_format: str) -> None:
    """The merged summary as a table on stdout: the axes that vary, the main metrics."""
    import pandas as pd

    from pipedec_sim.results.metrics import format_table
    from pipedec_sim.results.tables import read_table
    s = _int_columns(read_table(path, out_format))
    cols = ["strategy", "stages"] + [c for c in ("cfg_width", "cfg_topk", "cfg_floor")
                                     if s[c].nunique(dropna=True) > 1] \
        + ["tbt_ms", "speedup_vs_ar", "speedup_vs_tree_sd", "hit_rate", "utilization"]
    group = [f"cfg_{k}" for k in GROUP_KEYS if k != "stages" and s[f"cfg_{k}"].nunique() > 1]
    show = s[group + cols].rename(columns=lambda c: c.removeprefix("cfg_"))
    show["speedup_vs_tree_sd"] = ["-" if pd.isna(v) else f"{v:.2f}x"
                                  for v in show["speedup_vs_tree_sd"]]
    for c in ("width", "topk", "floor"):
        if c in show:
            show[c] = ["-" if pd.isna(v) else f"{v:g}" for v in show[c]]
    print(format_table(show))


def _print_serving(path: Path, out_format: str) -> None:
    """A serving sweep's summary on stdout: the settings that vary, throughput, latency."""
    from pipedec_sim.results.serving import format_serving
    from pipedec_sim.results.tables import read_table
    s = _int_columns(read_table(path, out_format))
    load = next(c for c in ("cfg_rate", "cfg_concurrency") if c in s.columns)
    fixed = {"config_id", "strategy", load}
    varying = [c for c in s.columns if (c.startswith("cfg_") or c == "stages")
               and c not in fixed and s[c].nunique(dropna=True) > 1]
    metrics = ["throughput_tok_s", "tbt_p50_ms", "tbt_p99_ms", "ttft_p99_ms", "hit_rate",
               "throughput_vs_pp"]
    if s.slo_attainment.notna().any():
        metrics[-1:-1] = ["slo_attainment", "goodput_tok_s"]
    show = s[varying + [load, "strategy"] + metrics].copy()
    show["throughput_vs_pp"] = ["-" if v != v else f"{v:.2f}x" for v in show.throughput_vs_pp]
    print(format_serving(show.rename(columns=lambda c: c.removeprefix("cfg_"))))
