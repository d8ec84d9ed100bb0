"""The evicted-key filter: never a false "surely absent", and few false "may hold" up to its capacity."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from featurepush_server.core.stores.key_filter import KeyFilter


@settings(max_examples=100, deadline=None)
@given(
    added=st.lists(st.binary(max_size=40), max_size=300), other=st.lists(st.binary(max_size=40), max_size=50)
)
def test_every_added_key_may_be_held(added: list[bytes], other: list[bytes]) -> None:
    keys = KeyFilter(512)
    assert keys.might_hold(added + other) == [False] * len(added + other)  # empty: nothing held
    keys.add(added)
    assert keys.count == len(added)
    held = keys.might_hold(added + other)
    assert all(held[: len(added)])
    keys.clear()
    assert keys.count == 0 and keys.might_hold(added) == [False] * len(added)


def test_at_capacity_about_one_key_in_a_hundred_is_wrongly_held() -> None:
    rng = random.Random(5)
    keys = KeyFilter(1 << 20)  # 1 MiB
    assert keys.nbytes == 1 << 20 and 600_000 < keys.capacity < 750_000
    added = [rng.randbytes(16) for _ in range(keys.capacity)]
    keys.add(added, chunk=50_000)
    assert all(keys.might_hold(added[::97]))
    assert not keys.has_room(1) and keys.has_room(0)
    others = [b"x" + rng.randbytes(16) for _ in range(100_000)]
    wrong = sum(keys.might_hold(others)) / len(others)
    assert wrong < 0.03, wrong


def test_a_filter_is_sized_in_whole_64_bit_words_up_to_its_bytes() -> None:
    assert KeyFilter(1000).nbytes == 512
    assert KeyFilter(1).nbytes == 512  # at least 64 words
    assert KeyFilter(16 << 20).capacity == (16 << 20) * 8 // 12
