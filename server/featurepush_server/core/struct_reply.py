"""The Struct form of a GetFeatures reply, written from stored rows with as few steps per row as it takes.

Each result is the reply's field tag, the vector's length and status, then the stored payload (for an
expired row, only its event_time part): a prefix looked up by the body's length, and a slice of the
stored value. Checking that a payload is whole is written out inline for the one- and two-byte lengths
that rows under 16 KiB have; helper calls and concatenations per row cost twice as much.
"""

from __future__ import annotations

from collections.abc import Sequence

from featurepush.v1 import online_service_pb2

from .encoding import payload_whole
from .framing import HEADER_BYTES, time_header
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
# Where a stored value's payload starts: after its header and the 4-byte length of its columns.
_COLUMNS_AT = HEADER_BYTES + 4
# The most body lengths whose result prefix is kept per status.
_PREFIXES_KEPT = 1 << 16


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
    out: list[bytes] = []
    append = out.append
    present = _PRESENT_PREFIXES
    # Headers compare as bytes in event-time order.
    bound = None if cutoff is None else time_header(cutoff)
    for value in stored:
        if value is None:
            append(MISSING_RESULT)
            continue
        start = _COLUMNS_AT + int.from_bytes(value[HEADER_BYTES:_COLUMNS_AT], "big")
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
