"""The framing of a stored row value: an 8-byte event-time header, the columns, then the payload.

The header is the event time in microseconds, sign-flipped and big-endian, so that comparing headers as
bytes compares event times; stores use it to keep the latest event per entity and to find expired rows
without decoding the payload. After it, a 4-byte big-endian length and that many bytes of the row's
columns (the form Arrow reads take), then the payload (the form Struct reads take). Both are opaque here
(`encoding.py` writes them). Every backend stores values framed this way, and this module defines the
header's width and byte order and where the columns end; the replies written row by row
(`struct_reply.py`, `arrow_reply.py`) read the columns' length inline from its constants, since a call per
row would cost them a tenth of their time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HEADER_BYTES = 8
# Where a stored value's columns start: after its header and the columns' 4-byte length.
COLUMNS_AT = HEADER_BYTES + 4
_SIGN = np.uint64(1 << 63)
# The header and the columns' length as numbers.
_HEADER_NUMBER = np.dtype(">u8")
_COLUMNS_LENGTH = np.dtype(">u4")


def time_header(micros: int) -> bytes:
    """The header of an event time; also the bound that compares a stored value's header to a time."""
    return (micros + (1 << 63)).to_bytes(HEADER_BYTES, "big")


def head_matrix(micros: np.ndarray, column_lengths: np.ndarray) -> np.ndarray:
    """What every row's stored value starts with, its header and its columns' length, as an (n, 12) matrix."""
    n = len(micros)
    out = np.empty((n, COLUMNS_AT), dtype=np.uint8)
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
    joined = b"".join(values)
    blob = np.frombuffer(joined, dtype=np.uint8)
    sizes = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    if not len(sizes):
        empty = np.zeros(0, dtype=np.int64)
        return blob, empty, empty, empty
    if sizes.min() < COLUMNS_AT:
        raise ValueError("a stored value is shorter than its header")
    starts = np.zeros(len(values), dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    headers, payload_at = heads(joined, starts)
    columns_at = starts + COLUMNS_AT
    lengths = payload_at - columns_at
    if (lengths > sizes - COLUMNS_AT).any():
        raise ValueError("a stored value's columns run past its end")
    return blob, (headers ^ _SIGN).view(np.int64), columns_at, lengths


def numbers(joined: bytearray | bytes, dtype: np.dtype) -> np.ndarray:
    """A view of `joined` whose item i is the number of type `dtype` in its bytes from i on.

    Indexing it reads many numbers at any byte offsets at once (take() would copy the whole view first).
    """
    return np.ndarray((len(joined) - dtype.itemsize + 1,), dtype, joined, strides=(1,))


def heads(joined: bytearray | bytes, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The headers, as numbers that order as the headers do, and payload starts of values joined at `starts`.

    Never reads outside `joined` (at least 12 bytes long), but a value shorter than its header and columns'
    length reads its neighbour's bytes: callers check that each payload lies inside its value.
    """
    headers = numbers(joined, _HEADER_NUMBER)[np.minimum(starts, len(joined) - HEADER_BYTES)]
    columns = numbers(joined, _COLUMNS_LENGTH)[np.minimum(starts + HEADER_BYTES, len(joined) - 4)]
    return headers, starts + COLUMNS_AT + columns


def header_number(micros: int) -> np.uint64:
    """time_header as the number heads() gives headers as: a header is older than it where it is smaller."""
    return np.uint64(micros + (1 << 63))


def payload(value: bytes) -> bytes:
    """A stored value's payload: what follows its header and columns."""
    return value[COLUMNS_AT + int.from_bytes(value[HEADER_BYTES:COLUMNS_AT], "big") :]
