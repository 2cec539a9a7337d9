"""Bundled profiles, loading by name or path, and writing profiles atomically."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

from ...atomic import write_text
from ...errors import InputError
from ..files import file_problem, load_json, read_text
from .model import Profile
from .validate import parse_profile

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"


def bundled_profiles() -> dict[str, Path]:
    """Profiles shipped in pipedec_sim/profiles/, by file stem."""
    return {p.stem: p for p in sorted(PROFILES_DIR.glob("*.json"))}


def _resolve(path_or_name: str | os.PathLike) -> Path:
    """The file of a path or a bundled name; something at the path that is no regular file
    (a folder, a FIFO) is named as what it is."""
    p = Path(path_or_name)
    problem = file_problem(p)
    if problem is None:
        return p
    bundled = bundled_profiles()
    if str(path_or_name) in bundled:
        return bundled[str(path_or_name)]
    if os.path.lexists(p):
        raise InputError(problem, file=p)
    names = ", ".join(bundled) or "none"
    raise InputError(f"no such file, and not a bundled profile (bundled: {names})",
                     file=str(path_or_name))


def load_profile(path_or_name: str | os.PathLike) -> Profile:
    """Load and validate a profile from a JSON file path or a bundled profile name."""
    path = _resolve(path_or_name)
    return parse_profile(load_json(read_text(path), file=path), source=path)


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
