"""A reader-writer gate around a resource that may be replaced or closed while other threads use it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import ShuttingDown


class UsageGate:
    """Counts the calls using a resource, so that closing or replacing it waits for them to end.

    `use()` is taken by every call (shared, and reentrant within a thread); `exclusive()` by the one step
    that replaces the resource, and `close()` by the one that ends it, after which `use()` raises
    ShuttingDown instead of touching a closed resource. A pending exclusive step holds new users back, so
    a steady stream of calls cannot starve it. Thread-safe.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._exclusive = False
        self._wanted = 0
        self._closed = False
        self._local = threading.local()

    @property
    def wanted(self) -> bool:
        """Whether an exclusive step or a close waits for the current users; long work should end early."""
        return self._wanted > 0 or self._closed

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    @contextmanager
    def use(self) -> Iterator[None]:
        """Hold the resource open for the duration; raise ShuttingDown once it is closed."""
        depth: int = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                # A thread already inside goes on, or an exclusive step it waits for would never start.
                while (self._exclusive or self._wanted) and not self._closed:
                    self._cond.wait()
                if self._closed:
                    raise ShuttingDown("the server is shutting down; send the request again once it is back")
                self._users += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._users -= 1
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self, timeout_s: float) -> Iterator[bool]:
        """Hold every other user off; yields False (and holds nothing) if they did not finish in time."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._wanted += 1
            try:
                while (self._users or self._exclusive) and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                got = not self._users and not self._exclusive and not self._closed
                if got:
                    self._exclusive = True
            finally:
                self._wanted -= 1
                self._cond.notify_all()
        try:
            yield got
        finally:
            if got:
                with self._cond:
                    self._exclusive = False
                    self._cond.notify_all()

    def close(self, timeout_s: float) -> bool:
        """Turn new users away and wait up to `timeout_s` for current ones; return whether none is left."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while self._users or self._exclusive:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True
