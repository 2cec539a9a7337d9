"""A stage that raises or dies ends the run with one line naming it, quickly, with no
orphan processes, and the requests finished before it are written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from .helpers import tagged_pids  # noqa: E402

pytestmark = pytest.mark.real


def _run(tmp_path, fault: str):
    (tmp_path / "p.txt").write_text("one\ntwo\nthree\n")
    tag = f"PIPEDEC_TEST_TAG={uuid.uuid4().hex}"
    env = dict(os.environ, PIPEDEC_FAULT=fault, PIPEDEC_TEST_TAG=tag.split("=")[1])
    cmd = [sys.executable, "-m", "backends.torch.cli", "run", "--target", "tiny",
           "--stages", "3", "--strategies", "ar", "--prompts", str(tmp_path / "p.txt"),
           "--max-new-tokens", "8", "--out", str(tmp_path / "out"), "--quiet",
           "--timeout", "20"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    return proc, time.monotonic() - t0, tag


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_stage_failure_is_reported_and_cleaned_up(tmp_path, mode):
    proc, seconds, tag = _run(tmp_path, f"stage=2,request=2,mode={mode}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pipedec-real: error: stage 2 (rank 2) failed"), last
    assert "Traceback" not in proc.stderr, proc.stderr            # stages print one line
    errors = [x for x in proc.stderr.splitlines() if x.startswith("pipedec-real: error:")]
    assert errors == [last], proc.stderr
    if mode == "raise":
        assert ("pipedec-real: stage 2 (rank 2) failed: RuntimeError: injected fault"
                in proc.stderr), proc.stderr
    assert seconds < 60          # includes ~10 s of process start-up; the fault is at ~1 s
    time.sleep(0.5)
    assert tagged_pids(tag) == [], "orphan stage processes"
    out = [json.loads(x) for x in (tmp_path / "out" / "outputs.jsonl").read_text().splitlines()]
    assert [x["id"] for x in out] == ["1"]          # request 1 finished and is kept


def test_a_stop_signal_while_closing_a_failed_run_keeps_its_failure(monkeypatch):
    """torchrun SIGTERMs the head once its node's stages failed on the same lost link, often
    while the head is already closing that failed run: the run still returns the lost link
    (the error line names it, not "interrupted") and the close is finished."""
    import argparse
    from types import SimpleNamespace

    from backends.torch import cli
    from backends.torch.runtime import StageFailed

    closes: list[bool] = []

    class Pipe:
        def close(self, clean: bool = True) -> None:
            closes.append(clean)
            if len(closes) == 1:             # the agent's SIGTERM lands during the close
                raise cli.Stopped("stopped by torchrun (SIGTERM)", 1)

    def lost(*_):
        raise StageFailed("lost the link from stage 2 (rank 2): connection closed")

    monkeypatch.setattr(cli, "_load", lambda *_: SimpleNamespace(encode=str.split))
    monkeypatch.setattr(cli, "_check", lambda *_: None)
    monkeypatch.setattr(cli, "_requests", lambda *_: [])
    monkeypatch.setattr(cli, "_pipeline", lambda *_: Pipe())
    monkeypatch.setattr(cli, "_run_all", lost)
    failure = cli._run(argparse.Namespace(target="tiny", record_events=None), [])
    assert isinstance(failure, StageFailed) and "lost the link" in str(failure)
    assert closes == [False, False]
