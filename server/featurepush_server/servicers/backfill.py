"""BackfillService over the core batch sources and backfiller."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
from google.protobuf import timestamp_pb2

from featurepush.v1 import backfill_service_pb2 as pb
from featurepush.v1 import backfill_service_pb2_grpc as pb_grpc

from ..core.backfill import Backfiller
from ..core.batch import BatchSources
from ..core.registry import Registry
from ..status import streaming


def _micros(message: pb.ReadBatchSourceRequest | pb.BackfillRequest, name: str) -> int | None:
    if not message.HasField(name):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, name)
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000


def _stop_flag(context: grpc.ServicerContext) -> threading.Event:
    """An event set as soon as the call ends, so the core stops reading between batches."""
    stopped = threading.Event()
    context.add_callback(stopped.set)
    return stopped


class BackfillServicer(pb_grpc.BackfillServiceServicer):
    """Streams batch sources as Arrow IPC and loads them into the online store."""

    def __init__(self, registry: Registry, sources: BatchSources, backfiller: Backfiller):
        self._registry = registry
        self._sources = sources
        self._backfiller = backfiller

    @streaming
    def ReadBatchSource(
        self, request: pb.ReadBatchSourceRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ReadBatchSourceResponse]:
        stopped = _stop_flag(context)
        read = self._sources.open_read(
            self._registry.get(request.source).spec,
            start=_micros(request, "start_time"),
            end=_micros(request, "end_time"),
            columns=list(request.columns),
            max_rows=request.max_rows_per_batch,
            max_bytes=request.max_bytes_per_batch,
            stop=stopped.is_set,
        )
        batches = read.batches()
        try:
            yield pb.ReadBatchSourceResponse(arrow_schema=read.schema.serialize().to_pybytes())
            for batch in batches:
                yield pb.ReadBatchSourceResponse(arrow_record_batch=batch.serialize().to_pybytes())
        finally:
            batches.close()

    @streaming
    def Backfill(
        self, request: pb.BackfillRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.BackfillResponse]:
        stopped = _stop_flag(context)
        runs = self._backfiller.run(
            request.source,
            start=_micros(request, "start_time"),
            end=_micros(request, "end_time"),
            dry_run=request.dry_run,
            stop=stopped.is_set,
        )
        try:
            for p in runs:
                yield pb.BackfillResponse(
                    rows_read=p.rows_read,
                    rows_written=p.rows_written,
                    rows_superseded=p.rows_superseded,
                    rows_rejected=p.rows_rejected,
                    bytes_read=p.bytes_read,
                    elapsed_seconds=p.elapsed_seconds,
                    rejections=[
                        pb.RowRejection(row=r.row, field=r.field, description=r.description)
                        for r in p.rejections
                    ],
                    done=p.done,
                )
        finally:
            runs.close()
