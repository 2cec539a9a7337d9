"""Plotting helpers over the tidy frames of `pipedec-sim sweep` / `run` and timeline JSON.

Every function takes a frame (or a timeline), draws into a new figure (or the `ax` given)
and returns the figure; `save(fig, path)` writes a PNG (or PDF, SVG). The Agg backend is
used, so this runs headless. Summary frames are `summary.csv` or `summary.parquet` from a
sweep (one row per configuration; `cfg_*` columns) or from `run --out` (one row per
strategy).
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipedec_sim.results.metrics import ideal_speedup
from pipedec_sim.results.tables import read_table, table_name

STRATEGY_ORDER = ["ar", "tree-sd", "pipedec"]
LABELS = {"ar": "plain PP", "tree-sd": "tree SD (EAGLE-2)", "pipedec": "PipeDec"}
COLORS = {"ar": "#7f7f7f", "tree-sd": "#1f77b4", "pipedec": "#d62728"}
SLICE_LABELS = {"layer": "layers (tree rows)", "layer (cancelled)": "layers, cancelled (pruned)",
                "token": "single-token pass (after a flush / plain PP)",
                "tree": "tree verification pass", "draft": "draft step", "prefill": "prefill"}
COMMITS = ("token", "hit", "stall", "miss", "accept")  # instant events on the head: a commit each
SLICE_COLORS = {"layer": "#4c72b0", "layer (cancelled)": "#c44e52", "prefill": "#b0b0b0",
                "draft": "#55a868", "tree": "#8172b2", "token": "#dd8452"}


# --------------------------------------------------------------------------- frames

def load_summary(path: str | Path) -> pd.DataFrame:
    """A sweep or `run --out` folder (its summary.csv, or its summary.parquet if it has only
    that one, as `pipedec-sim plot` reads it), or a summary .csv or .parquet file."""
    p = Path(path)
    if p.is_dir():
        csv, parquet = p / table_name("summary", "csv"), p / table_name("summary", "parquet")
        p = parquet if not csv.exists() and parquet.exists() else csv
    df = read_table(p, "parquet" if p.suffix.lower() == ".parquet" else "csv")
    if "strategy" not in df.columns or "tbt_ms" not in df.columns:
        raise ValueError(f"{p}: not a summary table (needs strategy and tbt_ms columns)")
    return df


def _dataset(df: pd.DataFrame) -> pd.Series:
    """A label per row for the workload setting (trace, plus profile/link if they vary)."""
    parts = []
    for col in ("cfg_trace", "cfg_profile", "cfg_link_gbps", "cfg_topology"):
        if col in df.columns and df[col].nunique(dropna=False) > 1:
            v = df[col].astype(str)
            if col == "cfg_trace":
                v = v.str.replace(r"\.jsonl(\.gz)?$", "", regex=True)
            if col == "cfg_link_gbps":
                v = v + " Gb/s"
            if col == "cfg_topology":
                v = "topology " + v
            parts.append(v)
    if not parts:
        if "cfg_trace" in df.columns:
            return df["cfg_trace"].astype(str).str.replace(r"\.jsonl(\.gz)?$", "", regex=True)
        return pd.Series(["workload"] * len(df), index=df.index)
    out = parts[0]
    for p in parts[1:]:
        out = out + "\n" + p
    return out


def best_per_strategy(summary: pd.DataFrame, by=("dataset", "stages")) -> pd.DataFrame:
    """The lowest-TBT configuration of each strategy within each `by` group."""
    df = summary.copy()
    df["dataset"] = _dataset(df)
    keys = [k for k in by if k in df.columns] + ["strategy"]
    idx = df.groupby(keys, sort=False)["tbt_ms"].idxmin()
    return df.loc[idx].reset_index(drop=True)


def _stages_choice(df: pd.DataFrame, stages: int | None) -> int:
    if stages is None:
        return int(df.stages.max())
    if stages not in set(df.stages):
        raise ValueError(f"no results for {stages} stages (have {sorted(set(df.stages))})")
    return int(stages)


def _knob_label(row) -> str:
    if row.strategy == "pipedec" and "cfg_width" in row and pd.notna(row.get("cfg_width")):
        return f"W={int(row.cfg_width)}"
    if row.strategy == "tree-sd" and "cfg_total" in row and pd.notna(row.get("cfg_total")):
        return f"{int(row.cfg_total)} nodes"
    return ""


# --------------------------------------------------------------------------- plots

def speedup_bars(summary: pd.DataFrame, stages: int | None = None) -> plt.Figure:
    """Speedup vs plain PP (left) and PipeDec vs tree SD (right), one group per data set.

    Each strategy shows its best configuration (lowest TBT) at `stages` (default: the most).
    """
    S = _stages_choice(summary, stages)
    best = best_per_strategy(summary[summary.stages == S])
    datasets = list(dict.fromkeys(best.dataset))
    strategies = [s for s in STRATEGY_ORDER if s in set(best.strategy)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2),
                                   gridspec_kw={"width_ratios": [2, 1]})
    x = np.arange(len(datasets))
    bw = 0.8 / max(len(strategies), 1)
    ar_tbt = {d: best[(best.dataset == d) & (best.strategy == "ar")].tbt_ms for d in datasets}
    for i, s in enumerate(strategies):
        vals, labels = [], []
        for d in datasets:
            r = best[(best.dataset == d) & (best.strategy == s)]
            if len(r) and len(ar_tbt[d]):
                vals.append(float(ar_tbt[d].iloc[0] / r.tbt_ms.iloc[0]))
                labels.append(_knob_label(r.iloc[0]))
            else:
                vals.append(np.nan)
                labels.append("")
        bars = ax1.bar(x + (i - (len(strategies) - 1) / 2) * bw, vals, bw,
                       label=LABELS.get(s, s), color=COLORS.get(s))
        for b, v, lab in zip(bars, vals, labels):
            if not math.isnan(v):
                ax1.annotate(f"{v:.2f}x" + (f"\n{lab}" if lab else ""),
                             (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom",
                             fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax1.axhline(1.0, color="black", lw=0.8, ls=":")
    ax1.set_xticks(x, datasets, rotation=15 if len(datasets) > 3 else 0)
    ax1.set_ylabel("speedup vs plain PP (x, higher is better)")
    ax1.set_title(f"Decode speedup, S={S} stages (best config per strategy)")
    ax1.legend(loc="upper left", fontsize=8)
    ax1.set_ylim(0, np.nanmax([ax1.get_ylim()[1], 1.0]) * 1.18)

    vs = []
    for d in datasets:
        pd_ = best[(best.dataset == d) & (best.strategy == "pipedec")]
        sd = best[(best.dataset == d) & (best.strategy == "tree-sd")]
        vs.append(float(sd.tbt_ms.iloc[0] / pd_.tbt_ms.iloc[0]) if len(pd_) and len(sd)
                  else np.nan)
    bars = ax2.bar(x, vs, 0.5, color=COLORS["pipedec"])
    for b, v in zip(bars, vs):
        if not math.isnan(v):
            ax2.annotate(f"{v:.2f}x", (b.get_x() + b.get_width() / 2, v), ha="center",
                         va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax2.axhline(1.0, color="black", lw=0.8, ls=":")
    ax2.set_xticks(x, datasets, rotation=30 if len(datasets) > 3 else 0,
                   ha="right" if len(datasets) > 3 else "center")
    ax2.set_ylabel("PipeDec speedup vs tree SD (x)")
    ax2.set_title("PipeDec vs tree SD")
    top = np.nanmax(vs + [1.0]) if not all(math.isnan(v) for v in vs) else 1.0
    ax2.set_ylim(0, top * 1.18)
    fig.tight_layout()
    return fig


def reference_speedup(S, p):
    """PipeDec's ideal speedup over PP with hit rate p: a hit costs one stage, a miss S."""
    return ideal_speedup(p, np.asarray(S, dtype=float))


def speedup_vs_stages(summary: pd.DataFrame) -> plt.Figure:
    """Speedup vs plain PP against pipeline depth S, with S/(p+(1-p)S) for reference."""
    best = best_per_strategy(summary)
    datasets = list(dict.fromkeys(best.dataset))
    fig, ax = plt.subplots(figsize=(7 if len(datasets) == 1 else 11, 4.5))
    styles = ["-", "--", "-.", ":"]
    for j, d in enumerate(datasets):
        b = best[best.dataset == d]
        ar = b[b.strategy == "ar"].set_index("stages").tbt_ms
        suffix = f" ({d.replace(chr(10), ', ')})" if len(datasets) > 1 else ""
        for s in STRATEGY_ORDER:
            r = b[b.strategy == s].sort_values("stages")
            if not len(r) or s == "ar":
                continue
            sp = ar.reindex(r.stages).values / r.tbt_ms.values
            ax.plot(r.stages, sp, styles[j % 4], marker="o", color=COLORS[s],
                    label=LABELS[s] + suffix)
        r = b[b.strategy == "pipedec"]
        if len(r):
            p = float((r.hit_rate * r.tokens).sum() / r.tokens.sum())
            Ss = np.linspace(1, max(b.stages.max(), 2), 100)
            ax.plot(Ss, reference_speedup(Ss, p), styles[j % 4], color="black", lw=1, alpha=0.6,
                    label=f"S/(p+(1-p)S), p={p:.2f} (PipeDec hit rate){suffix}")
            if "stall_rate" in r.columns and r.stall_rate.notna().all() and r.stall_rate.sum() > 0:
                q = p - float((r.stall_rate * r.tokens).sum() / r.tokens.sum())
                ax.plot(Ss, reference_speedup(Ss, q), styles[j % 4], color="#ff7f0e", lw=1,
                        alpha=0.7, label=f"same, p={q:.2f} (hits without a stall){suffix}")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="plain PP")
    ax.set_xlabel("pipeline stages S")
    ax.set_ylabel("speedup vs plain PP (x)")
    ax.set_title("Speedup vs pipeline depth (best config per strategy and S)")
    ax.set_xticks(sorted({1} | set(best.stages)))
    ax.set_xlim(0.5, best.stages.max() + 0.5)
    if len(datasets) == 1:
        ax.legend(fontsize=8, loc="upper left")
    else:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def where(summary: pd.DataFrame, conditions: dict[str, str]) -> pd.DataFrame:
    """The rows matching every `key=value` condition: a key is a column (`stages`,
    `strategy`) or a sweep setting without its `cfg_` prefix (`floor`, `profile`, `trace`);
    numbers compare as numbers. Rows where the setting is empty (it does not apply to
    their strategy: plain PP has no floor) are kept, so speedups keep their baseline.
    ValueError naming the key (and the values there are) if no row has the value."""
    df = summary
    for key, value in conditions.items():
        col = key if key in df.columns else f"cfg_{key}"
        if col not in df.columns:
            keys = sorted({c.removeprefix("cfg_") for c in summary.columns
                           if c.startswith("cfg_") or c in ("strategy", "stages")})
            raise ValueError(f"no column {key!r} to select on (have: {', '.join(keys)})")
        match = df[col].astype(str) == value
        num = pd.to_numeric(df[col], errors="coerce")
        try:
            match |= num == float(value)
        except ValueError:
            pass
        if not match.any():
            have = ", ".join(sorted(map(str, df[col].dropna().unique()))[:12])
            raise ValueError(f"no rows with {key}={value} (have {key}: {have or 'none'})")
        df = df[match | df[col].isna()]
    return df


WIDTH_METRICS = ("tbt_ms", "speedup_vs_ar", "hit_rate", "wasted_per_token", "utilization",
                 "tokens_per_s")


def width_slice(summary: pd.DataFrame, metric: str = "tbt_ms", stages: int | None = None,
                dataset: str | None = None) -> tuple[pd.DataFrame, int, str, str]:
    """The PipeDec rows a width heatmap draws: (rows, S, data set, what was chosen).

    One S (default: the most) and one data set (default: the first); where other settings
    vary too (floor, coverage, prune mode, ...), each (W, k) cell keeps its lowest-TBT
    configuration. The last item says all of that in words, for the title and the CLI."""
    if metric not in WIDTH_METRICS:
        raise ValueError(f"unsupported metric {metric!r}")
    df = summary[summary.strategy == "pipedec"].copy()
    if not len(df) or "cfg_width" not in df.columns:
        raise ValueError("no PipeDec rows with cfg_width: run a sweep over --width")
    S = _stages_choice(df, stages)
    df = df[df.stages == S]
    df["dataset"] = _dataset(df)
    datasets = list(dict.fromkeys(df.dataset))
    dataset = dataset or datasets[0]
    df = df[df.dataset == dataset]
    notes = [f"S={S}", dataset.replace("\n", ", ")]
    if len(datasets) > 1:
        notes[-1] += f" (1 of {len(datasets)} workloads; choose with --where)"
    varying = [c for c in df.columns if c.startswith("cfg_") and c not in ("cfg_width", "cfg_topk")
               and df[c].nunique(dropna=False) > 1]
    if varying:
        df = df.loc[df.groupby(["cfg_width", "cfg_topk"]).tbt_ms.idxmin()]
        for c in varying:
            values = ", ".join(sorted(map(str, summary.loc[summary.strategy == "pipedec", c]
                                          .dropna().unique())))
            notes.append(f"lowest-TBT {c[4:]} per cell (of {values})")
    return df, S, dataset, "; ".join(notes)


def _text_color(im, v: float) -> str:
    """Black or white, whichever reads on the cell's colour (whatever the colormap)."""
    r, g, b, _ = im.cmap(im.norm(v))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def width_heatmap(summary: pd.DataFrame, metric: str = "tbt_ms", stages: int | None = None,
                  dataset: str | None = None) -> plt.Figure:
    """PipeDec sensitivity to layer width W (x) and children per node k (y) at S stages
    (the slice of `width_slice`)."""
    df, S, dataset, note = width_slice(summary, metric, stages, dataset)
    grid = df.pivot_table(index="cfg_topk", columns="cfg_width", values=metric, aggfunc="mean")
    grid = grid.sort_index(ascending=False)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 1.1 * grid.shape[1]),
                                    max(3.2, 1.8 + 0.6 * grid.shape[0])))
    lower_better = metric in ("tbt_ms", "wasted_per_token")
    im = ax.imshow(grid.values, cmap="viridis_r" if lower_better else "viridis", aspect="auto")
    units = {"tbt_ms": "TBT (ms/token)", "speedup_vs_ar": "speedup vs plain PP (x)",
             "hit_rate": "hit rate", "wasted_per_token": "wasted rows per token",
             "utilization": "stage utilisation", "tokens_per_s": "tokens/s"}[metric]
    fig.colorbar(im, ax=ax, label=units)
    ax.set_xticks(range(grid.shape[1]), [str(int(c)) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(int(i)) for i in grid.index])
    ax.set_xlabel("PipeDec layer width W (nodes)")
    ax.set_ylabel("children per node k")
    vals = grid.values
    best = np.nanargmin(vals) if lower_better else np.nanargmax(vals)
    for (i, j), v in np.ndenumerate(vals):
        if not math.isnan(v):
            mark = "*" if i * vals.shape[1] + j == best else ""
            ax.text(j, i, f"{v:.3g}{mark}", ha="center", va="center", fontsize=8,
                    color=_text_color(im, v))
    ax.set_title(f"PipeDec {units}, {note} (* = best)", fontsize=10, wrap=True)
    fig.tight_layout()
    return fig


def utilization_bars(summary: pd.DataFrame, stages: int | None = None) -> plt.Figure:
    """Stage utilisation and wasted (pruned or cancelled) rows per committed token."""
    S = _stages_choice(summary, stages)
    best = best_per_strategy(summary[summary.stages == S])
    datasets = list(dict.fromkeys(best.dataset))
    strategies = [s for s in STRATEGY_ORDER if s in set(best.strategy)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(datasets))
    bw = 0.8 / max(len(strategies), 1)
    for ax, col, ylabel, fmt in ((axes[0], "utilization", "mean stage utilisation (%)", "{:.0f}%"),
                                 (axes[1], "wasted_per_token",
                                  "wasted rows per committed token", "{:.1f}")):
        for i, s in enumerate(strategies):
            vals = []
            for d in datasets:
                r = best[(best.dataset == d) & (best.strategy == s)]
                v = float(r[col].iloc[0]) if len(r) else np.nan
                vals.append(v * 100 if col == "utilization" else v)
            bars = ax.bar(x + (i - (len(strategies) - 1) / 2) * bw, vals, bw,
                          label=LABELS.get(s, s), color=COLORS.get(s))
            for b, v in zip(bars, vals):
                if not math.isnan(v):
                    ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, v), ha="center",
                                va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(x, datasets)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    axes[0].set_title(f"Stage utilisation, S={S}")
    axes[1].set_title(f"Wasted work, S={S}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def serving_curves(summary: pd.DataFrame) -> plt.Figure:
    """Latency against throughput under load (a serving summary: one row per strategy and
    rate or concurrency): TBT p50 solid and p99 dashed, one colour per strategy, points in
    order of cfg_rate (or cfg_concurrency) and labelled with it."""
    order = next((c for c in ("cfg_rate", "cfg_concurrency") if c in summary.columns), None)
    if order is not None:
        repeated = summary.duplicated(["strategy", order])
        if repeated.any():
            varying = [c for c in summary.columns if c.startswith("cfg_") and c != order
                       and summary[c].nunique(dropna=False) > 1]
            raise ValueError(f"several rows per strategy and {order[4:]}: keep one setting "
                             f"with --where (varying: {', '.join(c[4:] for c in varying)})")
    for col in ("throughput_tok_s", "tbt_p50_ms", "tbt_p99_ms"):
        if not pd.api.types.is_numeric_dtype(summary[col]):
            raise ValueError(f"column {col} holds values that are not numbers")
    unit = {"cfg_rate": " req/s", "cfg_concurrency": " outstanding"}.get(order or "", "")
    strategies = [s for s in STRATEGY_ORDER if s in set(summary.strategy)]
    strategies += [s for s in dict.fromkeys(summary.strategy) if s not in strategies]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, s in enumerate(strategies):
        r = summary[summary.strategy == s].sort_values(order or "throughput_tok_s")
        color = COLORS.get(s, f"C{i}")
        label = LABELS.get(s, s)
        ax.plot(r.throughput_tok_s, r.tbt_p50_ms, "-", marker="o", color=color,
                label=f"{label}, p50")
        ax.plot(r.throughput_tok_s, r.tbt_p99_ms, "--", marker="^", color=color,
                label=f"{label}, p99")
        if order is not None:
            for _, row in r.iterrows():
                ax.annotate(f"{row[order]:g}{unit}", (row.throughput_tok_s, row.tbt_p50_ms),
                            fontsize=7, xytext=(3, -9), textcoords="offset points",
                            color=color)
    ax.set_xlabel("throughput (output tokens/s)")
    ax.set_ylabel("time between tokens (ms/token)")
    by = f" (points by {order[4:]})" if order else ""
    ax.set_title(f"Serving: TBT vs throughput, p50 solid, p99 dashed{by}", fontsize=10)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- timelines

def load_timeline(source) -> dict:
    """A Chrome trace dict, a path to one, or {label: events} from `SimResult.timelines`."""
    if isinstance(source, (str, Path)):
        from pipedec_sim.inputs.files import load_json, read_text
        source = load_json(read_text(source), file=source)
    if isinstance(source, dict) and "traceEvents" in source:
        return source
    from pipedec_sim.results.timeline import chrome_trace
    return chrome_trace({(k if isinstance(k, str) else " / request ".join(map(str, k))): v
                         for k, v in source.items()})


def timeline_runs(trace: dict) -> dict[int, str]:
    return {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
            if e.get("ph") == "M" and e.get("name") == "process_name"}


def _pick_run(trace: dict, run: str | None) -> tuple[int, str]:
    runs = timeline_runs(trace)
    if not runs:
        raise ValueError("timeline has no runs")
    if run is None:
        for pid, name in runs.items():
            if name.startswith("pipedec"):
                return pid, name
        return next(iter(runs.items()))
    for pid, name in runs.items():
        if name == run or name.startswith(run):
            return pid, name
    raise ValueError(f"no run {run!r} in the timeline (have: {', '.join(runs.values())})")


def _tracks(trace: dict, pid: int) -> dict[int, str]:
    return {e["tid"]: e["args"]["name"] for e in trace["traceEvents"]
            if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] == pid}


def timeline_gantt(source, run: str | None = None, start_ms: float | None = None,
                   span_ms: float | None = None, tokens: int = 12) -> plt.Figure:
    """What each actor does over a few decode steps: one row per stage, hits and misses.

    `run` picks a run by label prefix (default: the first PipeDec run); the window starts
    at the first committed token (or `start_ms`) and covers `tokens` commits (or `span_ms`).
    """
    trace = load_timeline(source)
    pid, label = _pick_run(trace, run)
    tracks = _tracks(trace, pid)
    evs = [e for e in trace["traceEvents"] if e.get("pid") == pid and e.get("ph") in ("X", "i")]
    commits = sorted(e["ts"] / 1e3 for e in evs if e["ph"] == "i" and e["name"] in COMMITS)
    if start_ms is None:
        start_ms = commits[0] if commits else 0.0
    if span_ms is None:
        later = [t for t in commits if t > start_ms]
        end = later[min(tokens, len(later)) - 1] if later else start_ms + 100.0
        span_ms = max(end - start_ms, 1.0) * 1.04
    end_ms = start_ms + span_ms
    order = sorted(tracks, key=lambda t: t)
    ypos = {tid: i for i, tid in enumerate(reversed(order))}
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.32 * len(order)))
    seen = set()
    for e in evs:
        if e["ph"] != "X":
            continue
        t0, t1 = e["ts"] / 1e3, (e["ts"] + e["dur"]) / 1e3
        if t1 < start_ms or t0 > end_ms:
            continue
        name = e["name"]
        color = SLICE_COLORS.get(name, "#999999")
        lab = SLICE_LABELS.get(name, name) if name not in seen else None
        seen.add(name)
        ax.broken_barh([(t0, t1 - t0)], (ypos[e["tid"]] - 0.4, 0.8), facecolors=color,
                       edgecolors="white", linewidth=0.3, label=lab)
    marks = {"hit": ("^", "#2ca02c"), "stall": ("v", "#ff7f0e"), "miss": ("x", "#d62728"),
             "accept": ("o", "#1f77b4"), "token": ("|", "#333333")}
    head_y = ypos.get(next((t for t, n in tracks.items() if n == "head"), order[0]), 0)
    for name, (m, c) in marks.items():
        ts = [e["ts"] / 1e3 for e in evs if e["ph"] == "i" and e["name"] == name
              and start_ms <= e["ts"] / 1e3 <= end_ms]
        if ts:
            ax.scatter(ts, [head_y] * len(ts), marker=m, color=c, s=40, zorder=3,
                       label={"hit": "hit (commit, tree kept)",
                              "miss": "miss (commit, tree flushed)",
                              "stall": "stall (hit on a node that was not in the next batch)",
                              "accept": "accept (verified tree)",
                              "token": "token (commit)"}[name])
            if name in ("miss", "stall"):
                for t in ts:
                    ax.axvline(t, color=c, lw=0.8, alpha=0.5, zorder=0)
    ax.set_yticks([ypos[t] for t in order], [tracks[t] for t in order])
    ax.set_xlim(start_ms, end_ms)
    ax.set_xlabel("simulated time (ms)")
    shown = {e["name"] for e in evs if e["ph"] == "i" and start_ms <= e["ts"] / 1e3 <= end_ms}
    notes = (["red lines: misses (tree flushed)"] if "miss" in shown else []) + \
        (["orange lines: stalls (pipeline refills)"] if "stall" in shown else [])
    ax.set_title(f"Pipeline timeline: {label} ({start_ms:.0f}-{end_ms:.0f} ms"
                 + ("; " + ", ".join(notes) if notes else "") + ")", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    return fig


def stage_busy(source, run: str | None = None) -> pd.DataFrame:
    """Per-actor busy time from a timeline: busy_ms, useful_ms (not cancelled), fraction."""
    trace = load_timeline(source)
    pid, _ = _pick_run(trace, run)
    tracks = _tracks(trace, pid)
    evs = [e for e in trace["traceEvents"] if e.get("pid") == pid and e.get("ph") == "X"]
    if not evs:
        raise ValueError("the run has no slices")
    t0 = min(e["ts"] for e in evs)
    t1 = max(e["ts"] + e["dur"] for e in evs)
    rows = []
    for tid, name in tracks.items():
        mine = [e for e in evs if e["tid"] == tid]
        busy = sum(e["dur"] for e in mine) / 1e3
        wasted = sum(e["dur"] for e in mine if "cancelled" in e["name"]) / 1e3
        rows.append({"actor": name, "busy_ms": busy, "cancelled_ms": wasted,
                     "utilization": busy / ((t1 - t0) / 1e3)})
    df = pd.DataFrame(rows)
    key = df.actor.map(lambda a: (1, int(a[5:])) if a.startswith("stage") else (0 if a in
                       ("head", "draft") else 2, 0))
    return df.assign(_k=key).sort_values("_k").drop(columns="_k").reset_index(drop=True)


def stage_utilization(source, run: str | None = None) -> plt.Figure:
    """Per-stage busy fraction over one run, split into useful and cancelled work."""
    trace = load_timeline(source)
    _, label = _pick_run(trace, run)
    df = stage_busy(trace, run)
    span = df.busy_ms / df.utilization.replace(0, np.nan)
    useful = (df.busy_ms - df.cancelled_ms) / span * 100
    cancelled = df.cancelled_ms / span * 100
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(df) + 2), 4))
    x = np.arange(len(df))
    ax.bar(x, useful.fillna(0), color=SLICE_COLORS["layer"], label="busy (kept work)")
    ax.bar(x, cancelled.fillna(0), bottom=useful.fillna(0), color=SLICE_COLORS["layer (cancelled)"],
           label="cancelled (pruned) work")
    ax.set_xticks(x, df.actor, rotation=45, ha="right")
    ax.set_ylabel("time busy (% of the run)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Utilisation per actor: {label}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# What `save` writes, by the file name's suffix (anything else: PNG).
IMAGE_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def save(fig: plt.Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write the figure atomically (PNG, or PDF/SVG by the name's suffix) and close it."""
    from pipedec_sim.atomic import atomic_path
    path = Path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower(), "png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt)
    plt.close(fig)
    return path
