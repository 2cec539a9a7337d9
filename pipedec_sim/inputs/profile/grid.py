"""Latency grids: piecewise-linear ms(tokens) and bilinear ms(tokens, context).

The simulator looks durations up in its hot loop, so lookups are plain-Python bisect +
linear interpolation (a few microseconds), and grids are immutable.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

# Analytic-profile grid axes (new tokens per batch, cached context rows).
TOKENS_AXIS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
CONTEXT_AXIS = (0, 128, 256, 512, 1024, 2048, 4096, 8192)


def _segment(axis: tuple, x: float) -> tuple[int, float]:
    """Index i of the segment [axis[i], axis[i+1]] used for x and x's fraction along it.

    Outside the axis the end segment is used with a fraction < 0 or > 1 (linear
    extrapolation). A single-point axis gives (0, 0.0): the grid is constant along it.
    """
    n = len(axis)
    if n == 1:
        return 0, 0.0
    i = bisect_right(axis, x) - 1
    if i < 0:
        i = 0
    elif i > n - 2:
        i = n - 2
    x0 = axis[i]
    return i, (x - x0) / (axis[i + 1] - x0)


class Grid1D:
    """Piecewise-linear ms(x); linear extrapolation past the ends; never below 0."""

    __slots__ = ("xs", "ys")

    def __init__(self, xs: Sequence[int], ys: Sequence[float]):
        self.xs = tuple(xs)
        self.ys = tuple(float(y) for y in ys)
        if not self.xs or len(self.xs) != len(self.ys):
            raise ValueError("Grid1D needs equally many (>= 1) points and values")

    def __call__(self, x: float) -> float:
        ys = self.ys
        if len(ys) == 1:
            return ys[0]
        i, f = _segment(self.xs, x)
        y = ys[i] + f * (ys[i + 1] - ys[i])
        return y if y > 0.0 else 0.0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Grid1D) and (self.xs, self.ys) == (other.xs, other.ys)

    def __repr__(self) -> str:
        return f"Grid1D(xs={self.xs}, ys={self.ys})"

    def to_dict(self) -> dict:
        return {"tokens": list(self.xs), "ms": list(self.ys)}


class Grid2D:
    """Bilinear ms(tokens, context); per-axis linear extrapolation; never below 0."""

    __slots__ = ("tokens", "context", "ms")

    def __init__(self, tokens: Sequence[int], context: Sequence[int],
                 ms: Sequence[Sequence[float]]):
        self.tokens = tuple(tokens)
        self.context = tuple(context)
        self.ms = tuple(tuple(float(v) for v in row) for row in ms)
        if (not self.tokens or not self.context or len(self.ms) != len(self.tokens)
                or any(len(row) != len(self.context) for row in self.ms)):
            raise ValueError("Grid2D needs a len(tokens) x len(context) table, axes non-empty")

    def __call__(self, tokens: float, context: float) -> float:
        i, ft = _segment(self.tokens, tokens)
        j, fc = _segment(self.context, context)
        ms = self.ms
        r0 = ms[i]
        r1 = ms[i + 1] if ft else r0  # ft == 0 also covers single-point token axes
        if fc:
            a = r0[j] + fc * (r0[j + 1] - r0[j])
            b = r1[j] + fc * (r1[j + 1] - r1[j])
        else:
            a, b = r0[j], r1[j]
        y = a + ft * (b - a)
        return y if y > 0.0 else 0.0

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Grid2D)
                and (self.tokens, self.context, self.ms) == (other.tokens, other.context, other.ms))

    def __repr__(self) -> str:
        return f"Grid2D(tokens={self.tokens}, context={self.context}, ms=...)"

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "context": list(self.context),
                "ms": [list(row) for row in self.ms]}
