"""Writing a program's result tables (and timeline) all or none."""
from __future__ import annotations

import sys


def write_run_outputs(args, result) -> None:
    """summary and requests (--out, in --out-format) and the timeline (--timeline), all or
    none: each is written to a temp file, and they replace their targets only once all
    are written."""
    import json

    from pipedec_sim.atomic import atomic_paths
    from pipedec_sim.results.tables import table_name, write_table
    from pipedec_sim.results.timeline import chrome_trace
    fmt = args.out_format
    outputs = []
    if args.out:
        outputs += [(args.out / table_name("summary", fmt), result.summary),
                    (args.out / table_name("requests", fmt), result.requests)]
    if args.timeline:
        outputs.append((args.timeline, chrome_trace({f"{s} / request {r}": evs for (s, r), evs
                                                     in result.timelines.items()})))
    if not outputs:
        return
    with atomic_paths(path for path, _ in outputs) as temps:
        for tmp, (_, data) in zip(temps, outputs):
            if isinstance(data, dict):
                tmp.write_text(json.dumps(data), encoding="utf-8")
            else:
                write_table(data, tmp, fmt)
    if args.out:
        print(f"wrote {outputs[0][0]} and {outputs[1][0]}", file=sys.stderr)
    if args.timeline:
        print(f"wrote {args.timeline} (open in ui.perfetto.dev or chrome://tracing)",
              file=sys.stderr)
