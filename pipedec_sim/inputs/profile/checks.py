"""Field checks shared by the profile reader and `Profile.with_link`: each names the file
and the JSON path of a bad value."""
from __future__ import annotations

import math
from typing import Any, Mapping

from ...errors import InputError
from ..files import short
from ..limits import MAX_MS, MIN_GBPS, SHAPE_LIMITS

# No integer in a profile may exceed this (2**53: every int up to it is exact as a float,
# and the grids and timings are computed in floats; 10**400 would overflow them).
MAX_PROFILE_INT = 2**53


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
        raise _fail(src, path, f"expected a non-empty string, got {short(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(src, path, "holds a lone surrogate: not valid Unicode") from None
    return v


def _int(v: Any, path: str, src: str | None, minimum: int = 1,
         maximum: int = MAX_PROFILE_INT) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(src, path, f"expected an integer, got {_type_name(v)} {short(v)}")
    if v < minimum:
        raise _fail(src, path, f"must be >= {minimum}, got {short(v)}")
    if v > maximum:
        raise _fail(src, path, f"must be <= {maximum} (the limit), got {short(v)}")
    return v


def check_shape_int(v: Any, path: str, src: str | None) -> int:
    """A model-shape integer (`target.layers`, `draft.hidden`, ...): >= 1 and at most its
    limit in pipedec_sim.inputs.limits.SHAPE_LIMITS (the key is the path's last part)."""
    key = path.rsplit(".", 1)[-1]
    return _int(v, path, src, maximum=SHAPE_LIMITS.get(key, MAX_PROFILE_INT))


def check_number(v: Any, path: str, src: str | None, *, positive: bool = False,
                  allow_inf: bool = False, maximum: float = MAX_MS) -> float:
    """A finite number, >= 0 (or > 0 if `positive`), at most `maximum` (every number in a
    profile is a duration in ms or a factor: MAX_MS bounds both); durations may be 0,
    rates may not."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(src, path, f"expected a number, got {_type_name(v)} {short(v)}")
    if isinstance(v, int) and abs(v) > MAX_PROFILE_INT:
        raise _fail(src, path, f"must be <= {MAX_PROFILE_INT} (the limit), got {short(v)}")
    if math.isnan(v) or (math.isinf(v) and not (allow_inf and v > 0)):
        raise _fail(src, path, f"must be finite, got {v}")
    if v < 0 or (positive and v == 0):
        raise _fail(src, path, f"must be {'> 0' if positive else '>= 0'}, got {v}")
    if v > maximum and not (allow_inf and math.isinf(v)):
        raise _fail(src, path, f"must be <= {maximum:g} (the limit), got {short(v)}")
    return float(v)


def check_bandwidth(v: Any, path: str, src: str | None) -> float:
    """A link's Gbit/s: > 0 and at least MIN_GBPS (inf: an ideal link)."""
    bw = check_number(v, path, src, positive=True, allow_inf=True)
    if bw < MIN_GBPS:
        raise _fail(src, path, f"must be >= {MIN_GBPS:g} (the limit: 1 kbit/s), got {short(v)}")
    return bw
