"""Test helpers: small trace builders (exact hit models instead of sampled confidences)
and a process finder for the real-backend tests."""
from __future__ import annotations

import os
import random

from pipedec_sim.inputs.traces import Trace, TraceHeader, TraceRequest


def header(top_k: int) -> TraceHeader:
    return TraceHeader(source="synthetic", target="test", draft="test", tokenizer="none",
                       dataset="test", top_k=top_k, command="tests", created="2026-11-26")


def bernoulli_trace(requests: int, length: int, p: float, *, k: int = 4, prompt_len: int = 8,
                    seed: int = 0) -> Trace:
    """At each position the draft's top-1 is the target's token with probability p;
    otherwise the target's token is not in the draft's top-k at all."""
    rng = random.Random(seed)
    reqs = []
    for r in range(requests):
        out = [rng.randrange(1000) for _ in range(length)]
        ids, probs = [], []
        for t in out:
            others = rng.sample(range(1000, 100_000), k)
            ids.append([t] + others[: k - 1] if rng.random() < p else others)
            probs.append([round(0.5 ** (i + 1), 6) for i in range(k)])
        reqs.append(TraceRequest(str(r), prompt_len, out, ids, probs))
    return Trace(header(k), reqs)


def random_trace(rng: random.Random, requests: int, length: int, k: int, prompt_len: int) -> Trace:
    """Truth at a random rank (or absent); random but ordered probabilities."""
    reqs = []
    for r in range(requests):
        out = [rng.randrange(50) for _ in range(length)]   # small vocab: many collisions
        ids, probs = [], []
        for t in out:
            cand = [x for x in rng.sample(range(60), k + 1) if x != t][:k]
            rank = rng.randrange(k + 1)
            if rank < k:
                cand[rank] = t
            ids.append(cand)
            raw = sorted((rng.random() for _ in range(k)), reverse=True)
            s = sum(raw) * (1 + rng.random())
            probs.append([v / s for v in raw])
        reqs.append(TraceRequest(str(r), prompt_len, out, ids, probs))
    return Trace(header(k), reqs)


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries `tag`: a launched CLI and everything it spawned
    (environments are inherited), so tests can check for and kill leftovers."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if tag.encode() in fh.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids
