"""Two checks behind the fidelity analysis of CPU runs (see the closing notes of issue 6).

    python benchmarks/cpu_contention.py

1. Memory-bandwidth contention: n = 1..5 processes each stream the weights of 7.5
   SmolLM2-135M layers (fp32, ~105 MB, larger than L3) through 4-row matmuls. Printed:
   ms per pass and the slowdown against ideal processor sharing of 2 cores.
2. Gloo idle cost: CPU time a process spends blocked 3 s in `dist.recv`.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time

import torch
import torch.distributed as dist


def _stream(n_iter: int, q) -> None:
    torch.set_num_threads(1)
    ws = [torch.randn(576, 1536) for _ in range(24)] + [torch.randn(576, 576) for _ in range(16)]
    x = torch.randn(4, 576)
    for w in ws[:5]:
        x @ w                                  # warm-up
    t = time.perf_counter()
    for _ in range(n_iter):
        for w in ws:
            x @ w
    q.put((time.perf_counter() - t) / n_iter * 1e3)


def bandwidth(cores: int = 2) -> None:
    ctx = mp.get_context("spawn")
    base = None
    for n in range(1, 6):
        q = ctx.Queue()
        ps = [ctx.Process(target=_stream, args=(60, q)) for _ in range(n)]
        for p in ps:
            p.start()
        ms = sum(q.get() for _ in ps) / n
        for p in ps:
            p.join()
        base = base or ms
        ideal = base * max(1.0, n / cores)
        print(f"{n} processes: {ms:6.2f} ms per pass, "
              f"{ms / ideal:.2f}x the processor-sharing ideal", flush=True)


def _gloo(rank: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    t = torch.zeros(4)
    if rank == 0:
        time.sleep(3.0)
        dist.send(t, 1)
    else:
        c0, w0 = time.process_time(), time.perf_counter()
        dist.recv(t, 0)
        q.put((time.perf_counter() - w0, time.process_time() - c0))
    dist.destroy_process_group()


def gloo_idle() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=_gloo, args=(r, port, q)) for r in range(2)]
    for p in ps:
        p.start()
    wall, cpu = q.get()
    for p in ps:
        p.join()
    print(f"gloo receiver blocked {wall:.2f} s wall, {cpu:.3f} s CPU")


if __name__ == "__main__":
    print(f"load average {os.getloadavg()}")
    bandwidth()
    gloo_idle()
