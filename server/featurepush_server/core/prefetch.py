"""Runs a producer one step ahead in a thread, so reading the next item overlaps handing out this one."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


def prefetch(make: Callable[[], Iterator[T]], depth: int = 2) -> Generator[T, None, None]:
    """Yield what `make()` yields, produced in a thread at most `depth` items ahead.

    The producer's exceptions are raised here, in order. Closing this generator (or an error in the
    consumer) stops the producer at its next item and closes its iterator, releasing what it holds.
    """
    items: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        source = make()
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            failure.append(e)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            while not stop.is_set():
                try:
                    items.put(_DONE, timeout=0.1)
                    break
                except queue.Full:
                    continue

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                if failure:
                    raise failure[0]
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
