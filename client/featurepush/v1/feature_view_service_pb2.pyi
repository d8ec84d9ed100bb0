import datetime

from featurepush.v1 import feature_view_pb2 as _feature_view_pb2
from featurepush.v1 import online_service_pb2 as _online_service_pb2
from featurepush.v1 import schema_pb2 as _schema_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApplyFeatureViewRequest(_message.Message):
    __slots__ = ("view", "validate_only")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    view: _feature_view_pb2.StreamFeatureView
    validate_only: bool
    def __init__(self, view: _Optional[_Union[_feature_view_pb2.StreamFeatureView, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class ApplyFeatureViewResponse(_message.Message):
    __slots__ = ("view", "changed", "created")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    view: _feature_view_pb2.StreamFeatureView
    changed: bool
    created: bool
    def __init__(self, view: _Optional[_Union[_feature_view_pb2.StreamFeatureView, _Mapping]] = ..., changed: _Optional[bool] = ..., created: _Optional[bool] = ...) -> None: ...

class GetFeatureViewRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetFeatureViewResponse(_message.Message):
    __slots__ = ("view",)
    VIEW_FIELD_NUMBER: _ClassVar[int]
    view: _feature_view_pb2.StreamFeatureView
    def __init__(self, view: _Optional[_Union[_feature_view_pb2.StreamFeatureView, _Mapping]] = ...) -> None: ...

class ListFeatureViewsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListFeatureViewsResponse(_message.Message):
    __slots__ = ("views", "next_page_token")
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    views: _containers.RepeatedCompositeFieldContainer[_feature_view_pb2.StreamFeatureView]
    next_page_token: str
    def __init__(self, views: _Optional[_Iterable[_Union[_feature_view_pb2.StreamFeatureView, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteFeatureViewRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteFeatureViewResponse(_message.Message):
    __slots__ = ("tiles_deleted",)
    TILES_DELETED_FIELD_NUMBER: _ClassVar[int]
    tiles_deleted: int
    def __init__(self, tiles_deleted: _Optional[int] = ...) -> None: ...

class ApplyFeatureServiceRequest(_message.Message):
    __slots__ = ("service", "validate_only")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    service: _feature_view_pb2.FeatureService
    validate_only: bool
    def __init__(self, service: _Optional[_Union[_feature_view_pb2.FeatureService, _Mapping]] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class ApplyFeatureServiceResponse(_message.Message):
    __slots__ = ("service", "changed", "created")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    service: _feature_view_pb2.FeatureService
    changed: bool
    created: bool
    def __init__(self, service: _Optional[_Union[_feature_view_pb2.FeatureService, _Mapping]] = ..., changed: _Optional[bool] = ..., created: _Optional[bool] = ...) -> None: ...

class GetFeatureServiceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetFeatureServiceResponse(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: _feature_view_pb2.FeatureService
    def __init__(self, service: _Optional[_Union[_feature_view_pb2.FeatureService, _Mapping]] = ...) -> None: ...

class ListFeatureServicesRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListFeatureServicesResponse(_message.Message):
    __slots__ = ("services", "next_page_token")
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[_feature_view_pb2.FeatureService]
    next_page_token: str
    def __init__(self, services: _Optional[_Iterable[_Union[_feature_view_pb2.FeatureService, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteFeatureServiceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteFeatureServiceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetViewFeaturesRequest(_message.Message):
    __slots__ = ("feature_view", "feature_service", "keys", "as_of", "response_format")
    FEATURE_VIEW_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    AS_OF_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    feature_view: str
    feature_service: str
    keys: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    as_of: _timestamp_pb2.Timestamp
    response_format: _online_service_pb2.ResponseFormat
    def __init__(self, feature_view: _Optional[str] = ..., feature_service: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., response_format: _Optional[_Union[_online_service_pb2.ResponseFormat, str]] = ...) -> None: ...

class ViewFeature(_message.Message):
    __slots__ = ("name", "type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: _schema_pb2.DataType
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[_schema_pb2.DataType, _Mapping]] = ...) -> None: ...

class ViewFeatureValue(_message.Message):
    __slots__ = ("status", "value", "effective_time")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    status: _online_service_pb2.FeatureStatus
    value: _struct_pb2.Value
    effective_time: _timestamp_pb2.Timestamp
    def __init__(self, status: _Optional[_Union[_online_service_pb2.FeatureStatus, str]] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., effective_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ViewFeatureVector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[ViewFeatureValue]
    def __init__(self, values: _Optional[_Iterable[_Union[ViewFeatureValue, _Mapping]]] = ...) -> None: ...

class GetViewFeaturesResponse(_message.Message):
    __slots__ = ("features", "results", "arrow_ipc")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ARROW_IPC_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[ViewFeature]
    results: _containers.RepeatedCompositeFieldContainer[ViewFeatureVector]
    arrow_ipc: bytes
    def __init__(self, features: _Optional[_Iterable[_Union[ViewFeature, _Mapping]]] = ..., results: _Optional[_Iterable[_Union[ViewFeatureVector, _Mapping]]] = ..., arrow_ipc: _Optional[bytes] = ...) -> None: ...
