"""The framing of a stored row value: an 8-byte event-time header, then the payload.

The header is the event time in microseconds, sign-flipped and big-endian, so that comparing headers as
bytes compares event times; stores use it to keep the latest event per entity and to find expired rows
without decoding the payload. The payload is opaque here (`encoding.py` writes it). Every backend stores
values framed this way, and this module is the only one that knows the header's width and byte order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

HEADER_BYTES = 8
_SIGN = np.uint64(1 << 63)


def time_header(micros: int) -> bytes:
    """The header of an event time; also the bound that compares a stored value's header to a time."""
    return (micros + (1 << 63)).to_bytes(HEADER_BYTES, "big")


def time_headers(micros: np.ndarray) -> pa.Array:
    """The header of every event time, column at a time, as a binary array."""
    flipped = np.asarray(micros, dtype=np.int64).view(np.uint64) ^ _SIGN
    data = np.ascontiguousarray(flipped.astype(">u8").view(np.uint8))
    n = len(flipped)
    offsets = np.arange(0, (n + 1) * HEADER_BYTES, HEADER_BYTES, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def header(value: bytes) -> bytes:
    """A stored value's header."""
    return value[:HEADER_BYTES]


def header_micros(value: bytes) -> int:
    """The event time in a stored value's header."""
    return int.from_bytes(value[:HEADER_BYTES], "big") - (1 << 63)


def payload(value: bytes) -> bytes:
    """A stored value without its header."""
    return value[HEADER_BYTES:]
