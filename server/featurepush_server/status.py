"""The one table from core errors to gRPC statuses, and the guards that apply it at the edge."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .core.errors import (
    Aborted,
    Cancelled,
    CoreError,
    FailedPrecondition,
    InvalidInput,
    LimitExceeded,
    NotFound,
    StorageFull,
    Unavailable,
)

_LOGGER = logging.getLogger(__name__)
DOMAIN = "featurepush.dev"
# Status details travel in trailing metadata, which clients cap at 8 KiB by default (base64 grows it by a
# third), so the violations listed are bounded by size; the message says how many were left out.
MAX_DETAILS_BYTES = 4000
MAX_DESCRIPTION = 300

_CODES: dict[type[CoreError], int] = {
    InvalidInput: code_pb2.INVALID_ARGUMENT,
    NotFound: code_pb2.NOT_FOUND,
    FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    LimitExceeded: code_pb2.RESOURCE_EXHAUSTED,
    Cancelled: code_pb2.CANCELLED,
    Aborted: code_pb2.ABORTED,
    Unavailable: code_pb2.UNAVAILABLE,
    StorageFull: code_pb2.RESOURCE_EXHAUSTED,
}


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_of(err: CoreError) -> status_pb2.Status:
    """The google.rpc.Status of a core error: its code, message, ErrorInfo and, if any, BadRequest."""
    code = next((c for cls, c in _CODES.items() if isinstance(err, cls)), code_pb2.INTERNAL)
    details = []
    message = err.message
    if isinstance(err, InvalidInput) and err.violations:
        bad = error_details_pb2.BadRequest()
        size = 0
        for v in err.violations:
            text = (
                v.description
                if len(v.description) <= MAX_DESCRIPTION
                else v.description[:MAX_DESCRIPTION] + "..."
            )
            size += len(v.path.encode()) + len(text.encode()) + 8
            if size > MAX_DETAILS_BYTES and bad.field_violations:
                message += f" ({len(err.violations) - len(bad.field_violations)} more violations not listed)"
                break
            bad.field_violations.add(field=v.path, description=text)
        details.append(_pack(bad))
    details.append(
        _pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata))
    )
    return status_pb2.Status(code=code, message=message, details=details)


def internal_status() -> status_pb2.Status:
    """The status of an unexpected failure; its cause stays in the server log, not the reply."""
    return status_pb2.Status(
        code=code_pb2.INTERNAL,
        message="internal error in featurepush; the server log has the details",
        details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))],
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
