"""PP, tree-SD and PipeDec on clusters nobody here has: analytic profiles + acceptance proxies.

    python benchmarks/cluster_table.py [--requests 20] [--keep DIR]

For each cluster below: `pipedec-sim profile analytic` writes its profile, a synthetic trace
is drawn from the pair's bundled acceptance proxy (`llama70b-1b-proxy`, `llama8b-1b-proxy`:
published figures, see their `source`), and `pipedec-sim run` simulates plain PP (ar),
tree-SD and PipeDec on it with the default knobs. Prints TBT per strategy and PipeDec's
speedups over PP and over tree-SD. Every GPU is a stage (topology B: the draft shares stage
1's GPU). Absolute numbers are the analytic model's (roofline fitted to an H100: see
benchmarks/analytic_fit.py); the acceptance is a proxy, not a recording of these models.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipedec_sim.inputs.acceptance import load_acceptance, synthetic_trace  # noqa: E402
from pipedec_sim.inputs.traces import write_trace  # noqa: E402

CLUSTERS = [  # label, profile analytic flags, target, acceptance proxy
    ("8 x A100-80GB, 4 servers x 2 (NVLink), 25 GbE",
     ["--gpu", "a100-80gb", "--servers", "4", "--gpus-per-server", "2",
      "--intra-link", "nvlink", "--inter-link", "25gbe"], "llama-3.1-70b", "llama70b-1b-proxy"),
    ("8 x A100-80GB, 4 servers x 2 (NVLink), 25 GbE",
     ["--gpu", "a100-80gb", "--servers", "4", "--gpus-per-server", "2",
      "--intra-link", "nvlink", "--inter-link", "25gbe"], "llama-3.1-8b", "llama8b-1b-proxy"),
    ("14 x RTX 4090, 1 per server, 10 GbE",
     ["--gpu", "rtx-4090", "--servers", "14", "--gpus-per-server", "1",
      "--inter-link", "10gbe"], "llama-3.1-70b", "llama70b-1b-proxy"),
]
DRAFT = "llama-3.2-1b"
PROMPT_LEN = (64, 512)
OUTPUT_LEN = 256


def sim(*args: str) -> None:
    """A pipedec-sim command; its tables are read from --out, its warnings shown."""
    r = subprocess.run([sys.executable, "-m", "pipedec_sim.programs.cli", *args],
                       cwd=ROOT, capture_output=True, text=True)
    for line in r.stderr.splitlines():
        if "warning" in line or "error" in line:
            print(line, file=sys.stderr)
    if r.returncode:
        raise SystemExit(f"pipedec-sim {' '.join(args[:2])} failed (exit {r.returncode})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20,
                    help="synthetic requests per pair (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="trace and simulation seed (default 0)")
    ap.add_argument("--keep", type=Path, default=None,
                    help="write the profiles, traces and run outputs here (default: a temp dir)")
    args = ap.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="cluster-table-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (label, flags, target, proxy) in enumerate(CLUSTERS):
        prof, trace, out = (work / f"profile-{i}.json", work / f"trace-{proxy}.jsonl",
                            work / f"run-{i}")
        sim("profile", "analytic", *flags, "--target", target, "--draft", DRAFT,
            "--topology", "B", "--out", str(prof), "--quiet")
        if not trace.exists():
            model = load_acceptance(proxy)
            write_trace(synthetic_trace(
                requests=args.requests, output_len=OUTPUT_LEN, prompt_len=PROMPT_LEN,
                model=model, seed=args.seed, dataset="synthetic (Alpaca-like lengths)",
                target=model.target, draft=model.draft,
                command=f"benchmarks/cluster_table.py --requests {args.requests}"), trace)
        stages = "8" if "A100" in label else "14"
        sim("run", "--trace", str(trace), "--profile", str(prof), "--stages", stages,
            "--topology", "B", "--max-requests", str(args.requests), "--seed", str(args.seed),
            "--out", str(out), "--quiet")
        with open(out / "summary.csv", newline="") as f:
            s = {r["strategy"]: r for r in csv.DictReader(f)}
        rows.append((label, f"{target.removeprefix('llama-')}/1b", stages,
                     *(float(s[k]["tbt_ms"]) for k in ("ar", "tree-sd", "pipedec")),
                     float(s["pipedec"]["speedup_vs_ar"]),
                     float(s["pipedec"]["speedup_vs_tree_sd"]),
                     float(s["tree-sd"]["speedup_vs_ar"]), float(s["pipedec"]["hit_rate"])))
    print(f"trace: synthetic, {args.requests} requests drawn from the pair's acceptance proxy "
          f"(prompt {PROMPT_LEN[0]}..{PROMPT_LEN[1]} tokens, {OUTPUT_LEN} output tokens, seed "
          f"{args.seed}); topology B; default knobs; TBT in ms")
    head = ("cluster", "models", "S", "PP", "tree-SD", "PipeDec", "PipeDec/PP",
            "PipeDec/tree-SD", "tree-SD/PP", "PipeDec hit")
    w = [max(len(head[0]), *(len(r[0]) for r in rows)), 9, 3, 7, 8, 8, 11, 16, 11, 11]
    print("  ".join(h.ljust(w[0]) if k == 0 else h.rjust(w[k]) for k, h in enumerate(head)))
    for r in rows:
        cells = [r[0].ljust(w[0]), r[1].rjust(w[1]), r[2].rjust(w[2])]
        cells += [f"{x:.2f}".rjust(w[k]) for k, x in zip(range(3, 6), r[3:6])]
        cells += [f"{x:.2f}x".rjust(w[k]) for k, x in zip(range(6, 9), r[6:9])]
        cells.append(f"{r[9]:.3f}".rjust(w[9]))
        print("  ".join(cells))
    print(f"files: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
