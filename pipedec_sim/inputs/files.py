"""Reading input files: gzip-transparent text, line iteration, OS and decoding errors turned
into `InputError` naming the file (and line)."""
from __future__ import annotations

import gzip
import zlib
from os import PathLike
from typing import Any, Iterator

from pipedec_sim.errors import InputError

FilePath = str | PathLike   # what the readers take: a str or any os.PathLike



def open_text(path: FilePath) -> Any:
    """Open a text file for reading, gunzipping it if it starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def read_text(path: FilePath) -> str:
    """Whole file as text (gzip transparent); OS and decoding errors become InputError."""
    try:
        with open_text(path) as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"cannot read: {os_reason(e)}", file=path) from None
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason})", file=path) from None


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
        raise InputError(f"not UTF-8 text ({e.reason})", file=path, line=lineno + 1) from None


def json_type(x: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            type(None): "null"}.get(type(x), type(x).__name__)
