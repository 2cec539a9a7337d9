"""Reading a profile: validate a decoded JSON dict field by field and build a `Profile`."""
from __future__ import annotations

import json
import math
import os
from datetime import date
from typing import Any, Mapping

from ...errors import InputError
from .checks import (
    _fail,
    _get,
    _int,
    _join,
    _obj,
    _str,
    _type_name,
    check_bandwidth,
    check_number,
    check_shape_int,
)
from .grid import Grid1D, Grid2D
from .model import (
    BATCHING,
    COLD_FIELDS,
    CORE_SHARING,
    CPU_FIELDS,
    DEVICE_FIELDS,
    SCHEMA,
    SCHEMA_MAJOR,
    SCHEMA_PREFIX,
    BatchPoint,
    LinkModel,
    ModelShape,
    Profile,
)


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
    return tuple(check_number(x, f"{path}[{k}]", src) for k, x in enumerate(row))


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
    ints = {k: check_shape_int(_get(d, k, path, src), _join(path, k), src)
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
    if "host" in p:
        _host(p["host"], src)


HOST_STRINGS = ("cpu_model", "cpu_vendor", "cpu_id", "machine", "description")
HOST_INTS = ("cpu_count", "affinity_cores")


def _host(v: Any, src: str | None) -> None:
    """provenance.host (optional; what `pipedec-real profile` records about the machine,
    see pipedec_sim/inputs/host.py): strings, core counts, the ISA flags, the load."""
    path = "provenance.host"
    h = _obj(v, path, src)
    for k in HOST_STRINGS:
        if k in h:
            _str(h[k], f"{path}.{k}", src)
    for k in HOST_INTS:
        if k in h:
            _int(h[k], f"{path}.{k}", src)
    if "cpu_count" in h and "affinity_cores" in h and h["affinity_cores"] > h["cpu_count"]:
        raise _fail(src, f"{path}.affinity_cores", f"{h['affinity_cores']} cores in the "
                                                   f"affinity mask but cpu_count is "
                                                   f"{h['cpu_count']}")
    if "isa" in h:
        if not isinstance(h["isa"], list):
            raise _fail(src, f"{path}.isa", f"expected a list, got {_type_name(h['isa'])}")
        for i, flag in enumerate(h["isa"]):
            _str(flag, f"{path}.isa[{i}]", src)
    if "load_average" in h:
        la = _list(h["load_average"], f"{path}.load_average", src)
        if len(la) != 3:
            raise _fail(src, f"{path}.load_average", f"expected 3 numbers (1, 5, 15 min), "
                                                     f"got {len(la)}")
        for i, x in enumerate(la):
            check_number(x, f"{path}.load_average[{i}]", src)


def _link(v: Any, src: str | None, path: str = "link") -> LinkModel:
    d = _obj(v, path, src)
    lat = check_number(_get(d, "latency_ms", path, src), f"{path}.latency_ms", src)
    bw = _get(d, "bandwidth_gbps", path, src)  # null = ideal (infinite) link
    bw = math.inf if bw is None else check_bandwidth(bw, f"{path}.bandwidth_gbps", src)
    return LinkModel(lat, bw)


def _servers(v: Any, src: str | None) -> dict:
    """Optional per-hop links: {"stage_server": [server of each stage], "intra_link":
    {latency_ms, bandwidth_gbps}}; absent: `link` is every hop."""
    if v is None:
        return {}
    d = _obj(v, "servers", src)
    path = "servers.stage_server"
    servers = tuple(_int(x, f"{path}[{k}]", src, minimum=0)
                    for k, x in enumerate(_list(_get(d, "stage_server", "servers", src),
                                                path, src)))
    for k in range(1, len(servers)):
        if servers[k] < servers[k - 1]:
            raise _fail(src, f"{path}[{k}]", f"stages run on servers in order: stage {k + 1} "
                                             f"on server {servers[k]} after stage {k} on "
                                             f"server {servers[k - 1]}")
    intra = _link(_get(d, "intra_link", "servers", src), src, "servers.intra_link")
    return {"stage_server": servers, "intra_link": intra}


def _cpu_costs(lat: Mapping, devices: Mapping, src: str | None) -> dict:
    """The optional CPU-host fields (0 / 1 when absent: older profiles load unchanged)."""
    out = {k: check_number(lat[k], f"latency.{k}", src) for k in CPU_FIELDS + COLD_FIELDS
           if k in lat}
    for k in DEVICE_FIELDS:
        if k in devices:
            v = check_number(devices[k], f"devices.{k}", src, positive=True)
            if v < 1.0:
                raise _fail(src, f"devices.{k}", f"must be >= 1, got {v}")
            out[k] = v
    return out


def _batch(lat: Mapping, src: str | None) -> dict:
    """Optional measured batched forwards, "latency.batch": a non-empty list of {"rows":
    [n_b, ...], "context": [c_b, ...], "ms": t}, one entry of rows (>= 1) and context
    (>= 0) per request, ms > 0 (per layer). Absent (older profiles): none."""
    if "batch" not in lat:
        return {}
    points = []
    for k, v in enumerate(_list(lat["batch"], "latency.batch", src)):
        path = f"latency.batch[{k}]"
        d = _obj(v, path, src)
        rows = tuple(_int(x, f"{path}.rows[{i}]", src)
                     for i, x in enumerate(_list(_get(d, "rows", path, src), f"{path}.rows",
                                                 src)))
        ctx = tuple(_int(x, f"{path}.context[{i}]", src, minimum=0)
                    for i, x in enumerate(_list(_get(d, "context", path, src),
                                                f"{path}.context", src)))
        if len(ctx) != len(rows):
            raise _fail(src, f"{path}.context", f"expected {len(rows)} contexts (one per "
                                                f"request in rows), got {len(ctx)}")
        ms = check_number(_get(d, "ms", path, src), f"{path}.ms", src, positive=True)
        points.append(BatchPoint(rows, ctx, ms))
    return {"batch": tuple(points)}


def _batching(lat: Mapping, src: str | None) -> dict:
    """Optional "latency.batching" (one of BATCHING); absent: DEFAULT_BATCHING."""
    if "batching" not in lat:
        return {}
    v = lat["batching"]
    if v not in BATCHING:
        raise _fail(src, "latency.batching", f"must be one of {', '.join(BATCHING)}, got {v!r}")
    return {"batching": v}


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
        # a share of one core: what an actor gets of it beside the others (at most all)
        share = tuple(check_number(x, f"devices.core_share[{k}]", src, positive=True,
                                   maximum=1.0)
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
    split = _split(d.get("split"), target.layers, src)
    servers = _servers(d.get("servers"), src)
    if split is not None and servers and len(servers["stage_server"]) != len(split):
        raise _fail(src, "servers.stage_server",
                    f"places {len(servers['stage_server'])} stages, but split has "
                    f"{len(split)}")
    return Profile(
        name=_str(_get(d, "name", "", src), "name", src),
        provenance=_provenance(_get(d, "provenance", "", src), src),
        target=target,
        draft=_shape(_get(d, "draft", "", src), "draft", src),
        layer=_grid2d(_get(lat, "layer", "latency", src), "latency.layer", src),
        draft_step=_grid2d(_get(lat, "draft_step", "latency", src), "latency.draft_step", src),
        lm_head=_grid1d(_get(lat, "lm_head", "latency", src), "latency.lm_head", src),
        embed=_grid1d(_get(lat, "embed", "latency", src), "latency.embed", src),
        kv_compact_ms=check_number(_get(lat, "kv_compact_ms", "latency", src),
                                    "latency.kv_compact_ms", src),
        head_overhead_ms=check_number(_get(lat, "head_overhead_ms", "latency", src),
                                       "latency.head_overhead_ms", src),
        link=_link(_get(d, "link", "", src), src),
        device_kind=kind,
        shared_cores=cores,
        split=split,
        source=src,
        core_sharing=sharing,
        core_share=share,
        **_cpu_costs(lat, d["devices"], src),
        **servers,
        **_batch(lat, src),
        **_batching(lat, src),
    )


# --------------------------------------------------------------------------- load / save
