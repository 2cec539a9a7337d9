"""Speculation traces: what the target generated and what the draft proposed on the true path.

A trace is JSONL (optionally gzipped). Line 1 is a header; every further line is one request:
the target's greedy output token ids and, for each output position, the draft's top-k token ids
and probabilities given the true prefix. That is enough to replay acceptance exactly on the true
path for any tree policy. See traces/README.md for the field-by-field format.

Reading validates every field and raises `InputError(file=, line=, field=)` on the first problem,
so a bad trace stops at the edge instead of deep inside a simulation.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import gzip
import json
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, NoReturn

from pipedec_sim.atomic import write_bytes
from pipedec_sim.errors import InputError
from pipedec_sim.inputs.acceptance_model import AcceptanceModel
from pipedec_sim.inputs.files import (
    FilePath,
    file_problem,
    iter_lines,
    json_type,
    load_json,
    open_text,
    short,
    utf8_problem,
)
from pipedec_sim.inputs.limits import MAX_OUTPUT_LEN, MAX_PROMPT_LEN, MAX_TOP_K, SNIFF_BYTES
from pipedec_sim.protocol.sampling import GREEDY, Sampling

FORMAT = "pipedec-trace/1"
SOURCES = ("recorded", "synthetic")
_HEADER_STR_FIELDS = ("target", "draft", "tokenizer", "dataset", "command")
_HEADER_KEYS = {"format", "source", *_HEADER_STR_FIELDS, "top_k", "created",
                "acceptance_model", "notes", "sampling"}
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Probabilities are usually rounded (4 decimals in bundled files): a row's sum and its order may
# be off by rounding, not by more.
_PROB_TOL = 1e-3
# The header's format key, for a first line the sniffer cannot decode whole.
_FORMAT_KEY = re.compile(r'(?<!\\)"format"\s*:\s*"' + re.escape(FORMAT) + '"')

@dataclass
class TraceHeader:
    source: str
    target: str
    draft: str
    tokenizer: str
    dataset: str
    top_k: int
    command: str
    created: str
    acceptance_model: dict | None = None
    notes: str = ""
    # How the target chose its tokens (protocol.sampling.Sampling's fields); None: greedy.
    sampling: dict | None = None
    extra: dict = field(default_factory=dict)  # unknown header keys, kept for round trips


@dataclass
class TraceRequest:
    id: str
    prompt_len: int
    output: list[int]
    topk_ids: list[list[int]]
    topk_probs: list[list[float]]
    prompt_ids: list[int] | None = None


@dataclass
class Trace:
    header: TraceHeader
    requests: list[TraceRequest]
    path: str | None = None


# ----------------------------------------------------------------------------- validation

def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


class _Checker:
    """Raises InputError located at one line of one file."""

    def __init__(self, file: FilePath | None, line: int | None):
        self.file, self.line = file, line

    def fail(self, field_name: str | None, message: str) -> NoReturn:
        raise InputError(message, file=self.file, line=self.line, field=field_name)

    def get(self, obj: dict, key: str) -> Any:
        if key not in obj:
            self.fail(key, "missing")
        return obj[key]

    def string(self, obj: dict, key: str) -> str:
        v = self.get(obj, key)
        if not isinstance(v, str):
            self.fail(key, f"expected a string, got {json_type(v)}")
        return self.utf8(v, key)

    def utf8(self, v: str, name: str) -> str:
        problem = utf8_problem(v)
        if problem:
            self.fail(name, problem)
        return v

    def int_at_least(self, v: Any, name: str, low: int, high: int | None = None) -> int:
        if not _is_int(v):
            self.fail(name, f"expected an integer, got {json_type(v)}")
        if v < low:
            self.fail(name, f"must be >= {low}, got {short(v)}")
        if high is not None and v > high:
            self.fail(name, f"must be <= {high} (the limit), got {short(v)}")
        return v

    def token_list(self, v: Any, name: str, min_len: int = 0) -> list[int]:
        if not isinstance(v, list):
            self.fail(name, f"expected an array of token ids, got {json_type(v)}")
        if len(v) < min_len:
            self.fail(name, f"must hold at least {min_len} token id(s), got {len(v)}")
        for i, t in enumerate(v):
            if not _is_int(t) or t < 0:
                self.fail(f"{name}[{i}]", f"expected a token id (integer >= 0), got {t!r}")
        return v


def parse_header(obj: Any, *, file: FilePath | None = None, line: int | None = 1) -> TraceHeader:
    """Validate a decoded header line."""
    ck = _Checker(file, line)
    if not isinstance(obj, dict):
        ck.fail(None, f"header must be a JSON object, got {json_type(obj)}")
    fmt = obj.get("format")
    if fmt != FORMAT:
        hint = " (is this a speculation trace?)" if fmt is None else ""
        ck.fail("format", f"expected {FORMAT!r}, got {fmt!r}{hint}")
    source = ck.string(obj, "source")
    if source not in SOURCES:
        ck.fail("source", f"expected one of {', '.join(SOURCES)}, got {source!r}")
    strs = {k: ck.string(obj, k) for k in _HEADER_STR_FIELDS}
    top_k = ck.int_at_least(ck.get(obj, "top_k"), "top_k", 1, MAX_TOP_K)
    created = ck.string(obj, "created")
    if not _valid_date(created):
        ck.fail("created", f"expected a date YYYY-MM-DD, got {created!r}")
    acceptance = obj.get("acceptance_model")
    if acceptance is not None:
        acceptance = _check_acceptance(acceptance, source, ck)
    notes = obj.get("notes", "")
    if not isinstance(notes, str):
        ck.fail("notes", f"expected a string, got {json_type(notes)}")
    ck.utf8(notes, "notes")
    sampling = _check_sampling(obj["sampling"], ck) if obj.get("sampling") is not None else None
    extra = {k: v for k, v in obj.items() if k not in _HEADER_KEYS}
    return TraceHeader(source=source, top_k=top_k, created=created, acceptance_model=acceptance,
                       notes=notes, sampling=sampling, extra=extra, **strs)


def _check_sampling(d: Any, ck: _Checker) -> dict:
    """A header's `sampling`: the Sampling fields the target was sampled with."""
    if not isinstance(d, dict):
        ck.fail("sampling", f"expected an object, got {json_type(d)}")
    known = {f.name for f in dataclasses.fields(Sampling)}
    for k in d:
        if k not in known:
            ck.fail(f"sampling.{k}", f"unknown setting; known: {', '.join(sorted(known))}")
    try:
        Sampling(**d)
    except (TypeError, ValueError) as e:
        ck.fail("sampling", str(e))
    return dict(d)


def trace_sampling(header: TraceHeader) -> Sampling:
    """How the trace's target tokens were chosen (greedy when the header says nothing)."""
    return Sampling(**header.sampling) if header.sampling else GREEDY


def _valid_date(s: str) -> bool:
    if not _DATE_RE.match(s):
        return False
    try:
        _dt.date.fromisoformat(s)
    except ValueError:
        return False
    return True


def _check_acceptance(d: Any, source: str, ck: _Checker) -> dict:
    if source != "synthetic":
        ck.fail("acceptance_model", "only synthetic traces carry an acceptance model")
    try:
        AcceptanceModel.from_dict(d)
    except InputError as e:
        sub = f"acceptance_model.{e.field}" if e.field else "acceptance_model"
        ck.fail(sub, e.message)
    return d


def parse_request(obj: Any, top_k: int, *, file: FilePath | None = None,
                  line: int | None = None) -> TraceRequest:
    """Validate a decoded request line against the header's top_k."""
    ck = _Checker(file, line)
    if not isinstance(obj, dict):
        ck.fail(None, f"request must be a JSON object, got {json_type(obj)}")
    rid = ck.get(obj, "id")
    if not (isinstance(rid, str) or _is_int(rid)) or rid == "":
        ck.fail("id", f"expected a non-empty string or an integer, got {short(rid)}")
    if isinstance(rid, str):
        ck.utf8(rid, "id")
    prompt_len = ck.int_at_least(ck.get(obj, "prompt_len"), "prompt_len", 1, MAX_PROMPT_LEN)
    output = ck.token_list(ck.get(obj, "output"), "output", min_len=1)
    if len(output) > MAX_OUTPUT_LEN:
        ck.fail("output", f"has {len(output)} tokens, more than the limit of {MAX_OUTPUT_LEN}")
    topk_ids = _check_topk_ids(ck.get(obj, "draft_topk"), len(output), top_k, ck)
    topk_probs = _check_topk_probs(ck.get(obj, "draft_probs"), topk_ids, ck)
    prompt_ids = obj.get("prompt_ids")
    if prompt_ids is not None:
        ck.token_list(prompt_ids, "prompt_ids")
        if len(prompt_ids) != prompt_len:
            ck.fail("prompt_ids", f"has {len(prompt_ids)} ids but prompt_len is {prompt_len}")
    return TraceRequest(id=str(rid), prompt_len=prompt_len, output=output, topk_ids=topk_ids,
                        topk_probs=topk_probs, prompt_ids=prompt_ids)


def _check_topk_ids(rows: Any, n: int, top_k: int, ck: _Checker) -> list[list[int]]:
    if not isinstance(rows, list):
        ck.fail("draft_topk", f"expected an array of rows, got {json_type(rows)}")
    if len(rows) != n:
        ck.fail("draft_topk", f"has {len(rows)} rows but output has {n} tokens "
                "(need one per position)")
    for i, row in enumerate(rows):
        name = f"draft_topk[{i}]"
        ck.token_list(row, name, min_len=1)
        if len(row) > top_k:
            ck.fail(name, f"has {len(row)} ids but the header's top_k is {top_k}")
        if len(set(row)) != len(row):
            dup = next(t for t in row if row.count(t) > 1)
            ck.fail(name, f"token id {dup} appears more than once")
    return rows


def _check_topk_probs(rows: Any, ids: list[list[int]], ck: _Checker) -> list[list[float]]:
    if not isinstance(rows, list):
        ck.fail("draft_probs", f"expected an array of rows, got {json_type(rows)}")
    if len(rows) != len(ids):
        ck.fail("draft_probs", f"has {len(rows)} rows but draft_topk has {len(ids)}")
    for i, (row, id_row) in enumerate(zip(rows, ids)):
        name = f"draft_probs[{i}]"
        if not isinstance(row, list) or len(row) != len(id_row):
            got = f"{len(row)} values" if isinstance(row, list) else json_type(row)
            ck.fail(name, f"expected {len(id_row)} probabilities (as in draft_topk[{i}]), "
                    f"got {got}")
        for j, p in enumerate(row):
            if not _is_num(p) or not 0.0 <= p <= 1.0:
                ck.fail(f"{name}[{j}]", f"expected a probability in [0, 1], got {p!r}")
            if j and p > row[j - 1] + _PROB_TOL:
                ck.fail(f"{name}[{j}]", f"{p} is larger than the previous {row[j - 1]}: "
                        "top-k must be ordered best first")
        if sum(row) > 1.0 + _PROB_TOL:
            ck.fail(name, f"probabilities sum to {sum(row):.6g} > 1")
    return rows


# ----------------------------------------------------------------------------- read / write

def read_trace(path: FilePath, *, max_requests: int | None = None) -> Trace:
    """Read and validate a trace (.jsonl or .jsonl.gz); raise InputError on the first problem."""
    if max_requests is not None and (not _is_int(max_requests) or max_requests < 1):
        raise InputError(f"must be a positive integer, got {max_requests!r}", field="max_requests")
    header: TraceHeader | None = None
    requests: list[TraceRequest] = []
    seen: dict[str, int] = {}
    last = 0
    for lineno, text in iter_lines(path):
        last = lineno
        if not text.strip():
            continue  # blank lines (e.g. a trailing one) carry nothing
        obj = _decode_line(text, path, lineno)
        if header is None:
            header = parse_header(obj, file=path, line=lineno)
            continue
        req = parse_request(obj, header.top_k, file=path, line=lineno)
        if req.id in seen:
            raise InputError(f"duplicate id {req.id!r} (first on line {seen[req.id]})",
                             file=path, line=lineno, field="id")
        seen[req.id] = lineno
        requests.append(req)
        if max_requests is not None and len(requests) >= max_requests:
            break
    if header is None:
        raise InputError("empty file: expected a trace header line", file=path)
    if not requests:
        raise InputError("no requests after the header", file=path, line=last + 1)
    return Trace(header=header, requests=requests, path=os.fspath(path))


def _decode_line(text: str, path: FilePath, lineno: int) -> Any:
    return load_json(text, file=path, line=lineno)


def header_to_dict(h: TraceHeader) -> dict:
    d: dict[str, Any] = {"format": FORMAT, "source": h.source, "target": h.target,
                         "draft": h.draft, "tokenizer": h.tokenizer, "dataset": h.dataset,
                         "top_k": h.top_k, "command": h.command, "created": h.created}
    if h.acceptance_model is not None:
        d["acceptance_model"] = h.acceptance_model
    if h.notes:
        d["notes"] = h.notes
    if h.sampling is not None:
        d["sampling"] = h.sampling
    for k, v in h.extra.items():
        d.setdefault(k, v)  # never let an extra key shadow a known one
    return d


def request_to_dict(r: TraceRequest) -> dict:
    d: dict[str, Any] = {"id": r.id, "prompt_len": r.prompt_len, "output": r.output,
                         "draft_topk": r.topk_ids, "draft_probs": r.topk_probs}
    if r.prompt_ids is not None:
        d["prompt_ids"] = r.prompt_ids
    return d


def write_trace(trace: Trace, path: FilePath) -> None:
    """Validate, then write atomically; gzip when `path` ends with .gz (reproducible bytes)."""
    lines = [header_to_dict(trace.header)] + [request_to_dict(r) for r in trace.requests]
    # Validate what we are about to write so that a bad trace fails here, not when read back.
    header = parse_header(lines[0], file=path, line=1)
    seen: set[str] = set()
    for i, d in enumerate(lines[1:], start=2):
        req = parse_request(d, header.top_k, file=path, line=i)
        if req.id in seen:
            raise InputError(f"duplicate id {req.id!r}", file=path, line=i, field="id")
        seen.add(req.id)
    if not trace.requests:
        raise InputError("a trace needs at least one request", file=path, line=2)
    text = "".join(json.dumps(d, separators=(",", ":"), ensure_ascii=False) + "\n" for d in lines)
    problem = utf8_problem(text)
    if problem:
        raise InputError(f"cannot be written as UTF-8: a value {problem}", file=path)
    data = text.encode("utf-8")
    if os.fspath(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    write_bytes(path, data)


def is_trace_file(path: FilePath) -> bool:
    """True if the first line is a JSON object whose format is FORMAT.

    Reads at most SNIFF_BYTES (don't slurp a binary file). A first line that is longer, or
    that does not decode, is a trace if it carries the header's format key: read_trace then
    reads it whole, or says what is wrong with it. False for anything but a regular file,
    which is never opened (a FIFO would block): the reader that follows says what it is.
    """
    if file_problem(path) is not None:
        return False
    try:
        with open_text(path) as f:
            first = f.readline(SNIFF_BYTES)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError):
        return False
    try:
        obj = json.loads(first)
    except (ValueError, RecursionError):
        return first.lstrip().startswith("{") and _FORMAT_KEY.search(first) is not None
    return isinstance(obj, dict) and obj.get("format") == FORMAT
