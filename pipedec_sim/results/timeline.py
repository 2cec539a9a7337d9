"""Chrome/Perfetto trace JSON: one process per run, one track per actor; instant events
(the head's commits: hit, miss, stall, accept, token) are thread-scoped ("s": "t"), so
viewers draw them on the head's track rather than across the whole trace."""
from __future__ import annotations

import json

from pipedec_sim.atomic import write_text

_ORDER = ("head", "draft", "lm_head")


def _sort_key(tid: str):
    if tid.startswith("stage"):
        return (1, int(tid[5:]))
    return (0 if tid in _ORDER[:2] else 2, _ORDER.index(tid) if tid in _ORDER else 9)


def _scoped(e: dict) -> dict:
    """Instant events (commits: hit, miss, ...) drawn on their own track: thread scope."""
    if e.get("ph") in ("i", "I"):
        e["s"] = "t"
    return e


def chrome_trace(runs: dict[str, list[dict]]) -> dict:
    """`runs` maps a label (e.g. 'pipedec / request 0') to that run's events."""
    events = []
    for pid, (label, evs) in enumerate(runs.items()):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": label}})
        tids = sorted({e["tid"] for e in evs} | {"head"}, key=_sort_key)
        index = {t: i for i, t in enumerate(tids)}
        for t, i in index.items():
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": i,
                           "args": {"name": t}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": i,
                           "args": {"sort_index": i}})
        events += [_scoped({**e, "pid": pid, "tid": index[e["tid"]]}) for e in evs]
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path, runs: dict[str, list[dict]]) -> None:
    write_text(path, json.dumps(chrome_trace(runs)))
