"""Prompt-file readers (Alpaca, ShareGPT, MT-Bench, HumanEval, GSM8K, plain text).

Prompt files carry no draft proposals, so they run through an acceptance model
(`pipedec_sim.inputs.acceptance`). `load_workload` is the one entry point the CLI needs: it
accepts a speculation trace or any prompt file and says in one line what it used.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, NoReturn, overload

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.acceptance import (
    AcceptanceModel,
    acceptance_for_format,
    trace_from_prompts,
)
from pipedec_sim.inputs.files import (
    FilePath,
    json_type,
    load_json,
    raw_decode_json,
    read_text,
    short,
    utf8_problem,
)
from pipedec_sim.inputs.limits import MAX_PROMPT_LEN
from pipedec_sim.inputs.traces import FORMAT as TRACE_FORMAT
from pipedec_sim.inputs.traces import Trace, is_trace_file, read_trace, trace_sampling

FORMATS = ("alpaca", "sharegpt", "mtbench", "humaneval", "gsm8k", "plain")
# What `load_workload(format=)` (and `pipedec-sim run --format`) accepts: auto-detection,
# a speculation trace, or one of the prompt formats.
WORKLOAD_FORMATS = ("auto", "trace") + FORMATS
CHARS_PER_TOKEN = 4.0  # prompt files have no token ids: lengths are estimated from characters
_HUMAN = {"human", "user"}
_ASSISTANT = {"gpt", "chatgpt", "assistant", "bard", "bing", "model"}
# What may be left at a decode error when the text was merely cut short: a number fragment.
_NUMBER_FRAGMENT = re.compile(r"[-+.0-9eE]*")


@dataclass
class Prompt:
    id: str
    text: str
    dataset: str
    reference: str | None = None  # the reference answer, if the file has one


@dataclass
class _Item:
    """One decoded record and where it came from, for error messages."""
    obj: Any
    index: int  # 0-based record number
    line: int  # 1-based line where the record starts
    in_list: bool  # from a top-level JSON list (fields are named `[i].key`)

    def fail(self, path: FilePath, key: str | None, message: str) -> NoReturn:
        prefix = f"[{self.index}]" if self.in_list else ""
        name = (f"{prefix}.{key}" if prefix else key) if key else (prefix or None)
        raise InputError(message, file=path, line=self.line, field=name)

    @overload
    def string(self, path: FilePath, key: str, *, required: Literal[True] = True) -> str: ...
    @overload
    def string(self, path: FilePath, key: str, *, required: bool) -> str | None: ...

    def string(self, path: FilePath, key: str, *, required: bool = True) -> str | None:
        v = self.obj.get(key)
        if v is None and not required:
            return None
        if key not in self.obj:
            self.fail(path, key, "missing")
        if not isinstance(v, str):
            self.fail(path, key, f"expected a string, got {json_type(v)}")
        if required and not v.strip():
            self.fail(path, key, "is empty")
        return self.utf8(path, key, v)

    def utf8(self, path: FilePath, key: str, v: str) -> str:
        """`v` if it can be written out as UTF-8 (no lone surrogate from a JSON escape)."""
        problem = utf8_problem(v)
        if problem:
            self.fail(path, key, problem)
        return v


@dataclass
class _PromptFile:
    prompts: list[Prompt]
    format: str
    truncated: bool = False  # a JSON list cut off mid-item (read up to the last whole item)
    skipped: int = 0  # records with nothing to prompt with (ShareGPT without a human turn)
    state: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- record sources

def _iter_jsonl(text: str, path: FilePath) -> Iterator[_Item]:
    index = 0
    # split("\n"), not splitlines(): U+2028 may sit unescaped inside a JSON string.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        obj = load_json(line, file=path, line=lineno, hint="; expected one object per line")
        yield _Item(obj, index, lineno, in_list=False)
        index += 1


class _LineCounter:
    """Line number of increasing offsets in O(total length)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _iter_json_list(text: str, path: FilePath, state: dict) -> Iterator[_Item]:
    """Items of a top-level JSON list, one at a time.

    A file cut off mid-item (a truncated download; the ShareGPT package ships one) yields every
    whole item and sets state["truncated"]; a malformed item elsewhere is an error.
    """
    dec, lines, n = json.JSONDecoder(), _LineCounter(text), len(text)
    pos, index = _skip_ws(text, text.index("[") + 1), 0
    if pos < n and text[pos] == "]":
        return
    while True:
        if pos >= n:
            state["truncated"] = True
            return
        try:
            obj, end = raw_decode_json(dec, text, pos, file=path)
        except json.JSONDecodeError as e:
            if _cut_short(e, text):
                state["truncated"] = True
                return
            raise InputError(f"invalid JSON: {e.msg} (column {e.colno})", file=path,
                             line=e.lineno, field=f"[{index}]") from None
        yield _Item(obj, index, lines.at(pos), in_list=True)
        index += 1
        pos = _skip_ws(text, end)
        if pos < n and text[pos] == "]":
            return
        if pos < n and text[pos] != ",":
            raise InputError(f"invalid JSON: expected ',' or ']' after item {index - 1}",
                             file=path, line=lines.at(pos), field=f"[{index - 1}]")
        pos = _skip_ws(text, pos + 1)


def _cut_short(e: json.JSONDecodeError, text: str) -> bool:
    """Did decoding fail only because the text ends mid-item (rather than being malformed)?"""
    if e.msg.startswith("Unterminated string"):
        return True  # the string runs to the end of the file
    rest = text[e.pos:].strip()
    return (not rest or _NUMBER_FRAGMENT.fullmatch(rest) is not None
            or any(word.startswith(rest) for word in ("true", "false", "null")))


def _iter_plain(text: str, path: FilePath) -> Iterator[_Item]:
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield _Item(line.strip(), lineno - 1, lineno, in_list=False)


# ----------------------------------------------------------------------------- formats

def _alpaca(it: _Item, path: FilePath) -> Prompt:
    instruction = it.string(path, "instruction")
    extra = it.string(path, "input", required=False)
    text = instruction + ("\n\n" + extra if extra and extra.strip() else "")
    return Prompt(_record_id(it, path), text, "alpaca",
                  it.string(path, "output", required=False) or None)


def _sharegpt(it: _Item, path: FilePath) -> Prompt | None:
    turns = it.obj.get("conversations")
    if not isinstance(turns, list):
        it.fail(path, "conversations", f"expected an array of turns, got {json_type(turns)}")
    text = reference = None
    for j, turn in enumerate(turns):
        role, value = _turn(it, path, j, turn)
        if text is None and role in _HUMAN and value.strip():
            text = value
        elif text is not None and role in _ASSISTANT:
            reference = value or None
            break
    if text is None:
        return None  # real ShareGPT has empty and assistant-first conversations: skip, count
    return Prompt(_record_id(it, path), text, "sharegpt", reference)


def _turn(it: _Item, path: FilePath, j: int, turn: Any) -> tuple[str, str]:
    if not isinstance(turn, dict):
        it.fail(path, f"conversations[{j}]", "expected an object with 'from' and 'value'")
    for key in ("from", "value"):
        if not isinstance(turn.get(key), str):
            it.fail(path, f"conversations[{j}].{key}",
                    "missing" if key not in turn else "expected a string")
    return turn["from"].lower(), it.utf8(path, f"conversations[{j}].value", turn["value"])


def _mtbench(it: _Item, path: FilePath) -> Prompt:
    turns = it.obj.get("turns")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) \
            or not turns[0].strip():
        it.fail(path, "turns", "expected a non-empty array of strings")
    it.utf8(path, "turns[0]", turns[0])
    # MT-Bench's "reference" (math/coding only) is a terse answer key, not a response: using it
    # would make those outputs a few tokens long, so the output length stays max_new_tokens.
    return Prompt(_record_id(it, path, key="question_id"), turns[0], "mtbench")


def _humaneval(it: _Item, path: FilePath) -> Prompt:
    task = it.string(path, "task_id")
    return Prompt(task, it.string(path, "prompt"), "humaneval",
                  it.string(path, "canonical_solution", required=False) or None)


def _gsm8k(it: _Item, path: FilePath) -> Prompt:
    return Prompt(_record_id(it, path), it.string(path, "question"), "gsm8k",
                  it.string(path, "answer"))


def _plain(it: _Item, path: FilePath) -> Prompt:
    return Prompt(str(it.line), it.obj, "plain")


def _record_id(it: _Item, path: FilePath, key: str = "id") -> str:
    v = it.obj.get(key)
    if v is None:
        if key == "id":
            return str(it.index)  # Alpaca and GSM8K have no ids: use the record number
        it.fail(path, key, "missing")
    if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
        it.fail(path, key, f"expected a non-empty string or an integer, got {short(v)}")
    return it.utf8(path, key, v) if isinstance(v, str) else str(v)


_CONVERTERS: dict[str, Callable[[_Item, FilePath], Prompt | None]] = {
    "alpaca": _alpaca, "sharegpt": _sharegpt, "mtbench": _mtbench, "humaneval": _humaneval,
    "gsm8k": _gsm8k, "plain": _plain}


def _detect(it: _Item, path: FilePath) -> str:
    obj = it.obj
    if not isinstance(obj, dict):
        it.fail(path, None, f"expected a JSON object, got {json_type(obj)}")
    fmt = obj.get("format")
    if isinstance(fmt, str) and fmt.startswith("pipedec-trace"):
        msg = ("is a speculation trace header, not a prompt" if fmt == TRACE_FORMAT
               else f"unsupported trace format {fmt!r} (this version reads {TRACE_FORMAT!r})")
        it.fail(path, "format", msg)
    keys = set(obj)
    for fmt, needed in (("sharegpt", {"conversations"}), ("alpaca", {"instruction"}),
                        ("mtbench", {"turns"}), ("humaneval", {"task_id", "prompt"}),
                        ("gsm8k", {"question", "answer"})):
        if needed <= keys:
            return fmt
    it.fail(path, None, f"cannot tell the prompt format from the keys {sorted(keys)[:8]}: "
            "expected alpaca (instruction), sharegpt (conversations), mtbench (turns), "
            "humaneval (task_id, prompt) or gsm8k (question, answer); or name it with "
            f"--format ({', '.join(FORMATS)})")


# ----------------------------------------------------------------------------- entry points

def _is_plain(path: FilePath, text: str) -> bool:
    name = os.fspath(path).lower().removesuffix(".gz")
    if name.endswith(".txt"):
        return True
    return not name.endswith((".json", ".jsonl")) and text.lstrip()[:1] not in ("[", "{")


def _records(path: FilePath, text: str, fmt: str, state: dict) -> tuple[Iterator[_Item], bool]:
    """The file's records, and whether they are plain-text lines."""
    if fmt == "plain" or (fmt == "auto" and _is_plain(path, text)):
        return _iter_plain(text, path), True
    first = text.lstrip()[:1]
    if first == "[":
        return _iter_json_list(text, path, state), False
    if first != "{":
        line = 1 + text.count("\n", 0, len(text) - len(text.lstrip()))
        raise InputError("not JSON: expected a list of objects or one object per line",
                         file=path, line=line)
    return _iter_jsonl(text, path), False


def _read(path: FilePath, fmt: str, max_requests: int | None) -> _PromptFile:
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"unknown prompt format {fmt!r} (known: auto, {', '.join(FORMATS)})",
                         field="format")
    if max_requests is not None and (isinstance(max_requests, bool) or max_requests < 1):
        raise InputError(f"must be a positive integer, got {max_requests!r}", field="max_requests")
    text = read_text(path).lstrip("\ufeff")  # editors on Windows add a BOM
    if not text.strip():
        raise InputError("empty file: no prompts", file=path)
    out = _PromptFile(prompts=[], format=fmt)
    records, plain = _records(path, text, fmt, out.state)
    if plain:
        out.format = "plain"
    seen: set[str] = set()
    for it in records:
        if out.format == "auto":
            out.format = _detect(it, path)  # the first record decides
        elif not plain and not isinstance(it.obj, dict):
            it.fail(path, None, f"expected a JSON object, got {json_type(it.obj)}")
        prompt = _CONVERTERS[out.format](it, path)
        if prompt is None:
            out.skipped += 1
            continue
        if len(prompt.text) > MAX_PROMPT_LEN * CHARS_PER_TOKEN:
            it.fail(path, None, f"the prompt is about {len(prompt.text) / CHARS_PER_TOKEN:.0f} "
                    f"tokens long, more than the limit of {MAX_PROMPT_LEN}")
        prompt.id = _unique(prompt.id, seen)
        out.prompts.append(prompt)
        if max_requests is not None and len(out.prompts) >= max_requests:
            break
    out.truncated = bool(out.state.get("truncated"))
    if not out.prompts:
        fmt_name = "unknown" if out.format == "auto" else out.format
        why = f"; skipped {out.skipped} record(s) without a human turn" if out.skipped else ""
        raise InputError(f"no prompts found (format {fmt_name}{why})", file=path)
    return out


def _unique(pid: str, seen: set[str]) -> str:
    """Ids must be unique in a trace; real dumps repeat some, so suffix repeats."""
    new, n = pid, 1
    while new in seen:
        n += 1
        new = f"{pid}#{n}"
    seen.add(new)
    return new


def read_prompts(path: FilePath, *, format: str = "auto",
                 max_requests: int | None = None) -> list[Prompt]:
    """Read a prompt file; `format` is auto-detected from the content unless forced."""
    return _read(path, format, max_requests).prompts


def load_workload(path: FilePath, *, max_requests: int | None = None, max_new_tokens: int = 256,
                  seed: int = 0, acceptance: AcceptanceModel | None = None,
                  format: str = "auto", temperature: float | None = None
                  ) -> tuple[Trace, str]:
    """A trace file as is, or a prompt file run through an acceptance model.

    `format` (WORKLOAD_FORMATS) forces "trace" or a prompt format; "auto" sniffs the file.
    `temperature` (prompt files): the target's sampling temperature, which picks the bundled
    acceptance model fitted at it; a trace carries its own (a different one is an error).
    Returns the trace and one line saying what was used (for logs and result headers).
    """
    if format not in WORKLOAD_FORMATS:
        raise InputError(f"unknown format {format!r} (known: {', '.join(WORKLOAD_FORMATS)})",
                         field="format")
    name = os.path.basename(os.fspath(path))
    if format == "trace" or (format == "auto" and is_trace_file(path)):
        trace = read_trace(path, max_requests=max_requests)
        recorded = trace_sampling(trace.header).temperature
        if temperature is not None and temperature != recorded:
            raise InputError(f"the trace's target was sampled at temperature {recorded:g}, not "
                             f"{temperature:g}: --temperature picks the acceptance model of a "
                             "prompt file; a trace replays its own tokens", field="--temperature")
        return trace, _describe_trace(trace, name, acceptance)
    pf = _read(path, format, max_requests)
    model = acceptance or acceptance_for_format(pf.format, temperature or 0.0)
    if acceptance is not None and temperature is not None and acceptance.temperature != temperature:
        raise InputError(f"acceptance model {acceptance.name or 'given'} was fitted at "
                         f"temperature {acceptance.temperature:g}, not {temperature:g}",
                         field="--temperature")
    trace = trace_from_prompts(pf.prompts, model=model, max_new_tokens=max_new_tokens, seed=seed,
                               chars_per_token=CHARS_PER_TOKEN, dataset=f"{pf.format}: {name}")
    notes = [f"{pf.format}, {len(pf.prompts)} prompts"]
    if pf.truncated:
        notes.append("file truncated: read up to the last whole item")
    if pf.skipped:
        notes.append(f"skipped {pf.skipped} record(s) without a human turn")
    refs = sum(p.reference is not None for p in pf.prompts)
    outputs = (f"{max_new_tokens} tokens (max_new_tokens)" if not refs else
               f"the reference answers' estimated lengths, at most {max_new_tokens}"
               + ("" if refs == len(pf.prompts) else f" ({refs} have one, the rest "
                                                      f"{max_new_tokens})"))
    desc = (f"prompt file {name} ({'; '.join(notes)}) with acceptance model "
            f"{model.name or 'unnamed'} ({model.source or 'no source given'}); prompt "
            f"lengths estimated at {CHARS_PER_TOKEN:g} characters per token; outputs {outputs}")
    return trace, desc


def _describe_trace(trace: Trace, name: str, acceptance: AcceptanceModel | None) -> str:
    h = trace.header
    desc = (f"{h.source} trace {name} ({len(trace.requests)} requests; target {h.target}, "
            f"draft {h.draft}, dataset {h.dataset}; target tokens {trace_sampling(h).describe()})")
    if h.acceptance_model:
        desc += f" drawn from acceptance model {h.acceptance_model.get('name') or 'unnamed'}"
    if acceptance is not None:
        desc += "; the given acceptance model is unused: the trace carries its own proposals"
    return desc
