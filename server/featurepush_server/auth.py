"""API-key authentication: a server interceptor that checks every featurepush call's key and scope."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from featurepush.v1 import (
    backfill_service_pb2,
    feature_view_service_pb2,
    ingest_service_pb2,
    online_service_pb2,
    registry_service_pb2,
)

from .config import ConfigError, ServerConfig, is_loopback
from .core.keys import KeyRing, KeysFileError
from .status import DOMAIN

_LOGGER = logging.getLogger(__name__)

_REGISTRY = "/featurepush.v1.RegistryService/"
_INGEST = "/featurepush.v1.IngestService/"
_ONLINE = "/featurepush.v1.OnlineService/"
_BACKFILL = "/featurepush.v1.BackfillService/"
_VIEWS = "/featurepush.v1.FeatureViewService/"

# The scope each featurepush method needs; a key with "admin" may call them all. A featurepush method
# missing here needs "admin", so a new RPC is closed until someone decides who may call it.
METHOD_SCOPES: dict[str, str] = {
    _ONLINE + "GetFeatures": "read",
    _REGISTRY + "GetSource": "read",
    _REGISTRY + "ListSources": "read",
    _REGISTRY + "GetServerStatus": "read",
    _INGEST + "Push": "ingest",
    _INGEST + "PushStream": "ingest",
    _BACKFILL + "Backfill": "backfill",
    _BACKFILL + "ReadBatchSource": "backfill",
    _REGISTRY + "ApplySource": "admin",
    _REGISTRY + "DeleteSource": "admin",
    _VIEWS + "GetViewFeatures": "read",
    _VIEWS + "GetFeatureView": "read",
    _VIEWS + "ListFeatureViews": "read",
    _VIEWS + "GetFeatureService": "read",
    _VIEWS + "ListFeatureServices": "read",
    _VIEWS + "ApplyFeatureView": "admin",
    _VIEWS + "DeleteFeatureView": "admin",
    _VIEWS + "ApplyFeatureService": "admin",
    _VIEWS + "DeleteFeatureService": "admin",
}

# The files whose services the interceptor guards; health and reflection stay open.
GUARDED_FILES = (
    registry_service_pb2.DESCRIPTOR,
    ingest_service_pb2.DESCRIPTOR,
    online_service_pb2.DESCRIPTOR,
    backfill_service_pb2.DESCRIPTOR,
    feature_view_service_pb2.DESCRIPTOR,
)
_GUARDED_PREFIX = "/featurepush."

_MESSAGES = {
    "API_KEY_MISSING": "this call needs an API key, sent as the metadata 'authorization: Bearer <key>'",
    "API_KEY_MALFORMED": "the authorization metadata is not 'Bearer fpk_<id>_<secret>'",
    "API_KEY_INVALID": "the API key is unknown, revoked or wrong",
}


def _status(code: int, message: str, reason: str, metadata: dict[str, str] | None = None) -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata or {}))
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[info]))


# grpc's stubs make the handler generic, the runtime class is not.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def _refusal(handler: Handler, status: grpc.Status) -> Handler:
    """A handler answering as `handler` would that ends the call with `status`, reading no request.

    It takes its requests as a stream, which it never reads: grpcio runs a unary request's handler only
    once the message arrived, and a caller refused for its key must not hold a thread until it sends one.
    """

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort_with_status(status)

    def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        context.abort_with_status(status)
        yield from ()

    kwargs: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.stream_unary_rpc_method_handler(unary, **kwargs)


def required_scope(method: str) -> str | None:
    """The scope a full method name (/package.Service/Method) needs, or None for an open method."""
    if method in METHOD_SCOPES:
        return METHOD_SCOPES[method]
    return "admin" if method.startswith(_GUARDED_PREFIX) else None


class ApiKeyInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Lets a featurepush call through only with a valid, unrevoked key holding the method's scope.

    Calls without a usable key end UNAUTHENTICATED, calls whose key lacks the scope PERMISSION_DENIED,
    both with an ErrorInfo and before the request is read. Other services (health, reflection) pass.
    Thread-safe; key strings never reach the log, only the public key id.
    """

    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method: str = handler_call_details.method
        scope = required_scope(method)
        if scope is None:
            return continuation(handler_call_details)
        status = self._check(method, scope, handler_call_details.invocation_metadata or ())
        handler = continuation(handler_call_details)
        if status is None or handler is None:
            return handler
        return _refusal(handler, status)

    def _check(self, method: str, scope: str, metadata: Any) -> grpc.Status | None:
        """None if the call may run, else the status that refuses it."""
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            reason = "API_KEY_MISSING"
        else:
            text = values[0] if isinstance(values[0], str) else ""
            kind, _, token = text.strip().partition(" ")
            if len(values) > 1 or kind.lower() != "bearer":
                reason = "API_KEY_MALFORMED"
            else:
                verdict = self._keys.verify(token.strip())
                if verdict.key is not None:
                    if verdict.key.allows(scope):
                        return None
                    _LOGGER.info("refused %s: key %s lacks scope %s", method, verdict.key.id, scope)
                    return _status(
                        code_pb2.PERMISSION_DENIED,
                        f"API key {verdict.key.id} lacks the {scope!r} scope that {method} needs",
                        "API_KEY_SCOPE_MISSING",
                        {"required_scope": scope, "key_id": verdict.key.id},
                    )
                reason = verdict.reason
        _LOGGER.info("refused %s: %s", method, reason)
        return _status(code_pb2.UNAUTHENTICATED, _MESSAGES[reason], reason)


def auth_interceptor(config: ServerConfig) -> ApiKeyInterceptor | None:
    """The API-key interceptor of a configuration with a keys_file, else None; reads the file once now."""
    if config.keys_file is None:
        return None
    try:
        keys = KeyRing(config.keys_file)
    except KeysFileError as e:
        raise ConfigError(f"keys_file: {e}") from None
    _LOGGER.info("API keys required: %d keys in %s", len(keys.keys()), config.keys_file)
    return ApiKeyInterceptor(keys)


def log_exposure(config: ServerConfig) -> None:
    """Say at start who can reach the server and whether they need a key."""
    host = config.listen.rpartition(":")[0]
    if config.keys_file is None:
        if is_loopback(host):
            _LOGGER.info(
                "no keys_file: any caller can use every method, so the server listens on loopback only (%s)",
                config.listen,
            )
        else:
            _LOGGER.warning(
                "no keys_file and allow_unauthenticated: anyone reaching %s can use every method",
                config.listen,
            )
    elif config.tls_cert is None and not is_loopback(host):
        _LOGGER.warning(
            "API keys are required but TLS is off: keys travel in clear text to %s; set tls_cert and tls_key",
            config.listen,
        )
