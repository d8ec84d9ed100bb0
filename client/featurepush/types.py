"""The definitions DSL's data types, Tecton-style, and their mapping to featurepush.v1.DataType."""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass

from featurepush.v1 import schema_pb2

__all__ = [
    "Array",
    "Bool",
    "Bytes",
    "DataType",
    "Field",
    "Float32",
    "Float64",
    "Int32",
    "Int64",
    "Map",
    "ScalarType",
    "String",
    "Struct",
    "Timestamp",
    "dtype_from_proto",
]


class DataType(abc.ABC):
    """A field's type: a scalar singleton or a nesting of Array, Map and Struct. Immutable and hashable."""

    __slots__ = ()

    @abc.abstractmethod
    def to_proto(self) -> schema_pb2.DataType:
        """Returns the wire form of this type."""


@dataclass(frozen=True, eq=False)
class ScalarType(DataType):
    """A leaf type; use the module singletons (String, Int64, ...) rather than constructing one."""

    name: str
    scalar: schema_pb2.ScalarType

    def to_proto(self) -> schema_pb2.DataType:
        return schema_pb2.DataType(scalar=self.scalar)

    def __repr__(self) -> str:
        return self.name

    # Singletons compare by the wire value, so a copy (e.g. from pickling) still equals the original.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, ScalarType) and other.scalar == self.scalar

    def __hash__(self) -> int:
        return hash(("ScalarType", int(self.scalar)))


String = ScalarType("String", schema_pb2.SCALAR_TYPE_STRING)
Int32 = ScalarType("Int32", schema_pb2.SCALAR_TYPE_INT32)
Int64 = ScalarType("Int64", schema_pb2.SCALAR_TYPE_INT64)
Float32 = ScalarType("Float32", schema_pb2.SCALAR_TYPE_FLOAT32)
Float64 = ScalarType("Float64", schema_pb2.SCALAR_TYPE_FLOAT64)
Bool = ScalarType("Bool", schema_pb2.SCALAR_TYPE_BOOL)
Timestamp = ScalarType("Timestamp", schema_pb2.SCALAR_TYPE_TIMESTAMP)
Bytes = ScalarType("Bytes", schema_pb2.SCALAR_TYPE_BYTES)

_SCALARS_BY_WIRE: dict[int, ScalarType] = {
    int(t.scalar): t for t in (String, Int32, Int64, Float32, Float64, Bool, Timestamp, Bytes)
}


def _require_dtype(value: object, what: str) -> DataType:
    if not isinstance(value, DataType):
        raise TypeError(f"{what} must be a featurepush type such as Int64 or Array(String), got {value!r}")
    return value


@dataclass(frozen=True)
class Array(DataType):
    """A list whose elements all have element_type; elements may be null only if element_nullable."""

    element_type: DataType
    element_nullable: bool = False

    def __post_init__(self) -> None:
        _require_dtype(self.element_type, "Array element_type")

    def to_proto(self) -> schema_pb2.DataType:
        return schema_pb2.DataType(
            array=schema_pb2.ArrayType(
                element_type=self.element_type.to_proto(), element_nullable=self.element_nullable
            )
        )

    def __repr__(self) -> str:
        extra = ", element_nullable=True" if self.element_nullable else ""
        return f"Array({self.element_type!r}{extra})"


@dataclass(frozen=True)
class Map(DataType):
    """A map from String keys to values of value_type, as Tecton's Map(String, T); other key types raise."""

    key_type: DataType
    value_type: DataType
    value_nullable: bool = False

    def __post_init__(self) -> None:
        if self.key_type != String:
            raise TypeError(f"Map keys must be String, got {self.key_type!r}")
        _require_dtype(self.value_type, "Map value_type")

    def to_proto(self) -> schema_pb2.DataType:
        return schema_pb2.DataType(
            map=schema_pb2.MapType(value_type=self.value_type.to_proto(), value_nullable=self.value_nullable)
        )

    def __repr__(self) -> str:
        extra = ", value_nullable=True" if self.value_nullable else ""
        return f"Map(String, {self.value_type!r}{extra})"


@dataclass(frozen=True)
class Struct(DataType):
    """A nested record of named fields, kept in order as a tuple so the type stays hashable."""

    fields: tuple[Field, ...]

    def __init__(self, fields: Iterable[Field]) -> None:
        items = tuple(fields)
        for item in items:
            if not isinstance(item, Field):
                raise TypeError(f"Struct fields must be Field objects, got {item!r}")
        object.__setattr__(self, "fields", items)

    def to_proto(self) -> schema_pb2.DataType:
        return schema_pb2.DataType(struct=schema_pb2.StructType(fields=[f.to_proto() for f in self.fields]))

    def __repr__(self) -> str:
        return f"Struct([{', '.join(repr(f) for f in self.fields)}])"


@dataclass(frozen=True)
class Field:
    """One named, typed column of a schema or a struct; nullable fields may be null or absent in records."""

    name: str
    dtype: DataType
    nullable: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"Field name must be a str, got {self.name!r}")
        _require_dtype(self.dtype, f"Field {self.name!r} dtype")

    def to_proto(self) -> schema_pb2.Field:
        return schema_pb2.Field(
            name=self.name, type=self.dtype.to_proto(), nullable=self.nullable, description=self.description
        )

    @classmethod
    def from_proto(cls, message: schema_pb2.Field) -> Field:
        return cls(
            name=message.name,
            dtype=dtype_from_proto(message.type),
            nullable=message.nullable,
            description=message.description,
        )

    def __repr__(self) -> str:
        parts = [repr(self.name), repr(self.dtype)]
        if self.nullable:
            parts.append("nullable=True")
        if self.description:
            parts.append(f"description={self.description!r}")
        return f"Field({', '.join(parts)})"


def dtype_from_proto(message: schema_pb2.DataType) -> DataType:
    """Returns the DSL type for a wire DataType; raises ValueError if it is unset or unknown."""
    kind = message.WhichOneof("kind")
    if kind == "scalar":
        try:
            return _SCALARS_BY_WIRE[int(message.scalar)]
        except KeyError:
            raise ValueError(f"unknown or unspecified scalar type {int(message.scalar)}") from None
    if kind == "array":
        return Array(dtype_from_proto(message.array.element_type), message.array.element_nullable)
    if kind == "map":
        return Map(String, dtype_from_proto(message.map.value_type), message.map.value_nullable)
    if kind == "struct":
        return Struct([Field.from_proto(f) for f in message.struct.fields])
    raise ValueError("DataType has no kind set")
