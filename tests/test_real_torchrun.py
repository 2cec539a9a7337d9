"""The multi-node torchrun launch, emulated as 2 "nodes" (2 torchrun agents x 2 ranks, one
c10d rendezvous on 127.0.0.1) on this host: its outputs equal the local launch's and the
target's own greedy output, only the head (rank 0) prints the table and writes --out, and a
node that dies mid-run ends the head quickly with a clear error.

Every process a test starts carries a unique tag in its environment; whatever happens, the
teardown SIGKILLs every tagged process (torchrun puts its workers in sessions of their own,
so killing an agent's process group would leave its ranks running).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from .helpers import tagged_pids  # noqa: E402

pytestmark = pytest.mark.real

TORCHRUN = shutil.which("torchrun", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                          f"{os.environ.get('PATH', '')}")
if TORCHRUN is None:
    pytest.skip("torchrun not found", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
STAGES, NODES, PER_NODE = 3, 2, 2              # world 4 = head + 3 stages = 2 nodes x 2
PROMPTS = ["Hello, world! This is a test.", "The quick brown fox jumps"]
NEW_TOKENS = 16
RUN_ARGS = ["run", "--target", "tiny", "--draft", "tiny-noisy", "--stages", str(STAGES),
            "--width", "4", "--topk", "4", "--max-new-tokens", str(NEW_TOKENS),
            "--strategies", "ar,tree-sd,pipedec"]
HARD_TIMEOUT = 120        # seconds: no subprocess of this module outlives it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, limit: float = 60.0) -> None:
    """Until something accepts connections on `port` (the first agent's c10d store)."""
    end = time.monotonic() + limit
    while time.monotonic() < end and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"no c10d store on port {port} (agent exit code {proc.poll()})")


def _kill(tag: str) -> None:
    for pid in tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class Launcher:
    """Starts processes tagged with one run id; `cleanup()` kills every one of them."""

    def __init__(self, tmp_path: Path):
        self.tmp, self.run_id = tmp_path, uuid.uuid4().hex
        self.procs: list[subprocess.Popen] = []

    def tag(self, node: str) -> str:
        return f"PIPEDEC_TEST_TAG={self.run_id}-{node}"

    def start(self, cmd: list[str], node: str, **env) -> subprocess.Popen:
        full_env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1",
                        PIPEDEC_TEST_TAG=f"{self.run_id}-{node}")
        full_env.pop("PIPEDEC_FAULT", None)
        full_env.update(env)
        out = open(self.tmp / f"{node}.out", "w")
        err = open(self.tmp / f"{node}.err", "w")
        p = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=err,
                             start_new_session=True)
        out.close()
        err.close()
        p.node = node
        self.procs.append(p)
        return p

    def nodes(self, extra: list[str], addrs=("127.0.0.1", "127.0.0.2"),
              **env) -> list[subprocess.Popen]:
        """NODES torchrun agents on one c10d endpoint; node r writes --out to out_node{r}
        (as if every node had its own disk). Node r has address addrs[r] (all loopback).
        c10d ignores --node-rank: it orders nodes by address, so the lowest address gets
        rank 0, the head. node0 is started first and hosts the c10d store (it binds the
        endpoint before node1 starts)."""
        port = _free_port()
        procs = []
        for r in range(NODES):
            cmd = [TORCHRUN, f"--nnodes={NODES}", f"--nproc-per-node={PER_NODE}",
                   f"--node-rank={r}", f"--local-addr={addrs[r]}", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=pipedec-test-{port}",
                   "-m", "backends.torch.cli", *RUN_ARGS, *extra,
                   "--out", str(self.tmp / f"out_node{r}")]
            procs.append(self.start(cmd, f"node{r}", **env))
            if r == 0:
                _wait_listening(port, procs[0])
        return procs

    def text(self, node: str, stream: str) -> str:
        return (self.tmp / f"{node}.{stream}").read_text(errors="replace")

    def wait(self, procs, deadline: float) -> list[int]:
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                logs = {q.node: self.text(q.node, "err")[-1500:] for q in procs}
                self.cleanup()
                pytest.fail(f"{p.node} still running at the hard timeout; stderr: {logs}")
        return [p.returncode for p in procs]

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                _kill(self.tag(p.node))
        _kill(f"PIPEDEC_TEST_TAG={self.run_id}")      # every node's leftover ranks too
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def launcher(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    ln = Launcher(tmp_path)
    try:
        yield ln
    finally:
        ln.cleanup()
        time.sleep(0.2)
        assert tagged_pids(f"PIPEDEC_TEST_TAG={ln.run_id}") == [], "orphan processes"


def _outputs(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _head_node(ln: Launcher) -> str:
    heads = [f"node{r}" for r in range(NODES)
             if "real request runs: 1/" in ln.text(f"node{r}", "err")]
    assert len(heads) == 1, heads
    return heads[0]


def test_two_nodes_match_local_launch_and_greedy(launcher):
    ln = launcher
    prompts = str(ln.tmp / "prompts.txt")
    deadline = time.monotonic() + HARD_TIMEOUT
    # The local launch (pipedec-real spawns its own stages) runs alongside the 2 nodes.
    local = ln.start([sys.executable, "-m", "backends.torch.cli", *RUN_ARGS, "--prompts",
                      prompts, "--out", str(ln.tmp / "out_local"), "--quiet"], "local")
    nodes = ln.nodes(["--prompts", prompts])

    from backends.torch.models import load  # the reference, meanwhile
    torch.set_num_threads(1)
    target = load("tiny")
    refs = {}
    for i, text in enumerate(PROMPTS, 1):
        ids = target.encode(text)
        out = target.model.generate(torch.tensor([ids]), do_sample=False,
                                    max_new_tokens=NEW_TOKENS, eos_token_id=target.eos,
                                    pad_token_id=0)
        refs[str(i)] = out[0, len(ids):].tolist()

    codes = ln.wait([local, *nodes], deadline)
    assert codes == [0, 0, 0], {p.node: ln.text(p.node, "err")[-2000:] for p in ln.procs}
    head = _head_node(ln)
    other = next(f"node{r}" for r in range(NODES) if f"node{r}" != head)
    # Only the head prints the table and writes --out; the stages print nothing on stdout.
    assert ln.text(head, "out").count("strategy  stages") == 1, ln.text(head, "out")
    assert ln.text(other, "out") == ""
    assert (ln.tmp / f"out_{head}" / "outputs.jsonl").exists()
    assert not (ln.tmp / f"out_{other}").exists()
    multi = (ln.tmp / f"out_{head}" / "outputs.jsonl").read_text()
    assert multi == (ln.tmp / "out_local" / "outputs.jsonl").read_text()
    rows = _outputs(ln.tmp / f"out_{head}" / "outputs.jsonl")
    assert sorted((r["strategy"], r["id"]) for r in rows) == sorted(
        (s, i) for s in ("ar", "tree-sd", "pipedec") for i in refs)
    for r in rows:
        assert r["output_ids"] == refs[r["id"]], (r["strategy"], r["id"])


@pytest.mark.parametrize("store", ["on-head-node", "on-dead-node"])
def test_dead_node_ends_the_head_with_an_error(launcher, store):
    """SIGKILL every process of the stage-only node (agent and ranks: a node's death) once the
    head has finished one request run: the head ends within seconds, exits non-zero, prints
    one error line and keeps the finished run.

    on-head-node: the head's node hosts the c10d store; the head sees the broken gloo link
    (and keeps it as the cause when its agent SIGTERMs it after the node's own stages
    failed on the same link).
    on-dead-node: the dead node hosted the store; the head's agent loses the rendezvous and
    SIGTERMs its ranks at once; the head turns that into the error line, or names the
    lost link if it saw that first (a race: both are the node's death)."""
    ln = launcher
    deadline = time.monotonic() + HARD_TIMEOUT
    addrs = ("127.0.0.1", "127.0.0.2") if store == "on-head-node" else ("127.0.0.2", "127.0.0.1")
    nodes = ln.nodes(["--prompts", str(ln.tmp / "prompts.txt"), "--max-new-tokens", "32",
                      "--timeout", "10"], addrs=addrs)
    head = "node0" if store == "on-head-node" else "node1"
    while "real request runs: 1/" not in ln.text(head, "err"):
        assert time.monotonic() < deadline, "the head never finished a request run"
        assert all(p.poll() is None for p in nodes), {
            p.node: ln.text(p.node, "err")[-2000:] for p in nodes}
        time.sleep(0.02)
    assert _head_node(ln) == head
    victim = next(p for p in nodes if p.node != head)
    head_proc = next(p for p in nodes if p.node == head)
    t0 = time.monotonic()
    _kill(ln.tag(victim.node))
    (code,) = ln.wait([head_proc], min(deadline, t0 + 40))
    seconds = time.monotonic() - t0
    err = ln.text(head, "err")
    print(f"{store}: the head ended {seconds:.1f} s after the node died, exit code {code}")
    assert code != 0
    assert seconds < 30, seconds      # measured 1-5 s
    lines = [x for x in err.splitlines() if x.startswith("pipedec-real: error:")]
    assert len(lines) == 1, err[-3000:]
    why = (["lost the link from stage"] if store == "on-head-node"
           else ["lost the link from stage", "stopped by torchrun (SIGTERM)"])
    assert any(w in lines[0] for w in why) and "finished request runs" in lines[0], lines[0]
    kept = _outputs(ln.tmp / f"out_{head}" / "outputs.jsonl")
    assert 1 <= len(kept) < 3 * len(PROMPTS) and kept[0]["strategy"] == "ar", kept


def test_world_size_mismatch_is_named_by_every_rank(launcher):
    """torchrun world 4 with --stages 2: every rank, the head included, names --stages."""
    ln = launcher
    deadline = time.monotonic() + HARD_TIMEOUT
    nodes = ln.nodes(["--prompts", str(ln.tmp / "prompts.txt"), "--stages", "2"])
    codes = ln.wait(nodes, deadline)
    assert all(c != 0 for c in codes)
    msgs = [x for r in range(NODES) for x in ln.text(f"node{r}", "err").splitlines()
            if x.startswith("pipedec-real: error: field '--stages'")]
    assert len(msgs) >= 1 and "needs 3" in msgs[0], msgs
    assert not any((ln.tmp / f"out_node{r}").exists() for r in range(NODES))
