"""Fit the analytic model's efficiency factors (`roofline.py`) to a measured GPU profile and
report the fit's error at every grid point.

The fit minimises, over the layer, draft-step and LM-head grids, the sum of each grid's mean
squared log ratio model / measured (every grid weighs the same, however many points it has),
by Nelder-Mead over the logs of the positive factors (knee - 1 for the knee), restarted until
it stops improving. Deterministic: no random starts. The embedding, KV compaction and head
overhead are not fitted: the first is a median offset, the others are one measured number.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .model import Profile
from .roofline import (
    COMPACT_CONTEXT,
    COMPACT_LAYERS,
    Efficiency,
    Hardware,
    draft_step_ms,
    embed_ms,
    layer_ms,
    lm_head_ms,
)

FITTED = ("mem_eff", "flop_eff", "gemm_half_hidden", "knee", "attn_bytes",
          "attn_bytes_single", "attn_flop_eff", "layer_ms", "lm_head_ms", "draft_step_ms")
GRIDS = ("layer", "draft_step", "lm_head")


@dataclass(frozen=True)
class PointError:
    grid: str             # layer, draft_step or lm_head
    tokens: int
    context: int | None   # None for lm_head
    measured_ms: float
    model_ms: float

    @property
    def rel(self) -> float:
        return self.model_ms / self.measured_ms - 1.0


@dataclass(frozen=True)
class FitReport:
    efficiency: Efficiency
    points: tuple[PointError, ...]
    loss: float

    def grid(self, name: str) -> list[PointError]:
        return [p for p in self.points if p.grid == name]

    def summary(self, name: str) -> tuple[float, float]:
        """(median, worst) of |model / measured - 1| over one grid."""
        errs = [abs(p.rel) for p in self.grid(name)]
        return statistics.median(errs), max(errs)


def _axes(profile: Profile):
    g = profile.layer
    n, c = np.meshgrid(np.array(g.tokens, float), np.array(g.context, float), indexing="ij")
    return n, c


def _model(hw: Hardware, e: Efficiency, profile: Profile) -> dict[str, np.ndarray]:
    n, c = _axes(profile)
    dn, dc = np.meshgrid(np.array(profile.draft_step.tokens, float),
                         np.array(profile.draft_step.context, float), indexing="ij")
    hn = np.array(profile.lm_head.xs, float)
    return {"layer": layer_ms(hw, e, profile.target, n, c),
            "draft_step": draft_step_ms(hw, e, profile.draft, dn, dc),
            "lm_head": lm_head_ms(hw, e, profile.target, hn)}


def _measured(profile: Profile) -> dict[str, np.ndarray]:
    return {"layer": np.array(profile.layer.ms), "draft_step": np.array(profile.draft_step.ms),
            "lm_head": np.array(profile.lm_head.ys)}


def _loss(model: dict[str, np.ndarray], meas: dict[str, np.ndarray]) -> float:
    total = 0.0
    for k in GRIDS:
        r = np.log(np.maximum(model[k], 1e-9) / meas[k])
        total += float(np.mean(r * r))
    return total


def report(hw: Hardware, e: Efficiency, profile: Profile) -> FitReport:
    """The model's error at every grid point of a measured profile."""
    model, meas = _model(hw, e, profile), _measured(profile)
    pts: list[PointError] = []
    for name, grid in (("layer", profile.layer), ("draft_step", profile.draft_step)):
        for i, n in enumerate(grid.tokens):
            for j, c in enumerate(grid.context):
                pts.append(PointError(name, n, c, float(meas[name][i, j]),
                                      float(model[name][i, j])))
    for i, n in enumerate(profile.lm_head.xs):
        pts.append(PointError("lm_head", n, None, float(meas["lm_head"][i]),
                              float(model["lm_head"][i])))
    return FitReport(e, tuple(pts), _loss(model, meas))


def nelder_mead(f: Callable[[np.ndarray], float], x0: np.ndarray, *, iters: int = 4000,
                step: float = 0.3, tol: float = 1e-12) -> tuple[np.ndarray, float]:
    """Minimise f from x0 (plain Nelder-Mead: reflect, expand, contract, shrink)."""
    n = len(x0)
    pts = [np.array(x0, float)] + [np.array(x0, float) + step * np.eye(n)[i] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[-1] - vals[0] < tol:
            break
        centre = np.mean(pts[:-1], axis=0)
        xr = centre + (centre - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = centre + 2.0 * (centre - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = centre + 0.5 * (pts[-1] - centre)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    best = int(np.argmin(vals))
    return pts[best], vals[best]


def _encode(e: Efficiency) -> np.ndarray:
    vals = [getattr(e, k) for k in FITTED]
    vals[FITTED.index("knee")] -= 1.0
    return np.log(np.maximum(np.array(vals, float), 1e-6))


def _decode(z: np.ndarray, base: Efficiency) -> Efficiency:
    vals = dict(zip(FITTED, np.exp(z).tolist()))
    vals["knee"] += 1.0
    return dataclasses.replace(base, **vals)


# Where every fit starts: round numbers, no knowledge of the answer.
NEUTRAL = Efficiency("neutral", mem_eff=0.9, flop_eff=0.7, gemm_half_hidden=2000.0, knee=4.0,
                     attn_bytes=3000.0, attn_bytes_single=1500.0, attn_flop_eff=0.3,
                     layer_ms=0.02, lm_head_ms=0.02, draft_step_ms=1.0, embed_ms=0.0,
                     compact_layer_ms=0.0, head_overhead_ms=0.0, fitted_to="")


def fit_efficiency(profile: Profile, hw: Hardware, *, name: str, start: Efficiency = NEUTRAL,
                   rounds: int = 12) -> FitReport:
    """Fit FITTED to `profile` (measured on `hw`) from `start`, then the embedding offset,
    the compaction term and the head overhead from its single values."""
    base = dataclasses.replace(start, name=name, fitted_to=profile.name)
    meas = _measured(profile)

    def loss(z: np.ndarray) -> float:
        return _loss(_model(hw, _decode(z, base), profile), meas)

    z, best = _encode(base), loss(_encode(base))
    for _ in range(rounds):
        z_new, v = nelder_mead(loss, z)
        improved = v < best * (1 - 1e-6)
        z, best = (z_new, v) if v < best else (z, best)
        if not improved:
            break
    e = _decode(z, base)
    # embedding: the median of measured minus the bytes term; compaction: the one measured
    # prune (COMPACT_LAYERS layers at COMPACT_CONTEXT); head overhead: as measured
    emb = [y - float(embed_ms(hw, dataclasses.replace(e, embed_ms=0.0), profile.target, x))
           for x, y in zip(profile.embed.xs, profile.embed.ys)]
    kv = 2 * profile.target.kv_heads * profile.target.head_dim * hw.kv_bytes * COMPACT_CONTEXT
    compact = (profile.kv_compact_ms / COMPACT_LAYERS
               - 2 * kv / (hw.bytes_per_ms * e.mem_eff))
    e = dataclasses.replace(e, embed_ms=max(0.0, statistics.median(emb)),
                            compact_layer_ms=max(0.0, compact),
                            head_overhead_ms=profile.head_overhead_ms)
    return report(hw, e, profile)
