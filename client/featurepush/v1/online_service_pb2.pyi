import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResponseFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESPONSE_FORMAT_UNSPECIFIED: _ClassVar[ResponseFormat]
    RESPONSE_FORMAT_STRUCT: _ClassVar[ResponseFormat]
    RESPONSE_FORMAT_ARROW: _ClassVar[ResponseFormat]

class FeatureStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_STATUS_UNSPECIFIED: _ClassVar[FeatureStatus]
    FEATURE_STATUS_PRESENT: _ClassVar[FeatureStatus]
    FEATURE_STATUS_MISSING: _ClassVar[FeatureStatus]
    FEATURE_STATUS_EXPIRED: _ClassVar[FeatureStatus]
RESPONSE_FORMAT_UNSPECIFIED: ResponseFormat
RESPONSE_FORMAT_STRUCT: ResponseFormat
RESPONSE_FORMAT_ARROW: ResponseFormat
FEATURE_STATUS_UNSPECIFIED: FeatureStatus
FEATURE_STATUS_PRESENT: FeatureStatus
FEATURE_STATUS_MISSING: FeatureStatus
FEATURE_STATUS_EXPIRED: FeatureStatus

class GetFeaturesRequest(_message.Message):
    __slots__ = ("source", "keys", "response_format")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    source: str
    keys: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    response_format: ResponseFormat
    def __init__(self, source: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., response_format: _Optional[_Union[ResponseFormat, str]] = ...) -> None: ...

class FeatureVector(_message.Message):
    __slots__ = ("status", "event_time", "features")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    status: FeatureStatus
    event_time: _timestamp_pb2.Timestamp
    features: _struct_pb2.Struct
    def __init__(self, status: _Optional[_Union[FeatureStatus, str]] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., features: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class GetFeaturesResponse(_message.Message):
    __slots__ = ("results", "arrow_ipc")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[FeatureVector]
    arrow_ipc: bytes
    def __init__(self, results: _Optional[_Iterable[_Union[FeatureVector, _Mapping]]] = ..., arrow_ipc: _Optional[bytes] = ...) -> None: ...
