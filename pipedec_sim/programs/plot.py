"""`pipedec-sim plot`: PNGs from sweep results or a timeline JSON, without a notebook."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipedec_sim.errors import InputError

KINDS = ("speedup", "stages", "width", "timeline", "utilization")


def add_parser(sub) -> None:
    from pipedec_sim.programs.flags import positive
    p = sub.add_parser("plot", help="draw a PNG from sweep results or a timeline JSON",
                       description="Draw one PNG. RESULTS is a sweep folder or a summary.csv "
                       "(from `sweep` or `run --out`) for speedup/stages/width/utilization, or "
                       "a timeline JSON (`run --timeline`) for timeline (and for utilization "
                       "per stage).")
    p.add_argument("results", type=Path, metavar="RESULTS")
    p.add_argument("--kind", required=True, choices=KINDS,
                   help="speedup: bars vs plain PP and tree SD; stages: speedup vs S with the "
                        "S/(p+(1-p)S) curve; width: W x k heatmap; timeline: Gantt of the "
                        "stages; utilization: stage utilisation and wasted work")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    p.add_argument("--stages", type=positive(), default=None,
                   help="which S to show for speedup/width/utilization (default: the largest)")
    p.add_argument("--metric", default="tbt_ms",
                   choices=("tbt_ms", "speedup_vs_ar", "hit_rate", "wasted_per_token",
                            "utilization", "tokens_per_s"),
                   help="width heatmap value (default tbt_ms)")
    p.add_argument("--run", default=None,
                   help="timeline: which run, by label prefix (default: the first pipedec run)")
    p.add_argument("--start-ms", type=float, default=None,
                   help="timeline: window start (default: the first committed token)")
    p.add_argument("--span-ms", type=positive(float), default=None,
                   help="timeline: window length (default: enough for --tokens commits)")
    p.add_argument("--tokens", type=positive(), default=12,
                   help="timeline: commits to show when --span-ms is not given (default 12)")
    p.add_argument("--dpi", type=positive(), default=110)


def _is_timeline(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".json"


def _read_summary(path: Path):
    import pandas as pd
    p = path / "summary.csv" if path.is_dir() else path
    if not p.is_file():
        raise InputError("no such file" + (" (expected a sweep folder with summary.csv)"
                                           if path.is_dir() else ""), file=p)
    try:
        df = pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"not a CSV table: {e}", file=p) from None
    missing = [c for c in ("strategy", "stages", "tbt_ms") if c not in df.columns]
    if missing:
        raise InputError(f"not a summary table: missing column(s) {', '.join(missing)}", file=p)
    if not len(df):
        raise InputError("empty table", file=p)
    return df


def _read_timeline(path: Path) -> dict:
    if not path.is_file():
        raise InputError("no such file", file=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"not JSON: {e}", file=path,
                         line=getattr(e, "lineno", None)) from None
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise InputError("not a Chrome trace (no traceEvents list)", file=path,
                         field="traceEvents")
    return data


def cmd_plot(args) -> int:
    from analysis import plots
    try:
        if args.kind == "timeline" or (args.kind == "utilization" and _is_timeline(args.results)):
            tl = _read_timeline(args.results)
            if args.kind == "timeline":
                fig = plots.timeline_gantt(tl, run=args.run, start_ms=args.start_ms,
                                           span_ms=args.span_ms, tokens=args.tokens)
            else:
                fig = plots.stage_utilization(tl, run=args.run)
        else:
            if _is_timeline(args.results):
                raise InputError(f"--kind {args.kind} needs sweep results (a folder or "
                                 "summary.csv), not a timeline", file=args.results)
            df = _read_summary(args.results)
            if args.kind == "speedup":
                fig = plots.speedup_bars(df, stages=args.stages)
            elif args.kind == "stages":
                fig = plots.speedup_vs_stages(df)
            elif args.kind == "width":
                fig = plots.width_heatmap(df, metric=args.metric, stages=args.stages)
            else:
                fig = plots.utilization_bars(df, stages=args.stages)
    except ValueError as e:          # a table without what this kind of plot needs
        if isinstance(e, InputError):
            raise
        raise InputError(str(e), file=args.results) from None
    plots.save(fig, args.out, dpi=args.dpi)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
