"""Reading input files: regular files only, gzip-transparent text (a UTF-8 BOM dropped),
line iteration and JSON decoding, every OS, decoding and JSON error turned into
`InputError` naming the file (and line).

Every reader of the package goes through here, so one guard covers them all: a FIFO, a
device or a folder is refused before it is opened (opening a FIFO blocks forever), and
JSON nested deeper than MAX_JSON_DEPTH or holding an integer longer than Python converts
(MAX_INT_DIGITS) is one line of error, not a RecursionError or ValueError traceback.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import stat
import zlib
from contextlib import contextmanager
from os import PathLike
from typing import Any, Iterator

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.limits import MAX_INT_DIGITS, MAX_JSON_DEPTH

FilePath = str | PathLike   # what the readers take: a str or any os.PathLike


# ----------------------------------------------------------------------------- files

def file_problem(path: FilePath) -> str | None:
    """Why `path` cannot be read as an input file ("cannot read: no such file", "cannot
    read: is a folder, not a file", "cannot read: is a FIFO (named pipe), not a regular
    file"), or None for a regular file. Looks with os.stat only: never opens (or blocks
    on) it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "cannot read: no such file"
    except NotADirectoryError:
        return "cannot read: no such file (a parent is not a folder)"
    except OSError as e:
        return f"cannot read: {os_reason(e)}"
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        return "cannot read: is a folder, not a file"
    what = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode) else "a special file")
    return f"cannot read: is {what}, not a regular file"


def check_regular(path: FilePath) -> None:
    """InputError unless `path` is a regular file (see file_problem)."""
    problem = file_problem(path)
    if problem is not None:
        raise InputError(problem, file=path)


def open_text(path: FilePath) -> Any:
    """Open a regular text file for reading, gunzipping it if it starts with the gzip magic
    bytes; a leading UTF-8 byte-order mark is dropped."""
    check_regular(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, "r", encoding="utf-8-sig")


def read_text(path: FilePath) -> str:
    """Whole file as text (gzip transparent); OS and decoding errors become InputError."""
    try:
        with open_text(path) as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"cannot read: {os_reason(e)}", file=path) from None
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason})", file=path,
                         line=_first_bad_line(path)) from None


def os_reason(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__


def iter_lines(path: FilePath) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) pairs; I/O and decoding errors become InputError."""
    lineno = 0
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                yield lineno, line
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"cannot read: {os_reason(e)}", file=path,
                         line=lineno + 1 if lineno else None) from None
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason})", file=path,
                         line=_first_bad_line(path) or lineno + 1) from None


def _first_bad_line(path: FilePath) -> int | None:
    """The 1-based line holding the first byte that is not UTF-8 (text is decoded in
    chunks, so the decoder's error does not say which line)."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return lineno
    except (OSError, EOFError, zlib.error):
        pass
    return None


# ----------------------------------------------------------------------------- JSON

def load_json(text: str, *, file: FilePath | None, line: int | None = None,
              hint: str = "") -> Any:
    """Decode one JSON value: `text` is a whole file (line None: errors give the line in
    it) or line `line` of one. Every failure is an InputError naming the file and line;
    `hint` is added to syntax errors ("expected one object per line")."""
    with json_limits(text, file=file, line=line):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON: {e.msg} (column {e.colno}{hint})", file=file,
                             line=e.lineno if line is None else line) from None
    check_depth(value, text, file=file, line=line)
    return value


def raw_decode_json(decoder: json.JSONDecoder, text: str, pos: int, *,
                    file: FilePath | None) -> tuple[Any, int]:
    """`decoder.raw_decode(text, pos)` (one item of a longer text) with the same limits as
    load_json; json.JSONDecodeError is left to the caller (it may only mean "cut short")."""
    with json_limits(text, file=file, start=pos):
        value, end = decoder.raw_decode(text, pos)
    check_depth(value, text, file=file, start=pos)
    return value, end


@contextmanager
def json_limits(text: str, *, file: FilePath | None, line: int | None = None,
                start: int = 0) -> Iterator[None]:
    """Turn the decoder's own limits into InputError: RecursionError (nesting far past
    MAX_JSON_DEPTH) and ValueError for an integer past MAX_INT_DIGITS digits."""
    try:
        yield
    except RecursionError:
        raise _too_deep(text, file, line, start) from None
    except ValueError as e:
        if isinstance(e, json.JSONDecodeError) or "integer string conversion" not in str(e):
            raise
        m = re.compile(rf"\d{{{MAX_INT_DIGITS + 1}}}").search(text, start)
        where = line if line is not None else (_line_at(text, m.start()) if m else None)
        raise InputError(f"an integer has more than {MAX_INT_DIGITS} digits", file=file,
                         line=where) from None


def check_depth(value: Any, text: str, *, file: FilePath | None, line: int | None = None,
                start: int = 0) -> None:
    """InputError if `value` nests arrays and objects more than MAX_JSON_DEPTH deep.

    Iterative, and it only descends into containers that hold containers (`map(type)`
    runs in C), so a trace line of thousands of numbers costs next to nothing."""
    if not isinstance(value, (list, dict)):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep(text, file, line, start)
        items = v.values() if isinstance(v, dict) else v
        if _CONTAINERS.isdisjoint(set(map(type, items))):
            continue
        stack.extend((x, depth + 1) for x in items if isinstance(x, (list, dict)))


_CONTAINERS = {list, dict}


def _too_deep(text: str, file: FilePath | None, line: int | None, start: int) -> InputError:
    where = line if line is not None else _line_at(text, _deep_pos(text, start))
    return InputError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep", file=file,
                      line=where)


def _deep_pos(text: str, start: int) -> int:
    """Where nesting first passes MAX_JSON_DEPTH (only run to word an error)."""
    depth, in_str, escaped = 0, False, False
    for pos in range(start, len(text)):
        c = text[pos]
        if in_str:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return pos
        elif c in "]}":
            depth -= 1
    return start


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


# ----------------------------------------------------------------------------- values

def json_type(x: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            type(None): "null"}.get(type(x), type(x).__name__)


def utf8_problem(s: str) -> str | None:
    """Why string `s` cannot be written as UTF-8 (a lone surrogate from a JSON escape such
    as "\\ud800"), or None."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"holds {s[e.start:e.end].encode('unicode_escape').decode()} at character "
                f"{e.start}, which is not valid Unicode (a lone surrogate)")
    return None


def short(v: Any, limit: int = 60) -> str:
    """repr(v), cut to `limit` characters, for error messages about absurd values."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**30:
        return f"an integer of about {int(v.bit_length() * 0.30103) + 1} digits"
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."
