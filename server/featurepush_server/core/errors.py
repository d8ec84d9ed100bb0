"""The core's exception tree; the gRPC edge maps each class to one status code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Violation:
    """One offending value: where it is (a path such as `records["clicks"][3].clicked`) and what was wrong."""

    path: str
    description: str


class CoreError(Exception):
    """Base of every error the core raises on purpose; `reason` is an UPPER_SNAKE_CASE machine code."""

    reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})


class InvalidInput(CoreError):
    """The request is malformed; `violations` names the offending fields, the first `total` of them.

    Where a request has more violations than are worth collecting, `violations` holds the first and
    `total` says how many there are in all; the edge's message says how many it lists of them.
    """

    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        violations: Sequence[Violation] = (),
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        total: int = 0,
    ):
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations)
        self.total = max(total, len(self.violations))


class NotFound(CoreError):
    """A named object does not exist."""

    reason = "NOT_FOUND"


class FailedPrecondition(CoreError):
    """The request is well formed but the system's state refuses it."""

    reason = "FAILED_PRECONDITION"


class LimitExceeded(CoreError):
    """The request is larger than a configured limit."""

    reason = "LIMIT_EXCEEDED"


class Busy(CoreError):
    """The server holds as much of this kind of work as it may now; the request may be sent again later."""

    reason = "OVERLOADED"

    def __init__(self, message: str, retry_after_s: float, *, metadata: dict[str, str] | None = None):
        super().__init__(message, metadata=metadata)
        self.retry_after_s = retry_after_s


class Aborted(CoreError):
    """A concurrent change made the request's work stale; nothing was written and it may be sent again."""

    reason = "ABORTED"


class Cancelled(CoreError):
    """The caller went away, so the work stopped."""

    reason = "CANCELLED"


class Unavailable(CoreError):
    """The server cannot do this now, though the request is fine; sending it again later may succeed."""

    reason = "UNAVAILABLE"


class ShuttingDown(Unavailable):
    """The server is stopping; the call should be sent again, to this server once restarted or another."""

    reason = "SHUTTING_DOWN"


class DataLoss(CoreError):
    """Stored data is damaged beyond reading: the request is fine, and sending it again will not help."""

    reason = "DATA_LOSS"


class StorageFull(CoreError):
    """The disk holding the data is full; writes are refused until space is freed, reads go on."""

    reason = "DISK_FULL"


def shown(name: str, width: int = 64) -> str:
    """A caller-supplied name as messages quote it: cut to `width` characters, so replies stay small."""
    return name if len(name) <= width else name[: width - 3] + "..."


def name_list(names: Sequence[str], limit: int = 5) -> str:
    """At most `limit` names, each cut by `shown`, and how many more there were."""
    out = ", ".join(shown(n) for n in names[:limit])
    return out if len(names) <= limit else f"{out} and {len(names) - limit} more"
