"""Test helpers: small trace builders (exact hit models instead of sampled confidences)
and a process finder for the real-backend tests."""
from __future__ import annotations

import contextlib
import os
import random
import signal

from pipedec_sim.inputs.traces import Trace, TraceHeader, TraceRequest


def header(top_k: int) -> TraceHeader:
    return TraceHeader(source="synthetic", target="test", draft="test", tokenizer="none",
                       dataset="test", top_k=top_k, command="tests", created="2026-11-26")


def bernoulli_trace(requests: int, length: int, p: float, *, k: int = 4, prompt_len: int = 8,
                    seed: int = 0) -> Trace:
    """At each position the draft's top-1 is the target's token with probability p;
    otherwise the target's token is not in the draft's top-k at all."""
    rng = random.Random(seed)
    reqs = []
    for r in range(requests):
        out = [rng.randrange(1000) for _ in range(length)]
        ids, probs = [], []
        for t in out:
            others = rng.sample(range(1000, 100_000), k)
            ids.append([t] + others[: k - 1] if rng.random() < p else others)
            probs.append([round(0.5 ** (i + 1), 6) for i in range(k)])
        reqs.append(TraceRequest(str(r), prompt_len, out, ids, probs))
    return Trace(header(k), reqs)


def random_trace(rng: random.Random, requests: int, length: int, k: int, prompt_len: int) -> Trace:
    """Truth at a random rank (or absent); random but ordered probabilities."""
    reqs = []
    for r in range(requests):
        out = [rng.randrange(50) for _ in range(length)]   # small vocab: many collisions
        ids, probs = [], []
        for t in out:
            cand = [x for x in rng.sample(range(60), k + 1) if x != t][:k]
            rank = rng.randrange(k + 1)
            if rank < k:
                cand[rank] = t
            ids.append(cand)
            raw = sorted((rng.random() for _ in range(k)), reverse=True)
            s = sum(raw) * (1 + rng.random())
            probs.append([v / s for v in raw])
        reqs.append(TraceRequest(str(r), prompt_len, out, ids, probs))
    return Trace(header(k), reqs)


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries `tag`: a launched CLI and everything it spawned
    (environments are inherited), so tests can check for and kill leftovers."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if tag.encode() in fh.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def _address(hex_addr: str) -> str:
    """/proc/net/tcp{,6}'s local address as text: hex 32-bit words, each printed as the
    host-order number whose memory holds 4 bytes of the address in network order."""
    import ipaddress
    import struct
    words = [int(hex_addr[i:i + 8], 16) for i in range(0, len(hex_addr), 8)]
    return str(ipaddress.ip_address(b"".join(struct.pack("=I", w) for w in words)))


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state that one of `pids` holds,
    IPv4 and IPv6 (from /proc/net/tcp{,6}, matched to the processes' fds by inode)."""
    owner = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[8:-1]] = pid
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in owner:             # 0A: TCP_LISTEN
                    addr, port = f[1].split(":")
                    found.append((owner[f[9]], _address(addr), int(port, 16)))
    return found


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (TimeoutError) instead of hanging the suite, e.g. in open() on a FIFO."""
    def boom(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_error_line(err: str) -> str:
    """The one `pipedec-real...` line a refused command prints (no traceback)."""
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("pipedec-real"), err
    return lines[0]


def real_cli(argv, capsys) -> tuple[int, str]:
    """`pipedec-real` (backends.torch.cli.main) in this process: (exit status, stderr),
    argparse's exits included."""
    from backends.torch import cli
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def wire_loopback(monkeypatch, sent: list) -> None:
    """`backends.torch.wire.recv` reads the frames in `sent` (as `wire.frame` made them)
    in order, without gloo; each receive must ask for the dtype and shape that was sent."""
    from backends.torch import wire

    def raw(into, src, tag):
        t = sent.pop(0)
        assert t.dtype == into.dtype and t.shape == into.shape
        into.copy_(t)
    monkeypatch.setattr(wire, "_recv_raw", raw)
    monkeypatch.setattr(wire, "_frames", {})
    monkeypatch.setattr(wire, "_reading", {})
