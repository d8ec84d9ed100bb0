"""Client side of BackfillService: read a source's batch history as Arrow, and backfill the online store."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import grpc
import pyarrow as pa
from google.protobuf import timestamp_pb2

from featurepush.errors import from_rpc_error
from featurepush.v1 import backfill_service_pb2 as pb
from featurepush.v1 import backfill_service_pb2_grpc as pb_grpc


def read_schema(message: bytes) -> pa.Schema:
    """The schema message the server sent; ValueError if it is not one pyarrow can read."""
    try:
        return pa.ipc.read_schema(pa.py_buffer(message))
    except ValueError:
        raise
    except (pa.ArrowException, OSError) as e:
        # A forged type is ArrowNotImplementedError and a cut message OSError, neither a ValueError.
        raise ValueError(f"the server's Arrow schema could not be read: {e}") from None


def read_batch(message: bytes, schema: pa.Schema) -> pa.RecordBatch:
    """A record batch message the server sent; ValueError (pyarrow's ArrowInvalid or another) if not valid."""
    try:
        batch = pa.ipc.read_record_batch(pa.py_buffer(message), schema)
        # The IPC reader checks buffer sizes, not the offsets inside them: a string's offset past its data
        # would be read from whatever memory follows.
        batch.validate(full=True)
    except ValueError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"the server's record batch could not be read: {e}") from None
    return batch


@dataclass(frozen=True)
class RowRejection:
    """Why one batch-source row was not loaded: its position in the selected range, field and reason."""

    row: int
    field: str
    description: str


@dataclass(frozen=True)
class BackfillProgress:
    """A backfill's counts so far; `done` on the last one."""

    rows_read: int
    rows_written: int
    rows_superseded: int
    rows_rejected: int
    bytes_read: int
    elapsed_seconds: float
    rejections: tuple[RowRejection, ...]
    done: bool


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone; pass an aware datetime such as one in UTC")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def read_batch_source(
    channel: grpc.Channel,
    source: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    columns: Sequence[str] = (),
    max_rows_per_batch: int = 0,
    max_bytes_per_batch: int = 0,
    timeout: float | None = None,
) -> pa.RecordBatchReader:
    """Stream rows of `source`'s batch history with event times in [start, end) as a RecordBatchReader.

    Batches arrive lazily; dropping the reader before the end cancels the call.
    """
    request = pb.ReadBatchSourceRequest(
        source=source,
        start_time=timestamp(start),
        end_time=timestamp(end),
        columns=list(columns),
        max_rows_per_batch=max_rows_per_batch,
        max_bytes_per_batch=max_bytes_per_batch,
    )
    call = pb_grpc.BackfillServiceStub(channel).ReadBatchSource(request, timeout=timeout)
    try:
        first = next(call)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    schema = read_schema(first.arrow_schema)

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for message in call:
                yield read_batch(message.arrow_record_batch, schema)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            # Stopping early (or a failure) ends the server's read at once rather than at the deadline.
            call.cancel()

    return pa.RecordBatchReader.from_batches(schema, batches())


def progress_of(message: pb.BackfillResponse) -> BackfillProgress:
    """The BackfillProgress of one progress message."""
    return BackfillProgress(
        rows_read=message.rows_read,
        rows_written=message.rows_written,
        rows_superseded=message.rows_superseded,
        rows_rejected=message.rows_rejected,
        bytes_read=message.bytes_read,
        elapsed_seconds=message.elapsed_seconds,
        rejections=tuple(RowRejection(r.row, r.field, r.description) for r in message.rejections),
        done=message.done,
    )


def backfill(
    channel: grpc.Channel,
    source: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    dry_run: bool = False,
    on_progress: Callable[[BackfillProgress], None] | None = None,
    timeout: float | None = None,
) -> BackfillProgress:
    """Load `source`'s batch rows with event times in [start, end) into the online store; return totals."""
    request = pb.BackfillRequest(
        source=source, start_time=timestamp(start), end_time=timestamp(end), dry_run=dry_run
    )
    last: BackfillProgress | None = None
    try:
        for message in pb_grpc.BackfillServiceStub(channel).Backfill(request, timeout=timeout):
            last = progress_of(message)
            if on_progress is not None:
                on_progress(last)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    if last is None or not last.done:
        raise RuntimeError(f"the backfill of {source!r} ended without a final report")
    return last
