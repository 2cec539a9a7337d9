"""Run picklable tasks as Ray tasks (`pipedec-sim sweep --executor ray`). Ray is optional:
`pip install 'pipedec-sim[ray]'`.

Without an address a local Ray instance starts with `workers` CPUs, every socket of it on
loopback (no dashboard) and it stops when the sweep ends; with `--address HOST:PORT` the
sweep joins that cluster (its nodes need pipedec-sim installed; inputs travel through
Ray's object store, so they need no shared file system) and only disconnects at the end.
A process already connected to Ray (a test, a notebook) keeps its connection.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
from typing import Any, Callable, Iterator

from pipedec_sim.errors import InputError

INSTALL_RAY = "pip install 'pipedec-sim[ray]'"


def import_ray(field: str = "--executor"):
    """The ray module, or InputError (one line naming the flag) if it is not installed."""
    try:
        import ray
    except ImportError:
        raise InputError(f"ray is not installed: {INSTALL_RAY}", field=field) from None
    return ray


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """InputError (naming --address) unless `address` is HOST:PORT (or ray://HOST:PORT, or
    auto) and, for HOST:PORT, something listens there: Ray itself would retry for minutes."""
    if address == "auto":
        return
    m = re.fullmatch(r"(ray://)?(\[[^\]]+\]|[^:/\s\[\]]+):(\d{1,5})", address)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise InputError(f"expected HOST:PORT (or ray://HOST:PORT, or auto), got {address!r}",
                         field="--address")
    host, port = m.group(2).strip("[]"), int(m.group(3))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise InputError(f"cannot reach a Ray cluster at {address}: {e.strerror or e}",
                         field="--address") from None


def init_ray(workers: int, address: str | None = None) -> bool:
    """Connect this process to Ray unless it already is: to the cluster at `address`, else
    to a new local instance of `workers` CPUs that listens on loopback only. True if this
    call connected (then the caller shuts Ray down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            with _loopback_only():
                ray.init(num_cpus=workers, _node_ip_address="127.0.0.1", **quiet)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise InputError(f"cannot start or reach Ray: {str(e).strip().splitlines()[0]}",
                         field="--address" if address else "--executor") from None
    return True


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """While a local instance starts: Ray's node address is loopback (Ray picks the
    machine's outward address on Linux unless its cluster mode is off), so GCS, raylet,
    object store and workers bind 127.0.0.1; the processes it starts inherit the setting."""
    var = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    old_env = os.environ.get(var)
    os.environ[var] = "0"
    from ray._private import ray_constants
    old = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old
        if old_env is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old_env


def run_tasks(fn: Callable, tasks: list[tuple], done: Callable[[tuple, Any], None],
              failed: Callable[[tuple, str], None], *, workers: int,
              address: str | None = None, shared: list | None = None) -> None:
    """fn(*task) for every task, as Ray tasks of one CPU each: `done(task, result)` as
    each returns, `failed(task, message)` if Ray loses one (a crashed worker). Objects in
    `shared` (inputs many tasks take: traces, profiles) enter the object store once and
    reach the tasks by reference. On an error or Ctrl-C the tasks left are cancelled."""
    ray = import_ray()
    opened = init_ray(workers, address)
    try:
        refs = {id(obj): ray.put(obj) for obj in shared or []}
        remote = ray.remote(num_cpus=1)(fn)
        pending = {remote.remote(*[refs.get(id(a), a) for a in task]): task for task in tasks}
        try:
            _collect(ray, pending, done, failed)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if opened:
            ray.shutdown()


def _collect(ray, pending: dict, done, failed) -> None:
    """Hand each finished task's result on as it comes (removing it from `pending`)."""
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            task = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:
                failed(task, f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")
                continue
            done(task, result)
