"""Runs a producer ahead in a thread, so reading the next item overlaps handing out this one."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator
from typing import TypeVar

T = TypeVar("T")


def prefetch(
    make: Callable[[], Iterator[T]],
    depth: int = 2,
    *,
    max_bytes: int | None = None,
    size: Callable[[T], int] | None = None,
) -> Generator[T, None, None]:
    """Yield what `make()` yields, produced in a thread at most `depth` items ahead.

    With `max_bytes`, the items waiting also hold at most that many bytes by `size` (one item always
    fits), so a consumer that stalls holds the producer still. The producer's exceptions are raised
    here, in order. Closing this generator (or an error in the consumer) stops the producer at its next
    item and closes its iterator, releasing what it holds.
    """
    waiting: deque[T] = deque()
    held = [0]
    changed = threading.Condition()
    stop = threading.Event()
    finished = threading.Event()
    failure: list[BaseException] = []

    def weight(item: T) -> int:
        return size(item) if size is not None and max_bytes is not None else 0

    def room(item_bytes: int) -> bool:
        if not waiting:
            return True
        if len(waiting) >= depth:
            return False
        return max_bytes is None or held[0] + item_bytes <= max_bytes

    def produce() -> None:
        source = make()
        try:
            for item in source:
                item_bytes = weight(item)
                with changed:
                    while not stop.is_set() and not room(item_bytes):
                        changed.wait()
                    if stop.is_set():
                        return
                    waiting.append(item)
                    held[0] += item_bytes
                    changed.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            failure.append(e)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            with changed:
                finished.set()
                changed.notify_all()

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            with changed:
                while not waiting and not finished.is_set():
                    changed.wait()
                if not waiting:
                    if failure:
                        raise failure[0]
                    return
                item = waiting.popleft()
                held[0] -= weight(item)
                changed.notify_all()
            yield item
            del item  # not held while the consumer waits for the next one
    finally:
        with changed:
            stop.set()
            waiting.clear()
            changed.notify_all()
        thread.join()
