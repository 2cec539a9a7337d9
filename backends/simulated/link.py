"""What carries messages between simulated actors: one-way hops and inboxes."""
from __future__ import annotations

from collections import deque

import simpy

TOKEN_BYTES = 8          # an int64 token id on the wire
HEADER_BYTES = 64        # fixed-shape metadata per message


class Hop:
    """A one-way hop: transfers serialise on bandwidth, then pay latency."""

    def __init__(self, env: simpy.Environment, latency_ms: float, bytes_per_ms: float):
        self.env, self.latency, self.bpms, self.free_at = env, latency_ms, bytes_per_ms, 0.0

    def delay(self, nbytes: int) -> float:
        """Queue a message of `nbytes` now; returns how long until it is delivered."""
        now = self.env.now
        start = max(now, self.free_at)
        self.free_at = start + (nbytes / self.bpms if self.bpms else 0.0)
        return self.free_at + self.latency - now

    def send(self, nbytes: int, deliver) -> None:
        delay = self.delay(nbytes)
        if delay <= 0.0:
            deliver()
        else:
            self.env.timeout(delay).callbacks.append(lambda _e: deliver())


def ring_hop(env: simpy.Environment, profile, j: int, stages: int) -> Hop:
    """Hop j of the ring (0: head -> stage 1, j: stage j -> j+1, S: stage S -> head) with
    the profile's link for it (`Profile.hop_link`)."""
    link = profile.hop_link(j, stages)
    bpms = link.bandwidth_gbps * 1e9 / 8 / 1e3 if link.bandwidth_gbps else 0.0
    return Hop(env, link.latency_ms, bpms)


class Inbox:
    """A FIFO an actor waits on; cheaper than simpy.Store (no event per put/get when
    work is already queued), which matters at tens of thousands of steps per second."""

    def __init__(self, env: simpy.Environment):
        self.env, self.items, self.waiter = env, deque(), None

    def put(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None:
            waiter, self.waiter = self.waiter, None
            waiter.succeed()

    def get(self):
        """Generator: `item = yield from inbox.get()`."""
        if not self.items:
            self.waiter = self.env.event()
            yield self.waiter
        return self.items.popleft()
