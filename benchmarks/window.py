"""PipeDec's in-flight window on the real backend: ms per token with and without it.

    python benchmarks/window.py [--stages 2] [--rounds 3] [--out FILE]

Runs `pipedec-real run --strategies pipedec` on the tiny models over the bundled sample
prompts, alternating the default window (S + 1 batches in flight) and none (--window
10**9, so the draft injects a layer whenever stage 1 is free), and prints each round's
ms per token (`tbt_ms` of summary.csv) and the medians' ratio. Without the window a stage
slower than stage 1 queues layers without bound, and prune notices travelling in-band
wait behind the queue (`docs/ARCHITECTURE.md`, flow control).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipedec_sim.inputs.host import describe, host_record  # noqa: E402

WINDOWS = {"window S+1 (default)": [], "no window": ["--window", str(10**9)]}


def tbt_ms(args, extra: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "backends.torch.cli", "run", "--target", "tiny",
           "--draft", "tiny-noisy", "--stages", str(args.stages), "--strategies", "pipedec",
           "--prompts", str(ROOT / "traces/samples/prompts.txt"), "--max-new-tokens",
           str(args.max_new_tokens), "--quiet", "--out", str(out), *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if res.returncode:
        raise SystemExit(f"window: {' '.join(cmd)} failed: {res.stderr.strip()[-400:]}")
    import pandas as pd
    return float(pd.read_csv(out / "summary.csv").tbt_ms.iloc[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", type=int, default=2, help="pipeline stages (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per setting (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=32,
                    help="tokens per prompt (default 32)")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    lines = [f"# python benchmarks/window.py {' '.join(argv or sys.argv[1:])}",
             f"# host: {describe(host_record())}; load average before {os.getloadavg()}"]
    times: dict[str, list[float]] = {name: [] for name in WINDOWS}
    with tempfile.TemporaryDirectory(prefix="window-") as tmp:
        for r in range(args.rounds):
            for name, extra in WINDOWS.items():
                print(f"[window] round {r + 1}/{args.rounds}: {name}", file=sys.stderr,
                      flush=True)
                times[name].append(tbt_ms(args, extra, Path(tmp) / f"{r}-{len(extra)}"))
    lines.append(f"pipedec, tiny models, S={args.stages}: ms per token, rounds in order")
    for name, ts in times.items():
        lines.append(f"  {name:<22} " + "  ".join(f"{t:7.2f}" for t in ts)
                     + f"   median {statistics.median(ts):7.2f}")
    med = [statistics.median(ts) for ts in times.values()]
    lines.append(f"  no window / window: {med[1] / med[0]:.2f}x")
    lines.append(f"# load average after {os.getloadavg()}")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
