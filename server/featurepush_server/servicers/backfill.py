"""BackfillService over the core batch sources and backfiller."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pyarrow as pa

from featurepush.v1 import backfill_service_pb2 as pb
from featurepush.v1 import backfill_service_pb2_grpc as pb_grpc

from ..core.backfill import Backfiller, BackfillProgress
from ..core.batch import BatchRead, BatchSources
from ..core.errors import Cancelled, ShuttingDown
from ..core.prefetch import prefetch
from ..core.registry import Registry
from ..core.times import request_micros
from ..core.wire import READ_BATCH_RECORD_BATCH, READ_BATCH_SCHEMA, varint
from ..metrics import Metrics
from ..status import streaming
from .calls import stop_check

SERVICE = pb.DESCRIPTOR.services_by_name["BackfillService"].full_name


def _frame(tag: bytes, body: pa.Buffer) -> bytes:
    """One serialized ReadBatchSourceResponse holding `body`; bytes + a buffer copies the body once."""
    return tag + varint(body.size) + memoryview(body)


def _frames(read: BatchRead) -> Iterator[bytes]:
    """The serialized replies of a read's batches; closing this closes the read."""
    batches = read.batches()
    try:
        for batch in batches:
            yield _frame(READ_BATCH_RECORD_BATCH, batch.serialize())
    finally:
        batches.close()


def _progress(p: BackfillProgress) -> pb.BackfillResponse:
    return pb.BackfillResponse(
        rows_read=p.rows_read,
        rows_written=p.rows_written,
        rows_superseded=p.rows_superseded,
        rows_rejected=p.rows_rejected,
        bytes_read=p.bytes_read,
        elapsed_seconds=p.elapsed_seconds,
        rejections=[
            pb.RowRejection(row=r.row, field=r.field, description=r.description) for r in p.rejections
        ],
        done=p.done,
    )


class BackfillServicer(pb_grpc.BackfillServiceServicer):
    """Streams batch sources as Arrow IPC and loads them into the online store.

    Once `stopping` is set, reads and backfills end at their next batch with UNAVAILABLE; a backfill's
    message and ErrorInfo give the rows it had written, which are durable.
    """

    def __init__(
        self,
        registry: Registry,
        sources: BatchSources,
        backfiller: Backfiller,
        read_ahead_bytes: int = 32 * 1024 * 1024,
        *,
        stopping: threading.Event | None = None,
        metrics: Metrics | None = None,
    ):
        self._metrics = metrics
        self._registry = registry
        self._sources = sources
        self._backfiller = backfiller
        # Serialized replies waiting for gRPC; the core's file batch holds about as much again.
        self._frame_bytes = read_ahead_bytes // 2
        self._stopping = stopping or threading.Event()

    def _stop_check(self, context: grpc.ServicerContext) -> Callable[[], bool]:
        """Whether the call ended or the server is stopping; checked by the core between batches."""
        ended = stop_check(context)
        stopping = self._stopping
        return lambda: stopping.is_set() or ended()

    def ReadBatchSource(
        self, request: pb.ReadBatchSourceRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ReadBatchSourceResponse]:
        for frame in self.read_batch_source_frames(request, context):
            yield pb.ReadBatchSourceResponse.FromString(frame)

    @streaming
    def read_batch_source_frames(
        self, request: pb.ReadBatchSourceRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """ReadBatchSource's replies already serialized, so each Arrow batch is copied once, not thrice."""
        stop = self._stop_check(context)
        read = self._sources.open_read(
            self._registry.get(request.source).spec,
            start=request_micros(request, "start_time"),
            end=request_micros(request, "end_time"),
            columns=list(request.columns),
            max_rows=request.max_rows_per_batch,
            max_bytes=request.max_bytes_per_batch,
            stop=stop,
        )
        yield _frame(READ_BATCH_SCHEMA, read.schema.serialize())
        # Reading and encoding the next batch overlaps sending this one: parquet decoding frees the GIL.
        frames = prefetch(lambda: _frames(read), max_bytes=self._frame_bytes, size=len)
        try:
            yield from frames
        except Cancelled:
            if self._stopping.is_set():
                raise ShuttingDown(
                    "the server is shutting down; read the rest again once it is back"
                ) from None
            raise
        finally:
            frames.close()

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """The service's handlers, with ReadBatchSource sending pre-serialized replies."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ReadBatchSource": grpc.unary_stream_rpc_method_handler(
                    self.read_batch_source_frames,
                    request_deserializer=pb.ReadBatchSourceRequest.FromString,
                ),
                "Backfill": grpc.unary_stream_rpc_method_handler(
                    self.Backfill,
                    request_deserializer=pb.BackfillRequest.FromString,
                    response_serializer=pb.BackfillResponse.SerializeToString,
                ),
            },
        )

    @streaming
    def Backfill(
        self, request: pb.BackfillRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.BackfillResponse]:
        runs = self._backfiller.run(
            request.source,
            start=request_micros(request, "start_time"),
            end=request_micros(request, "end_time"),
            dry_run=request.dry_run,
            stop=self._stop_check(context),
        )
        progress = BackfillProgress()
        counted = BackfillProgress()
        try:
            for progress in runs:
                counted = self._count(request, progress, counted)
                yield _progress(progress)
        except (Cancelled, ShuttingDown):
            if not self._stopping.is_set():
                raise
            # The core's progress object counts every write that succeeded, the last chunk's included.
            raise ShuttingDown(
                f"the server is shutting down; the backfill stopped after reading {progress.rows_read} rows "
                f"and writing {progress.rows_written}, which are stored. Run it again once the server is "
                "back: the rows already stored are written again with the same values, so it ends as one "
                "run would",
                metadata={"rows_read": str(progress.rows_read), "rows_written": str(progress.rows_written)},
            ) from None
        finally:
            self._count(request, progress, counted)
            runs.close()

    def _count(
        self, request: pb.BackfillRequest, progress: BackfillProgress, counted: BackfillProgress
    ) -> BackfillProgress:
        """Add what `progress` holds beyond `counted` to the backfill metrics; return what is now counted."""
        metrics = self._metrics
        if metrics is None or request.dry_run or progress is counted:
            return counted
        for outcome in ("read", "written", "superseded", "rejected"):
            delta = getattr(progress, f"rows_{outcome}") - getattr(counted, f"rows_{outcome}")
            if delta > 0:
                metrics.backfill_rows.labels(request.source, outcome).inc(delta)
        return dataclasses.replace(progress, rejections=[])
