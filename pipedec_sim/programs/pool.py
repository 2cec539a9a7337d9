"""Worker processes for the programs: `simulate` (request runs), `sweep` (configurations)
and `tune` (tuner points) share one pool that dies with the process that made it."""
from __future__ import annotations

import os

# Modules a fork server imports once, so each worker starts in milliseconds.
PRELOAD = ["pipedec_sim.programs.sweep", "pipedec_sim.programs.simulate",
           "backends.simulated.pipeline"]


def default_workers() -> int:
    """The default of every --workers flag: one worker per CPU."""
    return os.cpu_count() or 1


def pool_context():
    """Worker start method: a fork server that has imported the simulator once (workers
    start in milliseconds), where the platform has one; spawn elsewhere. Both re-import
    nothing from the parent's state, so workers behave the same either way."""
    import multiprocessing as mp
    forced = os.environ.get("PIPEDEC_START_METHOD")        # e.g. spawn, to test spawn-safety
    if forced:
        return mp.get_context(forced)
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return mp.get_context("spawn")


class WorkerPool:
    """A process pool whose workers die with this process, so a killed sweep (or tuner,
    or run) leaves no orphans: each worker asks for SIGTERM when its parent dies
    (PR_SET_PDEATHSIG), and, since under a fork server that parent is the server (which
    itself lives as long as any worker holds its pipe), also exits when a pipe that only
    this process holds open reaches EOF. A context manager; `pool` is the executor."""

    def __init__(self, workers: int):
        from concurrent.futures import ProcessPoolExecutor
        ctx = pool_context()
        self._lifeline, self._keep = ctx.Pipe(duplex=False)    # workers read, we hold
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                        initializer=_die_with_parent,
                                        initargs=(self._lifeline,))

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(wait=exc[0] is None)

    def shutdown(self, wait: bool = True) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=True)
        if wait:                         # the workers are gone: nothing reads the pipe
            self._lifeline.close()
            self._keep.close()


def results_in_order(pool: WorkerPool, fn, tasks: list, done=None) -> list:
    """fn(*task) for every task in the pool: the results in the order of `tasks`, each
    reported to `done(task, result)` as it finishes. The first error cancels the tasks
    not yet started and is raised."""
    from concurrent.futures import as_completed
    futures = {pool.pool.submit(fn, *task): n for n, task in enumerate(tasks)}
    results: list = [None] * len(tasks)
    try:
        for f in as_completed(futures):
            n = futures[f]
            results[n] = f.result()
            if done:
                done(tasks[n], results[n])
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    return results


def _die_with_parent(lifeline) -> None:
    """Worker initializer (see WorkerPool)."""
    import signal
    import threading
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        try:
            lifeline.recv()               # nothing is ever sent: returns at EOF only
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="lifeline", daemon=True).start()
