"""Turning a push's data into its wire form, and push replies into results; shared by every client."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any, TypeAlias

import pyarrow as pa

from featurepush.client import FeatureResult, FeatureStatus, PushResult, SourceCounts
from featurepush.errors import FeaturepushError
from featurepush.types import Field
from featurepush.v1 import ingest_service_pb2, online_service_pb2
from featurepush.values import decode_record, fill_struct

__all__ = ["BatchFailure", "PushBatchError", "PushData", "fill_source_records", "push_result"]

# Records as dicts, or columns as a pyarrow Table or RecordBatch, or a pandas DataFrame.
# pyarrow and pandas have no type hints, so the alias can say no more than Any.
PushData: TypeAlias = Any


def _is_dataframe(data: object) -> bool:
    # pandas is optional: a DataFrame can only exist if pandas was already imported by the caller.
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(data, pandas.DataFrame)


def to_arrow(data: object) -> pa.Table | pa.RecordBatch | None:
    """The Arrow form of columnar data, or None when `data` is records."""
    if isinstance(data, pa.Table | pa.RecordBatch):
        return data
    if _is_dataframe(data):
        return pa.Table.from_pandas(data, preserve_index=False)
    return None


def arrow_ipc(data: pa.Table | pa.RecordBatch) -> bytes:
    """An Arrow IPC stream (schema, then record batches) of a table or batch."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write(data)
    return bytes(sink.getvalue())


def fill_source_records(target: ingest_service_pb2.SourceRecords, source: str, data: PushData) -> int:
    """Put `data` in a SourceRecords, as Arrow IPC for columns or Structs for records; count them."""
    table = to_arrow(data)
    if table is not None:
        target.arrow_ipc = arrow_ipc(table)
        return int(table.num_rows)
    rows = target.rows
    count = 0
    # Encoding straight into the repeated field builds each Struct once, with no copies.
    records: Iterable[Mapping[str, Any]] = data
    for index, record in enumerate(records):
        fill_struct(rows.add(), record, f'records["{source}"][{index}]')
        count += 1
    return count


def push_result(response: ingest_service_pb2.PushResponse) -> PushResult:
    """The PushResult of a PushResponse."""
    return PushResult(
        counts={
            name: SourceCounts(int(c.accepted), int(c.written), int(c.superseded))
            for name, c in response.counts.items()
        },
        dry_run=response.dry_run,
        replayed=response.replayed,
    )


def feature_results(
    response: online_service_pb2.GetFeaturesResponse, schema: list[Field] | tuple[Field, ...]
) -> list[FeatureResult]:
    """The decoded vectors of a GetFeaturesResponse; raises ValueError if one does not fit the schema."""
    results: list[FeatureResult] = []
    for vector in response.results:
        name = online_service_pb2.FeatureStatus.Name(vector.status).removeprefix("FEATURE_STATUS_")
        if name not in FeatureStatus.__members__:
            raise ValueError(f"server returned feature status {vector.status}")
        event_time = vector.event_time.ToDatetime(tzinfo=UTC) if vector.HasField("event_time") else None
        features = decode_record(vector.features, schema) if vector.HasField("features") else None
        results.append(FeatureResult(FeatureStatus(name), event_time, features))
    return results


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
