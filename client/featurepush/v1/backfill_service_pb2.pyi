import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReadBatchSourceRequest(_message.Message):
    __slots__ = ("source", "start_time", "end_time", "columns", "max_rows_per_batch", "max_bytes_per_batch")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_PER_BATCH_FIELD_NUMBER: _ClassVar[int]
    source: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    columns: _containers.RepeatedScalarFieldContainer[str]
    max_rows_per_batch: int
    max_bytes_per_batch: int
    def __init__(self, source: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., columns: _Optional[_Iterable[str]] = ..., max_rows_per_batch: _Optional[int] = ..., max_bytes_per_batch: _Optional[int] = ...) -> None: ...

class ReadBatchSourceResponse(_message.Message):
    __slots__ = ("arrow_schema", "arrow_record_batch")
    ARROW_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    ARROW_RECORD_BATCH_FIELD_NUMBER: _ClassVar[int]
    arrow_schema: bytes
    arrow_record_batch: bytes
    def __init__(self, arrow_schema: _Optional[bytes] = ..., arrow_record_batch: _Optional[bytes] = ...) -> None: ...

class BackfillRequest(_message.Message):
    __slots__ = ("source", "start_time", "end_time", "dry_run")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    source: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    dry_run: bool
    def __init__(self, source: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class BackfillResponse(_message.Message):
    __slots__ = ("rows_read", "rows_written", "rows_superseded", "rows_rejected", "bytes_read", "elapsed_seconds", "rejections", "done")
    ROWS_READ_FIELD_NUMBER: _ClassVar[int]
    ROWS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    ROWS_SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    ROWS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    rows_read: int
    rows_written: int
    rows_superseded: int
    rows_rejected: int
    bytes_read: int
    elapsed_seconds: float
    rejections: _containers.RepeatedCompositeFieldContainer[RowRejection]
    done: bool
    def __init__(self, rows_read: _Optional[int] = ..., rows_written: _Optional[int] = ..., rows_superseded: _Optional[int] = ..., rows_rejected: _Optional[int] = ..., bytes_read: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., rejections: _Optional[_Iterable[_Union[RowRejection, _Mapping]]] = ..., done: _Optional[bool] = ...) -> None: ...

class RowRejection(_message.Message):
    __slots__ = ("row", "field", "description")
    ROW_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    row: int
    field: str
    description: str
    def __init__(self, row: _Optional[int] = ..., field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...
