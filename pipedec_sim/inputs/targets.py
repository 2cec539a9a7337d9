"""Does a workload stand for the model the profile times? (a run's target-mismatch warning)

A trace names the target it was recorded with (header `target`); a synthetic trace or a
prompt file stands for the target of its acceptance model (`AcceptanceModel.target`). When
that target and the profile's are both known and differ (Llama-3.1-8B acceptance on a 70B
profile), `pipedec-sim run` says so on stderr and goes on.
"""
from __future__ import annotations

import re
import sys

# Names that stand for no model in particular.
UNSPECIFIED = {"", "synthetic", "unspecified", "unknown", "none", "constant-target"}
_SUFFIXES = ("-instruct", "-chat", "-hf", "-base", "-it")


def model_key(name: str) -> str:
    """A comparable key: lower case, organisation, notes in parentheses and instruct/chat
    suffixes dropped: 'meta-llama/Llama-3.1-70B-Instruct (shape)' -> 'llama-3.1-70b'."""
    key = re.sub(r"\(.*?\)", " ", name).strip().lower()
    key = key.split()[0] if key.split() else ""
    key = key.rsplit("/", 1)[-1].replace("_", "-")
    key = key.removeprefix("meta-")
    changed = True
    while changed:
        changed = False
        for s in _SUFFIXES:
            if key.endswith(s):
                key, changed = key[: -len(s)], True
    return key


def same_model(a: str, b: str) -> bool | None:
    """True/False when both name a model; None when either names none. One key extending
    the other at a '-' boundary counts as the same ('smollm2' and 'smollm2-135m')."""
    ka, kb = model_key(a), model_key(b)
    if ka in UNSPECIFIED or kb in UNSPECIFIED:
        return None
    short, long = sorted((ka, kb), key=len)
    return long == short or long.startswith(short + "-")


def workload_target(header, acceptance=None) -> tuple[str, str] | None:
    """(target name, what names it) for a loaded trace's header: its own target, else its
    acceptance model's (synthetic traces and prompt files), else the given model's."""
    if model_key(header.target) not in UNSPECIFIED:
        return header.target, "trace"
    model = header.acceptance_model or (acceptance.to_dict() if acceptance else None)
    if model and model.get("target"):
        return model["target"], f"acceptance model {model.get('name') or 'unnamed'}"
    return None


def target_mismatch(profile, header, acceptance=None) -> str | None:
    """The warning, or None when the workload's target is the profile's (or unknown)."""
    found = workload_target(header, acceptance)
    if found is None:
        return None
    name, where = found
    if same_model(name, profile.target.name) is False:
        return (f"warning: the {where} stands for target {name}, but profile {profile.name} "
                f"times {profile.target.name}: acceptance comes from one model pair, latency "
                "from another (pick an acceptance model for this target, e.g. a bundled "
                "*-proxy, or a profile of this target)")
    return None


def warn_target_mismatch(profile, header, acceptance=None, prog: str | None = None,
                         file=None) -> str | None:
    """Print `target_mismatch` (one line on stderr, prefixed by `prog`) if any."""
    msg = target_mismatch(profile, header, acceptance)
    if msg:
        print(f"{prog}: {msg}" if prog else msg, file=file or sys.stderr)
    return msg
