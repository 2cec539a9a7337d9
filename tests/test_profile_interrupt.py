"""Ctrl-C during `pipedec-real profile`'s link phase (a spawned echo process, gloo between
the two): the profiler ends at once with the head's one line, status 130, no traceback from
the child, no orphan and no output file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from .helpers import tagged_pids  # noqa: E402

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")]
ROOT = Path(__file__).resolve().parents[1]
LINK = "pipedec-real profile: link between two processes..."


@pytest.mark.parametrize("to", ["group", "head"])
def test_sigint_in_the_link_phase_ends_the_profile_cleanly(tmp_path, to):
    """To the group: a terminal's Ctrl-C, which reaches the child while it imports torch.
    To the head alone: the child is still there and must not report the lost link."""
    tag, out = uuid.uuid4().hex, tmp_path / "p.json"
    cmd = [sys.executable, "-m", "backends.torch.cli", "profile", "--target", "tiny",
           "--draft", "tiny-draft", "--quick", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PIPEDEC_TEST_TAG=tag),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            start_new_session=True)           # a terminal's job
    err: list[str] = []
    reader = threading.Thread(target=_read, args=(proc.stderr, err), daemon=True)
    reader.start()
    try:
        _wait(proc, err, lambda: any(line.startswith(LINK) for line in err), "link phase")
        _wait(proc, err, lambda: _echo_started(tag), "echo process")
        time.sleep(0.3)             # it is importing torch now
        t0 = time.monotonic()
        if to == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 10 s after SIGINT: {''.join(err)[-3000:]}")
        reader.join(5)              # EOF: nothing the profiler started holds its stderr
        seconds = time.monotonic() - t0
        left = tagged_pids(tag)
    finally:
        for pid in tagged_pids(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    print(f"SIGINT to the {to}: exit {code} after {seconds:.1f} s")
    after = "".join(err).split(LINK, 1)[1]
    assert code == 130, after
    assert seconds < 10 and not reader.is_alive(), after
    assert "Traceback" not in after and after.strip() == "pipedec-real: interrupted", after
    assert left == [], "orphan processes"
    assert list(tmp_path.iterdir()) == []          # no profile, not even a partial one


def _read(stream, lines: list[str]) -> None:
    for line in stream:             # to EOF, a line at a time: the test polls `lines`
        lines.append(line)


def _wait(proc, err: list[str], done, what: str, limit: float = 120.0) -> None:
    end = time.monotonic() + limit
    while not done():
        assert proc.poll() is None, "".join(err)[-3000:]
        assert time.monotonic() < end, f"no {what} in {limit} s: {''.join(err)[-3000:]}"
        time.sleep(0.02)


def _echo_started(tag: str) -> bool:
    """A process spawned by multiprocessing (not its resource tracker) runs."""
    for pid in tagged_pids(tag):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False
