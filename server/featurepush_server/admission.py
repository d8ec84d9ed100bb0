"""Admission control: bounded running calls, waiting calls and request bytes per class of method.

A flood of one kind of call (pushes, say) must not take the threads, memory and CPU that reads, health
checks and the registry need. Each class of method gets a gate: at most `calls` run at once, at most
`queue` more wait for a slot (each for at most `wait_s`, or its deadline), and the request bytes of the
running and waiting calls stay under `bytes`. A call past any bound is refused at once with a delay to
retry after, so a client backs off instead of piling up. Nothing here imports grpc.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

# The classes of method; calls of other services (health, reflection) are never gated.
PUSH = "push"
STREAM = "stream"
READ = "read"
BACKFILL = "backfill"
REGISTRY = "registry"
CLASSES = (PUSH, STREAM, READ, BACKFILL, REGISTRY)


@dataclass(frozen=True)
class Limit:
    """The bounds of one class: running calls, waiting calls, request bytes, and how long one may wait."""

    calls: int
    queue: int
    bytes: int
    wait_s: float


class Overloaded(Exception):
    """A call was refused by its class's gate; `retry_after_s` is when trying again is likely to succeed."""

    def __init__(self, klass: str, why: str, retry_after_s: float):
        super().__init__(
            f"featurepush is at its limit of {why} for {klass} calls; retry after {retry_after_s:.2f}s"
        )
        self.klass = klass
        self.why = why
        self.retry_after_s = retry_after_s


def default_limits(cpus: int, memory_bytes: int, max_message_bytes: int) -> dict[str, Limit]:
    """Bounds that fit a machine: pushes as many as cores, reads more, a sixteenth of memory for requests."""
    cpus = max(cpus, 1)
    # Decoding a push takes several times its wire size, so the bytes held stay a small share of memory,
    # but never below one largest message, which must always be admissible.
    push_bytes = max(max_message_bytes, min(memory_bytes // 16, 4 << 30))
    return {
        PUSH: Limit(calls=max(2, cpus), queue=max(4, 2 * cpus), bytes=push_bytes, wait_s=1.0),
        # Each open PushStream holds a thread for its life; idle ones are closed by the servicer.
        STREAM: Limit(calls=max(8, 4 * cpus), queue=0, bytes=0, wait_s=0.0),
        READ: Limit(
            calls=max(4, 4 * cpus),
            queue=max(8, 8 * cpus),
            bytes=max(max_message_bytes, 256 << 20),
            wait_s=0.5,
        ),
        BACKFILL: Limit(calls=max(2, cpus // 2), queue=0, bytes=0, wait_s=0.0),
        REGISTRY: Limit(calls=4, queue=8, bytes=max(max_message_bytes, 64 << 20), wait_s=1.0),
    }


def configured_limits(
    cpus: int,
    memory_bytes: int,
    max_message_bytes: int,
    *,
    pushes: int = 0,
    waiting_pushes: int = 0,
    push_bytes: int = 0,
    reads: int = 0,
    streams: int = 0,
    backfills: int = 0,
) -> dict[str, Limit]:
    """The machine's default bounds with every non-zero setting put in place of its default."""
    limits = default_limits(cpus, memory_bytes, max_message_bytes)
    push = limits[PUSH]
    limits[PUSH] = Limit(
        calls=pushes or push.calls,
        queue=waiting_pushes or push.queue,
        bytes=push_bytes or push.bytes,
        wait_s=push.wait_s,
    )
    if reads:
        limits[READ] = Limit(reads, 2 * reads, limits[READ].bytes, limits[READ].wait_s)
    if streams:
        limits[STREAM] = Limit(streams, 0, 0, 0.0)
    if backfills:
        limits[BACKFILL] = Limit(backfills, 0, 0, 0.0)
    return limits


class Gate:
    """One class's admission: thread-safe; `enter` blocks at most the class's wait, `leave` never blocks."""

    def __init__(self, klass: str, limit: Limit):
        self.klass = klass
        self.limit = limit
        self._cond = threading.Condition()
        self.running = 0
        self.waiting = 0
        self.held_bytes = 0
        # Work holding bytes counted by take_bytes.
        self.extra_holders = 0
        # How many calls were refused since start, for the operator.
        self.refused = 0

    def _retry_after(self) -> float:
        """A delay that grows with the backlog, so refused clients spread out instead of returning at once."""
        backlog = (self.running + self.waiting) / max(self.limit.calls, 1)
        return round(min(5.0, 0.1 * (1.0 + backlog)), 3)

    def _refuse(self, why: str) -> Overloaded:
        self.refused += 1
        return Overloaded(self.klass, why, self._retry_after())

    def enter(self, nbytes: int, time_left_s: float | None = None) -> None:
        """Take a slot for a call of `nbytes` request bytes, waiting if allowed; raise Overloaded if not."""
        limit = self.limit
        with self._cond:
            if limit.bytes and nbytes > 0 and self.held_bytes + nbytes > limit.bytes and self.held_bytes > 0:
                raise self._refuse("request bytes in progress")
            if self.running < limit.calls and self.waiting == 0:
                self.running += 1
                self.held_bytes += nbytes
                return
            if self.waiting >= limit.queue:
                raise self._refuse("calls running and waiting")
            wait = limit.wait_s if time_left_s is None else max(0.0, min(limit.wait_s, time_left_s))
            end = time.monotonic() + wait
            self.waiting += 1
            self.held_bytes += nbytes
            try:
                while self.running >= limit.calls:
                    left = end - time.monotonic()
                    if left <= 0:
                        self.held_bytes -= nbytes
                        raise self._refuse("calls running and waiting")
                    self._cond.wait(left)
            finally:
                self.waiting -= 1
            self.running += 1

    def leave(self, nbytes: int) -> None:
        """Give back a slot taken by `enter` with the same `nbytes`."""
        with self._cond:
            self.running -= 1
            self.held_bytes -= nbytes
            self._cond.notify()

    def take_bytes(self, nbytes: int) -> None:
        """Count `nbytes` more against the class's bytes for work already admitted; raise Overloaded if not.

        What a request's bytes become once decoded (a compressed Arrow stream expands many times over)
        weighs on memory as its wire bytes do. Always granted to work that holds the gate alone.
        """
        limit = self.limit
        with self._cond:
            alone = self.running <= 1 and self.extra_holders == 0
            if limit.bytes and self.held_bytes + nbytes > limit.bytes and not alone:
                raise self._refuse("request bytes in progress")
            self.held_bytes += nbytes
            self.extra_holders += 1

    def give_bytes(self, nbytes: int) -> None:
        """Give back bytes counted by `take_bytes`."""
        with self._cond:
            self.held_bytes -= nbytes
            self.extra_holders -= 1
            self._cond.notify()


class Admission:
    """The gates of every class; `gate(klass)` is None for a class that is not limited."""

    def __init__(self, limits: dict[str, Limit]):
        self.gates = {klass: Gate(klass, limit) for klass, limit in limits.items()}

    def gate(self, klass: str | None) -> Gate | None:
        """The gate of `klass`, or None."""
        return None if klass is None else self.gates.get(klass)

    def threads_needed(self) -> int:
        """Threads that admitted and waiting calls can hold at once."""
        return sum(g.limit.calls + g.limit.queue for g in self.gates.values())
