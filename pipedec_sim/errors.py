"""Errors for bad input: one message naming the file, the line and the field.

Every reader (traces, profiles, prompt files, CLI flags) raises `InputError`; the CLIs
catch it, print `str(err)` and exit with status 2, never a traceback.
"""
from __future__ import annotations

import errno
import sys
from os import PathLike
from typing import Callable


class InputError(ValueError):
    """Bad user input. `str()` gives `FILE:LINE: field 'F': message`."""

    def __init__(self, message: str, *, file: str | PathLike | None = None,
                 line: int | None = None, field: str | None = None):
        self.message = message
        self.file = None if file is None else str(file)
        self.line = line
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
        parts = [where] if where else []
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        parts.append(self.message)
        return ": ".join(parts)


# What the machine, not the input, can refuse while results are written (a full disk, a
# quota, a folder made read-only during the run): one line and status 1, not a traceback.
STORAGE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                            errno.EPERM, errno.EIO, errno.EFBIG})


def guarded(prog: str, command: Callable[[], int]) -> int:
    """Run a CLI command: bad input is one line on stderr and status 2, never a traceback;
    a storage failure (STORAGE_ERRORS) is one line and status 1."""
    try:
        return command()
    except InputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in STORAGE_ERRORS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
