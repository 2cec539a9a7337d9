"""Write results all-or-nothing: to a temp file beside the target, then rename.

Readers never see half a file, and a failed or interrupted write leaves the old file
(or nothing) in place. The result keeps the old file's mode (0644 for a new file).
Several files that belong together (a summary and its per-request table) are written to
temp files first and renamed only once every one of them is complete (`atomic_paths`).

`check_output` says before any work starts whether an output path can be written at all,
so that a long run never ends in a traceback (or half its files) for a bad `--out`.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from pipedec_sim.errors import InputError


def missing_parents(path: Path) -> list[Path]:
    """The parents of `path` that do not exist, innermost first."""
    missing = []
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    return missing


def remove_empty(folders: Iterable[Path]) -> None:
    """rmdir each folder that is still empty (a failed write's own, made for it)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass                            # not empty (or gone): something else is there


def _temp_beside(path: Path, made: list[Path]) -> Path:
    """A temp file in `path`'s folder, making the folder (and its missing parents, noted
    in `made` in the order they are made) if need be."""
    made += reversed(missing_parents(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def seal(tmp: Path, path: Path) -> None:
    """Make a written temp file durable, with the mode its target will keep."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)


@contextmanager
def atomic_paths(paths: Iterable[str | os.PathLike]) -> Iterator[list[Path]]:
    """Yield one temp path per target (in each target's folder); once the block has
    written them all, each replaces its target. On any error no target changes, and the
    folders made for them are removed again (if still empty)."""
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    made: list[Path] = []
    try:
        for path in targets:
            temps.append(_temp_beside(path, made))
        yield temps
        for tmp, path in zip(temps, targets):      # all durable before any becomes visible
            seal(tmp, path)
        for tmp, path in zip(temps, targets):
            os.replace(tmp, path)
    except BaseException as e:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        remove_empty(reversed(made))
        if isinstance(e, OSError) and e.filename is None and targets:
            # a write that failed inside a library (a full disk under pandas) names no file
            where = targets[0] if len(targets) == 1 else targets[0].parent
            raise OSError(e.errno, e.strerror, str(where)) from e
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success it replaces `path`."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- checks

def output_problem(path: str | os.PathLike, *, folder: bool = False,
                   files: Iterable[str] = ()) -> str | None:
    """Why `path` cannot be written (None if it can): an output file (`folder` False) must
    not be a folder or a special file; an output folder must not be a file, nor hold a
    folder where one of `files` goes. Either way the folder it lands in (or the nearest
    existing parent, for one still to be made) must take a new file: tried, not guessed
    from permission bits (root ignores them, a read-only mount does not)."""
    p = Path(path)
    if os.path.lexists(p):
        if folder and not p.is_dir():
            return "exists and is not a folder (expected a folder for the results)"
        if not folder and p.is_dir():
            return "is a folder (expected a file name)"
        if not folder and not p.is_file():
            return "exists and is not a regular file"
        for name in files if folder else ():
            if (p / name).is_dir():
                return f"holds a folder named {name}, where a result file goes"
        where = p if folder else p.parent
    else:
        where = p.parent
        while not os.path.lexists(where) and where != where.parent:
            where = where.parent
        if not where.is_dir():
            return f"cannot be made: {where} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".pipedec-probe-")
    except OSError as e:
        return f"cannot write in {where}: {e.strerror or e}"
    os.close(fd)
    os.unlink(probe)
    return None


def check_distinct(outputs: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """InputError if two outputs are one file (the later would silently overwrite the
    earlier): `outputs` are (flag, path) pairs, a results folder given as its files."""
    seen: dict[str, str] = {}
    for field, path in outputs:
        if path is None:
            continue
        key = os.path.abspath(path)
        if seen.get(key, field) != field:
            raise InputError(f"is also where {seen[key]} writes", file=path, field=field)
        seen[key] = field


def check_output(path: str | os.PathLike | None, field: str, *, folder: bool = False,
                 files: Iterable[str] = ()) -> None:
    """InputError(field=`field`, e.g. "--out") if `path` cannot be written (output_problem);
    None (no output asked for) is fine."""
    if path is None:
        return
    problem = output_problem(path, folder=folder, files=files)
    if problem is not None:
        raise InputError(problem, file=path, field=field)
