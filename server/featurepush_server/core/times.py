"""The times and durations the server keeps, and the check of each Timestamp or Duration a caller sends.

Protobuf's JSON form (grpcurl, other languages' clients) writes a Timestamp only in years 0001 to 9999 and a
Duration only within 10,000 years, each with nanos of the seconds' sign below one second; the server keeps
times in microseconds as int64, so a value outside those ranges is refused where it arrives, by the path of
its field, and never reaches the arithmetic or the stored definitions that would fail on it later.
"""

from __future__ import annotations

import datetime

from google.protobuf import duration_pb2, timestamp_pb2

from .errors import InvalidInput, Violation

# Seconds of 0001-01-01T00:00:00Z and of 9999-12-31T23:59:59Z: the years RFC 3339 can write.
MIN_SECONDS = -62_135_596_800
MAX_SECONDS = 253_402_300_799
# Microseconds of the same: the range every event time, bound and cutoff of the server lies in.
MIN_MICROS = MIN_SECONDS * 1_000_000
MAX_MICROS = MAX_SECONDS * 1_000_000 + 999_999
# The longest Duration protobuf holds: 10,000 years of 365.25 days.
MAX_DURATION_SECONDS = 315_576_000_000
# The longest span between two times the server keeps; a ttl beyond it would expire nothing anyway.
MAX_SPAN_MICROS = MAX_MICROS - MIN_MICROS
_NANOS = 999_999_999
_EPOCH = datetime.datetime(1970, 1, 1)


def timestamp_problem(stamp: timestamp_pb2.Timestamp) -> str | None:
    """Why `stamp` is not a Timestamp the server keeps, or None if it is one."""
    if not 0 <= stamp.nanos <= _NANOS:
        return f"nanos must be 0 to 999,999,999, got {stamp.nanos}"
    if not MIN_SECONDS <= stamp.seconds <= MAX_SECONDS:
        return f"must lie in years 0001 to 9999 UTC (seconds {MIN_SECONDS:,} to {MAX_SECONDS:,})"
    return None


def duration_problem(duration: duration_pb2.Duration, longest_micros: int | None = None) -> str | None:
    """Why `duration` is not a Duration of at most `longest_micros` (protobuf's range if None), or None."""
    seconds, nanos = duration.seconds, duration.nanos
    if not -_NANOS <= nanos <= _NANOS or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        return f"nanos must be -999,999,999 to 999,999,999 with the sign of seconds, got {nanos}"
    if abs(seconds) > MAX_DURATION_SECONDS:
        return f"seconds must be within +-{MAX_DURATION_SECONDS:,} (10,000 years), got {seconds}"
    if longest_micros is not None and abs(duration_micros(duration)) > longest_micros:
        return f"must be at most {longest_micros // 1_000_000:,} seconds, got {seconds}"
    return None


def timestamp_micros(stamp: timestamp_pb2.Timestamp) -> int:
    """A valid Timestamp in microseconds since the epoch, finer digits dropped toward the past."""
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000


def duration_micros(duration: duration_pb2.Duration) -> int:
    """A valid Duration in microseconds, finer digits dropped toward zero."""
    return duration.seconds * 1_000_000 + int(duration.nanos / 1000)


def rfc3339(micros: int) -> str:
    """A time in the server's range as RFC 3339 in UTC, to the microsecond."""
    return (_EPOCH + datetime.timedelta(microseconds=micros)).isoformat(timespec="microseconds") + "Z"


def request_micros(message: object, name: str, *, earliest: int = MIN_MICROS) -> int | None:
    """The Timestamp field `name` of a request in microseconds, None if unset; raise InvalidInput if invalid.

    `earliest` is the first time the request may name, where the server's work reaches before it.
    """
    if not message.HasField(name):  # type: ignore[attr-defined]
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, name)
    problem = timestamp_problem(stamp)
    if problem is None and timestamp_micros(stamp) < earliest:
        problem = f"must not be before {rfc3339(earliest)}"
    if problem is not None:
        raise InvalidInput(
            f"{name} is not a valid Timestamp", [Violation(name, problem)], reason="INVALID_TIME"
        )
    return timestamp_micros(stamp)
