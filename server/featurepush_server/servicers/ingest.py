"""IngestService over the core ingestor."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import Message

from featurepush.v1 import ingest_service_pb2 as pb
from featurepush.v1 import ingest_service_pb2_grpc as pb_grpc

from ..core.errors import CoreError, ShuttingDown
from ..core.ingest import Ingestor, PushOutcome, SourcePayload
from ..core.rows import BULK_MIN_ROWS
from ..core.struct_rows import WireRows
from ..edge import undecodable_status
from ..metrics import Metrics
from ..status import abort, internal_status, status_of, unary

_LOGGER = logging.getLogger(__name__)

# How often a blocked read-ahead thread looks again at whether the stream is still alive, in seconds.
_POLL_S = 0.25


PUSH = "/featurepush.v1.IngestService/Push"
PUSH_STREAM = "/featurepush.v1.IngestService/PushStream"


def _wire_rows_pool() -> descriptor_pool.DescriptorPool:
    """The ingest messages as they are on the wire, but with each row kept as its bytes (core.struct_rows).

    A repeated message field and a repeated bytes field have one wire form, so these types parse every
    PushRequest and PushStreamRequest and hand the rows over without building a message per row. They
    live in a pool of their own, under the same names.
    """
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor, change: Callable[[descriptor_pb2.FileDescriptorProto], None]) -> None:
        for dependency in file.dependencies:
            if dependency.name not in added:
                add(dependency, lambda _: None)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        change(proto)
        pool.Add(proto)
        added.add(file.name)

    def rows_as_bytes(proto: descriptor_pb2.FileDescriptorProto) -> None:
        proto.ClearField("service")
        (records,) = [m for m in proto.message_type if m.name == "SourceRecords"]
        (rows,) = [f for f in records.field if f.name == "rows"]
        rows.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
        rows.ClearField("type_name")

    add(pb.DESCRIPTOR, rows_as_bytes)
    return pool


_POOL = _wire_rows_pool()
WirePushRequest: type[Message] = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName(pb.PushRequest.DESCRIPTOR.full_name)
)
WirePushStreamRequest: type[Message] = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName(pb.PushStreamRequest.DESCRIPTOR.full_name)
)


@dataclass(frozen=True)
class WirePush:
    """A Push request as the edge decodes it: its records for the core, rows kept as their bytes."""

    records: dict[str, SourcePayload]
    dry_run: bool
    request_id: str
    # The request as decoded, its rows as bytes; the edge reads its source names for a failure's log line.
    message: Message


@dataclass(frozen=True)
class WireStreamItem:
    """One PushStream message as the edge decodes it."""

    sequence_id: int
    request: WirePush
    message: Message


def _wire_push(message: Any, *, deferred: bool = False) -> WirePush:
    records = {
        name: SourcePayload(WireRows(recs.rows, min_rows=BULK_MIN_ROWS, deferred=deferred), recs.arrow_ipc)
        for name, recs in message.records.items()
    }
    return WirePush(records, message.dry_run, message.request_id, message)


def parse_push(data: bytes) -> WirePush:
    """Decode a Push request; protobuf's DecodeError for malformed bytes, in the request or in a row."""
    return _wire_push(WirePushRequest.FromString(data))


def parse_push_stream(data: bytes) -> WireStreamItem:
    """Decode one PushStream message; protobuf's DecodeError for malformed bytes in it.

    Its rows are read when the stream comes to write them (`load`): a malformed row ends the stream there
    as a malformed message would have ended it here.
    """
    message: Any = WirePushStreamRequest.FromString(data)
    return WireStreamItem(message.sequence_id, _wire_push(message.request, deferred=True), message)


def _load(item: _Batch) -> bool:
    """Read a stream batch's deferred rows; False if one does not decode."""
    if isinstance(item, WireStreamItem):
        for payload in item.request.records.values():
            if isinstance(payload.rows, WireRows):
                try:
                    payload.rows.load()
                except Exception:  # noqa: BLE001 - as at the edge: bytes that do not decode are the caller's
                    return False
    return True


# One message of a PushStream: as generated code decodes it, or as the edge does.
_Batch = pb.PushStreamRequest | WireStreamItem

# How the edge decodes requests where the generated deserializer would do more work than needed.
PARSERS: dict[str, Callable[[bytes], Any]] = {PUSH: parse_push, PUSH_STREAM: parse_push_stream}


def payloads(request: pb.PushRequest | WirePush) -> dict[str, SourcePayload]:
    """The core's view of a push's records."""
    if isinstance(request, WirePush):
        return request.records
    return {name: SourcePayload(recs.rows, recs.arrow_ipc) for name, recs in request.records.items()}


def push_response(outcome: PushOutcome) -> pb.PushResponse:
    """The PushResponse of a push outcome."""
    response = pb.PushResponse(dry_run=outcome.dry_run, replayed=outcome.replayed)
    for name, c in outcome.counts.items():
        response.counts[name].CopyFrom(
            pb.SourceCounts(
                accepted=c.accepted, written=c.written, superseded=c.superseded, late_skipped=c.late_skipped
            )
        )
    return response


class _End:
    """Marks the end of the client's half of a stream; `error` is set when reading it failed."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def _read_ahead(
    requests: Iterator[_Batch],
    inbox: queue.Queue[_Batch | _End],
    context: grpc.ServicerContext,
) -> None:
    """Move requests into the bounded inbox; a full inbox stops reading, which back-pressures the client."""
    end = _End()
    try:
        for request in requests:
            while True:
                try:
                    inbox.put(request, timeout=_POLL_S)
                    break
                except queue.Full:
                    if not context.is_active():
                        return
    except grpc.RpcError:
        return  # the call was cancelled or broken; the writer sees the inactive context and stops
    except Exception as e:  # noqa: BLE001 - handed to the writer thread, which logs it
        end = _End(e)
    while context.is_active():
        try:
            inbox.put(end, timeout=_POLL_S)
            return
        except queue.Full:
            continue


def _stream_stopped() -> ShuttingDown:
    return ShuttingDown(
        "the server is shutting down; batches of this stream not yet acknowledged were not written, "
        "send them again (with their request ids) once it is back"
    )


class IngestServicer(pb_grpc.IngestServiceServicer):
    """Takes pushes, validates them and writes them to the online store.

    A PushStream reads at most `read_ahead` batches beyond the one being written, so one stream holds
    bounded memory however fast its client sends. Once `stopping` is set, a stream ends before its next
    batch with UNAVAILABLE, so a server that stops never leaves a batch half handled.
    """

    def __init__(
        self,
        ingestor: Ingestor,
        *,
        read_ahead: int = 4,
        idle_timeout_s: float = 60.0,
        stopping: threading.Event | None = None,
        metrics: Metrics | None = None,
    ):
        self._ingestor = ingestor
        self._metrics = metrics
        # The record counters of each source pushed to (only applied sources have counts).
        self._series: dict[str, tuple[Any, ...]] = {}
        self._read_ahead = read_ahead
        self._idle_timeout_s = idle_timeout_s
        self._stopping = stopping or threading.Event()

    @unary
    def Push(self, request: pb.PushRequest | WirePush, context: grpc.ServicerContext) -> pb.PushResponse:
        try:
            outcome = self._ingestor.push(
                payloads(request),
                dry_run=request.dry_run,
                request_id=request.request_id,
                stop=lambda: not context.is_active(),
            )
        except CoreError:
            self._count(request, None)
            raise
        self._count(request, outcome)
        return push_response(outcome)

    def _count(self, request: pb.PushRequest | WirePush, outcome: PushOutcome | None) -> None:
        """Records by source and outcome; a refused push counts its rows (an Arrow stream's uncounted)."""
        metrics = self._metrics
        if metrics is None or request.dry_run or (outcome is not None and outcome.replayed):
            return
        if outcome is not None:
            for name, c in outcome.counts.items():
                series = self._series.get(name)
                if series is None:
                    # Bound once per source: binding takes a lock and a lookup by labels.
                    series = self._series[name] = tuple(
                        metrics.records.labels(name, what) for what in ("accepted", "written", "superseded")
                    )
                accepted, written, superseded = series
                accepted.inc(c.accepted)
                written.inc(c.written)
                superseded.inc(c.superseded)
            return
        for name, records in request.records.items():
            # Only applied sources label metrics: any other name is the caller's and unbounded.
            if self._ingestor.knows(name):
                metrics.pushes_rejected.labels(name).inc()
                metrics.records.labels(name, "rejected").inc(len(records.rows))

    def PushStream(
        self, request_iterator: Iterator[_Batch], context: grpc.ServicerContext
    ) -> Iterator[pb.PushStreamResponse]:
        inbox: queue.Queue[pb.PushStreamRequest | WireStreamItem | _End] = queue.Queue(
            maxsize=self._read_ahead
        )
        reader = threading.Thread(
            target=_read_ahead,
            args=(request_iterator, inbox, context),
            name="push-stream-read-ahead",
            daemon=True,
        )
        reader.start()
        last = time.monotonic()
        while True:
            try:
                item = inbox.get(timeout=_POLL_S)
            except queue.Empty:
                if not context.is_active():
                    return
                if self._stopping.is_set():
                    abort(context, status_of(_stream_stopped()))
                if time.monotonic() - last > self._idle_timeout_s:
                    # An idle stream holds a thread and a slot of the bounded stream pool: give them back.
                    context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the push stream sent nothing for {self._idle_timeout_s:g}s and was closed; "
                        "open a new one to push again",
                    )
                continue
            last = time.monotonic()
            if self._stopping.is_set():
                abort(context, status_of(_stream_stopped()))
            if isinstance(item, _End):
                if item.error is not None:
                    _LOGGER.error("reading a push stream failed", exc_info=item.error)
                return
            if not _load(item):
                # As the edge ends a stream whose message does not decode: the batches before it stand.
                abort(context, undecodable_status(PUSH_STREAM))
            yield self._acknowledge(item, context)

    def _acknowledge(self, item: _Batch, context: grpc.ServicerContext) -> pb.PushStreamResponse:
        """Push one batch and say how it went; a failed batch gets its status, and the stream goes on."""
        request = item.request
        try:
            outcome = self._ingestor.push(
                payloads(request),
                dry_run=request.dry_run,
                request_id=request.request_id,
                stop=lambda: not context.is_active(),
            )
        except CoreError as e:
            self._count(request, None)
            status = status_of(e)
        except Exception:
            _LOGGER.exception("push stream batch %d failed", item.sequence_id)
            status = internal_status()
        else:
            self._count(request, outcome)
            return pb.PushStreamResponse(sequence_id=item.sequence_id, response=push_response(outcome))
        error = pb.BatchError(code=status.code, message=status.message, details=status.details)
        return pb.PushStreamResponse(sequence_id=item.sequence_id, error=error)
