from featurepush.v1 import source_pb2 as _source_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApplySourceRequest(_message.Message):
    __slots__ = ("source", "validate_only")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    source: _source_pb2.PushSource
    validate_only: bool
    def __init__(self, source: _Optional[_Union[_source_pb2.PushSource, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class ApplySourceResponse(_message.Message):
    __slots__ = ("source", "changed", "created")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    source: _source_pb2.PushSource
    changed: bool
    created: bool
    def __init__(self, source: _Optional[_Union[_source_pb2.PushSource, _Mapping]] = ..., changed: _Optional[bool] = ..., created: _Optional[bool] = ...) -> None: ...

class GetSourceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetSourceResponse(_message.Message):
    __slots__ = ("source",)
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    source: _source_pb2.PushSource
    def __init__(self, source: _Optional[_Union[_source_pb2.PushSource, _Mapping]] = ...) -> None: ...

class ListSourcesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSourcesResponse(_message.Message):
    __slots__ = ("sources", "next_page_token")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedCompositeFieldContainer[_source_pb2.PushSource]
    next_page_token: str
    def __init__(self, sources: _Optional[_Iterable[_Union[_source_pb2.PushSource, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteSourceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteSourceResponse(_message.Message):
    __slots__ = ("rows_deleted",)
    ROWS_DELETED_FIELD_NUMBER: _ClassVar[int]
    rows_deleted: int
    def __init__(self, rows_deleted: _Optional[int] = ...) -> None: ...

class GetServerStatusRequest(_message.Message):
    __slots__ = ("exact",)
    EXACT_FIELD_NUMBER: _ClassVar[int]
    exact: bool
    def __init__(self, exact: _Optional[bool] = ...) -> None: ...

class SourceStatus(_message.Message):
    __slots__ = ("name", "row_count", "row_count_exact")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_EXACT_FIELD_NUMBER: _ClassVar[int]
    name: str
    row_count: int
    row_count_exact: bool
    def __init__(self, name: _Optional[str] = ..., row_count: _Optional[int] = ..., row_count_exact: _Optional[bool] = ...) -> None: ...

class GetServerStatusResponse(_message.Message):
    __slots__ = ("version", "uptime_seconds", "writes_accepted", "store_bytes", "offline_log_lag_seconds", "offline_log_queued_entries", "sources", "store_warnings")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WRITES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    STORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_LOG_LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_LOG_QUEUED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    STORE_WARNINGS_FIELD_NUMBER: _ClassVar[int]
    version: str
    uptime_seconds: float
    writes_accepted: bool
    store_bytes: int
    offline_log_lag_seconds: float
    offline_log_queued_entries: int
    sources: _containers.RepeatedCompositeFieldContainer[SourceStatus]
    store_warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., writes_accepted: _Optional[bool] = ..., store_bytes: _Optional[int] = ..., offline_log_lag_seconds: _Optional[float] = ..., offline_log_queued_entries: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[SourceStatus, _Mapping]]] = ..., store_warnings: _Optional[_Iterable[str]] = ...) -> None: ...
