"""`pipedec-sim plot`: PNGs from sweep results or a timeline JSON, without a notebook."""
from __future__ import annotations

import sys
from pathlib import Path

from pipedec_sim.errors import InputError
from pipedec_sim.inputs.limits import MAX_DPI

KINDS = ("speedup", "stages", "width", "timeline", "utilization", "serving")
# The columns a summary table needs, by kind (serving: a serving summary from a rate sweep).
_SUMMARY_COLUMNS = ("strategy", "stages", "tbt_ms")
_SERVING_COLUMNS = ("strategy", "throughput_tok_s", "tbt_p50_ms", "tbt_p99_ms")
# Of those, the measures: numbers, and > 0 where given (a speedup divides by them).
_POSITIVE_COLUMNS = ("stages", "tbt_ms", "throughput_tok_s", "tbt_p50_ms", "tbt_p99_ms")
# Kinds that compare every strategy with plain PP, so need its rows.
_NEEDS_AR = ("speedup", "stages")


def condition(text: str) -> tuple[str, str]:
    """A --where value: KEY=VALUE."""
    import argparse
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. floor=0.1), got {text!r}")
    return key.strip(), value.strip()


def add_parser(sub) -> None:
    from pipedec_sim.programs.flags import file_path, number, positive
    p = sub.add_parser("plot", help="draw a PNG from sweep results or a timeline JSON",
                       description="Draw one PNG. RESULTS is a sweep folder or a summary.csv "
                       "or .parquet (from `sweep` or `run --out`) for speedup/stages/width/"
                       "utilization, a serving summary (one row per strategy and rate or "
                       "concurrency) for serving, or a timeline JSON (`run --timeline`) for "
                       "timeline (and for utilization per stage).")
    p.add_argument("results", type=file_path, metavar="RESULTS")
    p.add_argument("--kind", required=True, choices=KINDS,
                   help="speedup: bars vs plain PP and tree SD; stages: speedup vs S with the "
                        "S/(p+(1-p)S) curve; width: W x k heatmap; timeline: Gantt of the "
                        "stages; utilization: stage utilisation and wasted work; serving: TBT "
                        "p50/p99 against throughput, one line per strategy")
    p.add_argument("--out", type=file_path, required=True,
                   help="image to write: .png, .pdf or .svg (the format follows the name)")
    p.add_argument("--stages", type=positive(), default=None,
                   help="which S to show for speedup/width/utilization (default: the largest)")
    p.add_argument("--where", type=condition, action="append", default=[], metavar="KEY=VALUE",
                   help="sweep results: keep only rows with this setting, e.g. floor=0.1, "
                        "profile=analytic-llama70b-1b, prune=inband (repeatable; keys are the "
                        "summary's columns without cfg_)")
    p.add_argument("--metric", default="tbt_ms",
                   choices=("tbt_ms", "speedup_vs_ar", "hit_rate", "wasted_per_token",
                            "utilization", "tokens_per_s"),
                   help="width heatmap value (default tbt_ms)")
    p.add_argument("--run", default=None,
                   help="timeline: which run, by label prefix (default: the first pipedec run)")
    p.add_argument("--start-ms", type=number(float, lo=0), default=None,
                   help="timeline: window start (default: the first committed token)")
    p.add_argument("--span-ms", type=positive(float), default=None,
                   help="timeline: window length (default: enough for --tokens commits)")
    p.add_argument("--tokens", type=positive(), default=12,
                   help="timeline: commits to show when --span-ms is not given (default 12)")
    p.add_argument("--dpi", type=positive(hi=MAX_DPI), default=110,
                   help=f"resolution of the PNG (default 110, at most {MAX_DPI})")


def _is_timeline(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".json"


def _read_summary(path: Path, required=_SUMMARY_COLUMNS):
    import pandas as pd

    from pipedec_sim.inputs.files import file_problem
    p = _summary_file(path)
    problem = file_problem(p)
    if problem is not None:
        raise InputError(problem + (" (expected a sweep folder with summary.csv or "
                                    "summary.parquet)" if path.is_dir() else ""), file=p)
    if p.suffix.lower() == ".parquet":
        return _checked_summary(_read_parquet(p), p, required)
    try:
        df = pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"not a CSV table: {e}", file=p) from None
    return _checked_summary(df, p, required)


def _summary_file(path: Path) -> Path:
    """A folder's summary.csv, or its summary.parquet if it has only that one."""
    if not path.is_dir():
        return path
    if not (path / "summary.csv").exists() and (path / "summary.parquet").exists():
        return path / "summary.parquet"
    return path / "summary.csv"


def _read_parquet(p: Path):
    from pipedec_sim.results.tables import check_out_format, read_table
    check_out_format("parquet", field="RESULTS")          # pyarrow, or one line
    try:
        return read_table(p, "parquet")
    except (OSError, ValueError) as e:                   # pyarrow's ArrowInvalid is one
        raise InputError(f"not a Parquet table: {str(e).splitlines()[0]}", file=p) from None


def _checked_summary(df, p: Path, required=_SUMMARY_COLUMNS):
    missing = [c for c in required if c not in df.columns]
    if missing:
        what = "serving summary" if required == _SERVING_COLUMNS else "summary"
        raise InputError(f"not a {what} table: missing column(s) {', '.join(missing)}", file=p)
    if not len(df):
        raise InputError("empty table", file=p)
    for col in (c for c in _POSITIVE_COLUMNS if c in required):
        _check_measure(df, col, p)
    return df


def _check_measure(df, col: str, p: Path) -> None:
    """Column `col` holds numbers, > 0 where given, at least one (InputError naming the
    row: its CSV line)."""
    import pandas as pd
    values = pd.to_numeric(df[col], errors="coerce")
    bad = (values.isna() & df[col].notna()) | (values <= 0) | values.isin([float("inf")])
    if bad.any():
        i = int(bad.to_numpy().argmax())
        v = df[col].iloc[i]
        shown = repr(v) if isinstance(v, str) else str(v)
        raise InputError(f"expected a number > 0, got {shown}", file=p,
                         line=i + 2 if p.suffix.lower() != ".parquet" else None, field=col)
    if values.isna().all():
        raise InputError("no values (every row is empty)", file=p, field=col)


def _read_timeline(path: Path) -> dict:
    from pipedec_sim.inputs.files import load_json, read_text
    data = load_json(read_text(path), file=path)    # regular files only, nesting bounded
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise InputError("not a Chrome trace (no traceEvents list)", file=path,
                         field="traceEvents")
    return data


def cmd_plot(args) -> int:
    from analysis import plots
    from pipedec_sim.atomic import check_output
    check_output(args.out, "--out")                  # before any work
    if args.out.suffix.lower() not in plots.IMAGE_FORMATS:
        raise InputError(f"expected a file name ending in {', '.join(plots.IMAGE_FORMATS)}",
                         file=args.out, field="--out")
    try:
        if args.kind == "timeline" or (args.kind == "utilization" and _is_timeline(args.results)):
            if args.where:
                raise InputError("selects rows of sweep results, not of a timeline (use --run)",
                                 field="--where")
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
            required = _SERVING_COLUMNS if args.kind == "serving" else _SUMMARY_COLUMNS
            df = _select(plots, _read_summary(args.results, required), args.where)
            if args.kind in _NEEDS_AR and not (df.strategy == "ar").any():
                raise InputError(f"--kind {args.kind} compares with plain PP, but no row has "
                                 "strategy ar", file=args.results, field="strategy")
            if args.kind == "serving":
                fig = plots.serving_curves(df)
            elif args.kind == "speedup":
                fig = plots.speedup_bars(df, stages=args.stages)
            elif args.kind == "stages":
                fig = plots.speedup_vs_stages(df)
            elif args.kind == "width":
                fig = plots.width_heatmap(df, metric=args.metric, stages=args.stages)
                note = plots.width_slice(df, args.metric, args.stages)[3]
                print(f"width heatmap of {note}", file=sys.stderr)
            else:
                fig = plots.utilization_bars(df, stages=args.stages)
    except ValueError as e:          # a table without what this kind of plot needs
        if isinstance(e, InputError):
            raise
        raise InputError(str(e), file=args.results) from None
    plots.save(fig, args.out, dpi=args.dpi)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _select(plots, df, conditions: list[tuple[str, str]]):
    """The rows of every --where condition (InputError naming the flag)."""
    if not conditions:
        return df
    try:
        return plots.where(df, dict(conditions))
    except ValueError as e:
        raise InputError(str(e), field="--where") from None
