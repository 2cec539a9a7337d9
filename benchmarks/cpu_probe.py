"""CPU-time accounting of a real `pipedec-real run` (issue 6), without touching the runtime.

    python benchmarks/cpu_probe.py --stages 4 [--strategies ar,pipedec] [--work DIR]

Runs `pipedec-real run` with a `sitecustomize` on PYTHONPATH (only while PIPEDEC_CPU_PROBE
names an output folder) that wraps, in the head and in every spawned stage process:

  stage   run_stage (thread CPU + wall, rows, context per call), the on_batch / on_update
          handlers (thread CPU incl. payload recv, tensor_rows, isends), and per request
          the process CPU (all threads: main + gloo's) between RESET and REPORT;
  head    the draft (Draft.propose), the LM head (Verifier.verify), the strategy + wire
          (Head.feed), per request the main thread's, the reader threads' and the whole
          process's CPU.

Then it simulates the same requests (trace oracle, the fidelity benchmark's pipeline
options) and prints, per actor and strategy, real CPU vs simulated work in ms per output
token, split into: modelled compute, compute inflation (real CPU in run_stage over the
profile's prediction for the same rows and context) and per-message overhead (CPU outside
the compute, per batch and per prune notice). Those are the numbers the optional profile
fields `stage_overhead` / `head_cpu` model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENV = "PIPEDEC_CPU_PROBE"
SITE = ('import os\nif os.environ.get("PIPEDEC_CPU_PROBE"):\n'
        '    import benchmarks.cpu_probe as _p\n    _p.install(os.environ["PIPEDEC_CPU_PROBE"])\n')


# ---- inside the probed processes ------------------------------------------------------

def _cpu() -> float:
    return time.thread_time() * 1e3


class Acc:
    """Per-request counters of one process, dumped as one JSON line per request."""

    def __init__(self, path: Path):
        self.path = path
        self.reset(None)

    def reset(self, req) -> None:
        self.req, self.calls, self.sums = req, [], {}
        self.t0 = (time.process_time() * 1e3, _cpu(), time.perf_counter() * 1e3)
        self.threads: dict[int, float] = {}

    def add(self, key: str, cpu: float, wall: float, n: int = 1) -> None:
        s = self.sums.setdefault(key, [0.0, 0.0, 0])
        s[0] += cpu
        s[1] += wall
        s[2] += n

    def dump(self, extra: dict | None = None) -> None:
        p, t, w = self.t0
        rec = {"req": self.req, "process_cpu_ms": time.process_time() * 1e3 - p,
               "main_cpu_ms": _cpu() - t, "wall_ms": time.perf_counter() * 1e3 - w,
               "sums": self.sums, "calls": self.calls, **(extra or {})}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def _timed(acc_of, key, fn, on_call=None):
    def wrapper(*a, **kw):
        c, w = _cpu(), time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            dc, dw = _cpu() - c, (time.perf_counter() - w) * 1e3
            acc = acc_of(a)
            if acc is not None:
                acc.add(key, dc, dw)
                if on_call:
                    on_call(acc, a, dc, dw)
    wrapper.__wrapped__ = fn
    return wrapper


def install(out_dir: str) -> None:
    """Patch the worker (every process) and the head (the CLI process)."""
    import backends.torch.runtime as runtime
    import backends.torch.shard as shard
    import backends.torch.worker as worker
    out = Path(out_dir)
    _install_stage(worker, out)
    _install_head(runtime, shard, out)


def _install_stage(worker, out: Path) -> None:
    S = worker.Stage
    orig_init, orig_reset, orig_report = S.__init__, S.on_reset, S.on_report

    def init(self, cfg, j, *rest):
        orig_init(self, cfg, j, *rest)
        self._acc = Acc(out / f"stage{j}.jsonl")
        worker._probe_acc = self._acc

    def on_reset(self, h):
        self._acc.reset(int(h[1]))
        orig_reset(self, h)

    def on_report(self, h):
        self._acc.dump({"stage": self.j})
        orig_report(self, h)

    def stage_acc(a):
        return getattr(worker, "_probe_acc", None)

    orig_run = worker.run_stage

    def run_stage(shard, batch, hidden):
        ctx = shard.state.context
        c, w = _cpu(), time.perf_counter()
        res = orig_run(shard, batch, hidden)
        dc, dw = _cpu() - c, (time.perf_counter() - w) * 1e3
        acc = stage_acc(None)
        if acc is not None:
            n = len(res[0].rows) if res[0] is not None else 0
            acc.add("run_stage", dc, dw)
            acc.calls.append((n, ctx, round(dc, 4), round(dw, 4)))
        return res
    worker.run_stage = run_stage
    S.__init__, S.on_reset, S.on_report = init, on_reset, on_report
    S.on_batch = _timed(stage_acc, "on_batch", S.on_batch)
    S.on_update = _timed(stage_acc, "on_update", S.on_update)


def _install_head(runtime, shard, out: Path) -> None:
    from backends.torch import head as head_mod
    P, H = runtime.DistributedPipeline, head_mod.Head
    acc = Acc(out / "head.jsonl")
    readers: list[int] = []

    def hacc(a):
        return acc

    orig_reader, orig_run = P._reader, P.run

    def reader(self, read, *rest):
        readers.append(__import__("threading").get_ident())
        return orig_reader(self, read, *rest)

    def thread_cpu() -> dict:
        res = {}
        for ident in readers:
            try:
                res[ident] = time.clock_gettime(time.pthread_getcpuclockid(ident)) * 1e3
            except (OSError, ProcessLookupError):
                pass
        return res

    def run(self, name, req):
        acc.reset(f"{name}/{req.id}")
        r0 = thread_cpu()
        rec = orig_run(self, name, req)
        r1 = thread_cpu()
        acc.dump({"strategy": name, "request": req.id, "seq": self.seq,
                  "readers_cpu_ms": sum(r1[k] - r0.get(k, 0.0) for k in r1),
                  "end_ms": rec.end_ms, "batches": rec.batches})
        return rec

    def draft_call(a_, a, dc, dw):
        acc.calls.append(("draft", len(a[1]), a[0].shard.state.context, round(dc, 4),
                          round(dw, 4)))

    P._reader, P.run = reader, run
    shard.Draft.propose = _timed(hacc, "draft", shard.Draft.propose, draft_call)
    shard.Verifier.verify = _timed(hacc, "lm_head", shard.Verifier.verify)
    H.feed = _timed(hacc, "feed", H.feed)
    P._handle = _timed(hacc, "handle", P._handle)


# ---- the benchmark ----------------------------------------------------------------------

def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def probed_run(args, work: Path) -> Path:
    """`pipedec-real run` with the probe on; returns the folder of probe files."""
    import subprocess
    site, probe = work / "site", work / "probe"
    site.mkdir(parents=True, exist_ok=True)
    probe.mkdir(exist_ok=True)
    for f in probe.glob("*.jsonl"):
        f.unlink()
    (site / "sitecustomize.py").write_text(SITE)
    prompts = work / "prompts.txt"
    from benchmarks.fidelity import DEFAULT_PROMPTS
    prompts.write_text("\n".join(DEFAULT_PROMPTS) + "\n")
    env = dict(os.environ, **{ENV: str(probe)})
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "backends.torch.cli", "run", "--target", args.target,
           "--draft", args.draft, "--stages", str(args.stages), "--prompts", str(prompts),
           "--strategies", args.strategies, "--max-new-tokens", str(args.max_new_tokens),
           "--max-requests", str(args.max_requests), "--width", "4", "--topk", "4",
           "--out", str(work / "real"), "--quiet", "--timeout", "300"]
    print(f"[probe] load average before {load_avg()}", flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    print(f"[probe] real run {time.perf_counter() - t:.0f} s; load average after "
          f"{load_avg()}", flush=True)
    return probe


def read_probe(probe: Path) -> tuple[list[dict], dict[int, list[dict]]]:
    head = [json.loads(x) for x in (probe / "head.jsonl").read_text().splitlines()]
    stages = {}
    for f in sorted(probe.glob("stage*.jsonl")):
        recs = [json.loads(x) for x in f.read_text().splitlines()]
        stages[recs[0]["stage"]] = recs
    return head, stages


def analyse(head: list[dict], stages: dict, profile, S: int) -> list[dict]:
    """One row per (strategy, actor): real CPU split by where it goes, per output token."""
    import pandas as pd
    layers = profile.stage_layers(S)
    by_seq = {h["seq"]: h for h in head}
    rows = []
    for h in head:
        rows.append({"strategy": h["strategy"], "request": h["request"], "actor": "head",
                     "wall_ms": h["wall_ms"], "process_cpu_ms": h["process_cpu_ms"],
                     "main_cpu_ms": h["main_cpu_ms"], "readers_cpu_ms": h["readers_cpu_ms"],
                     **{f"{k}_cpu_ms": v[0] for k, v in h["sums"].items()},
                     **{f"{k}_wall_ms": v[1] for k, v in h["sums"].items()},
                     **{f"{k}_n": v[2] for k, v in h["sums"].items()},
                     "draft_model_ms": sum(profile.draft_step(n, c)
                                           for kind, n, c, *_ in h["calls"] if kind == "draft"
                                           and n)})
    for j, recs in stages.items():
        for r in recs:
            h = by_seq.get(r["req"])
            if h is None:
                continue
            calls = [c for c in r["calls"] if c[0]]
            model = sum(layers[j - 1] * profile.layer(n, c) + (profile.embed(n) if j == 1
                                                                 else 0.0)
                        for n, c, *_ in calls)
            s = r["sums"]
            rows.append({"strategy": h["strategy"], "request": h["request"],
                         "actor": f"stage{j}", "wall_ms": r["wall_ms"],
                         "process_cpu_ms": r["process_cpu_ms"], "main_cpu_ms": r["main_cpu_ms"],
                         "run_stage_cpu_ms": sum(c[2] for c in calls),
                         "run_stage_wall_ms": sum(c[3] for c in calls),
                         "compute_model_ms": model, "computed": len(calls),
                         "batches": s.get("on_batch", [0, 0, 0])[2],
                         "on_batch_cpu_ms": s.get("on_batch", [0, 0, 0])[0],
                         "updates": s.get("on_update", [0, 0, 0])[2],
                         "on_update_cpu_ms": s.get("on_update", [0, 0, 0])[0]})
    return pd.DataFrame(rows)


def report(df, real_csv: Path) -> None:
    import pandas as pd
    real = pd.read_csv(real_csv, dtype={"request": str})
    tokens = real.groupby("strategy").tokens.sum()
    st = df[df.actor != "head"].copy()
    st["other_threads_cpu_ms"] = st.process_cpu_ms - st.main_cpu_ms
    st["outside_cpu_ms"] = st.main_cpu_ms - st.run_stage_cpu_ms
    g = st.groupby(["strategy", "actor"]).sum(numeric_only=True)
    print("\nStages (sums over the requests):")
    show = pd.DataFrame({
        "batches": g.batches, "computed": g.computed, "updates": g.updates,
        "wall s": (g.wall_ms / 1e3).round(2),
        "proc CPU s": (g.process_cpu_ms / 1e3).round(2),
        "compute model ms": g.compute_model_ms.round(0),
        "run_stage CPU ms": g.run_stage_cpu_ms.round(0),
        "run_stage wall ms": g.run_stage_wall_ms.round(0),
        "CPU/model": (g.run_stage_cpu_ms / g.compute_model_ms).round(3),
        "wall/CPU": (g.run_stage_wall_ms / g.run_stage_cpu_ms).round(3),
        "outside ms/msg": (g.outside_cpu_ms / (g.batches + g.updates)).round(3),
        "gloo thr ms/msg": (g.other_threads_cpu_ms / (g.batches + g.updates)).round(3)})
    print(show.to_string())
    hd = df[df.actor == "head"].groupby("strategy").sum(numeric_only=True)
    print("\nHead (ms per output token):")
    cols = {"wall": "wall_ms", "process CPU": "process_cpu_ms", "main CPU": "main_cpu_ms",
            "readers CPU": "readers_cpu_ms", "draft CPU": "draft_cpu_ms",
            "draft wall": "draft_wall_ms", "draft model": "draft_model_ms",
            "lm CPU": "lm_head_cpu_ms", "feed CPU": "feed_cpu_ms",
            "handle CPU": "handle_cpu_ms"}
    hshow = pd.DataFrame({k: (hd[v] / tokens.reindex(hd.index)).round(2)
                          for k, v in cols.items() if v in hd})
    hshow["events"] = hd.get("feed_n", 0)
    hshow["handled"] = hd.get("handle_n", 0)
    print(hshow.to_string())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--draft", default="smollm2-draft")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--strategies", default="ar,tree-sd,pipedec")
    ap.add_argument("--max-requests", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--profile", default="cpu-smollm2")
    ap.add_argument("--work", default=None)
    ap.add_argument("--analyse-only", action="store_true")
    args = ap.parse_args(argv)
    from pipedec_sim.inputs.profile import load_profile
    work = Path(args.work or tempfile.mkdtemp(prefix="pipedec-probe-"))
    probe = work / "probe" if args.analyse_only else probed_run(args, work)
    head, stages = read_probe(probe)
    df = analyse(head, stages, load_profile(args.profile), args.stages)
    df.to_csv(work / "probe.csv", index=False)
    report(df, work / "real" / "requests.csv")
    print(f"\n[probe] files in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
