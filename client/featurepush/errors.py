"""Typed client exceptions decoded from gRPC statuses and their google.rpc details."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "AlreadyExistsError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FeaturepushError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "Violation",
    "from_rpc_error",
    "from_status_proto",
]

_CODES_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class Violation:
    """One invalid input: its path (such as records["clicks"][3].user_id) and what is wrong with it."""

    field: str
    description: str


class FeaturepushError(Exception):
    """A failed featurepush call: the status code, the server's message, and its ErrorInfo reason/metadata."""

    code: grpc.StatusCode
    message: str
    reason: str | None
    metadata: dict[str, str]
    # The server's google.rpc.RetryInfo delay in seconds: set when it refused the call for overload and
    # trying again after that long is expected to succeed.
    retry_delay_s: float | None

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.retry_delay_s = retry_delay_s

    def __str__(self) -> str:
        suffix = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}: {self.message}{suffix}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r}, reason={self.reason!r})"


class InvalidArgumentError(FeaturepushError):
    """INVALID_ARGUMENT: the request was rejected as a whole; violations lists every bad input by path."""

    violations: list[Violation]

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[Violation] = (),
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(code, message, reason=reason, metadata=metadata, retry_delay_s=retry_delay_s)
        self.violations = list(violations)

    def __str__(self) -> str:
        lines = [super().__str__()]
        lines.extend(f"{v.field}: {v.description}" for v in self.violations)
        return "\n".join(lines)


class NotFoundError(FeaturepushError):
    """NOT_FOUND: the named source (or other resource) does not exist."""


class AlreadyExistsError(FeaturepushError):
    """ALREADY_EXISTS: the resource exists and the request may not replace it."""


class FailedPreconditionError(FeaturepushError):
    """FAILED_PRECONDITION: the system is not in a state where the request can run, e.g. no batch_config."""


class ResourceExhaustedError(FeaturepushError):
    """RESOURCE_EXHAUSTED: a size or rate limit was exceeded; retry smaller or later."""


class UnavailableError(FeaturepushError):
    """UNAVAILABLE: the server could not be reached or is shutting down; safe to retry with a request_id."""


class DeadlineExceededError(FeaturepushError):
    """DEADLINE_EXCEEDED: the call's timeout passed; the outcome of a write is unknown."""


class PermissionDeniedError(FeaturepushError):
    """PERMISSION_DENIED: the caller may not do this."""


class UnauthenticatedError(FeaturepushError):
    """UNAUTHENTICATED: the call carried no API key, or one that is malformed, unknown, wrong or revoked."""


class InternalError(FeaturepushError):
    """INTERNAL: the server failed unexpectedly."""


class DataLossError(FeaturepushError):
    """DATA_LOSS: stored data the call needed is damaged; sending the call again will not help."""


_CLASS_BY_CODE: dict[grpc.StatusCode, type[FeaturepushError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
}


def _build(code: grpc.StatusCode, message: str, details: Sequence[any_pb2.Any]) -> FeaturepushError:
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[Violation] = []
    retry_delay_s: float | None = None
    for detail in details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(Violation(v.field, v.description) for v in bad_request.field_violations)
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason or None
            metadata.update(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay_s = max(0.0, retry.retry_delay.ToMicroseconds() / 1e6)
    cls = _CLASS_BY_CODE.get(code, FeaturepushError)
    if cls is InvalidArgumentError:
        return InvalidArgumentError(
            code,
            message,
            reason=reason,
            metadata=metadata,
            violations=violations,
            retry_delay_s=retry_delay_s,
        )
    return cls(code, message, reason=reason, metadata=metadata, retry_delay_s=retry_delay_s)


def from_status_proto(code: int, message: str, details: Sequence[any_pb2.Any]) -> FeaturepushError:
    """Returns the typed exception for a google.rpc.Status-shaped error, such as a PushStream BatchError."""
    status_code = _CODES_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    return _build(status_code, message, details)


def from_rpc_error(err: grpc.RpcError) -> FeaturepushError:
    """Returns the typed exception for a failed call, decoding BadRequest and ErrorInfo details if sent."""
    code = grpc.StatusCode.UNKNOWN
    message = str(err)
    if isinstance(err, grpc.Call):
        code = err.code() or grpc.StatusCode.UNKNOWN
        message = err.details() or ""
        try:
            status = rpc_status.from_call(err)
        except ValueError:
            # A status whose code or message disagrees with the call's is not trusted for details.
            status = None
        if status is not None:
            return _build(code, message, list(status.details))
    return _build(code, message, ())
