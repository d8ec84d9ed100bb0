from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScalarType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCALAR_TYPE_UNSPECIFIED: _ClassVar[ScalarType]
    SCALAR_TYPE_STRING: _ClassVar[ScalarType]
    SCALAR_TYPE_INT32: _ClassVar[ScalarType]
    SCALAR_TYPE_INT64: _ClassVar[ScalarType]
    SCALAR_TYPE_FLOAT32: _ClassVar[ScalarType]
    SCALAR_TYPE_FLOAT64: _ClassVar[ScalarType]
    SCALAR_TYPE_BOOL: _ClassVar[ScalarType]
    SCALAR_TYPE_TIMESTAMP: _ClassVar[ScalarType]
    SCALAR_TYPE_BYTES: _ClassVar[ScalarType]
SCALAR_TYPE_UNSPECIFIED: ScalarType
SCALAR_TYPE_STRING: ScalarType
SCALAR_TYPE_INT32: ScalarType
SCALAR_TYPE_INT64: ScalarType
SCALAR_TYPE_FLOAT32: ScalarType
SCALAR_TYPE_FLOAT64: ScalarType
SCALAR_TYPE_BOOL: ScalarType
SCALAR_TYPE_TIMESTAMP: ScalarType
SCALAR_TYPE_BYTES: ScalarType

class DataType(_message.Message):
    __slots__ = ("scalar", "array", "map", "struct")
    SCALAR_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    STRUCT_FIELD_NUMBER: _ClassVar[int]
    scalar: ScalarType
    array: ArrayType
    map: MapType
    struct: StructType
    def __init__(self, scalar: _Optional[_Union[ScalarType, str]] = ..., array: _Optional[_Union[ArrayType, _Mapping]] = ..., map: _Optional[_Union[MapType, _Mapping]] = ..., struct: _Optional[_Union[StructType, _Mapping]] = ...) -> None: ...

class ArrayType(_message.Message):
    __slots__ = ("element_type", "element_nullable")
    ELEMENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    ELEMENT_NULLABLE_FIELD_NUMBER: _ClassVar[int]
    element_type: DataType
    element_nullable: bool
    def __init__(self, element_type: _Optional[_Union[DataType, _Mapping]] = ..., element_nullable: _Optional[bool] = ...) -> None: ...

class MapType(_message.Message):
    __slots__ = ("value_type", "value_nullable")
    VALUE_TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_NULLABLE_FIELD_NUMBER: _ClassVar[int]
    value_type: DataType
    value_nullable: bool
    def __init__(self, value_type: _Optional[_Union[DataType, _Mapping]] = ..., value_nullable: _Optional[bool] = ...) -> None: ...

class StructType(_message.Message):
    __slots__ = ("fields",)
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.RepeatedCompositeFieldContainer[Field]
    def __init__(self, fields: _Optional[_Iterable[_Union[Field, _Mapping]]] = ...) -> None: ...

class Field(_message.Message):
    __slots__ = ("name", "type", "nullable", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NULLABLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: DataType
    nullable: bool
    description: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[DataType, _Mapping]] = ..., nullable: _Optional[bool] = ..., description: _Optional[str] = ...) -> None: ...

class Schema(_message.Message):
    __slots__ = ("fields",)
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.RepeatedCompositeFieldContainer[Field]
    def __init__(self, fields: _Optional[_Iterable[_Union[Field, _Mapping]]] = ...) -> None: ...
