"""The acceptance model: how a draft's top-k relates to the target's token, as a seeded
Beta-geometric distribution (draft confidence c ~ Beta(alpha, beta), rank r with probability
c (1-c)^r). Validated at the edge; traces carry one in synthetic headers."""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.files import FilePath, short, utf8_problem
from pipedec_sim.inputs.limits import MAX_BETA_PARAM, MAX_TOP_K, MAX_VOCAB

KIND = "beta-geometric"
_FIELDS = ("alpha", "beta", "top_k", "vocab", "name", "source", "target", "draft",
           "temperature")


@dataclass(frozen=True)
class AcceptanceModel:
    alpha: float
    beta: float
    top_k: int = 16
    vocab: int = 128256
    name: str = ""
    source: str = ""  # what it was fitted from, or "hand-set: ..."
    # The model pair it stands for (optional): a run warns when the profile's target is
    # another model (pipedec_sim.inputs.targets).
    target: str = ""
    draft: str = ""
    # The target's sampling temperature the fit stands for (0: greedy, as recorded traces
    # were before sampling): acceptance falls as the target samples.
    temperature: float = 0.0

    def __post_init__(self) -> None:
        _validate(asdict(self), file=None)

    @property
    def top1_agreement(self) -> float:
        """P(true token == draft top-1) = E[c]."""
        return self.alpha / (self.alpha + self.beta)

    def sample_position(self, rng: random.Random) -> tuple[list[int], list[float], int]:
        """One output position: (draft top-k ids best first, their probabilities, true token)."""
        c = rng.betavariate(self.alpha, self.beta)
        probs = [c * (1.0 - c) ** r for r in range(self.top_k)]
        rank = _draw_rank(probs, rng.random())
        true = rng.randrange(self.vocab)
        inside = rank < self.top_k
        ids = _distinct_ids(rng, self.vocab, self.top_k - inside, exclude=true)
        if inside:
            ids.insert(rank, true)
        return ids, probs, true

    def rank_probs(self) -> list[float]:
        """Expected P(true token at rank r), r < top_k: E[c (1-c)^r] = B(a+1, b+r) / B(a, b).

        Closed form, so exact and deterministic; 1 - sum() is the chance it is outside the top-k.
        """
        a, b = self.alpha, self.beta
        log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
        return [math.exp(math.lgamma(a + 1) + math.lgamma(b + r) - math.lgamma(a + b + r + 1)
                         - log_norm) for r in range(self.top_k)]

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("target", "draft", "temperature"):  # optional: absent when unset
            if not d[key]:
                del d[key]
        return {"kind": KIND, **d}

    @classmethod
    def from_dict(cls, d: Any, *, file: FilePath | None = None) -> "AcceptanceModel":
        """Validate a decoded JSON object; InputError names the file and field."""
        if not isinstance(d, dict):
            raise InputError("an acceptance model must be a JSON object", file=file)
        kind = d.get("kind", KIND)
        if kind != KIND:
            raise InputError(f"expected {KIND!r}, got {kind!r}", file=file, field="kind")
        unknown = sorted(set(d) - set(_FIELDS) - {"kind"})
        if unknown:
            raise InputError(f"unknown field (known: {', '.join(_FIELDS)})", file=file,
                             field=unknown[0])
        for key in ("alpha", "beta"):
            if key not in d:
                raise InputError("missing", file=file, field=key)
        values = {k: d[k] for k in _FIELDS if k in d}
        _validate(values, file=file)
        return cls(**values)


def _validate(d: dict, *, file: FilePath | None) -> None:
    def bad(key: str, msg: str) -> None:
        raise InputError(msg, file=file, field=key)

    for key in ("alpha", "beta"):
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            bad(key, f"expected a positive number, got {short(v)}")
        elif v > MAX_BETA_PARAM:
            bad(key, f"must be <= {MAX_BETA_PARAM:g} (the limit; Beta sampling stalls past it), "
                     f"got {short(v)}")
    for key, low, high in (("top_k", 1, MAX_TOP_K), ("vocab", 2, MAX_VOCAB)):
        v = d.get(key, 1 if key == "top_k" else 2)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            bad(key, f"expected an integer >= {low}, got {short(v)}")
        if v > high:
            bad(key, f"must be <= {high} (the limit), got {short(v)}")
    if d.get("vocab", 128256) <= d.get("top_k", 16):
        bad("vocab", f"must exceed top_k ({d.get('top_k', 16)}) to fill the top-k with "
                     "distinct ids")
    t = d.get("temperature", 0.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        bad("temperature", f"expected a number >= 0, got {short(t)}")
    for key in ("name", "source", "target", "draft"):
        if not isinstance(d.get(key, ""), str):
            bad(key, f"expected a string, got {short(d[key])}")
        problem = utf8_problem(d.get(key, ""))
        if problem:
            bad(key, problem)


def _draw_rank(probs: list[float], u: float) -> int:
    """Rank r with probability probs[r]; len(probs) (outside the top-k) with the rest."""
    acc = 0.0
    for r, p in enumerate(probs):
        acc += p
        if u < acc:
            return r
    return len(probs)


def _distinct_ids(rng: random.Random, vocab: int, n: int, *, exclude: int) -> list[int]:
    ids = rng.sample(range(vocab), n + 1)  # one spare in case `exclude` is drawn
    if exclude in ids:
        ids.remove(exclude)
    return ids[:n]
