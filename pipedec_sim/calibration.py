"""Calibration profiles: how long each piece of work takes on some hardware.

A profile (JSON, schema ``pipedec-profile/1``) holds latency grids for one target decoder
layer, one whole draft step, the target LM head and embedding, plus a link model and a device
map. The simulator looks durations up in its hot loop, so lookups are plain-Python bisect +
linear interpolation (a few microseconds), and everything is immutable after load.

Optional CPU-host fields (absent in older profiles: then 0, resp. 1, and the simulator
behaves exactly as before), all CPU work on the host's shared cores, measured by
`backends.torch.profiler.measure_stage_overhead`:

  latency.stage_message_ms   CPU ms a stage process spends per batch message outside the
                             compute (wire recv/isend, row decoding, gloo's threads)
  latency.stage_notice_ms    the same per prune notice (KV compaction excluded: kv_compact_ms)
  latency.head_event_ms      CPU ms the head spends per event outside the draft and LM head
                             (reader threads, wire, gloo); unlike head_overhead_ms (a delay)
                             it occupies the head's core
  devices.contention_slowdown  how much slower work runs while more processes are runnable
                             than there are cores (cache and memory contention that a
                             time-share table cannot see); 1 = none
  devices.message_contention   how much more CPU a stage spends per message (and notice)
                             while the cores are oversubscribed: a process woken for each
                             message runs cache-cold, and gloo's loop thread competes; 1 = none

Bad files raise `InputError` naming the file, the JSON line (syntax errors) or the JSON path
(``field``, e.g. ``latency.layer.ms[2][3]``), so the CLIs can print one line and exit 2.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Mapping, Sequence

from .atomic import write_text
from .errors import InputError

SCHEMA = "pipedec-profile/1"
SCHEMA_PREFIX = "pipedec-profile/"
SCHEMA_MAJOR = 1
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"

# Analytic-profile grid axes (new tokens per batch, cached context rows).
TOKENS_AXIS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
CONTEXT_AXIS = (0, 128, 256, 512, 1024, 2048, 4096, 8192)
# kv_compact_ms is estimated for one stage of ~80/14 layers holding a 1k-token context.
KV_COMPACT_LAYERS = 6
KV_COMPACT_CONTEXT = 1024


# --------------------------------------------------------------------------- shapes, grids

@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype_bytes: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


LLAMA_3_1_70B = ModelShape("meta-llama/Llama-3.1-70B", layers=80, hidden=8192, heads=64,
                           kv_heads=8, intermediate=28672, vocab=128256, dtype_bytes=2)
LLAMA_3_2_1B = ModelShape("meta-llama/Llama-3.2-1B", layers=16, hidden=2048, heads=32,
                          kv_heads=8, intermediate=8192, vocab=128256, dtype_bytes=2)


def _segment(axis: tuple, x: float) -> tuple[int, float]:
    """Index i of the segment [axis[i], axis[i+1]] used for x and x's fraction along it.

    Outside the axis the end segment is used with a fraction < 0 or > 1 (linear
    extrapolation). A single-point axis gives (0, 0.0): the grid is constant along it.
    """
    n = len(axis)
    if n == 1:
        return 0, 0.0
    i = bisect_right(axis, x) - 1
    if i < 0:
        i = 0
    elif i > n - 2:
        i = n - 2
    x0 = axis[i]
    return i, (x - x0) / (axis[i + 1] - x0)


class Grid1D:
    """Piecewise-linear ms(x); linear extrapolation past the ends; never below 0."""

    __slots__ = ("xs", "ys")

    def __init__(self, xs: Sequence[int], ys: Sequence[float]):
        self.xs = tuple(xs)
        self.ys = tuple(float(y) for y in ys)
        if not self.xs or len(self.xs) != len(self.ys):
            raise ValueError("Grid1D needs equally many (>= 1) points and values")

    def __call__(self, x: float) -> float:
        ys = self.ys
        if len(ys) == 1:
            return ys[0]
        i, f = _segment(self.xs, x)
        y = ys[i] + f * (ys[i + 1] - ys[i])
        return y if y > 0.0 else 0.0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grid1D) and (self.xs, self.ys) == (other.xs, other.ys)

    def __repr__(self) -> str:
        return f"Grid1D(xs={self.xs}, ys={self.ys})"

    def to_dict(self) -> dict:
        return {"tokens": list(self.xs), "ms": list(self.ys)}


class Grid2D:
    """Bilinear ms(tokens, context); per-axis linear extrapolation; never below 0."""

    __slots__ = ("tokens", "context", "ms")

    def __init__(self, tokens: Sequence[int], context: Sequence[int],
                 ms: Sequence[Sequence[float]]):
        self.tokens = tuple(tokens)
        self.context = tuple(context)
        self.ms = tuple(tuple(float(v) for v in row) for row in ms)
        if (not self.tokens or not self.context or len(self.ms) != len(self.tokens)
                or any(len(row) != len(self.context) for row in self.ms)):
            raise ValueError("Grid2D needs a len(tokens) x len(context) table, axes non-empty")

    def __call__(self, tokens: float, context: float) -> float:
        i, ft = _segment(self.tokens, tokens)
        j, fc = _segment(self.context, context)
        ms = self.ms
        r0 = ms[i]
        r1 = ms[i + 1] if ft else r0  # ft == 0 also covers single-point token axes
        if fc:
            a = r0[j] + fc * (r0[j + 1] - r0[j])
            b = r1[j] + fc * (r1[j + 1] - r1[j])
        else:
            a, b = r0[j], r1[j]
        y = a + ft * (b - a)
        return y if y > 0.0 else 0.0

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Grid2D)
                and (self.tokens, self.context, self.ms) == (other.tokens, other.context, other.ms))

    def __repr__(self) -> str:
        return f"Grid2D(tokens={self.tokens}, context={self.context}, ms=...)"

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "context": list(self.context),
                "ms": [list(row) for row in self.ms]}


@dataclass(frozen=True)
class Link:
    """One hop between neighbouring devices. bandwidth_gbps is in gigaBITs/s; inf = ideal."""

    latency_ms: float
    bandwidth_gbps: float

    def transfer_ms(self, nbytes: float) -> float:
        """Serialisation time only; add `latency_ms` once per message yourself."""
        return nbytes * 8e-6 / self.bandwidth_gbps  # bits / (Gbit/s) -> ms

    def to_dict(self) -> dict:
        bw = None if math.isinf(self.bandwidth_gbps) else self.bandwidth_gbps
        return {"latency_ms": self.latency_ms, "bandwidth_gbps": bw}


# --------------------------------------------------------------------------- profile

def split_layers(n_layers: int, stages: int) -> list[int]:
    """Contiguous layers per stage, as vLLM's get_pp_indices does.

    Each stage gets n // S; the remainder goes one each to the stages just before the last
    (the last also runs the final norm + LM head, so it is kept light).
    """
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise InputError(f"must be a positive integer, got {stages!r}", field="stages")
    if stages > n_layers:
        raise InputError(f"{stages} stages but the target has only {n_layers} layers",
                         field="stages")
    parts = [n_layers // stages] * stages
    for i in range(2, n_layers % stages + 2):
        parts[-i] += 1
    return parts


@dataclass(frozen=True)
class Profile:
    name: str
    provenance: dict
    target: ModelShape
    draft: ModelShape
    layer: Grid2D
    draft_step: Grid2D
    lm_head: Grid1D
    embed: Grid1D
    kv_compact_ms: float
    head_overhead_ms: float
    link: Link
    device_kind: str
    shared_cores: int | None
    split: tuple[int, ...] | None
    source: str | None = field(default=None, compare=False)
    # How processes share `shared_cores`: "ps" (processor sharing: n runnable processes
    # each progress at min(1, cores/n), as OS time-slicing does) or "fifo" (a process
    # holds a whole core until its work is done; others queue).
    core_sharing: str = "ps"
    # Measured share of a core each of n busy processes got (n = 1, 2, ...) while the
    # profile was measured: captures foreign load (other users' processes) too. None:
    # min(1, shared_cores / n), an otherwise idle machine.
    core_share: tuple[float, ...] | None = None
    # Optional CPU-host costs (module docstring); the defaults model nothing extra.
    stage_message_ms: float = 0.0
    stage_notice_ms: float = 0.0
    head_event_ms: float = 0.0
    contention_slowdown: float = 1.0
    message_contention: float = 1.0

    __hash__ = None  # type: ignore[assignment]  # provenance is a dict

    def stage_layers(self, stages: int) -> list[int]:
        if self.split is None:
            return split_layers(self.target.layers, stages)
        if len(self.split) != stages:
            raise InputError(f"profile splits the target over {len(self.split)} stages, "
                             f"but {stages} were asked for", file=self.source, field="split")
        return list(self.split)

    def hidden_bytes(self, rows: int) -> int:
        return rows * self.target.hidden * self.target.dtype_bytes

    def with_link(self, *, bandwidth_gbps: float | None = None,
                  latency_ms: float | None = None) -> Profile:
        bw = self.link.bandwidth_gbps if bandwidth_gbps is None else bandwidth_gbps
        lat = self.link.latency_ms if latency_ms is None else latency_ms
        _check_number(bw, "bandwidth_gbps", None, positive=True, allow_inf=True)
        _check_number(lat, "latency_ms", None)
        return dataclasses.replace(self, link=Link(float(lat), float(bw)))

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "provenance": json.loads(json.dumps(self.provenance)),  # deep copy
            "target": self.target.to_dict(),
            "draft": self.draft.to_dict(),
            "latency": {
                "layer": self.layer.to_dict(),
                "draft_step": self.draft_step.to_dict(),
                "lm_head": self.lm_head.to_dict(),
                "embed": self.embed.to_dict(),
                "kv_compact_ms": self.kv_compact_ms,
                "head_overhead_ms": self.head_overhead_ms,
                **{k: getattr(self, k) for k in CPU_FIELDS if getattr(self, k)},
            },
            "link": self.link.to_dict(),
            "devices": {"kind": self.device_kind, "shared_cores": self.shared_cores,
                        **({"core_sharing": self.core_sharing}
                           if self.core_sharing != "ps" else {}),
                        **({"core_share": list(self.core_share)}
                           if self.core_share else {}),
                        **{k: getattr(self, k) for k in DEVICE_FIELDS
                           if getattr(self, k) != 1.0}},
            "split": None if self.split is None else list(self.split),
        }


# --------------------------------------------------------------------------- validation

def _fail(src: str | None, path: str, msg: str) -> InputError:
    return InputError(msg, file=src, field=path or None)


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _get(obj: Mapping, key: str, path: str, src: str | None) -> Any:
    if key not in obj:
        raise _fail(src, _join(path, key), "missing required key")
    return obj[key]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _obj(v: Any, path: str, src: str | None) -> Mapping:
    if not isinstance(v, dict):
        raise _fail(src, path, f"expected an object, got {_type_name(v)}")
    return v


def _str(v: Any, path: str, src: str | None) -> str:
    if not isinstance(v, str) or not v:
        raise _fail(src, path, f"expected a non-empty string, got {v!r}")
    return v


def _int(v: Any, path: str, src: str | None, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(src, path, f"expected an integer, got {_type_name(v)} {v!r}")
    if v < minimum:
        raise _fail(src, path, f"must be >= {minimum}, got {v}")
    return v


def _check_number(v: Any, path: str, src: str | None, *, positive: bool = False,
                  allow_inf: bool = False) -> float:
    """A finite number, >= 0 (or > 0 if `positive`); durations may be 0, rates may not."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(src, path, f"expected a number, got {_type_name(v)} {v!r}")
    if math.isnan(v) or (math.isinf(v) and not (allow_inf and v > 0)):
        raise _fail(src, path, f"must be finite, got {v}")
    if v < 0 or (positive and v == 0):
        raise _fail(src, path, f"must be {'> 0' if positive else '>= 0'}, got {v}")
    return float(v)


def _list(v: Any, path: str, src: str | None) -> list:
    if not isinstance(v, list) or not v:
        raise _fail(src, path, f"expected a non-empty list, got {_type_name(v)}")
    return v


def _axis(v: Any, path: str, src: str | None, minimum: int) -> tuple[int, ...]:
    xs = tuple(_int(x, f"{path}[{k}]", src, minimum) for k, x in enumerate(_list(v, path, src)))
    for k in range(1, len(xs)):
        if xs[k] <= xs[k - 1]:
            raise _fail(src, f"{path}[{k}]",
                        f"axis must be strictly ascending, got {xs[k - 1]} then {xs[k]}")
    return xs


def _values(v: Any, n: int, path: str, src: str | None) -> tuple[float, ...]:
    row = _list(v, path, src)
    if len(row) != n:
        raise _fail(src, path, f"expected {n} values to match the axis, got {len(row)}")
    return tuple(_check_number(x, f"{path}[{k}]", src) for k, x in enumerate(row))


def _grid1d(v: Any, path: str, src: str | None) -> Grid1D:
    g = _obj(v, path, src)
    xs = _axis(_get(g, "tokens", path, src), f"{path}.tokens", src, minimum=1)
    ys = _values(_get(g, "ms", path, src), len(xs), f"{path}.ms", src)
    return Grid1D(xs, ys)


def _grid2d(v: Any, path: str, src: str | None) -> Grid2D:
    g = _obj(v, path, src)
    ts = _axis(_get(g, "tokens", path, src), f"{path}.tokens", src, minimum=1)
    cs = _axis(_get(g, "context", path, src), f"{path}.context", src, minimum=0)
    rows = _list(_get(g, "ms", path, src), f"{path}.ms", src)
    if len(rows) != len(ts):
        raise _fail(src, f"{path}.ms", f"expected {len(ts)} rows (one per tokens value), "
                                       f"got {len(rows)}")
    ms = [_values(r, len(cs), f"{path}.ms[{i}]", src) for i, r in enumerate(rows)]
    return Grid2D(ts, cs, ms)


def _shape(v: Any, path: str, src: str | None) -> ModelShape:
    d = _obj(v, path, src)
    ints = {k: _int(_get(d, k, path, src), _join(path, k), src)
            for k in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab",
                      "dtype_bytes")}
    s = ModelShape(name=_str(_get(d, "name", path, src), _join(path, "name"), src), **ints)
    if s.hidden % s.heads:
        raise _fail(src, _join(path, "heads"), f"hidden {s.hidden} is not a multiple of "
                                               f"heads {s.heads}")
    if s.heads % s.kv_heads:
        raise _fail(src, _join(path, "kv_heads"), f"heads {s.heads} is not a multiple of "
                                                  f"kv_heads {s.kv_heads}")
    return s


def _schema(v: Any, src: str | None) -> None:
    if not isinstance(v, str) or not v.startswith(SCHEMA_PREFIX):
        raise _fail(src, "schema", f"not a pipedec profile: expected {SCHEMA!r}, got {v!r}")
    version = v[len(SCHEMA_PREFIX):]
    major = version.split(".", 1)[0]
    if not major.isdigit():
        raise _fail(src, "schema", f"malformed schema version {v!r}, expected {SCHEMA!r}")
    if int(major) != SCHEMA_MAJOR:
        raise _fail(src, "schema", f"unsupported schema version {v!r}; this build reads "
                                   f"{SCHEMA!r} (regenerate the profile or upgrade pipedec-sim)")


def _provenance(v: Any, src: str | None) -> dict:
    p = _obj(v, "provenance", src)
    kind = _get(p, "kind", "provenance", src)
    if kind not in ("measured", "analytic"):
        raise _fail(src, "provenance.kind", f"expected 'measured' or 'analytic', got {kind!r}")
    for key in ("device", "command"):
        _str(_get(p, key, "provenance", src), f"provenance.{key}", src)
    d = _str(_get(p, "date", "provenance", src), "provenance.date", src)
    try:
        date.fromisoformat(d)
    except ValueError:
        raise _fail(src, "provenance.date", f"expected YYYY-MM-DD, got {d!r}") from None
    if kind == "analytic":  # an analytic profile is only as good as its stated formula
        _str(_get(p, "formula", "provenance", src), "provenance.formula", src)
        _get(p, "sources", "provenance", src)
    _optional_provenance(p, src)
    return json.loads(json.dumps(p))  # deep copy: the frozen Profile must not alias the input


def _optional_provenance(p: Mapping, src: str | None) -> None:
    if "formula" in p:
        _str(p["formula"], "provenance.formula", src)
    if "notes" in p and not isinstance(p["notes"], str):
        raise _fail(src, "provenance.notes", f"expected a string, got {_type_name(p['notes'])}")
    if "sources" in p:
        for k, s in enumerate(_list(p["sources"], "provenance.sources", src)):
            _str(s, f"provenance.sources[{k}]", src)
    if "versions" in p:
        for k, s in _obj(p["versions"], "provenance.versions", src).items():
            _str(s, f"provenance.versions.{k}", src)


def _link(v: Any, src: str | None) -> Link:
    d = _obj(v, "link", src)
    lat = _check_number(_get(d, "latency_ms", "link", src), "link.latency_ms", src)
    bw = _get(d, "bandwidth_gbps", "link", src)  # null = ideal (infinite) link
    bw = math.inf if bw is None else _check_number(bw, "link.bandwidth_gbps", src, positive=True)
    return Link(lat, bw)


CORE_SHARING = ("ps", "fifo")
CPU_FIELDS = ("stage_message_ms", "stage_notice_ms", "head_event_ms")   # in "latency"
DEVICE_FIELDS = ("contention_slowdown", "message_contention")            # in "devices"


def _cpu_costs(lat: Mapping, devices: Mapping, src: str | None) -> dict:
    """The optional CPU-host fields (0 / 1 when absent: older profiles load unchanged)."""
    out = {k: _check_number(lat[k], f"latency.{k}", src) for k in CPU_FIELDS if k in lat}
    for k in DEVICE_FIELDS:
        if k in devices:
            v = _check_number(devices[k], f"devices.{k}", src, positive=True)
            if v < 1.0:
                raise _fail(src, f"devices.{k}", f"must be >= 1, got {v}")
            out[k] = v
    return out


def _devices(v: Any, src: str | None) -> tuple[str, int | None, str, tuple | None]:
    d = _obj(v, "devices", src)
    kind = _get(d, "kind", "devices", src)
    if kind not in ("gpu", "cpu"):
        raise _fail(src, "devices.kind", f"expected 'gpu' or 'cpu', got {kind!r}")
    cores = d.get("shared_cores")
    if cores is not None:
        _int(cores, "devices.shared_cores", src)
    sharing = d.get("core_sharing", "ps")
    if sharing not in CORE_SHARING:
        raise _fail(src, "devices.core_sharing",
                    f"expected one of {', '.join(map(repr, CORE_SHARING))}, got {sharing!r}")
    share = d.get("core_share")
    if share is not None:
        share = tuple(_check_number(x, f"devices.core_share[{k}]", src, positive=True)
                      for k, x in enumerate(_list(share, "devices.core_share", src)))
    return kind, cores, sharing, share


def _split(v: Any, layers: int, src: str | None) -> tuple[int, ...] | None:
    if v is None:
        return None
    parts = tuple(_int(x, f"split[{k}]", src) for k, x in enumerate(_list(v, "split", src)))
    if sum(parts) != layers:
        raise _fail(src, "split", f"layers per stage sum to {sum(parts)}, but the target "
                                  f"has {layers} layers")
    return parts


def parse_profile(data: Any, *, source: str | os.PathLike | None = None) -> Profile:
    """Validate a decoded profile dict and build a Profile. Unknown keys are ignored."""
    src = None if source is None else str(source)
    if not isinstance(data, dict):
        raise InputError(f"a profile must be a JSON object, got {_type_name(data)}", file=src)
    d = data
    _schema(_get(d, "schema", "", src), src)
    target = _shape(_get(d, "target", "", src), "target", src)
    lat = _obj(_get(d, "latency", "", src), "latency", src)
    kind, cores, sharing, share = _devices(_get(d, "devices", "", src), src)
    return Profile(
        name=_str(_get(d, "name", "", src), "name", src),
        provenance=_provenance(_get(d, "provenance", "", src), src),
        target=target,
        draft=_shape(_get(d, "draft", "", src), "draft", src),
        layer=_grid2d(_get(lat, "layer", "latency", src), "latency.layer", src),
        draft_step=_grid2d(_get(lat, "draft_step", "latency", src), "latency.draft_step", src),
        lm_head=_grid1d(_get(lat, "lm_head", "latency", src), "latency.lm_head", src),
        embed=_grid1d(_get(lat, "embed", "latency", src), "latency.embed", src),
        kv_compact_ms=_check_number(_get(lat, "kv_compact_ms", "latency", src),
                                    "latency.kv_compact_ms", src),
        head_overhead_ms=_check_number(_get(lat, "head_overhead_ms", "latency", src),
                                       "latency.head_overhead_ms", src),
        link=_link(_get(d, "link", "", src), src),
        device_kind=kind,
        shared_cores=cores,
        split=_split(d.get("split"), target.layers, src),
        source=src,
        core_sharing=sharing,
        core_share=share,
        **_cpu_costs(lat, d["devices"], src),
    )


# --------------------------------------------------------------------------- load / save

def bundled_profiles() -> dict[str, Path]:
    """Profiles shipped in pipedec_sim/profiles/, by file stem."""
    return {p.stem: p for p in sorted(PROFILES_DIR.glob("*.json"))}


def _resolve(path_or_name: str | os.PathLike) -> Path:
    p = Path(path_or_name)
    if p.is_file():
        return p
    bundled = bundled_profiles()
    if str(path_or_name) in bundled:
        return bundled[str(path_or_name)]
    names = ", ".join(bundled) or "none"
    raise InputError(f"no such file, and not a bundled profile (bundled: {names})",
                     file=str(path_or_name))


def load_profile(path_or_name: str | os.PathLike) -> Profile:
    """Load and validate a profile from a JSON file path or a bundled profile name."""
    path = _resolve(path_or_name)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason})", file=path) from None
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", file=path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON: {e.msg} (column {e.colno})", file=path,
                         line=e.lineno) from None
    return parse_profile(data, source=path)


_NUM_LIST = re.compile(r"\[\n\s*(-?[0-9][-+0-9.eE]*(?:,\n\s*-?[0-9][-+0-9.eE]*)*)\n\s*\]")


def dumps_profile(data: Mapping) -> str:
    """Indented JSON with each list of numbers on one line (grids stay readable).

    The regex only ever joins lists spanning several lines; JSON strings cannot contain raw
    newlines, so string contents are never touched.
    """
    text = json.dumps(data, indent=2, allow_nan=False)
    return _NUM_LIST.sub(lambda m: "[" + ", ".join(re.split(r",\n\s*", m.group(1))) + "]",
                         text) + "\n"


def save_profile(profile_or_dict: Profile | Mapping, path: str | os.PathLike) -> None:
    """Validate, then write atomically: temp file in the same dir, fsync, os.replace."""
    if isinstance(profile_or_dict, Profile):
        data = profile_or_dict.to_dict()
    else:
        data = dict(profile_or_dict)
        parse_profile(data)  # never write a profile we could not load back
    path = Path(path)
    try:
        text = dumps_profile(data)
    except (TypeError, ValueError) as e:  # e.g. NaN or a set hidden in an extra key
        raise InputError(f"cannot be written as JSON: {e}", file=path) from None
    try:
        write_text(path, text)
    except OSError as e:
        raise InputError(f"cannot write: {e.strerror or e}", file=path) from None


ANALYTIC_FORMULA = (
    "Roofline per op: t_ms = max(bytes/(mem_bw*mem_eff), flops/(peak*flop_eff)) + "
    "layer_overhead. Decoder layer with n new tokens and c cached rows, P params of b bytes, "
    "head_dim = hidden/heads: P = 2*hidden*hidden (q,o) + 2*hidden*kv_heads*head_dim (k,v) + "
    "3*hidden*intermediate (MLP), norms negligible; bytes = P*b + 2*kv_heads*head_dim*b*(c+n) "
    "(KV read/write); flops = 2*P*n + 4*n*(c+n)*heads*head_dim (attention scores+values). "
    "lm_head(n): P = hidden*vocab, bytes = P*b, flops = 2*P*n (+ argmax negligible), "
    "+ layer_overhead. embed(n): bytes = n*hidden*b, flops = 0, + layer_overhead. "
    "draft_step(n,c) = draft.layers * layer_draft(n,c) + lm_head_draft(n). "
    "kv_compact_ms = 2*(6*2*kv_heads*head_dim*b*1024)/(mem_bw*mem_eff) + layer_overhead "
    "(read+write once the K and V of one ~6-layer stage at 1k context). "
    "head_overhead_ms = 0.05 (assumed). Units: GB = 1e9 bytes, TFLOPS = 1e12 flop/s."
)

ANALYTIC_SOURCES = [
    "NVIDIA Ada Lovelace GPU architecture whitepaper (RTX 4090): 1008 GB/s GDDR6X memory "
    "bandwidth; 165.2 dense FP16/BF16 tensor TFLOPS with FP32 accumulate",
    "meta-llama/Llama-3.1-70B config.json: 80 layers, hidden 8192, 64 heads, 8 KV heads, "
    "intermediate 28672, vocab 128256, bfloat16",
    "meta-llama/Llama-3.2-1B config.json: 16 layers, hidden 2048, 32 heads, 8 KV heads, "
    "intermediate 8192, vocab 128256, bfloat16",
    "IEEE 802.3 10GBASE-T / 100GBASE: 10 and 100 Gbit/s line rate",
    "assumed, not measured: mem_eff, flop_eff, layer_overhead (kernel launches), "
    "link latency, head_overhead",
]


@dataclass(frozen=True)
class _Roofline:
    bytes_per_ms: float
    flops_per_ms: float
    overhead_ms: float

    def ms(self, nbytes: float, flops: float) -> float:
        return max(nbytes / self.bytes_per_ms, flops / self.flops_per_ms) + self.overhead_ms


def layer_params(s: ModelShape) -> int:
    """Weights of one Llama decoder layer (norm weights ignored)."""
    return (2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_heads * s.head_dim
            + 3 * s.hidden * s.intermediate)


def _layer_ms(hw: _Roofline, s: ModelShape, n: int, c: int) -> float:
    p, b, hd = layer_params(s), s.dtype_bytes, s.head_dim
    nbytes = p * b + 2 * s.kv_heads * hd * b * (c + n)
    flops = 2 * p * n + 4 * n * (c + n) * s.heads * hd
    return hw.ms(nbytes, flops)


def _lm_head_ms(hw: _Roofline, s: ModelShape, n: int) -> float:
    p = s.hidden * s.vocab
    return hw.ms(p * s.dtype_bytes, 2 * p * n)


def _embed_ms(hw: _Roofline, s: ModelShape, n: int) -> float:
    return hw.ms(n * s.hidden * s.dtype_bytes, 0)


def _kv_compact_ms(hw: _Roofline, s: ModelShape) -> float:
    kv = KV_COMPACT_LAYERS * 2 * s.kv_heads * s.head_dim * s.dtype_bytes * KV_COMPACT_CONTEXT
    return hw.ms(2 * kv, 0)


def _r(x: float) -> float:
    return round(x, 6)  # ns resolution: keeps bundled files readable, far below any effect


def _pkg_version() -> str:
    try:
        from importlib.metadata import version
        return version("pipedec-sim")
    except Exception:  # running from a source tree without an install
        return "source-tree"


def analytic_profile(*, mem_bw_gbs: float = 1008.0, peak_tflops: float = 165.0,
                     mem_eff: float = 0.8, flop_eff: float = 0.6,
                     layer_overhead_ms: float = 0.03, link_gbps: float = 10.0,
                     link_latency_ms: float = 0.05,
                     device: str = "24 GB consumer GPU (RTX 4090-class)",
                     target: ModelShape = LLAMA_3_1_70B,
                     draft: ModelShape = LLAMA_3_2_1B) -> dict:
    """A roofline-model profile dict (see ANALYTIC_FORMULA); validate it with parse_profile."""
    hw = _Roofline(mem_bw_gbs * 1e9 * mem_eff / 1e3, peak_tflops * 1e12 * flop_eff / 1e3,
                   layer_overhead_ms)
    ts, cs = TOKENS_AXIS, CONTEXT_AXIS
    params = (f"mem_bw={mem_bw_gbs} GB/s, mem_eff={mem_eff}, peak={peak_tflops} TFLOPS, "
              f"flop_eff={flop_eff}, layer_overhead={layer_overhead_ms} ms, "
              f"link={link_gbps} Gbit/s + {link_latency_ms} ms per hop")
    return {
        "schema": SCHEMA,
        "name": "analytic-llama70b-1b",
        "provenance": {
            "kind": "analytic", "device": device, "date": date.today().isoformat(),
            "command": "python -m pipedec_sim.profiles.make_analytic",
            "formula": ANALYTIC_FORMULA, "sources": list(ANALYTIC_SOURCES),
            "versions": {"pipedec-sim": _pkg_version()},
            "notes": f"Parameters: {params}. Not a measurement: use it for shape-of-the-curve "
                     "questions; calibrate on real hardware for absolute numbers.",
        },
        "target": target.to_dict(),
        "draft": draft.to_dict(),
        "latency": {
            "layer": {"tokens": list(ts), "context": list(cs),
                      "ms": [[_r(_layer_ms(hw, target, n, c)) for c in cs] for n in ts]},
            "draft_step": {"tokens": list(ts), "context": list(cs),
                           "ms": [[_r(draft.layers * _layer_ms(hw, draft, n, c)
                                      + _lm_head_ms(hw, draft, n)) for c in cs] for n in ts]},
            "lm_head": {"tokens": list(ts), "ms": [_r(_lm_head_ms(hw, target, n)) for n in ts]},
            "embed": {"tokens": list(ts), "ms": [_r(_embed_ms(hw, target, n)) for n in ts]},
            "kv_compact_ms": _r(_kv_compact_ms(hw, target)),
            "head_overhead_ms": 0.05,
        },
        "link": {"latency_ms": link_latency_ms, "bandwidth_gbps": link_gbps},
        "devices": {"kind": "gpu", "shared_cores": None},
        "split": None,
    }


# --------------------------------------------------------------------------- test helper

def constant_profile(*, layers: int = 8, layer_ms: float = 1.0, draft_ms: float = 0.0,
                     lm_head_ms: float = 0.0, embed_ms: float = 0.0,
                     link_latency_ms: float = 0.0, bandwidth_gbps: float | None = None,
                     kv_compact_ms: float = 0.0, head_overhead_ms: float = 0.0,
                     shared_cores: int | None = None, core_sharing: str = "ps") -> Profile:
    """A profile whose every grid is flat, so closed-form checks are exact.

    bandwidth_gbps=None means an ideal link (transfer_ms == 0).
    """
    def flat2(ms: float) -> Grid2D:
        return Grid2D((1,), (0,), ((float(ms),),))

    def flat1(ms: float) -> Grid1D:
        return Grid1D((1,), (float(ms),))

    return Profile(
        name="constant",
        provenance={"kind": "analytic", "device": "none (test profile)",
                    "date": date.today().isoformat(), "command": "constant_profile()",
                    "formula": "every duration is a constant",
                    "sources": ["synthetic: chosen by the caller"]},
        target=dataclasses.replace(LLAMA_3_1_70B, name="constant-target", layers=layers),
        draft=dataclasses.replace(LLAMA_3_2_1B, name="constant-draft"),
        layer=flat2(layer_ms), draft_step=flat2(draft_ms),
        lm_head=flat1(lm_head_ms), embed=flat1(embed_ms),
        kv_compact_ms=float(kv_compact_ms), head_overhead_ms=float(head_overhead_ms),
        link=Link(float(link_latency_ms),
                  math.inf if bandwidth_gbps is None else float(bandwidth_gbps)),
        device_kind="gpu" if shared_cores is None else "cpu",
        shared_cores=shared_cores, split=None, core_sharing=core_sharing,
    )
