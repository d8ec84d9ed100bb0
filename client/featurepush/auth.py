"""Client credentials: TLS and mutual TLS from PEM files, and API keys sent as bearer metadata."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import grpc
import grpc.aio

__all__ = [
    "ApiKeyInterceptor",
    "PemPath",
    "async_api_key_interceptors",
    "channel_credentials",
]

PemPath = str | os.PathLike[str]
# What a metadata value may hold; a key pasted with a newline or quotes is refused here, not by the server.
_KEY_TEXT = re.compile(r"^[\x21-\x7e]+$")


def _read_pem(what: str, path: PemPath, marker: bytes) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {os.fspath(path)}: {e.strerror or e}") from None
    if marker not in data:
        raise ValueError(f"{what}: {os.fspath(path)} is not a PEM file with a {marker.decode().lower()}")
    return data


def channel_credentials(
    ca_cert: PemPath | None = None,
    client_cert: PemPath | None = None,
    client_key: PemPath | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials: the server checked against ca_cert (else system roots), a client cert for mTLS.

    Raises ValueError naming the option for a missing or non-PEM file.
    """
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem("ca_cert", ca_cert, b"CERTIFICATE") if ca_cert else None,
        private_key=_read_pem("client_key", client_key, b"PRIVATE KEY") if client_key else None,
        certificate_chain=_read_pem("client_cert", client_cert, b"CERTIFICATE") if client_cert else None,
    )


def _header(api_key: str) -> tuple[str, str]:
    if not _KEY_TEXT.match(api_key):
        # The key itself stays out of the message: it may end up in a log.
        raise ValueError("api_key must be one word of printable ASCII, such as fpk_<id>_<secret>")
    return ("authorization", f"Bearer {api_key}")


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _CallDetails(_Details, grpc.ClientCallDetails):
    """ClientCallDetails with the authorization header added."""


class ApiKeyInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds 'authorization: Bearer <key>' to every call on a channel (see grpc.intercept_channel)."""

    def __init__(self, api_key: str) -> None:
        self._header = _header(api_key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<hidden>)"

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        return _CallDetails(
            details.method,
            details.timeout,
            [*metadata, self._header],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Iterator[Any]
    ) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, request_iterator: Iterator[Any]
    ) -> Any:
        return continuation(self._details(details), request_iterator)


class _AsyncKeyHeader:
    """Adds the authorization header to grpc.aio call details."""

    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<hidden>)"

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(m for m in (details.metadata or ()) if m[0] != "authorization"))
        metadata.add(*self._header)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _AsyncUnaryUnary(_AsyncKeyHeader, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AsyncUnaryStream(_AsyncKeyHeader, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AsyncStreamUnary(_AsyncKeyHeader, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _AsyncStreamStream(_AsyncKeyHeader, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def async_api_key_interceptors(api_key: str) -> list[Any]:
    """The grpc.aio interceptors sending api_key with every call, for a grpc.aio channel's `interceptors`.

    One per call shape, because grpc.aio files each interceptor under the first shape it implements.
    """
    header = _header(api_key)
    return [
        cls(header) for cls in (_AsyncUnaryUnary, _AsyncUnaryStream, _AsyncStreamUnary, _AsyncStreamStream)
    ]
