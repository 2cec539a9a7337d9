"""JSON form of the strategy's events and actions, for `--record-events` and replay.

A record file is JSONL: per request one `{"request": ...}` line (strategy name, prompt,
knobs: enough to rebuild the strategy), a `{"start": [actions]}` line, then one
`{"event": e, "actions": [...]}` line per event fed to the strategy. Replaying the events
into a fresh strategy must give the same actions: the proof that the backend only
executes what the shared scheduler decides.
"""
from __future__ import annotations

import json

from pipedec_sim.protocol.messages import (
    Batch,
    Commit,
    Draft,
    Drafted,
    EntryFree,
    Finish,
    Inject,
    Row,
    Update,
    Verified,
)


def _rows(rows) -> list:
    return [[r.id, r.parent, r.token, r.pos] for r in rows]


def _unrows(rows) -> tuple:
    return tuple(Row(*r) for r in rows)


def action_json(a) -> dict:
    if isinstance(a, Inject):
        b = a.batch
        return {"inject": {"id": b.id, "rows": _rows(b.rows), "kind": b.kind,
                           "verify_from": b.verify_from, "committed": b.committed}}
    if isinstance(a, Draft):
        return {"draft": {"ticket": a.ticket, "rows": _rows(a.rows), "want": list(a.want),
                          "k": a.k, "committed": a.committed}}
    if isinstance(a, Update):
        return {"update": {"commit": list(a.commit), "kill": list(a.kill)}}
    if isinstance(a, Commit):
        return {"commit": {"tokens": list(a.tokens), "drafted": a.drafted,
                           "outcome": a.outcome}}
    if isinstance(a, Finish):
        return {"finish": {}}
    raise TypeError(f"not an action: {a!r}")


def event_json(e) -> dict:
    if isinstance(e, Drafted):
        return {"drafted": {"ticket": e.ticket,
                            "proposals": [[i, [list(p) for p in props]]
                                          for i, props in e.proposals.items()]}}
    if isinstance(e, Verified):
        return {"verified": {"batch": e.batch, "tokens": [[i, t] for i, t in e.tokens.items()]}}
    if isinstance(e, EntryFree):
        return {"entry_free": {}}
    raise TypeError(f"not an event: {e!r}")


def event_from_json(d: dict):
    (kind, v), = d.items()
    if kind == "drafted":
        return Drafted(v["ticket"], {i: tuple((int(t), float(lp)) for t, lp in props)
                                     for i, props in v["proposals"]})
    if kind == "verified":
        return Verified(v["batch"], {i: t for i, t in v["tokens"]})
    if kind == "entry_free":
        return EntryFree()
    raise ValueError(f"unknown event kind {kind!r}")


def action_from_json(d: dict):
    (kind, v), = d.items()
    if kind == "inject":
        return Inject(Batch(v["id"], _unrows(v["rows"]), v["kind"], v["verify_from"],
                            v["committed"]))
    if kind == "draft":
        return Draft(v["ticket"], _unrows(v["rows"]), tuple(v["want"]), v["k"], v["committed"])
    if kind == "update":
        return Update(tuple(v["commit"]), tuple(v["kill"]))
    if kind == "commit":
        return Commit(tuple(v["tokens"]), v["drafted"], v["outcome"])
    if kind == "finish":
        return Finish()
    raise ValueError(f"unknown action kind {kind!r}")


class Recorder:
    """Appends one JSON line per strategy step to an open text file (or does nothing)."""

    def __init__(self, fh=None):
        self.fh = fh
        self.starts: list[int] = []     # where each request's record begins in the file

    def request(self, **info) -> None:
        if self.fh is not None:
            self.starts.append(self.fh.tell())
        self._write({"request": info})

    def keep(self, n: int) -> None:
        """Cut the file after the first n requests' records (a run that failed midway
        keeps the records of its finished request runs only)."""
        if self.fh is not None and n < len(self.starts):
            self.fh.seek(self.starts[n])
            self.fh.truncate()
            del self.starts[n:]

    def start(self, actions) -> None:
        self._write({"start": [action_json(a) for a in actions]})

    def step(self, event, actions) -> None:
        self._write({"event": event_json(event), "actions": [action_json(a) for a in actions]})

    def _write(self, obj) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(obj, separators=(",", ":")) + "\n")


def read_records(path) -> list[dict]:
    """Group a record file into requests: [{"request", "start", "steps": [(e, actions)]}]."""
    out: list[dict] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            if "request" in d:
                out.append({"request": d["request"], "start": None, "steps": []})
            elif "start" in d:
                out[-1]["start"] = [action_from_json(a) for a in d["start"]]
            else:
                out[-1]["steps"].append((event_from_json(d["event"]),
                                         [action_from_json(a) for a in d["actions"]]))
    return out
