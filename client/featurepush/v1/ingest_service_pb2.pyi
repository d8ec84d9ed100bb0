from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import any_pb2 as _any_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PushRequest(_message.Message):
    __slots__ = ("records", "dry_run", "request_id")
    class RecordsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SourceRecords
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SourceRecords, _Mapping]] = ...) -> None: ...
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    records: _containers.MessageMap[str, SourceRecords]
    dry_run: bool
    request_id: str
    def __init__(self, records: _Optional[_Mapping[str, SourceRecords]] = ..., dry_run: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class SourceRecords(_message.Message):
    __slots__ = ("rows", "arrow_ipc")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    arrow_ipc: bytes
    def __init__(self, rows: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., arrow_ipc: _Optional[bytes] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("counts", "dry_run", "replayed")
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SourceCounts
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SourceCounts, _Mapping]] = ...) -> None: ...
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.MessageMap[str, SourceCounts]
    dry_run: bool
    replayed: bool
    def __init__(self, counts: _Optional[_Mapping[str, SourceCounts]] = ..., dry_run: _Optional[bool] = ..., replayed: _Optional[bool] = ...) -> None: ...

class SourceCounts(_message.Message):
    __slots__ = ("accepted", "written", "superseded", "late_skipped")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    LATE_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    written: int
    superseded: int
    late_skipped: int
    def __init__(self, accepted: _Optional[int] = ..., written: _Optional[int] = ..., superseded: _Optional[int] = ..., late_skipped: _Optional[int] = ...) -> None: ...

class PushStreamRequest(_message.Message):
    __slots__ = ("sequence_id", "request")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    request: PushRequest
    def __init__(self, sequence_id: _Optional[int] = ..., request: _Optional[_Union[PushRequest, _Mapping]] = ...) -> None: ...

class PushStreamResponse(_message.Message):
    __slots__ = ("sequence_id", "response", "error")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    response: PushResponse
    error: BatchError
    def __init__(self, sequence_id: _Optional[int] = ..., response: _Optional[_Union[PushResponse, _Mapping]] = ..., error: _Optional[_Union[BatchError, _Mapping]] = ...) -> None: ...

class BatchError(_message.Message):
    __slots__ = ("code", "message", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    details: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., details: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ...) -> None: ...
