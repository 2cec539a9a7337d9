"""The target's seeded sampler: one token per (request, position), whoever asks.

Speculation stays lossless under sampling if the target's token at a position is a fixed
function of that position's distribution, the seed, the request and the position, never of
the strategy, the batch or the backend. Then PipeDec's rule is unchanged: the target's
(sampled) token at the root is a hit when it is one of the root's children, and tree-SD
walks its tree with the sampled tokens, stopping at the first that is not a child. The
chance of a hit is the target's probability mass on those children, the most any rule can
get for a fixed set of children.

The sampler is Gumbel-max: token = argmax over the kept tokens of logits / T + g, with g
standard Gumbel noise from a counter-based generator (numpy's Philox) keyed on (seed,
request, position): the same noise for every strategy. Kept tokens follow Hugging Face's
order of warpers: temperature, then top-k, then top-p on what top-k kept. Temperature 0
is greedy: the argmax, exactly as before (ties: the lowest id).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Sampling:
    """How the target picks its token: temperature 0 is greedy."""
    temperature: float = 0.0
    top_p: float = 1.0          # nucleus: the smallest set holding this much probability
    top_k: int = 0              # at most this many candidates (0: no limit)
    seed: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        parts = [f"sampled at temperature {self.temperature:g}"]
        if self.top_p < 1:
            parts.append(f"top-p {self.top_p:g}")
        if self.top_k:
            parts.append(f"top-k {self.top_k}")
        return ", ".join(parts + [f"seed {self.seed}"])


GREEDY = Sampling()


def request_key(request_id: str) -> int:
    """A request's sampling key: a stable 63-bit hash of its id (Python's hash() is salted
    per process, and the stages are separate processes)."""
    digest = hashlib.blake2b(str(request_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def gumbel(sampling: Sampling, request: int, position: int, size: int) -> np.ndarray:
    """Standard Gumbel noise for every token id at (request, position)."""
    key = np.array([(sampling.seed * 0x9E3779B97F4A7C15 + request) & MASK64,
                    position & MASK64], dtype=np.uint64)     # (a list would go via float)
    u = np.random.Generator(np.random.Philox(key=key)).random(size)
    with np.errstate(divide="ignore"):
        return -np.log(-np.log(u))


def kept(scores: np.ndarray, sampling: Sampling) -> np.ndarray:
    """Which tokens top-k and top-p keep, given temperature-scaled logits (a bool mask)."""
    keep = np.ones(scores.shape, dtype=bool)
    order = np.argsort(-scores, kind="stable")          # best first, ties by id
    if sampling.top_k and sampling.top_k < scores.size:
        keep[order[sampling.top_k:]] = False
    if sampling.top_p < 1.0:
        z = np.where(keep, scores, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        cum = np.cumsum(p[order])
        last = int(np.searchsorted(cum, sampling.top_p))  # first prefix holding top_p
        keep[order[last + 1:]] = False
    return keep


def sample(logits, sampling: Sampling, request: int, position: int) -> int:
    """The target's token at `position` of `request` from its logits there."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    if sampling.greedy:
        return int(np.argmax(x))
    scores = x / sampling.temperature
    noisy = np.where(kept(scores, sampling), scores + gumbel(sampling, request, position,
                                                            x.size), -np.inf)
    return int(np.argmax(noisy))


def probabilities(logits, sampling: Sampling) -> np.ndarray:
    """The distribution `sample` draws from (for checks): softmax over the kept tokens."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    if sampling.greedy:
        out = np.zeros(x.size)
        out[int(np.argmax(x))] = 1.0
        return out
    scores = x / sampling.temperature
    z = np.where(kept(scores, sampling), scores, -np.inf)
    p = np.exp(z - z.max())
    return p / p.sum()
