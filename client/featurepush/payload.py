"""Turning a push's data into its wire form, and push replies into results; shared by every client."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import pyarrow as pa

from featurepush.client import PushResult, SourceCounts
from featurepush.columnar import arrow_schema, records_to_batch
from featurepush.errors import FeaturepushError
from featurepush.types import Field
from featurepush.v1 import ingest_service_pb2
from featurepush.values import fill_struct

__all__ = [
    "BatchFailure",
    "PushBatchError",
    "PushData",
    "PushSchema",
    "SMALL_PUSH_ROWS",
    "fill_source_records",
    "push_request",
    "push_result",
]

# Records as dicts, or columns as a pyarrow Table or RecordBatch, or a pandas or polars DataFrame.
# pyarrow, pandas and polars have no type hints, so the alias can say no more than Any.
PushData: TypeAlias = Any

# Answers to a push sent as Arrow from records after which it is sent again as Structs: the server's row
# path then gives the answer the records would have got as Structs (a violation's description, or the
# row-count limit, which it words differently for Arrow). A failed validation writes nothing and records no
# request_id, so sending again is safe.
RESEND_AS_ROWS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED})

# Lists of at most this many records go as Structs even where the schema is known: for a few rows, building
# an Arrow batch here and the server's checks of an untrusted Arrow stream cost more than the Structs do.
# Client.push end to end, one call at a time: one dict took 1.4 times as long as Arrow as it did as
# Structs, 8 dicts 1.2 times, 16 about the same, 32 and more less (0.9 times at 32, 0.6 at 256).
SMALL_PUSH_ROWS = 16


def sends_structs(data: PushData) -> bool:
    """Whether records go as Structs whatever their schema: a short list of them (SMALL_PUSH_ROWS)."""
    return isinstance(data, list) and len(data) <= SMALL_PUSH_ROWS


@dataclass(frozen=True)
class PushSchema:
    """A source's fields and their Arrow schema, as a client caches them to send records as Arrow."""

    fields: tuple[Field, ...]
    arrow: pa.Schema

    @classmethod
    def of(cls, fields: Sequence[Field]) -> PushSchema:
        return cls(tuple(fields), arrow_schema(fields))


def _loaded(module: str, name: str, data: object) -> bool:
    # pandas and polars are optional: their frames can only exist if the caller already imported them.
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(data, getattr(loaded, name))


def is_columnar(data: object) -> bool:
    """Whether `data` is columns (Arrow, pandas, polars) rather than records."""
    return (
        isinstance(data, pa.Table | pa.RecordBatch)
        or _loaded("pandas", "DataFrame", data)
        or _loaded("polars", "DataFrame", data)
    )


def _from_pandas(frame: Any, fields: Sequence[Field] | None) -> pa.Table:
    """A pandas frame as Arrow; an index naming schema fields becomes columns, any other is refused."""
    index = frame.index
    names = list(index.names)
    if all(name is None for name in names):
        pandas = sys.modules["pandas"]
        if isinstance(index, pandas.RangeIndex):
            return pa.Table.from_pandas(frame, preserve_index=False)
        raise ValueError(
            "the DataFrame has an unnamed index that is not a plain RangeIndex; it would be lost: "
            "reset_index(drop=True) to drop it, or name it after a schema field to push it as a column"
        )
    known = None if fields is None else {f.name for f in fields}
    if any(name is None for name in names) or (known is not None and not known.issuperset(names)):
        raise ValueError(
            f"the DataFrame's index levels {names} are not all fields of the source's schema; "
            "reset_index() to push them as columns under their names, or reset_index(drop=True) to drop them"
        )
    return pa.Table.from_pandas(frame.reset_index(), preserve_index=False)


def to_arrow(data: object, fields: Sequence[Field] | None = None) -> pa.Table | pa.RecordBatch | None:
    """The Arrow form of columnar data, or None when `data` is records; `fields` helps read a pandas index."""
    if isinstance(data, pa.Table | pa.RecordBatch):
        return data
    if _loaded("pandas", "DataFrame", data):
        return _from_pandas(data, fields)
    if _loaded("polars", "DataFrame", data):
        table: pa.Table = data.to_arrow()  # type: ignore[attr-defined]
        return table
    return None


def arrow_ipc(data: pa.Table | pa.RecordBatch) -> bytes:
    """An Arrow IPC stream (schema, then record batches) of a table or batch."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write(data)
    return bytes(sink.getvalue())


def fill_source_records(
    target: ingest_service_pb2.SourceRecords, source: str, data: PushData, schema: PushSchema | None = None
) -> bool:
    """Put `data` in a SourceRecords, as Arrow IPC or Structs; return whether records went as Arrow.

    Columns always go as Arrow. Records go as one Arrow batch when `schema` is known and
    featurepush.columnar finds them exact, else as Structs encoded by featurepush.values.
    """
    table = to_arrow(data, None if schema is None else schema.fields)
    if table is not None:
        target.arrow_ipc = arrow_ipc(table)
        return False
    if schema is not None:
        batch = records_to_batch(data, schema.fields, schema.arrow)
        if batch is not None:
            target.arrow_ipc = arrow_ipc(batch)
            return True
    rows = target.rows
    # Encoding straight into the repeated field builds each Struct once, with no copies.
    records: Iterable[Mapping[str, Any]] = data
    for index, record in enumerate(records):
        fill_struct(rows.add(), record, f'records["{source}"][{index}]')
    return False


def as_records(data: PushData) -> PushData:
    """Columns as they are, records as a list, so that they can be read twice."""
    return data if is_columnar(data) or isinstance(data, list) else list(data)


def push_request(
    records: Mapping[str, PushData],
    schemas: Mapping[str, PushSchema | None],
    *,
    dry_run: bool,
    request_id: str | None,
) -> tuple[ingest_service_pb2.PushRequest, list[str]]:
    """A PushRequest, and the sources whose records went as Arrow (to resend as rows, see RESEND_AS_ROWS)."""
    request = ingest_service_pb2.PushRequest(dry_run=dry_run, request_id=request_id or "")
    columnar = []
    for source, data in records.items():
        if fill_source_records(request.records[source], source, data, schemas.get(source)):
            columnar.append(source)
    return request, columnar


def push_result(response: ingest_service_pb2.PushResponse) -> PushResult:
    """The PushResult of a PushResponse."""
    return PushResult(
        counts={
            name: SourceCounts(int(c.accepted), int(c.written), int(c.superseded), int(c.late_skipped))
            for name, c in response.counts.items()
        },
        dry_run=response.dry_run,
        replayed=response.replayed,
    )


@dataclass(frozen=True)
class BatchFailure:
    """One pushed batch that was not written: its records, the error, and the ids it was sent with."""

    records: list[Mapping[str, Any]]
    error: FeaturepushError
    sequence_id: int
    request_id: str


class PushBatchError(Exception):
    """Raised by a pusher's flush or close when batches failed and no on_error callback took them."""

    def __init__(self, failures: list[BatchFailure]) -> None:
        records = sum(len(f.records) for f in failures)
        first = failures[0].error
        super().__init__(f"{len(failures)} batch(es), {records} record(s), were not written; first: {first}")
        self.failures = failures
