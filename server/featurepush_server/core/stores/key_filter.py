"""A Bloom filter of byte strings, answered a batch at a time with numpy: no Python step per key.

The store's latest-event index starts over once it outgrows its bounds; the keys it drops go into one
of these, so that a key found in neither still tells that no row of it is stored and the write needs no
read first. A filter can say a key may be held when it never was (about 1 in 100 at its capacity), never
the reverse; a wrong "may" only costs the read the index would have saved.

Blocked layout: each key sets and tests `HASHES` bits of one 64-bit word, so a test touches one word of
memory rather than one per bit. Python's own hash of a bytes object (64 bits, kept on the object once
computed) chooses the word from its low bits and the bits within it from its high ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HASHES = 6
# Bits each key has, on average, for about a 1% false-positive rate with 64-bit blocks of 6 bits.
_BITS_PER_KEY = 12
# The word index takes the hash's low bits and the bit choices the 36 above bit 27: at most 2^27 words.
_MAX_WORDS = 1 << 27
_BIT_SHIFTS = [np.uint64(27 + 6 * i) for i in range(HASHES)]
_SIX_BITS = np.uint64(63)
_ONE = np.uint64(1)


class KeyFilter:
    """Which byte strings were added, up to `capacity` of them; not thread-safe (the store's lock)."""

    def __init__(self, nbytes: int):
        words = 1 << max(int(nbytes // 8).bit_length() - 1, 6)
        self._words = np.zeros(min(words, _MAX_WORDS), dtype=np.uint64)
        self._mask = np.uint64(len(self._words) - 1)
        self.capacity = len(self._words) * 64 // _BITS_PER_KEY
        self.count = 0

    @property
    def nbytes(self) -> int:
        """The memory its bits take."""
        return int(self._words.nbytes)

    def has_room(self, more: int) -> bool:
        """Whether `more` keys still fit without raising the false-positive rate past about 1%."""
        return self.count + more <= self.capacity

    def _slots(self, keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Each key's word and the bits it sets there."""
        hashes = np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys)).view(np.uint64)
        bits = np.zeros(len(keys), dtype=np.uint64)
        for shift in _BIT_SHIFTS:
            bits |= _ONE << ((hashes >> shift) & _SIX_BITS)
        return hashes & self._mask, bits

    def add(self, keys: Sequence[bytes], chunk: int = 65_536) -> None:
        """Add keys, in chunks so a million of them need no large temporary arrays."""
        for start in range(0, len(keys), chunk):
            words, bits = self._slots(keys[start : start + chunk])
            # .at applies every key's bits, several keys sharing a word included.
            np.bitwise_or.at(self._words, words, bits)
        self.count += len(keys)

    def might_hold(self, keys: Sequence[bytes]) -> list[bool]:
        """For each key, False if it was surely never added."""
        if not self.count or not keys:
            return [False] * len(keys)
        words, bits = self._slots(keys)
        held: list[bool] = ((self._words[words] & bits) == bits).tolist()
        return held

    def clear(self) -> None:
        """Forget every key."""
        # New zeroed memory rather than writing zeros: pages the filter never used stay untouched.
        self._words = np.zeros(len(self._words), dtype=np.uint64)
        self.count = 0
