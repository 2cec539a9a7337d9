"""Field checks shared by the profile reader and `Profile.with_link`: each names the file
and the JSON path of a bad value."""
from __future__ import annotations

import math
from typing import Any, Mapping

from ...errors import InputError


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


def check_number(v: Any, path: str, src: str | None, *, positive: bool = False,
                  allow_inf: bool = False) -> float:
    """A finite number, >= 0 (or > 0 if `positive`); durations may be 0, rates may not."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(src, path, f"expected a number, got {_type_name(v)} {v!r}")
    if math.isnan(v) or (math.isinf(v) and not (allow_inf and v > 0)):
        raise _fail(src, path, f"must be finite, got {v}")
    if v < 0 or (positive and v == 0):
        raise _fail(src, path, f"must be {'> 0' if positive else '>= 0'}, got {v}")
    return float(v)
