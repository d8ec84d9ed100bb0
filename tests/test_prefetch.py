"""The prefetching generator: same items, errors passed on, the producer stopped and closed early."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from featurepush_server.core.prefetch import prefetch


def test_yields_every_item_in_order() -> None:
    assert list(prefetch(lambda: iter(range(1000)), depth=3)) == list(range(1000))


def test_a_producer_error_reaches_the_consumer_after_the_items_before_it() -> None:
    def failing() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("broken source")

    got = []
    with pytest.raises(ValueError, match="broken source"):
        for item in prefetch(failing):
            got.append(item)
    assert got == [1, 2]


def test_closing_early_stops_and_closes_the_producer() -> None:
    closed = threading.Event()
    produced = []

    def endless() -> Iterator[int]:
        try:
            n = 0
            while True:
                produced.append(n)
                yield n
                n += 1
        finally:
            closed.set()

    items = prefetch(endless, depth=2)
    assert next(items) == 0
    items.close()
    assert closed.is_set()
    # Bounded read-ahead: the producer never ran far past what was taken.
    assert len(produced) <= 5
