"""A background thread that does one piece of work every so often until it is stopped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .errors import StorageFull, Unavailable
from .line_budget import LineBudget

_LOGGER = logging.getLogger(__name__)

# Failures the server expects and handles (the store out of reach, a full disk): the store already logged
# the cause, so a round that meets one says so in a line, without a traceback, at most once a minute.
_EXPECTED = (Unavailable, StorageFull)
EXPECTED_LINE_INTERVAL_S = 60.0


class Periodic:
    """Calls `work` every `interval_s` seconds in a daemon thread; a failure is logged and retried next round.

    An interval of zero or less never starts the thread. `stopping` lets long work end early. An unexpected
    exception is logged with its traceback each round; an expected one (`_EXPECTED`) in one throttled line.
    """

    def __init__(self, name: str, interval_s: float, work: Callable[[], object]):
        self._name = name
        self._interval_s = interval_s
        self._work = work
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lines = LineBudget(burst=1, interval_s=EXPECTED_LINE_INTERVAL_S)

    @property
    def stopping(self) -> bool:
        """Whether stop() was called."""
        return self._stop.is_set()

    def start(self) -> None:
        """Start the thread, once."""
        if self._interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread, waiting for a round in progress to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._work()
            except _EXPECTED as e:
                held = self._lines.take(type(e).__name__)
                if held is not None:
                    more = f" ({held} more like it not logged)" if held else ""
                    _LOGGER.warning("%s failed: %s; will retry%s", self._name, e.message, more)
            except Exception:
                # What the work had not done stays to do, so the next round picks it up.
                _LOGGER.exception("%s failed; will retry", self._name)
