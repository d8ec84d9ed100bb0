"""The interceptor every featurepush call passes: admission by class, requests decoded here, calls recorded.

grpcio answers INTERNAL ("Exception deserializing request!") when a request's bytes do not decode, which
blames the server for the caller's mistake. Every handler is therefore given the raw bytes, which this
module decodes itself: a request protobuf cannot read is INVALID_ARGUMENT. The raw size is also what
admission counts, before any decoding is spent on a call that will be refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from featurepush.v1 import (
    backfill_service_pb2,
    feature_view_service_pb2,
    ingest_service_pb2,
    online_service_pb2,
    registry_service_pb2,
)

from . import admission
from .admission import Admission, Gate, Overloaded
from .core.errors import name_list, shown
from .core.line_budget import LineBudget
from .metrics import Metrics
from .status import DOMAIN, abort, pack
from .waits import RequestWaits, guarded

_LOGGER = logging.getLogger(__name__)


def _methods() -> dict[str, str]:
    """The full method path ("/pkg.Service/Method") of every featurepush RPC and its admission class."""
    by_service = {
        registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]: admission.REGISTRY,
        ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"]: admission.PUSH,
        online_service_pb2.DESCRIPTOR.services_by_name["OnlineService"]: admission.READ,
        backfill_service_pb2.DESCRIPTOR.services_by_name["BackfillService"]: admission.BACKFILL,
        feature_view_service_pb2.DESCRIPTOR.services_by_name["FeatureViewService"]: admission.READ,
    }
    out = {}
    for service, klass in by_service.items():
        for method in service.methods:
            # A stream of pushes holds its thread for its life, so it is bounded by count, not by bytes.
            out[f"/{service.full_name}/{method.name}"] = (
                admission.STREAM if method.client_streaming else klass
            )
            # Feature views are read like rows, and applied and deleted like sources.
            if klass == admission.READ and method.name.startswith(("Apply", "Delete")):
                out[f"/{service.full_name}/{method.name}"] = admission.REGISTRY
    return out


METHOD_CLASSES = _methods()


def overloaded_status(err: Overloaded) -> status_pb2.Status:
    """RESOURCE_EXHAUSTED with a RetryInfo delay, which featurepush's clients honour."""
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(int(err.retry_after_s * 1000))
    return status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED,
        message=str(err),
        details=[
            pack(error_details_pb2.RetryInfo(retry_delay=delay)),
            pack(
                error_details_pb2.ErrorInfo(
                    reason="OVERLOADED", domain=DOMAIN, metadata={"class": err.klass, "limit": err.why}
                )
            ),
        ],
    )


def undecodable_status(method: str) -> status_pb2.Status:
    """INVALID_ARGUMENT for request bytes that are not the method's request message."""
    name = method.rsplit("/", 1)[-1]
    bad = error_details_pb2.BadRequest()
    bad.field_violations.add(
        field="",
        description=f"not a valid {name} request message (malformed protobuf, invalid UTF-8 in a "
        "string, or nesting too deep)",
    )
    return status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message=f"the request could not be decoded as the {name} request message",
        details=[pack(bad), pack(error_details_pb2.ErrorInfo(reason="UNDECODABLE_REQUEST", domain=DOMAIN))],
    )


def _refuse(context: grpc.ServicerContext, err: Overloaded) -> None:
    abort(context, overloaded_status(err))


class _Slot:
    """A gate's slot held by one call; released once, whichever of its ends comes first."""

    def __init__(self, gate: Gate | None, nbytes: int):
        self._gate = gate
        self._nbytes = nbytes
        self._lock = threading.Lock()
        self._held = gate is not None

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held and self._gate is not None:
            self._gate.leave(self._nbytes)


class OpenStreams:
    """The open streams of one class, with when each last sent a message, to make room for a new one.

    Once every slot is taken, a new stream closes (cancels) the stream idle longest, if it has sent nothing
    for `evict_idle_s`: a stream sending a batch now and then, under the idle timeout, would otherwise hold
    its slot for as long as it liked, and a few such callers every slot. The featurepush pusher opens a new
    stream when it has records again.
    """

    # How long a freed slot is waited for, once a stream was closed to make room.
    _ROOM_WAIT_S = 1.0

    def __init__(self, evict_idle_s: float):
        self.evict_idle_s = evict_idle_s
        self._lock = threading.Lock()
        self._open: dict[int, tuple[_Call, grpc.ServicerContext]] = {}
        self.evicted = 0

    def opened(self, call: _Call, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._open[id(call)] = (call, context)

    def closed(self, call: _Call) -> None:
        with self._lock:
            self._open.pop(id(call), None)

    def make_room(self, gate: Gate, nbytes: int, context: grpc.ServicerContext) -> bool:
        """Close the stream idle longest if one has idled long enough, then take its slot; whether taken."""
        now = time.perf_counter()
        with self._lock:
            idle = [
                (call.last, key)
                for key, (call, _) in self._open.items()
                if call.pending <= 0 and now - call.last >= self.evict_idle_s
            ]
            if not idle:
                return False
            _, key = min(idle)
            _, victim = self._open.pop(key)
            self.evicted += 1
        _LOGGER.info("closed a push stream idle for %.1fs to make room for a new one", now - min(idle)[0])
        victim.cancel()  # type: ignore[no-untyped-call]
        end = now + self._ROOM_WAIT_S
        while True:
            try:
                gate.enter(nbytes, context.time_remaining())
                return True
            except Overloaded:
                if time.perf_counter() >= end:
                    return False
                time.sleep(0.02)


def _admit(
    gate: Gate | None, nbytes: int, context: grpc.ServicerContext, streams: OpenStreams | None = None
) -> _Slot:
    """Take a slot of `gate` for the call, or end the call with RESOURCE_EXHAUSTED and RetryInfo."""
    if gate is not None:
        try:
            gate.enter(nbytes, context.time_remaining())
        except Overloaded as e:
            if streams is None or not streams.make_room(gate, nbytes, context):
                abort(context, overloaded_status(e))
    slot = _Slot(gate, nbytes)
    # The call may end without the handler's own exit running (a cancelled stream); this frees it then.
    context.add_callback(slot.release)
    return slot


def _decode(
    parse: Callable[[bytes], Any] | None, raw: Any, method: str, context: grpc.ServicerContext
) -> Any:
    if parse is None:
        return raw
    try:
        return parse(raw)
    except Exception:  # noqa: BLE001 - any failure to decode the caller's bytes is the caller's error
        abort(context, undecodable_status(method))


class EdgeInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Gates featurepush calls by class and decodes their requests; other services pass through."""

    def __init__(
        self,
        gates: Admission,
        metrics: Metrics | None = None,
        parsers: Mapping[str, Callable[[bytes], Any]] | None = None,
        waits: RequestWaits | None = None,
        stream_evict_idle_s: float = 5.0,
    ):
        self._admission = gates
        # Push streams, closed idle-longest first when a new one finds every slot taken.
        self._streams = OpenStreams(stream_evict_idle_s)
        # Every handler, featurepush's and the other services', reads its requests within these bounds.
        self._waits = waits
        self._metrics = metrics
        # Methods whose requests are decoded otherwise than by their generated deserializer.
        self._parsers = dict(parsers or {})
        # Per server, so one server's flood of failures never silences another's (or a test's) lines.
        self._lines = LineBudget()
        # Each method's handler as found and as wrapped: the servicers' handlers are fixed once the server
        # starts, so a call reuses the wrapping instead of building it again.
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        found = continuation(details)
        method = details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is found:
            return known[1]
        if found is None:
            return None
        if method in METHOD_CLASSES:
            wrapped = self._wrap(found, method)
            if self._waits is not None:
                wrapped = guarded(wrapped, self._waits, _refuse, wrap_streams=False)
        elif self._waits is not None:
            wrapped = guarded(found, self._waits, _refuse, wrap_streams=True)
        else:
            return found
        # Two first calls racing here each build one; either is right, and the dict keeps the last.
        self._wrapped[method] = (found, wrapped)
        return wrapped

    def _wrap(self, found: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        """`found` gated, decoded and recorded at the edge."""
        # The stubs type the handler's behaviours as optional; the ones its kind names are set.
        handler: Any = found
        gate = self._admission.gate(METHOD_CLASSES[method])
        parse = self._parsers.get(method, handler.request_deserializer)
        serialize = handler.response_serializer
        record = _Record(_short(method), self._metrics, self._lines)
        streams = self._streams if METHOD_CLASSES[method] == admission.STREAM else None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                _stream_stream(handler.stream_stream, gate, parse, method, record, streams),
                response_serializer=serialize,
            )
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                _stream_unary(handler.stream_unary, gate, parse, method, record),
                response_serializer=serialize,
            )
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _unary_stream(handler.unary_stream, gate, parse, method, record),
                response_serializer=serialize,
            )
        return grpc.unary_unary_rpc_method_handler(
            _unary_unary(handler.unary_unary, gate, parse, method, record),
            response_serializer=serialize,
        )


Behavior = Callable[..., Any]


def _labels(message: Any) -> tuple[str, str]:
    """The source names and request id a request carries, for the log line of a failed call."""
    if message is not None and not hasattr(message, "DESCRIPTOR"):
        # A request decoded by one of the edge's own parsers carries the message it read.
        message = getattr(message, "message", None)
    if message is None or not hasattr(message, "DESCRIPTOR"):
        return "", ""
    fields = message.DESCRIPTOR.fields_by_name
    if "request" in fields:
        message, fields = message.request, message.request.DESCRIPTOR.fields_by_name
    source = ""
    if "records" in fields:
        source = name_list(sorted(message.records), 3)
    elif "source" in fields:
        value = message.source
        source = shown(value if isinstance(value, str) else value.name)
    elif "name" in fields:
        source = shown(message.name)
    return source, shown(getattr(message, "request_id", ""), 128)


class _Record:
    """Where one method's calls are recorded: its metric series, bound once, and its failure log budget."""

    def __init__(self, method: str, metrics: Metrics | None, lines: LineBudget):
        self.method = method
        self.lines = lines
        self.metrics = metrics
        # Bound once here: binding a series takes a lock and a lookup by labels, three times a call before.
        self.bytes_in = metrics.bytes_in.labels(method) if metrics is not None else None
        self.latency = metrics.latency.labels(method) if metrics is not None else None
        self._calls: dict[grpc.StatusCode, Any] = {}

    def calls(self, code: grpc.StatusCode) -> Any:
        """The count of calls that ended with `code`."""
        series = self._calls.get(code)
        if series is None:
            assert self.metrics is not None
            series = self._calls[code] = self.metrics.calls.labels(self.method, code.name)
        return series


class _Call:
    """What the edge records of one call: its latency, status code and request bytes; and a failure's line."""

    __slots__ = ("record", "started", "request", "last", "pending")

    def __init__(self, record: _Record, nbytes: int):
        self.record = record
        self.started = time.perf_counter()
        self.request: Any = None
        # A stream's last message in or out, and its messages not yet answered: idle is none pending.
        self.last = self.started
        self.pending = 0
        if record.bytes_in is not None and nbytes:
            record.bytes_in.inc(nbytes)

    def received(self) -> None:
        self.last = time.perf_counter()
        self.pending += 1

    def answered(self) -> None:
        self.last = time.perf_counter()
        self.pending -= 1

    def add_bytes(self, nbytes: int) -> None:
        if self.record.bytes_in is not None:
            self.record.bytes_in.inc(nbytes)

    def finish(self, servicer_context: grpc.ServicerContext, error: BaseException | None) -> None:
        """Count the call by its final code; a failure gets one log line without any record value."""
        # grpcio's contexts have code() (the code abort set); the stubs predate it.
        context: Any = servicer_context
        if error is None:
            code = context.code() or grpc.StatusCode.OK
        elif isinstance(error, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
        else:
            # abort() sets the code before raising; anything else reaches the caller as UNKNOWN.
            code = context.code() or grpc.StatusCode.UNKNOWN
        if not isinstance(code, grpc.StatusCode):
            code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        record = self.record
        if record.latency is not None:
            record.calls(code).inc()
            record.latency.observe(time.perf_counter() - self.started)
        if code != grpc.StatusCode.OK:
            held = record.lines.take((record.method, code))
            if held is None:
                return
            source, request_id = _labels(self.request)
            level = logging.WARNING if code in _SERVER_SIDE else logging.INFO
            _LOGGER.log(
                level,
                "call failed: method=%s code=%s source=%r request_id=%r%s",
                record.method,
                code.name,
                source,
                request_id,
                f" ({held} more like it not logged)" if held else "",
            )


# Codes that mean the server could not do its part, as opposed to a request it refused.
_SERVER_SIDE = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _short(method: str) -> str:
    """`/featurepush.v1.IngestService/Push` as `IngestService/Push`, the label of metrics and logs."""
    return method.rsplit(".", 1)[-1]


@contextmanager
def _handled(
    call: _Call,
    gate: Gate | None,
    nbytes: int,
    context: grpc.ServicerContext,
    streams: OpenStreams | None = None,
) -> Iterator[None]:
    """Hold an admission slot for the body, then record the call with the code it ended with."""
    error: BaseException | None = None
    try:
        slot = _admit(gate, nbytes, context, streams)
        if streams is not None:
            streams.opened(call, context)
        try:
            yield
        finally:
            if streams is not None:
                streams.closed(call)
            slot.release()
    except BaseException as e:
        error = e
        raise
    finally:
        call.finish(context, error)


def _unary_unary(behavior: Behavior, gate: Gate | None, parse: Any, method: str, record: _Record) -> Behavior:
    def handle(raw: bytes, context: grpc.ServicerContext) -> Any:
        # _handled, written out: the handler of every read and push runs this, and grpc runs a unary
        # handler to its end even when the caller has gone, so the slot needs no callback to come back.
        nbytes = len(raw)
        call = _Call(record, nbytes)
        error: BaseException | None = None
        try:
            if gate is not None:
                try:
                    gate.enter(nbytes, context.time_remaining())
                except Overloaded as e:
                    abort(context, overloaded_status(e))
            try:
                call.request = _decode(parse, raw, method, context)
                return behavior(call.request, context)
            finally:
                if gate is not None:
                    gate.leave(nbytes)
        except BaseException as e:
            error = e
            raise
        finally:
            call.finish(context, error)

    return handle


def _unary_stream(
    behavior: Behavior, gate: Gate | None, parse: Any, method: str, record: _Record
) -> Behavior:
    def handle(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
        call = _Call(record, len(raw))
        with _handled(call, gate, len(raw), context):
            call.request = _decode(parse, raw, method, context)
            yield from behavior(call.request, context)

    return handle


class _Requests:
    """A stream of raw request messages decoded one by one; a message that does not decode ends it."""

    def __init__(self, raw: Iterator[bytes], parse: Any, call: _Call):
        self._raw = raw
        self._parse = parse
        self._call = call
        self.undecodable = False

    def __iter__(self) -> Iterator[Any]:
        for item in self._raw:
            self._call.add_bytes(len(item))
            self._call.received()
            if self._parse is None:
                yield item
                continue
            try:
                message = self._parse(item)
            except Exception:  # noqa: BLE001 - the caller's bytes; reported when the stream ends
                self.undecodable = True
                return
            self._call.request = message
            yield message


def _stream_stream(
    behavior: Behavior,
    gate: Gate | None,
    parse: Any,
    method: str,
    record: _Record,
    streams: OpenStreams | None = None,
) -> Behavior:
    def handle(raw: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        call = _Call(record, 0)
        with _handled(call, gate, 0, context, streams):
            requests = _Requests(raw, parse, call)
            responses = behavior(iter(requests), context)
            try:
                for response in responses:
                    # A PushStream answers each batch once: a stream with none unanswered is idle.
                    call.answered()
                    yield response
            finally:
                responses.close()
            if requests.undecodable:
                abort(context, undecodable_status(method))

    return handle


def _stream_unary(
    behavior: Behavior, gate: Gate | None, parse: Any, method: str, record: _Record
) -> Behavior:
    def handle(raw: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        call = _Call(record, 0)
        with _handled(call, gate, 0, context):
            requests = _Requests(raw, parse, call)
            response = behavior(iter(requests), context)
            if requests.undecodable:
                abort(context, undecodable_status(method))
            return response

    return handle
