"""Schemas compiled from their protobuf form into a type tree and the matching Arrow schema."""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa

from featurepush.v1 import feature_view_pb2 as fv_pb2
from featurepush.v1 import schema_pb2, source_pb2

from .errors import InvalidInput, Violation, shown
from .times import MAX_SPAN_MICROS, duration_micros, duration_problem

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Fields in all, those of structs at every level counted too.
MAX_FIELDS = 1000
MAX_DEPTH = 16
# Bounds of a definition's free text, and of the whole definition as serialized: a client's default 4 MiB
# receive limit holds 16 of the largest, so a Get always fits and a List page holds at least one.
MAX_DESCRIPTION_CHARS = 4096
MAX_OWNER_CHARS = 256
MAX_TAGS = 64
MAX_TAG_KEY_CHARS = 128
MAX_TAG_VALUE_CHARS = 1024
MAX_DEFINITION_BYTES = 256 * 1024


class Kind(enum.Enum):
    """The kinds of type a field can have."""

    STRING = "String"
    INT32 = "Int32"
    INT64 = "Int64"
    FLOAT32 = "Float32"
    FLOAT64 = "Float64"
    BOOL = "Bool"
    TIMESTAMP = "Timestamp"
    BYTES = "Bytes"
    ARRAY = "Array"
    MAP = "Map"
    STRUCT = "Struct"

    # Members are singletons, so identity hashes them as equality compares them; Enum's own hash is a
    # Python function, and kinds are looked up in sets and dicts for every value of a small push.
    __hash__ = object.__hash__


_SCALAR_KINDS = {
    schema_pb2.SCALAR_TYPE_STRING: Kind.STRING,
    schema_pb2.SCALAR_TYPE_INT32: Kind.INT32,
    schema_pb2.SCALAR_TYPE_INT64: Kind.INT64,
    schema_pb2.SCALAR_TYPE_FLOAT32: Kind.FLOAT32,
    schema_pb2.SCALAR_TYPE_FLOAT64: Kind.FLOAT64,
    schema_pb2.SCALAR_TYPE_BOOL: Kind.BOOL,
    schema_pb2.SCALAR_TYPE_TIMESTAMP: Kind.TIMESTAMP,
    schema_pb2.SCALAR_TYPE_BYTES: Kind.BYTES,
}

ARROW_TIMESTAMP = pa.timestamp("us", tz="UTC")

_SCALAR_ARROW = {
    Kind.STRING: pa.string(),
    Kind.INT32: pa.int32(),
    Kind.INT64: pa.int64(),
    Kind.FLOAT32: pa.float32(),
    Kind.FLOAT64: pa.float64(),
    Kind.BOOL: pa.bool_(),
    Kind.TIMESTAMP: ARROW_TIMESTAMP,
    Kind.BYTES: pa.binary(),
}


@dataclass(frozen=True)
class DType:
    """A type: a scalar kind, or an array/map with its element type, or a struct with its fields."""

    kind: Kind
    element: DType | None = None
    element_nullable: bool = False
    fields: tuple[FieldSpec, ...] = ()

    def __str__(self) -> str:
        if self.kind is Kind.ARRAY:
            return f"Array({self.element})"
        if self.kind is Kind.MAP:
            return f"Map(String, {self.element})"
        if self.kind is Kind.STRUCT:
            return "Struct(" + ", ".join(f"{f.name}: {f.dtype}" for f in self.fields) + ")"
        return str(self.kind.value)

    def to_arrow(self) -> pa.DataType:
        """The Arrow type that holds values of this type."""
        if self.kind is Kind.ARRAY:
            assert self.element is not None
            return pa.list_(pa.field("item", self.element.to_arrow(), nullable=self.element_nullable))
        if self.kind is Kind.MAP:
            assert self.element is not None
            return pa.map_(
                pa.string(), pa.field("value", self.element.to_arrow(), nullable=self.element_nullable)
            )
        if self.kind is Kind.STRUCT:
            return pa.struct([f.to_arrow() for f in self.fields])
        return _SCALAR_ARROW[self.kind]


@dataclass(frozen=True)
class FieldSpec:
    """A named field of a schema or struct."""

    name: str
    dtype: DType
    nullable: bool

    def to_arrow(self) -> pa.Field:
        """The Arrow field for this field."""
        return pa.field(self.name, self.dtype.to_arrow(), nullable=self.nullable)


@dataclass(frozen=True)
class SourceSpec:
    """A validated push source: its fields, keys and event time, ready for the ingest path."""

    name: str
    fields: tuple[FieldSpec, ...]
    entity_keys: tuple[str, ...]
    timestamp_field: str
    ttl_micros: int
    log_offline: bool
    proto: source_pb2.PushSource = field(compare=False, repr=False)

    @functools.cached_property
    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema of the source's records (built once: pushes ask for it on every call)."""
        return pa.schema([f.to_arrow() for f in self.fields])

    def field(self, name: str) -> FieldSpec:
        """The field called `name`."""
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


def _compile_type(dt: schema_pb2.DataType, path: str, depth: int, out: list[Violation]) -> DType | None:
    if depth > MAX_DEPTH:
        out.append(Violation(path, f"types nest deeper than {MAX_DEPTH} levels"))
        return None
    which = dt.WhichOneof("kind")
    if which == "scalar":
        kind = _SCALAR_KINDS.get(dt.scalar)
        if kind is None:
            out.append(Violation(path + ".scalar", "must be a ScalarType other than SCALAR_TYPE_UNSPECIFIED"))
            return None
        return DType(kind)
    if which == "array":
        element = _compile_type(dt.array.element_type, path + ".array.element_type", depth + 1, out)
        return None if element is None else DType(Kind.ARRAY, element, dt.array.element_nullable)
    if which == "map":
        value = _compile_type(dt.map.value_type, path + ".map.value_type", depth + 1, out)
        return None if value is None else DType(Kind.MAP, value, dt.map.value_nullable)
    if which == "struct":
        fields = _compile_fields(dt.struct.fields, path + ".struct.fields", depth + 1, out)
        if not dt.struct.fields:
            out.append(Violation(path + ".struct.fields", "a struct needs at least one field"))
        return None if fields is None else DType(Kind.STRUCT, fields=fields)
    out.append(Violation(path, "a type must set one of scalar, array, map or struct"))
    return None


def _compile_fields(
    fields: Iterable[schema_pb2.Field], path: str, depth: int, out: list[Violation]
) -> tuple[FieldSpec, ...] | None:
    specs: list[FieldSpec] = []
    seen: set[str] = set()
    ok = True
    for i, f in enumerate(fields):
        fpath = f"{path}[{i}]"
        if not NAME_RE.match(f.name):
            out.append(
                Violation(
                    fpath + ".name",
                    f"{f.name!r} is not a valid name: use 1 to 128 letters, "
                    "digits and underscores, not starting with a digit",
                )
            )
            ok = False
        elif f.name in seen:
            out.append(Violation(fpath + ".name", f"duplicate field name {f.name!r}"))
            ok = False
        seen.add(f.name)
        dtype = _compile_type(f.type, fpath + ".type", depth, out)
        if dtype is None:
            ok = False
            continue
        specs.append(FieldSpec(f.name, dtype, f.nullable))
    return tuple(specs) if ok else None


def _field_count(fields: Iterable[schema_pb2.Field]) -> int:
    """How many fields a schema has, those of its structs (in arrays and maps too) at every level counted."""
    count = 0
    for f in fields:
        count += 1
        dt = f.type
        while dt.WhichOneof("kind") in ("array", "map"):
            dt = dt.array.element_type if dt.HasField("array") else dt.map.value_type
        if dt.HasField("struct"):
            count += _field_count(dt.struct.fields)
    return count


def check_fields(schema: schema_pb2.Schema, path: str, out: list[Violation]) -> None:
    """Add a violation at `path` if the schema has more than MAX_FIELDS fields at all levels together."""
    count = _field_count(schema.fields)
    if count > MAX_FIELDS:
        out.append(
            Violation(path, f"at most {MAX_FIELDS} fields are allowed, those of structs counted; got {count}")
        )


def check_labels(
    definition: source_pb2.PushSource | fv_pb2.StreamFeatureView | fv_pb2.FeatureService,
    path: str,
    out: list[Violation],
) -> None:
    """Check a definition's description, owner, tags and serialized size against their bounds."""
    if len(definition.description) > MAX_DESCRIPTION_CHARS:
        out.append(Violation(path + ".description", f"at most {MAX_DESCRIPTION_CHARS:,} characters"))
    if len(definition.owner) > MAX_OWNER_CHARS:
        out.append(Violation(path + ".owner", f"at most {MAX_OWNER_CHARS:,} characters"))
    if len(definition.tags) > MAX_TAGS:
        out.append(Violation(path + ".tags", f"at most {MAX_TAGS} tags, got {len(definition.tags):,}"))
    for key, value in sorted(definition.tags.items()):
        tag = f'{path}.tags["{shown(key)}"]'
        if not key:
            out.append(Violation(path + ".tags", "tag keys must not be empty"))
        elif len(key) > MAX_TAG_KEY_CHARS:
            out.append(Violation(tag, f"tag keys are at most {MAX_TAG_KEY_CHARS} characters"))
        if len(value) > MAX_TAG_VALUE_CHARS:
            out.append(Violation(tag, f"tag values are at most {MAX_TAG_VALUE_CHARS:,} characters"))
    size = definition.ByteSize()
    if size > MAX_DEFINITION_BYTES:
        out.append(
            Violation(
                path, f"the definition is {size:,} bytes serialized, more than {MAX_DEFINITION_BYTES:,}"
            )
        )


_KEY_KINDS = (Kind.STRING, Kind.INT32, Kind.INT64)


def compile_source(src: source_pb2.PushSource, path: str = "source") -> SourceSpec:
    """Check a source definition and compile it; raise InvalidInput naming every problem."""
    out: list[Violation] = []
    if not NAME_RE.match(src.name):
        out.append(
            Violation(
                path + ".name",
                f"{src.name!r} is not a valid source name: use 1 to 128 "
                "letters, digits and underscores, not starting with a digit",
            )
        )
    check_labels(src, path, out)
    if not src.schema.fields:
        out.append(Violation(path + ".schema.fields", "a schema needs at least one field"))
    check_fields(src.schema, path + ".schema.fields", out)
    fields = _compile_fields(src.schema.fields, path + ".schema.fields", 0, out) or ()
    by_name = {f.name: f for f in fields}
    if not src.entity_keys:
        out.append(Violation(path + ".entity_keys", "name at least one entity key field"))
    if len(set(src.entity_keys)) != len(src.entity_keys):
        out.append(Violation(path + ".entity_keys", "entity keys must not repeat"))
    for i, key in enumerate(src.entity_keys):
        spec = by_name.get(key)
        if spec is None:
            if fields:
                out.append(Violation(f"{path}.entity_keys[{i}]", f"{key!r} is not a schema field"))
        elif spec.dtype.kind not in _KEY_KINDS or spec.nullable:
            out.append(
                Violation(
                    f"{path}.entity_keys[{i}]",
                    f"entity key {key!r} must be a non-null String, Int32 or Int64 field, "
                    f"not {'a nullable ' if spec.nullable else ''}{spec.dtype}",
                )
            )
    ts = by_name.get(src.timestamp_field)
    if not src.timestamp_field:
        out.append(Violation(path + ".timestamp_field", "name the event-time field"))
    elif ts is None:
        if fields:
            out.append(Violation(path + ".timestamp_field", f"{src.timestamp_field!r} is not a schema field"))
    elif ts.dtype.kind is not Kind.TIMESTAMP or ts.nullable:
        out.append(
            Violation(
                path + ".timestamp_field",
                f"{src.timestamp_field!r} must be a non-null Timestamp field, not {ts.dtype}",
            )
        )
    ttl = src.online_ttl
    problem = duration_problem(ttl, MAX_SPAN_MICROS)
    if problem is not None:
        out.append(Violation(path + ".online_ttl", problem))
    elif ttl.seconds < 0 or ttl.nanos < 0:
        out.append(Violation(path + ".online_ttl", "must not be negative"))
    if src.HasField("batch_config"):
        bc = src.batch_config
        if not bc.uri:
            out.append(Violation(path + ".batch_config.uri", "name the batch source's files"))
        if bc.file_format == source_pb2.FILE_FORMAT_UNSPECIFIED:
            out.append(Violation(path + ".batch_config.file_format", "choose PARQUET, CSV or ARROW_IPC"))
        if bc.post_processor and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", bc.post_processor):
            out.append(
                Violation(
                    path + ".batch_config.post_processor",
                    f"{bc.post_processor!r} must look like 'package.module:function'",
                )
            )
    if out:
        raise InvalidInput(f"push source {src.name!r} is not valid", out, reason="INVALID_SOURCE")
    return SourceSpec(
        name=src.name,
        fields=fields,
        entity_keys=tuple(src.entity_keys),
        timestamp_field=src.timestamp_field,
        ttl_micros=duration_micros(ttl),
        log_offline=src.push_config.log_offline,
        proto=src,
    )
