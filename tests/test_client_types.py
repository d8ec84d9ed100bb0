"""Tests for the definitions DSL types and their wire round trip."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from featurepush.types import (
    Array,
    Bool,
    Bytes,
    DataType,
    Field,
    Float32,
    Float64,
    Int32,
    Int64,
    Map,
    String,
    Struct,
    Timestamp,
    dtype_from_proto,
)
from featurepush.v1 import schema_pb2

SCALARS: list[DataType] = [String, Int32, Int64, Float32, Float64, Bool, Timestamp, Bytes]

NESTED = [
    Array(Int64),
    Array(String, element_nullable=True),
    Array(Array(Float32)),
    Map(String, Float64),
    Map(String, Array(Bytes), value_nullable=True),
    Struct([Field("a", Int64), Field("b", Timestamp, nullable=True, description="when")]),
    Struct([Field("inner", Struct([Field("x", Map(String, Bool))]))]),
    Array(Struct([Field("id", Int32), Field("tags", Map(String, String))])),
    Struct([]),
]


@pytest.mark.parametrize("dtype", SCALARS + NESTED, ids=repr)
def test_dtype_round_trips_through_proto(dtype: DataType) -> None:
    assert dtype_from_proto(dtype.to_proto()) == dtype


@pytest.mark.parametrize(
    ("dtype", "wire"),
    [
        (String, schema_pb2.SCALAR_TYPE_STRING),
        (Int32, schema_pb2.SCALAR_TYPE_INT32),
        (Int64, schema_pb2.SCALAR_TYPE_INT64),
        (Float32, schema_pb2.SCALAR_TYPE_FLOAT32),
        (Float64, schema_pb2.SCALAR_TYPE_FLOAT64),
        (Bool, schema_pb2.SCALAR_TYPE_BOOL),
        (Timestamp, schema_pb2.SCALAR_TYPE_TIMESTAMP),
        (Bytes, schema_pb2.SCALAR_TYPE_BYTES),
    ],
    ids=repr,
)
def test_scalars_map_to_their_wire_enum(dtype: DataType, wire: schema_pb2.ScalarType) -> None:
    assert dtype.to_proto() == schema_pb2.DataType(scalar=wire)


def test_nested_proto_shape() -> None:
    message = Map(String, Array(Int64, element_nullable=True), value_nullable=True).to_proto()
    assert message.WhichOneof("kind") == "map"
    assert message.map.value_nullable
    assert message.map.value_type.array.element_nullable
    assert message.map.value_type.array.element_type.scalar == schema_pb2.SCALAR_TYPE_INT64


@pytest.mark.parametrize(
    ("dtype", "text"),
    [
        (Int64, "Int64"),
        (Array(Int64), "Array(Int64)"),
        (Array(String, element_nullable=True), "Array(String, element_nullable=True)"),
        (Map(String, Float64), "Map(String, Float64)"),
        (Struct([Field("a", Int64)]), "Struct([Field('a', Int64)])"),
        (
            Struct([Field("a", Bool, nullable=True, description="d")]),
            "Struct([Field('a', Bool, nullable=True, description='d')])",
        ),
    ],
    ids=str,
)
def test_repr_reads_like_the_dsl(dtype: DataType, text: str) -> None:
    assert repr(dtype) == text


def test_types_compare_and_hash_by_value() -> None:
    assert Array(Int64) == Array(Int64)
    assert Array(Int64) != Array(Int64, element_nullable=True)
    assert Struct([Field("a", Int64)]) == Struct((Field("a", Int64),))
    assert Field("a", Int64) != Field("a", Int64, description="other")
    assert len({Map(String, Int64), Map(String, Int64), Array(Int64)}) == 2


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: Map(Int64, String), TypeError, "Map keys must be String"),
        (lambda: Map(Array(String), String), TypeError, "Map keys must be String"),
        (lambda: Array(int), TypeError, "Array element_type must be a featurepush type"),  # type: ignore[arg-type]
        (lambda: Map(String, "Int64"), TypeError, "Map value_type must be a featurepush type"),  # type: ignore[arg-type]
        (lambda: Field("a", str), TypeError, "Field 'a' dtype must be a featurepush type"),  # type: ignore[arg-type]
        (lambda: Field(1, Int64), TypeError, "Field name must be a str"),  # type: ignore[arg-type]
        (lambda: Struct([Int64]), TypeError, "Struct fields must be Field objects"),  # type: ignore[list-item]
    ],
)
def test_bad_types_raise(build: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (schema_pb2.DataType(), "no kind set"),
        (schema_pb2.DataType(scalar=schema_pb2.SCALAR_TYPE_UNSPECIFIED), "unspecified scalar type 0"),
        (schema_pb2.DataType(array=schema_pb2.ArrayType()), "no kind set"),
    ],
)
def test_bad_proto_types_raise(message: schema_pb2.DataType, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dtype_from_proto(message)


def test_field_round_trips_through_proto() -> None:
    field = Field("clicks", Array(Int64), nullable=True, description="per hour")
    message = field.to_proto()
    assert message.name == "clicks" and message.nullable and message.description == "per hour"
    assert Field.from_proto(message) == field


_names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)


def _dtypes() -> st.SearchStrategy[DataType]:
    return st.recursive(
        st.sampled_from(SCALARS),
        lambda inner: st.one_of(
            st.builds(Array, inner, st.booleans()),
            st.builds(Map, st.just(String), inner, st.booleans()),
            st.lists(st.builds(Field, _names, inner, st.booleans()), max_size=3).map(Struct),
        ),
        max_leaves=8,
    )


@given(_dtypes())
def test_any_dtype_round_trips_through_proto(dtype: DataType) -> None:
    assert dtype_from_proto(dtype.to_proto()) == dtype
    assert dtype_from_proto(schema_pb2.DataType.FromString(dtype.to_proto().SerializeToString())) == dtype
