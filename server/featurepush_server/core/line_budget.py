"""A budget of log lines per kind, so that a flood of one kind of failure is not a flood of lines."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable


class LineBudget:
    """Lets through at most `burst` lines per kind and then one per `interval_s`, counting the rest.

    A flood of refused calls (bad keys, overload) would otherwise be a flood of log lines that costs the
    server disk and hides the one line that matters; the count of what was held back rides on the next
    line of the same kind, so nothing goes unmentioned.
    """

    def __init__(
        self, burst: int = 20, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._burst = burst
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        # kind -> [tokens left, time of the last refill, lines held back since the last one let through]
        self._kinds: dict[Hashable, list[float]] = {}

    def take(self, kind: Hashable) -> int | None:
        """None to drop this line; else how many lines of this kind were held back before it."""
        now = self._clock()
        with self._lock:
            state = self._kinds.get(kind)
            if state is None:
                if len(self._kinds) >= _MAX_KINDS:
                    # Kinds come from a fixed set of methods and codes; this only guards the memory.
                    self._kinds.clear()
                state = self._kinds[kind] = [float(self._burst), now, 0]
            tokens, last, held = state
            tokens = min(float(self._burst), tokens + (now - last) / self._interval_s)
            if tokens < 1:
                state[0], state[1], state[2] = tokens, now, held + 1
                return None
            state[0], state[1], state[2] = tokens - 1, now, 0
            return int(held)


_MAX_KINDS = 1024
