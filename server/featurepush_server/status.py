"""The one table from core errors to gRPC statuses, and the guards that apply it at the edge."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .core.errors import (
    Aborted,
    Busy,
    Cancelled,
    CoreError,
    DataLoss,
    FailedPrecondition,
    InvalidInput,
    LimitExceeded,
    NotFound,
    StorageFull,
    Unavailable,
)

_LOGGER = logging.getLogger(__name__)
DOMAIN = "featurepush.dev"
# The message and the details travel in trailing metadata, which a default grpcio client caps at 8 KiB
# (the message is percent-encoded, up to three bytes a character; the details base64-encoded, four bytes
# for three), so both are bounded however long or many the names a caller sent: violations by size (the
# message says how many it lists of how many in all), every name and metadata value by length.
MAX_DETAILS_BYTES = 3000
MAX_DESCRIPTION = 300
MAX_PATH = 300
MAX_MESSAGE = 600
MAX_METADATA_VALUE = 200
MAX_METADATA_ENTRIES = 16

_CODES: dict[type[CoreError], int] = {
    InvalidInput: code_pb2.INVALID_ARGUMENT,
    NotFound: code_pb2.NOT_FOUND,
    FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    LimitExceeded: code_pb2.RESOURCE_EXHAUSTED,
    Busy: code_pb2.RESOURCE_EXHAUSTED,
    Cancelled: code_pb2.CANCELLED,
    Aborted: code_pb2.ABORTED,
    Unavailable: code_pb2.UNAVAILABLE,
    StorageFull: code_pb2.RESOURCE_EXHAUSTED,
    DataLoss: code_pb2.DATA_LOSS,
}


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, marked with an ellipsis where cut."""
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def pack(message: Any) -> any_pb2.Any:
    """A message packed into google.protobuf.Any, as status details are."""
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_of(err: CoreError) -> status_pb2.Status:
    """The google.rpc.Status of a core error: its code, message, ErrorInfo and, if any, BadRequest."""
    code = next((c for cls, c in _CODES.items() if isinstance(err, cls)), code_pb2.INTERNAL)
    details = []
    message = clip(err.message, MAX_MESSAGE)
    metadata = {
        clip(k, 64): clip(v, MAX_METADATA_VALUE) for k, v in list(err.metadata.items())[:MAX_METADATA_ENTRIES]
    }
    info = error_details_pb2.ErrorInfo(reason=clip(err.reason, 63), domain=DOMAIN, metadata=metadata)
    size = info.ByteSize()
    if isinstance(err, InvalidInput) and err.violations:
        bad = error_details_pb2.BadRequest()
        for v in err.violations:
            path, text = clip(v.path, MAX_PATH), clip(v.description, MAX_DESCRIPTION)
            size += len(path.encode()) + len(text.encode()) + 8
            if size > MAX_DETAILS_BYTES and bad.field_violations:
                break
            bad.field_violations.add(field=path, description=text)
        # The one count of what the BadRequest holds, against how many violations there are in all.
        if len(bad.field_violations) < err.total:
            message += f" ({err.total} violations in all, the first {len(bad.field_violations)} listed)"
        details.append(pack(bad))
    if isinstance(err, Busy):
        # featurepush's clients wait this long and send the request again.
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(err.retry_after_s * 1000))
        details.append(pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    details.append(pack(info))
    return status_pb2.Status(code=code, message=message, details=details)


def internal_status() -> status_pb2.Status:
    """The status of an unexpected failure; its cause stays in the server log, not the reply."""
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message="internal error in featurepush; the server log has the details",
        details=[pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))],
    )


def abort(context: grpc.ServicerContext, status: status_pb2.Status) -> None:
    """End the call with a rich status."""
    context.abort_with_status(rpc_status.to_status(status))


F = TypeVar("F", bound=Callable[..., Any])


def unary(method: F) -> F:
    """Map core errors of a unary handler to statuses, and anything else to INTERNAL."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except CoreError as e:
            abort(context, status_of(e))
        except Exception:
            _LOGGER.exception("%s failed", method.__qualname__)
            abort(context, internal_status())
        return None  # abort raises; this only satisfies the type checker

    return wrapper  # type: ignore[return-value]


def streaming(method: F) -> F:
    """Map core errors of a response-streaming handler to statuses, and anything else to INTERNAL."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except CoreError as e:
            abort(context, status_of(e))
        except Exception:
            if not context.is_active():
                return
            _LOGGER.exception("%s failed", method.__qualname__)
            abort(context, internal_status())

    return wrapper  # type: ignore[return-value]
