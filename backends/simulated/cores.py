"""A host's CPU cores shared by the simulated processes (CPU profiles: `shared_cores`)."""
from __future__ import annotations

import simpy

DONE_WORK = 1e-9        # ms of work left that counts as done (float rounding)


class CorePool:
    """`cores` CPU cores shared by processor sharing: n runnable jobs each progress at
    min(1, cores / n) ms of work per ms, as the OS time-slices runnable processes (a
    2-core machine running a head and S stage processes). A job needs `work` ms of one
    core. One pending wake-up per change in the job set (stale ones are ignored).

    With a measured `share` table (share[n-1]: the share of a core each of n busy
    processes got, foreign load included) the rate is share[n-1] / base, relative to the
    share `base` of the one process that measured the profile's durations (default
    share[0]: same conditions); past the table's end its last total is divided among n.
    `slowdown` (>= 1) divides the rate while more jobs run than there are cores: cache and
    memory contention that a time-share table (spin loops) does not see.

    A wake-up finishes the job it was scheduled for (plus any other within DONE_WORK of
    done), whatever float rounding left of its work: late in a long run the clock cannot
    resolve a tiny remainder (now + delay == now), and waiting for it would never end."""

    def __init__(self, env: simpy.Environment, cores: float, share=None,
                 base: float | None = None, slowdown: float = 1.0):
        self.env, self.cores = env, float(cores)
        if share:
            m = len(share)
            b = base or share[0]
            self.rates = [1.0] + [share[n - 1] / b if n <= m else share[-1] * m / n / b
                                  for n in range(1, 65)]
        else:
            self.rates = [1.0] + [min(1.0, self.cores / n) for n in range(1, 65)]
        if slowdown != 1.0:
            self.rates = [r / slowdown if n > self.cores else r
                          for n, r in enumerate(self.rates)]
        self.jobs: dict[int, list] = {}      # id -> [remaining work, done event]
        self.t = 0.0                         # when `remaining` was last brought up to date
        self.rate = 1.0
        self.gen = 0
        self.ids = 0
        self.due = 0                         # the job the pending wake-up finishes

    def _advance(self) -> None:
        now = self.env.now
        dt = now - self.t
        if dt > 0.0 and self.jobs:
            w = dt * self.rate
            for job in self.jobs.values():
                job[0] -= w
        self.t = now

    def _reschedule(self) -> None:
        jobs = self.jobs
        n = len(jobs)
        rates = self.rates
        self.rate = rates[n] if n < len(rates) else rates[-1] * (len(rates) - 1) / n
        self.gen += 1
        if not n:
            return
        self.due = min(jobs, key=lambda i: jobs[i][0])
        gen = self.gen
        delay = max(jobs[self.due][0], 0.0) / self.rate
        self.env.timeout(delay).callbacks.append(lambda _e: self._due(gen))

    def _due(self, gen: int) -> None:
        if gen != self.gen:
            return                           # the job set changed since: a newer wake-up
        self._advance()
        for i in [i for i, job in self.jobs.items() if i == self.due or job[0] <= DONE_WORK]:
            self.jobs.pop(i)[1].succeed()
        self._reschedule()

    def busy(self) -> int:
        """Jobs running now."""
        return len(self.jobs)

    def start(self, work: float) -> tuple[int, simpy.Event]:
        self._advance()
        self.ids += 1
        done = self.env.event()
        self.jobs[self.ids] = [work, done]
        self._reschedule()
        return self.ids, done

    def stop(self, job: int) -> float:
        """Withdraw a job (its process was interrupted); returns the work it had left."""
        self._advance()
        left = self.jobs.pop(job)[0] if job in self.jobs else 0.0
        self._reschedule()
        return max(left, 0.0)
