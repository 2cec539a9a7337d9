"""Draft quality for SmolLM2-135M-Instruct: agreement, top-k coverage, step-time ratio.

    python benchmarks/draft_quality.py [--traces traces/real-*.jsonl.gz] [--draft DIR]
        [--fresh N --max-new-tokens M] [--no-timing] [--threads 1]

Per data set: top-1 agreement (the draft's top-1 equals the target's greedy token) and top-1/4/16
coverage (the target's token is within the draft's top-k), over every output position of the
recorded traces (teacher-forced: the draft sees the true prefix). By default the bundled traces
are read (no model run); `--fresh N` records N new prompts per held-out data set instead.

Step time: median wall time of one decode step with a KV cache (context 256), target vs draft,
for 1 token (autoregressive) and 16 tokens (one tree layer of width 16), interleaved reps so
that load from other processes hits both alike.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipedec_sim.inputs.traces import Trace, read_trace  # noqa: E402

HELD_OUT = ("mtbench", "humaneval", "gsm8k", "sharegpt")


def default_draft_dir() -> Path:
    root = os.environ.get("PIPEDEC_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "pipedec-sim"
    return base / "smollm2-draft"


def coverage(trace: Trace, ks=(1, 4, 16)) -> dict:
    n = 0
    hits = {k: 0 for k in ks}
    for r in trace.requests:
        for ids, tok in zip(r.topk_ids, r.output):
            n += 1
            for k in ks:
                if tok in ids[:k]:
                    hits[k] += 1
    out = {"requests": len(trace.requests), "positions": n}
    out.update({f"top{k}": hits[k] / max(1, n) for k in ks})
    return out


def step_times(target, draft, *, ctx: int = 256, widths=(1, 16), reps: int = 15) -> dict:
    import torch
    from transformers import DynamicCache

    def prep(m):
        c = DynamicCache(config=m.config)
        with torch.no_grad():
            m(input_ids=torch.randint(100, 40000, (1, ctx)), cache=c, use_cache=True,
              logits_to_keep=1)
        return c

    res = {}
    for w in widths:
        caches = {"target": prep(target), "draft": prep(draft)}
        times = {"target": [], "draft": []}
        x = torch.randint(100, 40000, (1, w))
        pos = torch.arange(ctx, ctx + w).unsqueeze(0)
        with torch.no_grad():
            for i in range(reps + 2):
                for name, m in (("target", target), ("draft", draft)):
                    t0 = time.perf_counter()
                    m(input_ids=x, position_ids=pos, cache=caches[name], use_cache=True)
                    dt = time.perf_counter() - t0
                    caches[name].crop(-w)
                    if i >= 2:
                        times[name].append(dt)
        t, d = statistics.median(times["target"]), statistics.median(times["draft"])
        res[w] = {"target_ms": t * 1e3, "draft_ms": d * 1e3, "ratio": d / t}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", nargs="*", default=None,
                    help="trace files (default: traces/real-*.jsonl*)")
    ap.add_argument("--draft", default=None, help="draft folder (default: "
                    "$PIPEDEC_CACHE/smollm2-draft, built by traces/make_real.py)")
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--fresh", type=int, default=0, help="record N new prompts per data set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the timing")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)

    rows = []
    if args.fresh:
        from backends.torch import datasets
        from backends.torch.trace_recorder import load_models, record_trace
        tgt, drf, tok, _, _ = load_models(args.target, str(args.draft or default_draft_dir()))
        for name in HELD_OUT:
            ps = datasets.load_prompts(name, max_requests=args.fresh)
            tr = record_trace(tgt, drf, tok, ps, max_new_tokens=args.max_new_tokens,
                              batch_size=8, progress=False)
            rows.append((name, coverage(tr), "fresh"))
    else:
        files = args.traces if args.traces is not None else \
            sorted(glob.glob(str(ROOT / "traces" / "real-*.jsonl*")))
        if not files:
            print("no traces given and none bundled (traces/real-*.jsonl*); use --fresh N",
                  file=sys.stderr)
            return 2
        for f in files:
            tr = read_trace(f)
            name = Path(f).name.split(".")[0].removeprefix("real-")
            rows.append((name, coverage(tr), Path(f).name))

    print("| data set | requests | positions | top-1 agreement | top-4 coverage | "
          "top-16 coverage | source |")
    print("|---|---|---|---|---|---|---|")
    for name, c, src in rows:
        print(f"| {name} | {c['requests']} | {c['positions']} | {c['top1']:.3f} | "
              f"{c['top4']:.3f} | {c['top16']:.3f} | {src} |")
    tot = sum(c["positions"] for _, c, _ in rows)
    if tot:
        mean = {k: sum(c[k] * c["positions"] for _, c, _ in rows) / tot
                for k in ("top1", "top4", "top16")}
        print(f"| all | {sum(c['requests'] for _, c, _ in rows)} | {tot} | {mean['top1']:.3f} | "
              f"{mean['top4']:.3f} | {mean['top16']:.3f} | |")

    if not args.no_timing:
        import torch
        from transformers import AutoModelForCausalLM

        from backends.torch.smollm2 import resolve_model
        torch.set_num_threads(args.threads)
        ddir = Path(args.draft) if args.draft else default_draft_dir()
        if not (ddir / "config.json").is_file():
            print(f"\nno draft at {ddir}: skipping step times (build it with "
                  "traces/make_real.py or pass --draft)", file=sys.stderr)
            return 0
        tgt = AutoModelForCausalLM.from_pretrained(resolve_model(args.target),
                                                   dtype=torch.float32).eval()
        drf = AutoModelForCausalLM.from_pretrained(ddir, dtype=torch.float32).eval()
        st = step_times(tgt, drf, reps=args.reps)
        print(f"\nstep time, fp32, {args.threads} thread(s), KV cache at context 256, median of "
              f"{args.reps} interleaved reps (target {tgt.config.num_hidden_layers} layers, "
              f"draft {drf.config.num_hidden_layers} layers; both with the 49152x576 LM head):")
        print("| tokens per step | target ms | draft ms | draft/target |")
        print("|---|---|---|---|")
        for w, r in st.items():
            print(f"| {w} | {r['target_ms']:.1f} | {r['draft_ms']:.1f} | {r['ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
