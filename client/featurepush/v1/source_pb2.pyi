import datetime

from featurepush.v1 import schema_pb2 as _schema_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FileFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILE_FORMAT_UNSPECIFIED: _ClassVar[FileFormat]
    FILE_FORMAT_PARQUET: _ClassVar[FileFormat]
    FILE_FORMAT_CSV: _ClassVar[FileFormat]
    FILE_FORMAT_ARROW_IPC: _ClassVar[FileFormat]
FILE_FORMAT_UNSPECIFIED: FileFormat
FILE_FORMAT_PARQUET: FileFormat
FILE_FORMAT_CSV: FileFormat
FILE_FORMAT_ARROW_IPC: FileFormat

class PushSource(_message.Message):
    __slots__ = ("name", "description", "owner", "tags", "schema", "entity_keys", "timestamp_field", "push_config", "batch_config", "online_ttl", "create_time", "update_time")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    ENTITY_KEYS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_FIELD_NUMBER: _ClassVar[int]
    PUSH_CONFIG_FIELD_NUMBER: _ClassVar[int]
    BATCH_CONFIG_FIELD_NUMBER: _ClassVar[int]
    ONLINE_TTL_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    owner: str
    tags: _containers.ScalarMap[str, str]
    schema: _schema_pb2.Schema
    entity_keys: _containers.RepeatedScalarFieldContainer[str]
    timestamp_field: str
    push_config: PushConfig
    batch_config: BatchConfig
    online_ttl: _duration_pb2.Duration
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., owner: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., schema: _Optional[_Union[_schema_pb2.Schema, _Mapping]] = ..., entity_keys: _Optional[_Iterable[str]] = ..., timestamp_field: _Optional[str] = ..., push_config: _Optional[_Union[PushConfig, _Mapping]] = ..., batch_config: _Optional[_Union[BatchConfig, _Mapping]] = ..., online_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PushConfig(_message.Message):
    __slots__ = ("log_offline",)
    LOG_OFFLINE_FIELD_NUMBER: _ClassVar[int]
    log_offline: bool
    def __init__(self, log_offline: _Optional[bool] = ...) -> None: ...

class BatchConfig(_message.Message):
    __slots__ = ("uri", "file_format", "timestamp_field", "post_processor", "hive_partitioning")
    URI_FIELD_NUMBER: _ClassVar[int]
    FILE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_FIELD_NUMBER: _ClassVar[int]
    POST_PROCESSOR_FIELD_NUMBER: _ClassVar[int]
    HIVE_PARTITIONING_FIELD_NUMBER: _ClassVar[int]
    uri: str
    file_format: FileFormat
    timestamp_field: str
    post_processor: str
    hive_partitioning: bool
    def __init__(self, uri: _Optional[str] = ..., file_format: _Optional[_Union[FileFormat, str]] = ..., timestamp_field: _Optional[str] = ..., post_processor: _Optional[str] = ..., hive_partitioning: _Optional[bool] = ...) -> None: ...
