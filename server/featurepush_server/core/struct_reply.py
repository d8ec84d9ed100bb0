"""The Struct form of a GetFeatures reply, written from stored rows with as few steps per row as it takes.

Each result is the reply's field tag, the vector's length and status, then the stored payload (for an
expired row, only its event_time part). A read of a few rows writes them in one tight loop: a prefix
looked up by the body's length, and a slice of the stored value, with payload_whole's checks written out
inline for the one- and two-byte lengths that rows under 16 KiB have. A read of more rows does the same
with numpy over all rows at once: the checks, then each prefix written over the end of the value's
columns, which the reply drops, and the kept bytes taken out in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import is_
from typing import cast

import numpy as np

from featurepush.v1 import online_service_pb2

from .encoding import payload_whole
from .framing import COLUMNS_AT, HEADER_BYTES, header_number, heads, numbers, time_header
from .wire import (
    FEATURE_VECTOR_EVENT_TIME,
    FEATURE_VECTOR_FEATURES,
    FEATURE_VECTOR_STATUS,
    GET_FEATURES_RESULT,
    varint,
)

_MISSING = FEATURE_VECTOR_STATUS + bytes([online_service_pb2.FEATURE_STATUS_MISSING])
MISSING_RESULT = GET_FEATURES_RESULT + varint(len(_MISSING)) + _MISSING
PRESENT = FEATURE_VECTOR_STATUS + bytes([online_service_pb2.FEATURE_STATUS_PRESENT])
EXPIRED = FEATURE_VECTOR_STATUS + bytes([online_service_pb2.FEATURE_STATUS_EXPIRED])
_EVENT_TIME = FEATURE_VECTOR_EVENT_TIME[0]
_FEATURES = FEATURE_VECTOR_FEATURES[0]
# The first two bytes of the features field's length, as one number.
_LENGTH_BYTES = np.dtype(">u2")
# The most body lengths whose result prefix is kept per status.
_PREFIXES_KEPT = 1 << 16
# Reads of fewer rows take the loop: there, numpy's fixed cost per call (about 35 us) outweighs the 0.35 us
# per row it saves over the loop's 0.6.
_FEW_ROWS = 80
# Kept and dropped runs of the joined values alternate, from a dropped one: enough for reads of 16,383 rows.
_KEPT_RUNS: np.ndarray = np.arange(1 << 15) % 2 == 1
# Room for a result prefix: its tag, a varint of one or two bytes, and the status field, with one byte
# before it that a one-byte varint leaves to the bytes dropped.
_PREFIX_ROOM = 5
# The longest body whose vector's length takes at most two varint bytes, plus one.
_BODIES = (1 << 14) - len(PRESENT)
# A missing row's place in the joined values: room for its prefix, which is all of its result.
_MISSING_ROOM = bytes(_PREFIX_ROOM)
_SPARE = bytes(COLUMNS_AT)


def _spans() -> np.ndarray:
    """The bytes from a features field's length to its end, by the length's first two bytes as one number.

    A length of three varint bytes or more has no span here, only a negative one that no value ends at.
    """
    first, second = np.divmod(np.arange(1 << 16), 256)
    spans = np.where(first < 0x80, 1 + first, 2 + (first & 0x7F) + (second << 7))
    return np.where((first >= 0x80) & (second >= 0x80), -(1 << 40), spans)


_SPANS = _spans()


def _prefix_rows() -> tuple[np.ndarray, np.ndarray]:
    """Each result prefix right-aligned in _PREFIX_ROOM bytes, and its length, by status and body length.

    Statuses are in the order present, expired, missing; the vector's length is the body's and its status
    field's, written as a varint of one byte below 128 and two bytes from there.
    """
    size = np.arange(_BODIES) + len(PRESENT)
    two = size >= 0x80
    rows = np.zeros((3, _BODIES, _PREFIX_ROOM), dtype=np.uint8)
    rows[:, :, 0] = np.where(two, GET_FEATURES_RESULT[0], 0)
    rows[:, :, 1] = np.where(two, (size & 0x7F) | 0x80, GET_FEATURES_RESULT[0])
    rows[:, :, 2] = np.where(two, size >> 7, size)
    rows[:, :, 3:] = np.frombuffer(PRESENT + EXPIRED + _MISSING, np.uint8).reshape(3, 1, 2)
    lengths = np.tile(np.where(two, 5, 4), 3)
    return rows.reshape(3 * _BODIES, _PREFIX_ROOM), lengths


_PREFIX_ROWS, _PREFIX_LENGTHS = _prefix_rows()


class _Prefixes(dict[int, bytes]):
    """Result prefixes (field tag, vector length, status) by body length, made on first use."""

    def __init__(self, status: bytes):
        super().__init__()
        self._status = status

    def __missing__(self, length: int) -> bytes:
        prefix = GET_FEATURES_RESULT + varint(length + len(self._status)) + self._status
        if len(self) < _PREFIXES_KEPT:
            self[length] = prefix
        return prefix


_PRESENT_PREFIXES = _Prefixes(PRESENT)
_EXPIRED_PREFIXES = _Prefixes(EXPIRED)


def result(status: bytes, body: bytes) -> bytes:
    """One result of a reply: a vector of `status` and `body` (its event_time and features fields)."""
    return (_PRESENT_PREFIXES if status == PRESENT else _EXPIRED_PREFIXES)[len(body)] + body


def struct_results(stored: Sequence[bytes | None], cutoff: int | None) -> bytes:
    """The GetFeaturesResponse of stored values in order; ValueError where a payload is not whole.

    `cutoff` is the oldest event time in microseconds still served PRESENT; rows older than it are EXPIRED.
    The checks are payload_whole's: the event_time field, then the features field ending where the value
    does.
    """
    if len(stored) >= _FEW_ROWS:
        written = _many_results(stored, cutoff)
        if written is not None:
            return written
    return _results_in_turn(stored, cutoff)


def _many_results(stored: Sequence[bytes | None], cutoff: int | None) -> bytes | None:
    """struct_results with numpy over all rows at once; None where the loop must decide.

    That is where a payload is not whole (the loop raises), or a vector's length takes three or more
    varint bytes (rows over 16 KiB, rare). Every read is clipped to the joined values, so a damaged value
    never reads outside them; one whose lengths point elsewhere, or past its own end, fails the
    check that its features end exactly where the value does.
    """
    n = len(stored)
    missing = None
    values = cast(Sequence[bytes], stored)
    if None in stored:
        missing = np.fromiter(map(is_, stored, repeat(None)), dtype=bool, count=n)
        values = [_MISSING_ROOM if v is None else v for v in stored]
    # Spare bytes after the last value: heads() reads a header's width wherever a value starts.
    joined = bytearray().join([*values, _SPARE])
    sizes = np.fromiter(map(len, values), dtype=np.int64, count=n)
    ends = np.add.accumulate(sizes)
    headers, body_at = heads(joined, ends - sizes)
    blob = np.frombuffer(joined, dtype=np.uint8)
    event_time = blob.take(body_at, mode="clip")
    features_at = body_at + 2
    features_at += blob.take(body_at + 1, mode="clip")
    length = numbers(joined, _LENGTH_BYTES)[np.minimum(features_at + 1, len(joined) - 2)]
    whole = features_at + 1 + _SPANS[length] == ends
    whole &= event_time == _EVENT_TIME
    whole &= blob.take(features_at, mode="clip") == _FEATURES
    if missing is not None:
        whole |= missing
    if not whole.all():
        return None
    stop = ends
    expired = None
    if cutoff is not None:
        expired = headers < header_number(cutoff)
        stop = np.where(expired, features_at, ends)
    if missing is not None:
        # An empty body: the prefix is MISSING_RESULT, written over the room held for it.
        body_at[missing] = ends[missing]
        stop = np.where(missing, ends, stop)
    # The prefix of each result, by its status and body length.
    code = stop - body_at
    if code.max() >= _BODIES:
        return None
    if expired is not None:
        code += expired * _BODIES
    if missing is not None:
        code[missing] = 2 * _BODIES
    # Each prefix ends where its body starts, over the value's header and columns, which the reply drops.
    rooms = np.ndarray((len(joined) - _PREFIX_ROOM + 1, _PREFIX_ROOM), np.uint8, joined, strides=(1, 1))
    rooms[body_at - _PREFIX_ROOM] = _PREFIX_ROWS[code]
    runs = np.empty(2 * n + 2, dtype=np.int64)
    runs[0] = 0
    runs[1:-1:2] = body_at - _PREFIX_LENGTHS[code]
    runs[2:-1:2] = stop
    runs[-1] = len(joined)
    kept: bytes = blob[np.repeat(_kept_runs(n), runs[1:] - runs[:-1])].tobytes()
    return kept


def _kept_runs(n: int) -> np.ndarray:
    """Whether each of 2n + 1 alternating runs is kept: every second one, from the second."""
    if 2 * n < len(_KEPT_RUNS):
        return _KEPT_RUNS[: 2 * n + 1]
    kept: np.ndarray = np.arange(2 * n + 1) % 2 == 1
    return kept


def _results_in_turn(stored: Sequence[bytes | None], cutoff: int | None) -> bytes:
    """struct_results one row after another."""
    out: list[bytes] = []
    append = out.append
    present = _PRESENT_PREFIXES
    # Headers compare as bytes in event-time order.
    bound = None if cutoff is None else time_header(cutoff)
    for value in stored:
        if value is None:
            append(MISSING_RESULT)
            continue
        start = COLUMNS_AT + int.from_bytes(value[HEADER_BYTES:COLUMNS_AT], "big")
        end = len(value)
        try:
            whole = value[start] == _EVENT_TIME
            at = start + 2 + value[start + 1]
            whole = whole and value[at] == _FEATURES
            size = value[at + 1]
            if size < 0x80:
                whole = whole and at + 2 + size == end
            elif value[at + 2] < 0x80:
                whole = whole and at + 3 + ((size & 0x7F) | (value[at + 2] << 7)) == end
            else:
                whole = whole and payload_whole(value[start:])
        except IndexError:
            whole = False
        if not whole:
            raise ValueError("a stored payload is not whole")
        if bound is not None and value[:HEADER_BYTES] < bound:
            append(_EXPIRED_PREFIXES[at - start])
            append(value[start:at])
        else:
            append(present[end - start])
            append(value[start:])
    return b"".join(out)
