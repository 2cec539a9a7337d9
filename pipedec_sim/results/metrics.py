"""Per-request and per-strategy results as tidy pandas frames.

TBT (time between tokens) is the decode time from the first commit to the last, divided
by the tokens committed after the first commit: prefill is excluded, as in the paper.
hit_rate is the fraction of committed tokens the draft had in its tree (PipeDec hits,
tree-SD accepted tokens); mean_accepted is tokens per target-only token (tokens per
flush for PipeDec, per verification pass for tree-SD, 1 for plain PP); stall_rate is the
fraction of tokens that were PipeDec hits on a node that was not in the batch right
behind the old root's (its branch regrew after likelier siblings crowded it out), so the
next token waits for the steps in between although this one counts as a hit.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

SUMMARY_COLUMNS = ["strategy", "stages", "requests", "tokens", "tbt_ms", "tokens_per_s",
                   "speedup_vs_ar", "hit_rate", "mean_accepted", "stall_rate", "utilization",
                   "wasted_per_token", "ttft_ms"]


@dataclass
class RequestMetrics:
    strategy: str
    request: str
    stages: int
    tokens: int
    drafted: int            # committed tokens the draft predicted
    stalls: int             # PipeDec hits whose node was not in the next batch
    ttft_ms: float
    decode_ms: float
    decode_tokens: int      # tokens committed after the first commit
    end_ms: float
    stage_busy_ms: float    # summed over stages
    stage_rows: int         # rows computed, summed over stages
    batches: int
    prompt_len: int = 0     # prompt rows every stage computes once (not waste)


def ideal_speedup(p, stages):
    """PipeDec's ideal speedup over plain PP at hit rate p: a hit costs one stage time,
    a miss a full trip through the S stages (works on scalars, numpy arrays, Series)."""
    return stages / (p + (1 - p) * stages)


def request_metrics(strategy: str, request: str, stages: int, commits, end_ms: float,
                    busy_ms: dict, rows: dict, batches: int, *,
                    prompt_len: int = 0) -> RequestMetrics:
    """`commits` is [(t_ms, n_tokens, n_drafted, outcome)] in commit order."""
    t0, n0 = commits[0][0], commits[0][1]
    stage_keys = [k for k in busy_ms if k.startswith("stage")]
    return RequestMetrics(
        strategy=strategy, request=str(request), stages=stages,
        tokens=sum(c[1] for c in commits), drafted=sum(c[2] for c in commits),
        stalls=sum(1 for c in commits if c[3] == "stall"),
        ttft_ms=t0, decode_ms=commits[-1][0] - t0,
        decode_tokens=sum(c[1] for c in commits) - n0, end_ms=end_ms,
        stage_busy_ms=sum(busy_ms[k] for k in stage_keys),
        stage_rows=sum(rows.get(k, 0) for k in stage_keys), batches=batches,
        prompt_len=prompt_len)


def requests_frame(items: list[RequestMetrics]) -> pd.DataFrame:
    df = pd.DataFrame([vars(m) for m in items])
    df["tbt_ms"] = df.decode_ms / df.decode_tokens.clip(lower=1)
    df["hit_rate"] = df.drafted / df.tokens
    df["utilization"] = df.stage_busy_ms / (df.stages * df.end_ms)
    return df


def summarize(df: pd.DataFrame, baseline: str = "ar") -> pd.DataFrame:
    """One row per (strategy, stages): token-weighted TBT, speedup vs plain PP and vs
    tree-SD (NaN where that strategy did not run)."""
    keys = [k for k in ("strategy", "stages") if k in df.columns]
    extra = [c for c in df.columns if c.startswith("cfg_")]
    rows = []
    for key, g in df.groupby(keys + extra, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        tokens = int(g.tokens.sum())
        tbt = g.decode_ms.sum() / max(int(g.decode_tokens.sum()), 1)
        target_only = tokens - int(g.drafted.sum())
        rows.append({**dict(zip(keys + extra, key)), "requests": len(g), "tokens": tokens,
                     "tbt_ms": tbt, "tokens_per_s": 1e3 / tbt if tbt > 0 else float("inf"),
                     "hit_rate": g.drafted.sum() / tokens,
                     "mean_accepted": tokens / max(target_only, 1),
                     "stall_rate": g.stalls.sum() / tokens,
                     "utilization": g.stage_busy_ms.sum() / (g.stages * g.end_ms).sum(),
                     # rows a stage computed that are neither prompt nor output (the
                     # last output token is never computed: clip plain PP's -1/tokens)
                     "wasted_per_token": max(0.0, (g.stage_rows.sum() / g.stages.iloc[0]
                                                   - g.prompt_len.sum() - tokens) / tokens),
                     "ttft_ms": g.ttft_ms.mean()})
    out = pd.DataFrame(rows)
    out["speedup_vs_ar"] = float("nan")
    out["speedup_vs_tree_sd"] = float("nan")
    group = ["stages"] + extra
    for _, g in out.groupby(group, dropna=False):
        base = g[g.strategy == baseline]
        if len(base):
            out.loc[g.index, "speedup_vs_ar"] = base.tbt_ms.iloc[0] / g.tbt_ms
        sd = g[g.strategy == "tree-sd"]
        if len(sd):
            out.loc[g.index, "speedup_vs_tree_sd"] = sd.tbt_ms.iloc[0] / g.tbt_ms
    cols = [c for c in SUMMARY_COLUMNS if c in out.columns]
    cols.insert(cols.index("speedup_vs_ar") + 1, "speedup_vs_tree_sd")   # as sweep's summary
    return out[[c for c in out.columns if c not in cols and c.startswith("cfg_")] + cols]


def format_table(summary: pd.DataFrame) -> str:
    """The one table people read."""
    show = summary.copy()
    fmt = {"tbt_ms": "{:.2f}", "tokens_per_s": "{:.1f}", "speedup_vs_ar": "{:.2f}x",
           "speedup_vs_tree_sd": "{:.2f}x", "hit_rate": "{:.3f}", "mean_accepted": "{:.2f}",
           "stall_rate": "{:.3f}",
           "utilization": "{:.1%}",
           "wasted_per_token": "{:.2f}", "ttft_ms": "{:.1f}"}
    for col, f in fmt.items():
        if col in show:
            show[col] = [("-" if pd.isna(v) else v if isinstance(v, str) else f.format(v))
                         for v in show[col]]            # a caller may format a column itself
    return show.to_string(index=False)
