"""Result tables on disk: CSV (the default) or Parquet (`--out-format`, needs pyarrow).

Parquet keeps each column's type (nullable integers, strings), so a table read back is
the frame that was written; CSV is what every tool reads. The programs write through a
temp file and a rename (`pipedec_sim.atomic`); these helpers only say what to call a
table and how to put a frame into a file.
"""
from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING

from pipedec_sim.errors import InputError

if TYPE_CHECKING:                       # pandas is imported where a table is written
    import pandas as pd

OUT_FORMATS = ("csv", "parquet")
DEFAULT_OUT_FORMAT = "csv"
INSTALL_PARQUET = "pip install 'pipedec-sim[parquet]'"


def table_name(stem: str, fmt: str = DEFAULT_OUT_FORMAT) -> str:
    """The file name of table `stem` (e.g. "summary") in format `fmt`."""
    return f"{stem}.{fmt}"


def table_names(stems, formats=OUT_FORMATS) -> tuple[str, ...]:
    """Every file name the tables `stems` can have (for output-path checks)."""
    return tuple(table_name(s, f) for s in stems for f in formats)


def check_out_format(fmt: str, field: str = "--out-format") -> None:
    """InputError (one line naming the flag) if `fmt` is unknown or cannot be written here:
    Parquet needs pyarrow. Called before any work."""
    if fmt not in OUT_FORMATS:
        raise InputError(f"unknown output format {fmt!r}; choose from {', '.join(OUT_FORMATS)}",
                         field=field)
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InputError(f"parquet output needs pyarrow, which is not installed: "
                             f"{INSTALL_PARQUET}", field=field) from None


def write_table(frame: "pd.DataFrame", path: str | PathLike, fmt: str = DEFAULT_OUT_FORMAT) -> None:
    """Write `frame` (no index) to `path` (a temp file, usually) in format `fmt`."""
    if fmt == "parquet":
        frame.to_parquet(path, index=False, engine="pyarrow")
    else:
        frame.to_csv(path, index=False)


def read_table(path: str | PathLike, fmt: str = DEFAULT_OUT_FORMAT) -> "pd.DataFrame":
    """A table written by `write_table`."""
    import pandas as pd
    if fmt == "parquet":
        return pd.read_parquet(path, engine="pyarrow")
    return pd.read_csv(path)
