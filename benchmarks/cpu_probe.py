"""CPU-time accounting of a real `pipedec-real run` (issue 6), without touching the runtime.

    python benchmarks/cpu_probe.py --stages 4 [--strategies ar,pipedec] [--work DIR]

Runs `pipedec-real run` with a `sitecustomize` on PYTHONPATH (only while PIPEDEC_CPU_PROBE
names an output folder) that wraps, in the head and in every spawned stage process:

  stage   run_stage (thread CPU + wall, rows, context per call), the on_batch / on_update
          handlers (thread CPU incl. payload recv, tensor_rows, isends), and per request
          the process CPU (all threads: main + gloo's) between RESET and REPORT;
  head    the draft (DraftModel.propose), the LM head (Verifier.verify), the strategy + wire
          (Head.feed), per request the main thread's, the reader threads' and the whole
          process's CPU.

Then it simulates the same requests (trace oracle, the fidelity benchmark's pipeline
options) and prints, per actor and strategy, real CPU vs simulated work in ms per output
token, split into: modelled compute, compute inflation (real CPU in run_stage over the
profile's prediction for the same rows and context) and per-message overhead (CPU outside
the compute, per batch and per prune notice). Those are the numbers the optional profile
fields `stage_overhead` / `head_cpu` model.

For plain PP (`ar`) it also prints the per-token critical path from timestamps on the
host's one monotonic clock (`critical_path`): the head's work after the LM head, each
message (sends, the wire, the wake-up: `send_j`; the payload recvs after the header:
`pre_j`), each stage's compute, the LM head; next to what the simulator charges for each
segment (and `sim+cold`: with the profile's cold-cache extras). Use a profile measured on
this machine (`--profile FILE`; it warns when the profile comes from another CPU model).
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
        self.req, self.calls, self.sums, self.marks = req, [], {}, []
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
               "sums": self.sums, "calls": self.calls, "marks": self.marks,
               **(extra or {})}
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


def _now() -> float:
    """perf_counter in ms: CLOCK_MONOTONIC on Linux, one clock for every process here."""
    return time.perf_counter() * 1e3


def _stamped(acc_of, key, fn, mark=None):
    """Like _timed, and appends (key, *mark(args, result), t_enter, t_exit) to acc.marks."""
    def wrapper(*a, **kw):
        c, w = _cpu(), _now()
        res = None
        try:
            res = fn(*a, **kw)
            return res
        finally:
            t1 = _now()
            acc = acc_of(a)
            if acc is not None:
                acc.add(key, _cpu() - c, t1 - w)
                acc.marks.append((key, *(mark(a, res) if mark else ()), round(w, 4),
                                  round(t1, 4)))
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

    def run_stage(shard, batch, hidden, **kw):
        ctx = shard.state.context
        c, w = _cpu(), _now()
        res = orig_run(shard, batch, hidden, **kw)
        t1 = _now()
        dc, dw = _cpu() - c, t1 - w
        acc = stage_acc(None)
        if acc is not None:
            n = len(res[0].rows) if res[0] is not None else 0
            acc.add("run_stage", dc, dw)
            # (rows, context, CPU ms, wall ms, batch id, start, end on the shared clock)
            acc.calls.append((n, ctx, round(dc, 4), round(dw, 4), batch.id, round(w, 4),
                              round(t1, 4)))
        return res
    worker.run_stage = run_stage
    S.__init__, S.on_reset, S.on_report = init, on_reset, on_report
    # on_batch marks: ("on_batch", t_enter, t_exit): entered once the header arrived
    S.on_batch = _stamped(stage_acc, "on_batch", S.on_batch)
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
    draft_cls = getattr(shard, "DraftModel", None) or shard.Draft
    draft_cls.propose = _timed(hacc, "draft", draft_cls.propose, draft_call)
    # Marks on the head's shared clock: the critical path of each batch (`critical_path`)
    shard.Verifier.verify = _stamped(hacc, "lm_head", shard.Verifier.verify)
    H.feed = _timed(hacc, "feed", H.feed)
    P._handle = _stamped(hacc, "handle", P._handle,
                         lambda a, r: (a[1][0], a[1][2] if len(a[1]) > 2 else -1))
    name = "inject" if "inject" in vars(P) else "_inject"     # the transport's entry point
    setattr(P, name, _stamped(hacc, "inject", getattr(P, name), lambda a, r: (a[1].id,)))
    orig_read = P._read_data

    def read_data(self):
        item = orig_read(self)
        if item is not None and item[0] in ("hidden", "tokens"):
            acc.marks.append(("got", item[2], round(_now(), 4)))   # reader thread: all recvd
        return item
    P._read_data = read_data


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
    from pipedec_sim.inputs.host import describe, host_record
    print(f"[probe] host {describe(host_record())}; load average before {load_avg()}",
          flush=True)
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


def critical_path(head: list[dict], stages: dict, strategy: str = "ar"):
    """Plain PP's per-token critical path, from the probe's marks on the shared clock: one
    row per decode batch (one row through every stage), its segments in ms:

      head     LM head end of the previous token -> this token's inject call (strategy,
               recorder, dispatch)
      send_0   inject called -> stage 1 entered on_batch (header, rows and their isends,
               the wire, stage 1 waking up: its header recv returned)
      pre_j    on_batch entered -> run_stage started (payload recvs, row decoding, ack)
      comp_j   run_stage (the modelled compute)
      send_j   stage j's run_stage ended -> stage j+1 entered on_batch (j < S: the sends,
               the wire, the wake-up), resp. -> the head's reader had the whole message (S)
      handoff  reader had it -> the main thread's _handle started
      pre_lm   _handle started -> the LM head started;  lm: the Verifier's LM head
    The segments add up to `token` (LM head end to LM head end). What follows a stage's
    sends (on_batch's return) overlaps the next stage and is left out.
    """
    import pandas as pd
    rows = []
    for h in head:
        if h["strategy"] != strategy:
            continue
        marks = h.get("marks") or []
        inj = {m[1]: (m[2], m[3]) for m in marks if m[0] == "inject"}
        got = {m[1]: m[2] for m in marks if m[0] == "got"}
        handles = {m[2]: (m[3], m[4]) for m in marks if m[0] == "handle" and m[1] != "ack"}
        lms = sorted((m[1], m[2]) for m in marks if m[0] == "lm_head")
        per_stage = {}
        for j, recs in stages.items():
            r = next((x for x in recs if x["req"] == h["seq"]), None)
            if r is None:
                break
            obs = [m for m in r.get("marks") or [] if m[0] == "on_batch"]
            calls = {}
            for c in r["calls"]:
                if len(c) < 7:
                    continue
                box = next((m for m in obs if m[1] <= c[5] and c[6] <= m[2]), None)
                if box is not None:
                    calls[c[4]] = (c[0], box[1], c[5], c[6], box[2], c[1])
            per_stage[j] = calls
        if len(per_stage) != len(stages):
            continue
        S = len(stages)
        order = sorted(inj, key=lambda b: inj[b][0])
        prev_lm_end = None
        for bid in order:
            chain = [per_stage[j].get(bid) for j in range(1, S + 1)]
            lm = next(((a, b) for a, b in lms if bid in handles
                       and handles[bid][0] <= a and b <= handles[bid][1]), None)
            ok = (all(chain) and bid in got and bid in handles and lm is not None
                  and all(c[0] == 1 for c in chain))
            if ok and prev_lm_end is not None:
                row = {"request": h["request"], "batch": bid,
                       "head": inj[bid][0] - prev_lm_end,
                       "send_0": chain[0][1] - inj[bid][0]}
                for j, c in enumerate(chain, 1):
                    _, enter, c0, c1, _, _ = c
                    row[f"pre_{j}"], row[f"comp_{j}"] = c0 - enter, c1 - c0
                    row[f"send_{j}"] = (chain[j][1] if j < S else got[bid]) - c1
                row["handoff"] = handles[bid][0] - got[bid]
                row["pre_lm"] = lm[0] - handles[bid][0]
                row["lm"] = lm[1] - lm[0]
                row["token"] = lm[1] - prev_lm_end
                row["ctx"] = chain[0][5]
                rows.append(row)
            prev_lm_end = lm[1] if lm is not None else None
    return pd.DataFrame(rows)


def simulated_path(profile, S: int, ctx: float, cold: bool = False) -> dict:
    """What the simulator charges for the same segments (plain PP: one job at a time on
    the cores, so no sharing or contention factors apply). `cold`: plus the profile's
    cold-cache extras (cold_stage_ms + layers * cold_layer_ms per stage batch,
    cold_lm_head_ms per LM head), as the simulator would charge them."""
    p = profile
    layers = p.stage_layers(S)
    bpms = p.link.bandwidth_gbps * 1e9 / 8 / 1e3
    hop = p.link.latency_ms
    out = {"head": p.head_event_ms + p.head_overhead_ms,
           "send_0": hop + (64 + 4 * 8) / bpms}
    for j in range(1, S + 1):
        out[f"pre_{j}"] = p.stage_message_ms          # all of a message's CPU, in one piece
        out[f"comp_{j}"] = layers[j - 1] * p.layer(1, ctx) + (p.embed(1) if j == 1 else 0.0)
        if cold:
            out[f"comp_{j}"] += (getattr(p, "cold_stage_ms", 0.0)
                                 + layers[j - 1] * getattr(p, "cold_layer_ms", 0.0))
        out[f"send_{j}"] = hop + (64 + p.hidden_bytes(1) + (32 if j < S else 0)) / bpms
    out["handoff"] = out["pre_lm"] = 0.0
    out["lm"] = p.lm_head(1) + (getattr(p, "cold_lm_head_ms", 0.0) if cold else 0.0)
    out["token"] = sum(out.values())
    return out


def report_path(path, profile, S: int) -> None:
    import pandas as pd
    if path.empty:
        print("\n(no plain-PP critical path: run with --strategies including ar)")
        return
    sim = simulated_path(profile, S, float(path.ctx.mean()))
    sim_cold = simulated_path(profile, S, float(path.ctx.mean()), cold=True)
    segs = [c for c in path.columns if c not in ("request", "batch", "ctx")]
    show = pd.DataFrame({"real median": path[segs].median(), "real mean": path[segs].mean(),
                         "real p90": path[segs].quantile(0.9),
                         "sim": pd.Series({k: sim.get(k, float("nan")) for k in segs})})
    show["mean - sim"] = show["real mean"] - show["sim"]
    if sim_cold != sim:
        show["sim+cold"] = pd.Series({k: sim_cold.get(k, float("nan")) for k in segs})
    print(f"\nPlain PP critical path per token, S={S} ({len(path)} decode tokens; ms):")
    print(show.round(3).to_string())
    groups = {"compute": [c for c in segs if c.startswith("comp_")] + ["lm"],
              "sends": [c for c in segs if c.startswith("send_")],
              "recvs": [c for c in segs if c.startswith("pre_") and c != "pre_lm"],
              "head": ["head", "handoff", "pre_lm"]}
    print("grouped (mean real / sim):", ", ".join(
        f"{g} {path[cols].sum(axis=1).mean():.2f}/{sum(sim[c] for c in cols):.2f}"
        for g, cols in groups.items()))


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
    profile = load_profile(args.profile)
    from pipedec_sim.inputs.host import warn_profile_host
    warn_profile_host(profile, "cpu_probe")
    df = analyse(head, stages, profile, args.stages)
    df.to_csv(work / "probe.csv", index=False)
    report(df, work / "real" / "requests.csv")
    path = critical_path(head, stages)
    path.to_csv(work / "path.csv", index=False)
    report_path(path, profile, args.stages)
    print(f"\n[probe] files in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
