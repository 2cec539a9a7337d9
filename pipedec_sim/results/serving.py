"""Serving results: per-request latencies under load and the throughput-latency summary.

A serving run overlaps many requests, so a strategy is judged by two numbers at once: the
throughput it sustains (output tokens per second of the whole run) and the latency each
request sees at that load (TBT, TTFT, end-to-end, as percentiles over requests). A
request's TBT is exactly metrics.py's: decode time from its first commit to its last over
the tokens committed after the first; TTFT and e2e count from its arrival, so queueing
before the first token is part of them. Goodput counts only the tokens of requests that
meet a latency SLO, and `at_matched_latency` compares two strategies' throughput at equal
latency (the paper's "1.64x-2.08x throughput at matched latency").
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

SERVED_COLUMNS = ["strategy", "request", "arrival_ms", "first_ms", "end_ms", "tokens",
                  "drafted", "decode_tokens", "decode_ms", "ttft_ms", "tbt_ms", "e2e_ms",
                  "prompt_len"]
# The summary's columns after its cfg_* ones (with the default keys).
SERVING_COLUMNS = ["strategy", "requests", "tokens", "duration_s", "throughput_tok_s",
                   "requests_per_s", "tbt_p50_ms", "tbt_p90_ms", "tbt_p99_ms", "tbt_mean_ms",
                   "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "slo_attainment",
                   "goodput_tok_s", "hit_rate"]
NAN = float("nan")


# ----------------------------------------------------------------------------- per request

def served_row(strategy: str, request: str, *, arrival_ms: float, commits, end_ms: float,
               prompt_len: int, **extra) -> dict:
    """One served request as a row. `commits` is [(t_ms, n_tokens, n_drafted, outcome)] in
    commit order, at absolute simulated times; `extra` (cfg_* columns) is added as is.
    tbt_ms is NaN when every token came with the first commit (no decode tokens)."""
    if not commits:
        raise ValueError(f"request {request!r} committed nothing")
    first_ms, n_first = commits[0][0], commits[0][1]
    tokens = sum(c[1] for c in commits)
    decode_tokens = tokens - n_first
    decode_ms = commits[-1][0] - first_ms
    return {"strategy": strategy, "request": str(request), "arrival_ms": arrival_ms,
            "first_ms": first_ms, "end_ms": end_ms, "tokens": tokens,
            "drafted": sum(c[2] for c in commits), "decode_tokens": decode_tokens,
            "decode_ms": decode_ms, "ttft_ms": first_ms - arrival_ms,
            "tbt_ms": decode_ms / decode_tokens if decode_tokens else NAN,
            "e2e_ms": end_ms - arrival_ms, "prompt_len": prompt_len, **extra}


def served_frame(rows: list[dict]) -> pd.DataFrame:
    """The rows of served_row as a frame: SERVED_COLUMNS first, then the extra columns."""
    df = pd.DataFrame(rows, columns=None if rows else SERVED_COLUMNS)
    return df[SERVED_COLUMNS + [c for c in df.columns if c not in SERVED_COLUMNS]]


# ----------------------------------------------------------------------------- summary

def _pct(values: pd.Series, q: float) -> float:
    v = values.dropna().to_numpy(dtype=float)
    return float(np.percentile(v, q)) if len(v) else NAN


def meets_slo(df: pd.DataFrame, slo_tbt_ms: float | None = None,
              slo_ttft_ms: float | None = None) -> pd.Series:
    """Per request: TBT <= slo_tbt_ms and TTFT <= slo_ttft_ms (each only if given). A
    request without decode tokens (NaN TBT) has no gap between tokens to miss the TBT SLO."""
    ok = pd.Series(True, index=df.index)
    if slo_tbt_ms is not None:
        ok &= df.tbt_ms.isna() | (df.tbt_ms <= slo_tbt_ms)
    if slo_ttft_ms is not None:
        ok &= df.ttft_ms <= slo_ttft_ms
    return ok


def serving_summary(df: pd.DataFrame, *, slo_tbt_ms: float | None = None,
                    slo_ttft_ms: float | None = None, keys=("strategy",)) -> pd.DataFrame:
    """One row per group of `keys` and every cfg_* column (a rate, a concurrency, ...).

    duration_s runs from the group's first arrival to its last end; throughput_tok_s and
    requests_per_s are over it. TBT, TTFT and e2e percentiles are over requests (linear, as
    np.percentile; requests without a TBT ignored); tbt_mean_ms is token weighted (summed
    decode time over summed decode tokens). slo_attainment and goodput_tok_s (tokens of
    the requests meeting the SLO, per second) are NaN when no SLO is given.
    """
    keys = [k for k in keys if k in df.columns]
    extra = [c for c in df.columns if c.startswith("cfg_")]
    has_slo = slo_tbt_ms is not None or slo_ttft_ms is not None
    rows = []
    for key, g in df.groupby(keys + extra, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        tokens = int(g.tokens.sum())
        duration_s = (g.end_ms.max() - g.arrival_ms.min()) / 1e3
        per_s = 1.0 / duration_s if duration_s > 0 else NAN
        decode_tokens = int(g.decode_tokens.sum())
        ok = meets_slo(g, slo_tbt_ms, slo_ttft_ms)
        rows.append({**dict(zip(keys + extra, key)), "requests": len(g), "tokens": tokens,
                     "duration_s": duration_s, "throughput_tok_s": tokens * per_s,
                     "requests_per_s": len(g) * per_s,
                     "tbt_p50_ms": _pct(g.tbt_ms, 50), "tbt_p90_ms": _pct(g.tbt_ms, 90),
                     "tbt_p99_ms": _pct(g.tbt_ms, 99),
                     "tbt_mean_ms": g.decode_ms.sum() / decode_tokens if decode_tokens else NAN,
                     "ttft_p50_ms": _pct(g.ttft_ms, 50), "ttft_p99_ms": _pct(g.ttft_ms, 99),
                     "e2e_p50_ms": _pct(g.e2e_ms, 50), "e2e_p99_ms": _pct(g.e2e_ms, 99),
                     "slo_attainment": float(ok.mean()) if has_slo else NAN,
                     "goodput_tok_s": int(g.tokens[ok].sum()) * per_s if has_slo else NAN,
                     "hit_rate": g.drafted.sum() / tokens if tokens else NAN})
    columns = extra + keys + [c for c in SERVING_COLUMNS if c not in keys]
    return pd.DataFrame(rows, columns=columns)


def format_serving(summary: pd.DataFrame) -> str:
    """The serving table people read: fixed decimals, '-' for NaN."""
    show = summary.copy()
    fmt = {"duration_s": "{:.1f}", "throughput_tok_s": "{:.1f}", "requests_per_s": "{:.2f}",
           "tbt_p50_ms": "{:.2f}", "tbt_p90_ms": "{:.2f}", "tbt_p99_ms": "{:.2f}",
           "tbt_mean_ms": "{:.2f}", "ttft_p50_ms": "{:.1f}", "ttft_p99_ms": "{:.1f}",
           "e2e_p50_ms": "{:.1f}", "e2e_p99_ms": "{:.1f}", "slo_attainment": "{:.1%}",
           "goodput_tok_s": "{:.1f}", "hit_rate": "{:.3f}"}
    for col, f in fmt.items():
        if col in show:
            show[col] = [("-" if pd.isna(v) else v if isinstance(v, str) else f.format(v))
                         for v in show[col]]
    return show.to_string(index=False)


# ----------------------------------------------------------------------------- comparison

def _curve(summary: pd.DataFrame, strategy: str, by: str, x: str) -> pd.DataFrame:
    """A strategy's (latency, throughput) points, sorted by latency; at a repeated latency
    the highest throughput."""
    missing = [c for c in ("strategy", by, x) if c not in summary.columns]
    if missing:
        raise ValueError(f"no column(s) {', '.join(missing)} in the summary")
    pts = summary.loc[summary.strategy == strategy, [by, x]].astype(float)
    pts = pts[np.isfinite(pts[by]) & np.isfinite(pts[x])]
    if not len(pts):
        raise ValueError(f"no {strategy!r} rows with finite {by} and {x}")
    return pts.groupby(by, as_index=False)[x].max().sort_values(by)


def at_matched_latency(summary: pd.DataFrame, strategy: str, baseline: str, *,
                       by: str = "tbt_p99_ms", x: str = "throughput_tok_s",
                       bound: float | None = None) -> dict:
    """Throughput of `strategy` over `baseline` at matched latency, from a rate sweep (one
    summary row per strategy and rate; filter other settings out first).

    At each latency level of the baseline's points (`by`, p99 TBT by default) the other
    strategy's throughput is interpolated linearly over its own points sorted by latency
    (np.interp), only where the level lies within its range of latencies; the ratio there
    is that throughput over the baseline's. Returns {"levels", "ratios", "min_ratio",
    "max_ratio"} (NaN for both when no level is in range). With `bound`, also the best
    throughput each reaches at latency <= bound ("best", "baseline_best") and their ratio
    ("bound_ratio"; NaN where one never meets the bound).
    """
    s, b = _curve(summary, strategy, by, x), _curve(summary, baseline, by, x)
    lo, hi = s[by].iloc[0], s[by].iloc[-1]
    levels, ratios = [], []
    for level, thr in zip(b[by], b[x]):
        if lo <= level <= hi and thr > 0:
            levels.append(float(level))
            ratios.append(float(np.interp(level, s[by], s[x])) / float(thr))
    out: dict = {"levels": levels, "ratios": ratios,
                 "min_ratio": min(ratios) if ratios else NAN,
                 "max_ratio": max(ratios) if ratios else NAN}
    if bound is not None:
        best = float(s.loc[s[by] <= bound, x].max()) if (s[by] <= bound).any() else NAN
        base = float(b.loc[b[by] <= bound, x].max()) if (b[by] <= bound).any() else NAN
        out.update(bound=bound, best=best, baseline_best=base,
                   bound_ratio=best / base if base > 0 and not math.isnan(best) else NAN)
    return out
