"""Serving workloads: which requests arrive, and when.

A serving run issues many requests over time instead of one after another, so besides the
requests themselves it needs an arrival process: open loop (Poisson arrivals at a rate, or
times given in a file) or closed loop (N requests outstanding, a finish issuing the next).
`serve_workload` turns the serving flags into one `ServeWorkload`, checking them here so a
bad combination stops at the edge in one line naming the flag, never inside a simulation.

When a run asks for more requests than the trace holds, the extra ones are drawn from the
trace again (seeded), each copy under an id of its own.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from typing import NoReturn, Sequence

import numpy as np

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.files import FilePath, iter_lines, short
from pipedec_sim.inputs.limits import MAX_ARRIVAL_S, MAX_SEED
from pipedec_sim.inputs.traces import TraceRequest

ARRIVAL_KINDS = ("poisson", "closed", "given")
ARRIVAL_COLUMN = "arrival_s"      # the column read_arrivals takes from a CSV
# requests one serving run may issue: memory, not realism (each costs ~0.25 KB before it runs;
# a million is days of simulation)
MAX_SERVE_REQUESTS = 1_000_000
_CHUNK = 4096                     # Poisson gaps drawn at a time when cutting at a duration


@dataclass(frozen=True)
class ServeWorkload:
    """The requests of a serving run and how they are issued.

    Open loop (Poisson or given arrivals): `arrivals_ms` holds one time per request and
    `concurrency` is None. Closed loop: `arrivals_ms` is None and `concurrency` requests
    are outstanding at all times; a finish issues the next request at once, none after
    `duration_ms` (None: until all requests are issued). For open loop `duration_ms` is
    only informative: the arrivals were already cut at it.
    """
    requests: tuple[TraceRequest, ...]     # in issue order; ids unique
    arrivals_ms: tuple[float, ...] | None  # open loop: non-decreasing, first >= 0
    concurrency: int | None                # closed loop: requests outstanding
    duration_ms: float | None
    describe: str                          # one line for the CLI

    def __post_init__(self):
        if (self.arrivals_ms is None) == (self.concurrency is None):
            raise ValueError("a ServeWorkload has either arrival times or a concurrency")
        if self.arrivals_ms is not None:
            a = self.arrivals_ms
            if len(a) != len(self.requests):
                raise ValueError(f"{len(a)} arrival times for {len(self.requests)} requests")
            if a and (a[0] < 0 or any(y < x for x, y in zip(a, a[1:]))):
                raise ValueError("arrival times must be >= 0 and non-decreasing")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if len({r.id for r in self.requests}) != len(self.requests):
            raise ValueError("request ids must be unique")


# ----------------------------------------------------------------------------- arrival times

def poisson_arrivals(n: int, rate_per_s: float, seed: int) -> tuple[float, ...]:
    """n arrival times in ms: the running sum of n exponential gaps with mean 1000/rate,
    starting from 0 (so the first arrival is the first gap, not t=0)."""
    _check_rate(rate_per_s)
    if n < 0:
        raise InputError(f"must be >= 0, got {n}", field="--requests")
    gaps = np.random.default_rng(seed).exponential(1000.0 / rate_per_s, n)
    return tuple(np.cumsum(gaps).tolist())


def poisson_until(duration_ms: float, rate_per_s: float, seed: int,
                  cap: int | None = None) -> tuple[float, ...]:
    """The arrivals of poisson_arrivals (same seed: a prefix of its times) that fall within
    [0, duration_ms), at most `cap` of them."""
    _check_rate(rate_per_s)
    limit = MAX_SERVE_REQUESTS if cap is None else cap
    rng = np.random.default_rng(seed)
    times: list[float] = []
    last = 0.0
    while len(times) < limit:
        # Chunks of one generator draw the same gaps as one draw of their total size, and
        # cumsum adds in order, so the times match poisson_arrivals' bit for bit.
        gaps = rng.exponential(1000.0 / rate_per_s, _CHUNK)
        chunk = np.cumsum(np.concatenate(([last], gaps)))[1:]
        inside = chunk[chunk < duration_ms]
        times.extend(inside.tolist())
        if len(inside) < len(chunk):
            return tuple(times[:limit])
        last = float(chunk[-1])
    if cap is None:
        raise InputError(f"more than {MAX_SERVE_REQUESTS} requests would arrive: lower "
                         "--rate or --duration, or cap them with --requests", field="--rate")
    return tuple(times[:cap])


def read_arrivals(path: FilePath) -> tuple[float, ...]:
    """Arrival times in ms from a file of times in SECONDS.

    Either one number per line, or a CSV whose header has an `arrival_s` column; blank
    lines and lines starting with # are skipped in both. Times must be finite, >= 0 and
    non-decreasing; the first problem is an InputError naming the file, line and field.
    """
    column: int | None = None       # CSV: the arrival_s column; None: one number per line
    header_seen = False
    times: list[float] = []
    last_line = 0
    for lineno, text in iter_lines(path):
        last_line = lineno
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        if not header_seen and not times and not _is_number(text):
            column = _header_column(text, path, lineno)
            header_seen = True
            continue
        value = text if column is None else _csv_cell(text, column, path, lineno)
        times.append(_arrival_s(value, times[-1] if times else None, path, lineno) * 1000.0)
        if len(times) > MAX_SERVE_REQUESTS:
            raise InputError(f"more than {MAX_SERVE_REQUESTS} arrival times", file=path,
                             line=lineno, field=ARRIVAL_COLUMN)
    if not times:
        raise InputError("no arrival times (expected one number of seconds per line, or a "
                         f"CSV with an {ARRIVAL_COLUMN} column)", file=path, line=last_line + 1)
    return tuple(times)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _csv_row(text: str) -> list[str]:
    return [cell.strip() for cell in next(csv.reader([text]))]


def _header_column(text: str, path: FilePath, lineno: int) -> int:
    names = _csv_row(text)
    if ARRIVAL_COLUMN not in names:
        raise InputError(f"expected a number of seconds or a CSV header with an "
                         f"{ARRIVAL_COLUMN} column, got {short(text)}", file=path,
                         line=lineno, field=ARRIVAL_COLUMN)
    return names.index(ARRIVAL_COLUMN)


def _csv_cell(text: str, column: int, path: FilePath, lineno: int) -> str:
    row = _csv_row(text)
    if column >= len(row):
        raise InputError(f"has {len(row)} column(s), the header names {ARRIVAL_COLUMN} as "
                         f"column {column + 1}", file=path, line=lineno, field=ARRIVAL_COLUMN)
    return row[column]


def _arrival_s(value: str, previous_ms: float | None, path: FilePath, lineno: int) -> float:
    def fail(message: str) -> NoReturn:
        raise InputError(message, file=path, line=lineno, field=ARRIVAL_COLUMN)
    try:
        t = float(value)
    except ValueError:
        fail(f"expected a number of seconds, got {short(value)}")
    if not math.isfinite(t) or t < 0:
        fail(f"expected a finite time >= 0 s, got {short(value)}")
    if t > MAX_ARRIVAL_S:
        fail(f"must be <= {MAX_ARRIVAL_S:g} s (the limit), got {short(value)}")
    if previous_ms is not None and t * 1000.0 < previous_ms:
        fail(f"{t:g} s is before the previous arrival ({previous_ms / 1000.0:g} s): "
             "times must be non-decreasing")
    return t


# ----------------------------------------------------------------------------- requests

def draw_requests(requests: Sequence[TraceRequest], n: int,
                  seed: int) -> tuple[TraceRequest, ...]:
    """n requests: the first min(n, len) in file order, then copies drawn from all of them
    (numpy default_rng(seed), with replacement), each copy under a unique id "ID#K"."""
    if not requests:
        raise InputError("no requests to serve", field="--requests")
    if n < 1:
        raise InputError(f"must be >= 1, got {n}", field="--requests")
    out = list(requests[:n])
    used = {r.id for r in requests}
    copies: dict[str, int] = {}
    picks = np.random.default_rng(seed).choice(len(requests), size=max(n - len(out), 0))
    for i in picks:
        r = requests[int(i)]
        k = copies.get(r.id, 0) + 1
        while f"{r.id}#{k}" in used:      # an id in the file may look like a copy's
            k += 1
        copies[r.id] = k
        used.add(f"{r.id}#{k}")
        out.append(dataclasses.replace(r, id=f"{r.id}#{k}"))
    return tuple(out)


# ----------------------------------------------------------------------------- flags

def serve_workload(requests: Sequence[TraceRequest], *, n: int | None, rate: float | None,
                   concurrency: int | None, arrivals_file: FilePath | None = None,
                   duration_s: float | None, seed: int) -> ServeWorkload:
    """The workload of the serving flags: exactly one of --rate (Poisson), --concurrency
    (closed loop) and --arrivals (times from a file).

    --requests (n) defaults to the file's count of requests, or with --arrivals to the
    count of times there (n may only lower it). With --rate and --duration the Poisson
    arrivals within [0, duration) are kept (n, if given, caps them); --duration with
    --arrivals cuts the given times the same way; with --concurrency no request is issued
    after it.
    """
    modes = [rate is not None, concurrency is not None, arrivals_file is not None]
    if sum(modes) != 1:
        got = "none" if not any(modes) else "more than one"
        raise InputError(f"give exactly one of --rate, --concurrency, --arrivals (got {got})",
                         field="--rate")
    if not requests:
        raise InputError("no requests to serve", field="--requests")
    _check_seed(seed)
    if n is not None and (not _is_int(n) or not 1 <= n <= MAX_SERVE_REQUESTS):
        raise InputError(f"must be an integer in [1, {MAX_SERVE_REQUESTS}], got {short(n)}",
                         field="--requests")
    duration_ms = None
    if duration_s is not None:
        if not _positive(duration_s):
            raise InputError(f"must be a finite number of seconds > 0, got {short(duration_s)}",
                             field="--duration")
        duration_ms = duration_s * 1000.0
    within = f" within {duration_s:g} s" if duration_s is not None else ""

    if concurrency is not None:
        if not _is_int(concurrency) or concurrency < 1:
            raise InputError(f"must be an integer >= 1, got {short(concurrency)}",
                             field="--concurrency")
        reqs = draw_requests(requests, n or len(requests), seed)
        until = f", none issued after {duration_s:g} s" if duration_s is not None else ""
        return ServeWorkload(reqs, None, concurrency, duration_ms,
                             f"{_count(reqs, requests, seed)}, closed loop, {concurrency} "
                             f"outstanding{until}")
    if rate is not None:
        if duration_ms is not None:
            times = poisson_until(duration_ms, rate, seed, cap=n)
        else:
            times = poisson_arrivals(n or len(requests), rate, seed)
        how = f"Poisson {float(rate)} req/s{within} (seed {seed})"
    else:
        assert arrivals_file is not None
        times = read_arrivals(arrivals_file)
        if n is not None and n > len(times):
            raise InputError(f"asks for {n} requests but {arrivals_file} has only "
                             f"{len(times)} arrival times", field="--requests")
        times = times[:n] if n is not None else times
        if duration_ms is not None:
            times = tuple(t for t in times if t < duration_ms)
        how = f"arrivals from {arrivals_file}{within}"
    if not times:
        raise InputError(f"no request arrives within {duration_s:g} s: lengthen it"
                         + (" or raise --rate" if rate is not None else ""), field="--duration")
    if rate is not None and times[-1] > MAX_ARRIVAL_S * 1000.0:
        raise InputError(f"{rate:g} requests/s: the last of {len(times)} requests would arrive "
                         f"at {times[-1] / 1000.0:.3g} s, past the limit of {MAX_ARRIVAL_S:g} "
                         "s; raise --rate or lower --requests", field="--rate")
    reqs = draw_requests(requests, len(times), seed)
    return ServeWorkload(reqs, times, None, duration_ms, f"{_count(reqs, requests, seed)}, {how}")


def _count(drawn: Sequence[TraceRequest], original: Sequence[TraceRequest], seed: int) -> str:
    if len(drawn) <= len(original):
        return f"{len(drawn)} requests"
    return f"{len(drawn)} requests ({len(original)} distinct, repeats drawn with seed {seed})"


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _check_rate(rate_per_s: float) -> None:
    if not _positive(rate_per_s):
        raise InputError(f"must be a finite number of requests/s > 0, got {short(rate_per_s)}",
                         field="--rate")


def _check_seed(seed: int) -> None:
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"must be an integer in [0, {MAX_SEED}], got {short(seed)}",
                         field="--seed")
