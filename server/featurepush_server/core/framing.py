"""The framing of a stored row value: an 8-byte event-time header, the columns, then the payload.

The header is the event time in microseconds, sign-flipped and big-endian, so that comparing headers as
bytes compares event times; stores use it to keep the latest event per entity and to find expired rows
without decoding the payload. After it, a 4-byte big-endian length and that many bytes of the row's
columns (the form Arrow reads take), then the payload (the form Struct reads take). Both are opaque here
(`encoding.py` writes them). Every backend stores values framed this way, and this module is the only
one that knows the header's width and byte order and where the columns end.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HEADER_BYTES = 8
_COLUMNS_AT = HEADER_BYTES + 4
_SIGN = np.uint64(1 << 63)


def time_header(micros: int) -> bytes:
    """The header of an event time; also the bound that compares a stored value's header to a time."""
    return (micros + (1 << 63)).to_bytes(HEADER_BYTES, "big")


def head_matrix(micros: np.ndarray, column_lengths: np.ndarray) -> np.ndarray:
    """What every row's stored value starts with, its header and its columns' length, as an (n, 12) matrix."""
    n = len(micros)
    out = np.empty((n, _COLUMNS_AT), dtype=np.uint8)
    flipped = np.asarray(micros, dtype=np.int64).view(np.uint64) ^ _SIGN
    out[:, :HEADER_BYTES] = flipped.astype(">u8").view(np.uint8).reshape(n, HEADER_BYTES)
    out[:, HEADER_BYTES:] = np.asarray(column_lengths).astype(">u4").view(np.uint8).reshape(n, 4)
    return out


def header(value: bytes) -> bytes:
    """A stored value's header."""
    return value[:HEADER_BYTES]


def header_micros(value: bytes) -> int:
    """The event time in a stored value's header."""
    return int.from_bytes(value[:HEADER_BYTES], "big") - (1 << 63)


def frame(header: bytes, columns: bytes, payload: bytes) -> bytes:
    """One stored value of its three parts."""
    return header + len(columns).to_bytes(4, "big") + columns + payload


def locate(values: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stored values joined as one uint8 array, with each one's event time and its columns' start and length.

    Many rows are taken apart this way with a few numpy operations and no Python per row. ValueError
    where a value is too short for its header and columns (cut short): its neighbour's bytes would be read.
    """
    blob = np.frombuffer(b"".join(values), dtype=np.uint8)
    sizes = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    if len(sizes) and sizes.min() < _COLUMNS_AT:
        raise ValueError("a stored value is shorter than its header")
    starts = np.zeros(len(values), dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    headers = blob[starts[:, None] + np.arange(HEADER_BYTES)].view(">u8").ravel() ^ _SIGN
    micros = headers.astype(np.uint64).view(np.int64)
    lengths = blob[(starts + HEADER_BYTES)[:, None] + np.arange(4)].view(">u4").ravel().astype(np.int64)
    if (lengths > sizes - _COLUMNS_AT).any():
        raise ValueError("a stored value's columns run past its end")
    return blob, micros, starts + _COLUMNS_AT, lengths


def payload(value: bytes) -> bytes:
    """A stored value's payload: what follows its header and columns."""
    return value[_COLUMNS_AT + int.from_bytes(value[HEADER_BYTES:_COLUMNS_AT], "big") :]
