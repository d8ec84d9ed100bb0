"""A background thread that does one piece of work every so often until it is stopped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

_LOGGER = logging.getLogger(__name__)


class Periodic:
    """Calls `work` every `interval_s` seconds in a daemon thread; a failure is logged and retried next round.

    An interval of zero or less never starts the thread. `stopping` lets long work end early.
    """

    def __init__(self, name: str, interval_s: float, work: Callable[[], object]):
        self._name = name
        self._interval_s = interval_s
        self._work = work
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
            except Exception:
                # What the work had not done stays to do, so the next round picks it up.
                _LOGGER.exception("%s failed; will retry", self._name)
