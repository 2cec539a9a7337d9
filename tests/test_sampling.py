"""The core's seeded sampler (pipedec_sim/protocol/sampling.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipedec_sim.protocol.sampling import (
    GREEDY,
    Sampling,
    kept,
    probabilities,
    request_key,
    sample,
)

LOGITS = np.array([2.0, 1.5, 1.4, 0.3, 0.0, -0.5, -1.0, -3.0])


def chi_square_p(observed: np.ndarray, expected: np.ndarray) -> float:
    """Upper-tail p-value of Pearson's chi-square statistic (Wilson-Hilferty
    approximation of the chi-square distribution, good for 3+ degrees of freedom)."""
    stat = float(((observed - expected) ** 2 / expected).sum())
    k = len(observed) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def frequencies(sampling_of_seed, n: int, size: int) -> np.ndarray:
    counts = np.zeros(size)
    for s in range(n):
        counts[sample(LOGITS, sampling_of_seed(s), request=7, position=123)] += 1
    return counts


def test_temperature_zero_is_the_argmax_lowest_id_first():
    assert sample(LOGITS, GREEDY, 0, 0) == 0
    assert sample([1.0, 3.0, 3.0], GREEDY, 5, 9) == 1


def test_the_same_key_gives_the_same_token_and_seeds_differ():
    s = Sampling(temperature=1.0, seed=3)
    a = [sample(LOGITS, s, 1, p) for p in range(200)]
    assert a == [sample(LOGITS, s, 1, p) for p in range(200)]
    assert a != [sample(LOGITS, Sampling(temperature=1.0, seed=4), 1, p) for p in range(200)]
    assert a != [sample(LOGITS, s, 2, p) for p in range(200)]          # another request


@pytest.mark.parametrize("sampling", [Sampling(temperature=0.7), Sampling(temperature=1.0),
                                      Sampling(temperature=1.0, top_p=0.9),
                                      Sampling(temperature=0.7, top_k=3)])
def test_frequencies_over_seeds_match_the_target_distribution(sampling):
    """20,000 seeds at one position: Pearson's chi-square against the distribution the
    sampler claims (softmax at T over what top-k/top-p keep) is not rejected at p = 0.001,
    and the same counts reject the plain T = 1 softmax when that differs."""
    n = 20_000
    counts = frequencies(lambda s: Sampling(sampling.temperature, sampling.top_p,
                                            sampling.top_k, seed=s), n, LOGITS.size)
    p = probabilities(LOGITS, sampling)
    live = p > 0
    assert counts[~live].sum() == 0                    # filtered tokens never come out
    assert chi_square_p(counts[live], n * p[live]) > 1e-3
    plain = probabilities(LOGITS, Sampling(temperature=1.0))
    if not np.allclose(plain, p):
        assert chi_square_p(counts, n * plain + 1e-9) < 1e-6


def test_top_k_and_top_p_keep_the_best_tokens():
    scores = LOGITS / 1.0
    assert kept(scores, Sampling(1.0, top_k=2)).tolist() == [True, True] + [False] * 6
    assert kept(scores, Sampling(1.0, top_p=1e-9)).tolist() == [True] + [False] * 7
    p = probabilities(LOGITS, Sampling(1.0))
    mask = kept(scores, Sampling(1.0, top_p=0.9))
    assert p[mask].sum() >= 0.9 and p[mask][:-1].sum() < 0.9


def test_request_keys_are_stable_across_processes():
    # A fixed value: Python's own hash() is salted per process, this must not be.
    assert request_key("0") == 0x3AEFE6A1CEBE95C2
    assert request_key("0") != request_key("1")
    assert 0 <= request_key("some request") < 2 ** 63


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(temperature=float("nan")),
                                 dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(seed=-2)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        Sampling(**bad)
