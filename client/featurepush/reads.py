"""GetFeatures for every client: the request, and the reply as rows (FeatureResult) or as Arrow columns."""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast, overload

import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf import timestamp_pb2

from featurepush.client import FeatureResult, FeatureStatus
from featurepush.columnar import arrow_type
from featurepush.definitions import StreamSource
from featurepush.types import Field
from featurepush.v1 import online_service_pb2
from featurepush.values import decode_record, key_to_struct

__all__ = ["SMALL_READ_KEYS", "FeatureResults", "get_features_request", "read_reply", "wants_arrow"]

_STATUSES = {
    online_service_pb2.FEATURE_STATUS_PRESENT: FeatureStatus.PRESENT,
    online_service_pb2.FEATURE_STATUS_MISSING: FeatureStatus.MISSING,
    online_service_pb2.FEATURE_STATUS_EXPIRED: FeatureStatus.EXPIRED,
}
_STATUS_NUMBERS = {status: number for number, status in _STATUSES.items()}
_ARROW_TIMESTAMP = pa.timestamp("us", tz="UTC")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# The method, called with requests serialized here: a request's keys are written straight as bytes.
GET_FEATURES_METHOD = "/featurepush.v1.OnlineService/GetFeatures"
# GetFeaturesRequest.keys (2), google.protobuf.Struct.fields (1), its map entry's key (1) and value (2),
# and google.protobuf.Value.string_value (3), all length-delimited; a test checks them against the
# descriptors.
REQUEST_KEYS = b"\x12"
STRUCT_FIELD = b"\x0a"
ENTRY_KEY = b"\x0a"
ENTRY_VALUE = b"\x12"
VALUE_STRING = b"\x1a"
# GetFeaturesResponse.arrow_ipc (2), length-delimited: a reply in the Arrow form is this field alone.
REPLY_ARROW_IPC = b"\x12"
TAGS: dict[str, tuple[str, str]] = {
    "REQUEST_KEYS": ("featurepush.v1.GetFeaturesRequest", "keys"),
    "STRUCT_FIELD": ("google.protobuf.Struct", "fields"),
    "ENTRY_KEY": ("google.protobuf.Struct.FieldsEntry", "key"),
    "ENTRY_VALUE": ("google.protobuf.Struct.FieldsEntry", "value"),
    "VALUE_STRING": ("google.protobuf.Value", "string_value"),
    "REPLY_ARROW_IPC": ("featurepush.v1.GetFeaturesResponse", "arrow_ipc"),
}


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string_key_prefix(name: bytes, size: int) -> bytes:
    """The bytes of a request's key {name: <string of `size` bytes>} that come before the string."""
    value = VALUE_STRING + _varint(size)
    entry = ENTRY_KEY + _varint(len(name)) + name + ENTRY_VALUE + _varint(len(value) + size) + value
    struct = STRUCT_FIELD + _varint(len(entry) + size) + entry
    return REQUEST_KEYS + _varint(len(struct) + size) + struct


# Per entity key name, the prefix of every short string key by its length in bytes, and the same prefixes
# as Latin-1 text, whose characters are the prefixes' bytes.
_SHORT_KEY = 256
_PREFIXES: dict[str, tuple[list[bytes], list[str]]] = {}


def _prefixes(name: str) -> tuple[list[bytes], list[str]]:
    found = _PREFIXES.get(name)
    if found is None:
        raw = name.encode()
        prefixes = [_string_key_prefix(raw, size) for size in range(_SHORT_KEY)]
        if len(_PREFIXES) >= 1024:
            _PREFIXES.clear()
        found = _PREFIXES[name] = (prefixes, [p.decode("latin-1") for p in prefixes])
    return found


# Reads of at most this many keys ask for Structs unless told otherwise: the server answers a few keys as
# Structs several times faster than as Arrow, whose columns cost a few dozen numpy and Arrow calls however
# few the rows, and decoding a few Structs here costs less than reading an Arrow stream.
SMALL_READ_KEYS = 8

# The serialized source field of a request, by source.
_HEADS: dict[str, bytes] = {}
# response_format's tag and value, written after the keys as protobuf writes fields, in number order: the
# server reads the keys of a request so laid out from its bytes rather than parsing it.
_TAILS = {
    arrow: online_service_pb2.GetFeaturesRequest(
        response_format=online_service_pb2.RESPONSE_FORMAT_ARROW
        if arrow
        else online_service_pb2.RESPONSE_FORMAT_STRUCT
    ).SerializeToString()
    for arrow in (False, True)
}


def wants_arrow(columnar: bool | None, key_count: int) -> bool:
    """Whether a read asks for Arrow: as told, or by default for more than SMALL_READ_KEYS keys."""
    return key_count > SMALL_READ_KEYS if columnar is None else columnar


def _head(source: str) -> bytes:
    head = _HEADS.get(source)
    if head is None:
        if len(_HEADS) >= 1024:
            _HEADS.clear()
        head = _HEADS[source] = online_service_pb2.GetFeaturesRequest(source=source).SerializeToString()
    return head


def _string_keys(texts: Sequence[str], name: str) -> bytes | None:
    """The request's keys {name: text} as bytes, laid out by C loops; None if a key is too long for this."""
    prefixes, text_prefixes = _prefixes(name)
    try:
        if "".join(texts).isascii():
            # An ASCII key's length is its UTF-8's and its characters are its bytes: the prefixes and keys
            # are joined as text and encoded once, rather than encoding each key.
            text = [*texts, *texts]
            text[::2] = map(text_prefixes.__getitem__, map(len, texts))
            text[1::2] = texts
            return "".join(text).encode("latin-1")
        raws = list(map(str.encode, texts))
        parts = raws + raws
        parts[::2] = map(prefixes.__getitem__, map(len, raws))
        parts[1::2] = raws
        return b"".join(parts)
    except IndexError:
        # Keys of _SHORT_KEY bytes or more have longer length prefixes: the general path writes them.
        return None


def get_features_request(
    source: str, keys: Sequence[Mapping[str, Any] | Any], entity_keys: Sequence[str], *, columnar: bool
) -> bytes:
    """The serialized request for `keys`, Arrow when `columnar`; keys as Client.get_features takes them."""
    # Serialized messages concatenated are one message with the fields of both.
    head, tail = _head(source), _TAILS[columnar]
    if len(entity_keys) == 1 and set(map(type, keys)) == {str}:
        # The common case, one String key, written as bytes: building a Struct costs ten times more.
        written = _string_keys(cast(Sequence[str], keys), entity_keys[0])
        if written is not None:
            return head + written + tail
    out = [head]
    for key in keys:
        struct_bytes = key_to_struct(key, entity_keys).SerializeToString()
        out.append(REQUEST_KEYS + _varint(len(struct_bytes)) + struct_bytes)
    out.append(tail)
    return b"".join(out)


def parse_reply(data: bytes) -> online_service_pb2.GetFeaturesResponse | memoryview:
    """A GetFeatures reply as it arrives: its Arrow stream where that is all it holds, else the message.

    The stream is a view of the reply's bytes: neither parsing the message nor copying the stream out of it
    is needed for the one field an Arrow reply has. protobuf's DecodeError for bytes that are no reply.
    """
    if data[:1] == REPLY_ARROW_IPC:
        # The field's length, a varint of at most five bytes here (a reply is below 2 GiB).
        size, shift, at = 0, 0, 1
        for byte in data[1:6]:
            size |= (byte & 0x7F) << shift
            shift += 7
            at += 1
            if byte < 0x80:
                if size and at + size == len(data):
                    return memoryview(data)[at:]
                break
    return online_service_pb2.GetFeaturesResponse.FromString(data)


def read_reply(
    response: online_service_pb2.GetFeaturesResponse | memoryview,
    definition: StreamSource,
    keys: Sequence[Mapping[str, Any] | Any],
) -> FeatureResults:
    """A reply's results, in either form (parse_reply); ValueError if they do not fit the definition or keys.

    A reply of another number of rows than `keys` is refused: rows would be paired with the wrong keys.
    """
    if isinstance(response, memoryview):
        return _arrow_results(response, definition, len(keys))
    if response.arrow_ipc:
        return _arrow_results(memoryview(response.arrow_ipc), definition, len(keys))
    results: list[FeatureResult] = []
    # The definition's own tuple: decode_record works out its decoders once per schema.
    schema = definition.schema
    for vector in response.results:
        status = _STATUSES.get(vector.status)
        if status is None:
            raise ValueError(f"server returned feature status {vector.status}")
        event_time = _datetime(vector.event_time) if vector.HasField("event_time") else None
        features = decode_record(vector.features, schema) if vector.HasField("features") else None
        results.append(FeatureResult(status, event_time, features))
    if len(results) != len(keys):
        raise ValueError(f"the server returned {len(results)} feature vectors for {len(keys)} keys")
    return FeatureResults(definition, results=results, keys=keys)


# The seconds of 0001-01-01 and of 9999-12-31T23:59:59, the range of a valid Timestamp.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def _datetime(timestamp: timestamp_pb2.Timestamp) -> dt.datetime:
    """Timestamp.ToDatetime(tzinfo=UTC) in a fraction of its time; its ValueError for an invalid one."""
    seconds, nanos = timestamp.seconds, timestamp.nanos
    if _MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000:
        return _EPOCH + dt.timedelta(seconds=seconds, microseconds=nanos // 1000)
    return timestamp.ToDatetime(tzinfo=dt.UTC)


def _arrow_results(stream: memoryview, definition: StreamSource, rows: int) -> FeatureResults:
    """The results of a reply's Arrow stream; ValueError if it does not fit the definition.

    The stream starts with its schema's message, which the server writes alike for every read of a source.
    Once that message is known to hold the expected columns, and the batch message after it says it holds
    a row per key, the batch is only read when the results are first used.
    """
    known = _STREAM_SCHEMAS.get(id(definition))
    if known is not None and known[0] is definition:
        size = len(known[1])
        if stream[:size] == known[1] and _batch_length(stream[size:]) == rows:
            return FeatureResults(definition, batch=(stream[size:], known[2], rows))
    table = _read_arrow(stream, definition)
    if table.num_rows != rows:
        raise ValueError(f"the server's Arrow reply has {table.num_rows} rows for {rows} keys")
    return FeatureResults(definition, table=table)


def _batch_length(message: memoryview) -> int | None:
    """The row count an encapsulated RecordBatch message's metadata states; None if it is no such message.

    Read straight from the flatbuffer (Arrow's Message.fbs): the Message table's header, when it is a
    RecordBatch, and that table's length. Offsets are relative to the metadata, which follows the
    continuation marker and the metadata's length. None too where anything but the end-of-stream marker
    follows the message's body: a stream of more messages is read whole.
    """
    try:
        if message[:4] != _CONTINUATION:
            return None
        size = _INT32.unpack_from(message, 4)[0]
        meta = message[8 : 8 + size]
        if size <= 0 or len(meta) != size:
            return None
        table = _UINT32.unpack_from(meta, 0)[0]
        # Message fields: version, header_type, header, bodyLength; RecordBatch's first is its length.
        header_type = _field(meta, table, 1)
        header_at = _field(meta, table, 2)
        body_at = _field(meta, table, 3)
        if not header_type or not header_at or meta[header_type] != _RECORD_BATCH:
            return None
        body = _INT64.unpack_from(meta, body_at)[0] if body_at else 0
        if body < 0 or message[8 + size + body :] not in (_END_OF_STREAM, b""):
            return None
        batch = header_at + _UINT32.unpack_from(meta, header_at)[0]
        length_at = _field(meta, batch, 0)
        return _INT64.unpack_from(meta, length_at)[0] if length_at else 0
    except (struct.error, IndexError):
        return None


def _field(meta: memoryview, table: int, index: int) -> int:
    """Where a flatbuffer table's field is in the metadata, 0 when the table leaves it out."""
    vtable = table - _INT32.unpack_from(meta, table)[0]
    if vtable < 0:
        # struct reads a negative offset from the end: a vtable before the metadata would be misread.
        raise IndexError("a flatbuffer vtable before the metadata")
    vtable_size = _UINT16.unpack_from(meta, vtable)[0]
    if 4 + 2 * index >= vtable_size:
        return 0
    offset: int = _UINT16.unpack_from(meta, vtable + 4 + 2 * index)[0]
    return table + offset if offset else 0


def _read_arrow(stream: memoryview, definition: StreamSource) -> pa.Table:
    """The reply's batches as one table, after its schema is checked against the definition's."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(stream)).read_all()
        # The IPC reader checks buffer sizes, not offsets: a string's offset past its data would be read
        # from whatever memory follows. Any of pyarrow's errors (a forged type is ArrowNotImplementedError)
        # is the reply's fault.
        table.validate(full=True)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"the server's Arrow reply could not be read: {e}") from None
    expected = _expected_schema(definition)
    if not table.schema.equals(expected):
        raise ValueError(f"the server's Arrow reply has columns {table.schema}, not {expected}")
    # A message is 0xFFFFFFFF, the little-endian length of its metadata, then the metadata.
    size = 8 + int.from_bytes(stream[4:8], "little")
    if len(_STREAM_SCHEMAS) >= 1024:
        _STREAM_SCHEMAS.clear()
    _STREAM_SCHEMAS[id(definition)] = (definition, bytes(stream[:size]), table.schema)
    return table


_CONTINUATION = b"\xff\xff\xff\xff"
# The end of an IPC stream: the continuation marker and a zero metadata length.
_END_OF_STREAM = _CONTINUATION + b"\x00\x00\x00\x00"
_UINT16, _INT32, _UINT32, _INT64 = (struct.Struct(f) for f in ("<H", "<i", "<I", "<q"))
# MessageHeader's RecordBatch, the value of a Message's header_type.
_RECORD_BATCH = 3
# By the identity of a definition, the schema message of the last reply read and checked against it.
_STREAM_SCHEMAS: dict[int, tuple[StreamSource, bytes, pa.Schema]] = {}
# Schemas by the identity of their definition, which a client keeps until the source changes.
_SCHEMAS: dict[int, tuple[StreamSource, pa.Schema]] = {}


def _expected_schema(definition: StreamSource) -> pa.Schema:
    cached = _SCHEMAS.get(id(definition))
    if cached is not None and cached[0] is definition:
        return cached[1]
    schema = columns_schema(definition)
    if len(_SCHEMAS) >= 1024:
        _SCHEMAS.clear()
    _SCHEMAS[id(definition)] = (definition, schema)
    return schema


def columns_schema(definition: StreamSource) -> pa.Schema:
    """The Arrow columns of a read: entity keys, status, event_time, then the other fields in schema order."""
    by_name = {f.name: f for f in definition.schema}
    taken = set(by_name)

    def free(name: str) -> str:
        # A schema field keeps its name; the status or event_time column makes way, as the server does.
        while name in taken:
            name = "_" + name
        taken.add(name)
        return name

    status, event_time = free("status"), free("event_time")
    fields = [pa.field(k, arrow_type(by_name[k].dtype), nullable=False) for k in definition.entity_keys]
    fields.append(pa.field(status, pa.int8(), nullable=False))
    fields.append(pa.field(event_time, _ARROW_TIMESTAMP))
    fields += [pa.field(f.name, arrow_type(f.dtype)) for f in _features(definition)]
    return pa.schema(fields)


def _pylist(column: pa.ChunkedArray) -> list[Any]:
    """A column's values as Python objects, as to_pylist gives them; top-level timestamps through numpy.

    pyarrow makes an aware datetime in a few microseconds; numpy's timedeltas added to the epoch take a
    twentieth of that, which counts for event_time and every Timestamp feature of a read.
    """
    if column.type != _ARROW_TIMESTAMP:
        values: list[Any] = column.to_pylist(maps_as_pydicts="strict")
        return values
    micros = pc.fill_null(column.combine_chunks().view(pa.int64()), 0).to_numpy()
    values = list(map(_EPOCH.__add__, micros.astype("timedelta64[us]").tolist()))
    if column.null_count:
        values = [v if ok else None for v, ok in zip(values, column.is_valid().to_pylist(), strict=True)]
    return values


def _key_dict(key: Any, entity_keys: Sequence[str]) -> dict[str, Any]:
    """A tuple or single-value key as a mapping of entity key fields."""
    return dict(zip(entity_keys, key if isinstance(key, tuple) else (key,), strict=True))


def _features(definition: StreamSource) -> list[Field]:
    return [f for f in definition.schema if f.name not in definition.entity_keys]


class FeatureResults(Sequence[FeatureResult]):
    """The vectors of one get_features call in key order; immutable.

    A sequence of FeatureResult, built on first use, and the same vectors as columns: to_arrow(),
    to_pandas() and to_polars() (when pandas or polars is installed). The columns are the entity keys,
    `status` (int8: 1 PRESENT, 2 MISSING, 3 EXPIRED), `event_time` (null when MISSING), then the source's
    other fields, null unless PRESENT; a field named status or event_time pushes those to _status or
    _event_time. An Arrow reply's record batch is read on first use too.
    """

    def __init__(
        self,
        definition: StreamSource,
        *,
        table: pa.Table | None = None,
        results: list[FeatureResult] | None = None,
        keys: Sequence[Mapping[str, Any] | Any] = (),
        batch: tuple[memoryview, pa.Schema, int] | None = None,
    ) -> None:
        self._definition = definition
        self._table = table
        self._results = results
        self._keys = keys
        # A reply's record batch message, its schema and its row count: read into a table on first use.
        self._batch = batch

    def __len__(self) -> int:
        if self._results is not None:
            return len(self._results)
        if self._batch is not None:
            return self._batch[2]
        assert self._table is not None
        return int(self._table.num_rows)

    @overload
    def __getitem__(self, index: int) -> FeatureResult: ...

    @overload
    def __getitem__(self, index: slice) -> list[FeatureResult]: ...

    def __getitem__(self, index: int | slice) -> FeatureResult | list[FeatureResult]:
        return self._rows()[index]

    def __iter__(self) -> Iterator[FeatureResult]:
        return iter(self._rows())

    def __eq__(self, other: object) -> bool:
        # Equal to the list get_features used to return, and to any sequence of the same results.
        if isinstance(other, FeatureResults | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"FeatureResults({self._rows()!r})"

    def to_arrow(self) -> pa.Table:
        """The vectors as an Arrow table, one row per key (see the class's docstring for the columns)."""
        if self._table is None:
            self._table = self._table_of_rows() if self._batch is None else self._read_batch(self._batch)
            self._batch = None
        return self._table

    def to_pandas(self) -> Any:
        """The vectors as a pandas DataFrame; needs pandas.

        Integer and Bool columns are pandas' nullable dtypes (Int64, boolean...): a MISSING entity's null
        would otherwise turn a whole int64 column into float64, which rounds values past 2**53.
        """
        try:
            import pandas
        except ImportError:
            raise ImportError("to_pandas() needs pandas: pip install pandas") from None
        nullable = {
            pa.int8(): pandas.Int8Dtype(),
            pa.int16(): pandas.Int16Dtype(),
            pa.int32(): pandas.Int32Dtype(),
            pa.int64(): pandas.Int64Dtype(),
            pa.uint8(): pandas.UInt8Dtype(),
            pa.uint16(): pandas.UInt16Dtype(),
            pa.uint32(): pandas.UInt32Dtype(),
            pa.uint64(): pandas.UInt64Dtype(),
            pa.bool_(): pandas.BooleanDtype(),
        }
        return self.to_arrow().to_pandas(types_mapper=nullable.get)

    def to_polars(self) -> Any:
        """The vectors as a polars DataFrame; needs polars."""
        try:
            import polars
        except ImportError:
            raise ImportError("to_polars() needs polars: pip install polars") from None
        return polars.from_arrow(self.to_arrow())

    @staticmethod
    def _read_batch(batch: tuple[memoryview, pa.Schema, int]) -> pa.Table:
        """The reply's record batch as a table; ValueError if it does not read or is not a row per key."""
        message, schema, rows = batch
        try:
            read = pa.ipc.read_record_batch(pa.py_buffer(message), schema)
            # As in _read_arrow: offsets are only checked by a full validation.
            read.validate(full=True)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"the server's Arrow reply could not be read: {e}") from None
        if read.num_rows != rows:
            raise ValueError(f"the server's Arrow reply has {read.num_rows} rows for {rows} keys")
        return pa.Table.from_batches([read])

    def _rows(self) -> list[FeatureResult]:
        if self._results is None:
            self._results = self._rows_of_table()
        return self._results

    def _rows_of_table(self) -> list[FeatureResult]:
        table = self.to_arrow()
        try:
            columns = [_pylist(c) for c in table.columns]
        except OverflowError as e:
            # A time past the years datetime holds, refused as the Struct form refuses one.
            raise ValueError(f"the server's Arrow reply holds a time datetime cannot hold: {e}") from None
        n_keys = len(self._definition.entity_keys)
        statuses, times = columns[n_keys], columns[n_keys + 1]
        where = {name: i for i, name in enumerate(self._definition.entity_keys)}
        where.update({f.name: n_keys + 2 + j for j, f in enumerate(_features(self._definition))})
        names = [f.name for f in self._definition.schema]
        ordered = [columns[where[name]] for name in names]
        out: list[FeatureResult] = []
        present = FeatureStatus.PRESENT
        for number, event_time, row in zip(statuses, times, zip(*ordered, strict=True), strict=True):
            status = _STATUSES.get(number)
            if status is None:
                raise ValueError(f"server returned feature status {number}")
            features = dict(zip(names, row, strict=True)) if status is present else None
            out.append(FeatureResult(status, event_time, features))
        return out

    def _table_of_rows(self) -> pa.Table:
        schema = columns_schema(self._definition)
        entity_keys = list(self._definition.entity_keys)
        results = self._rows()
        keys = [key if isinstance(key, Mapping) else _key_dict(key, entity_keys) for key in self._keys]
        arrays: list[pa.Array] = [
            pa.array([key[name] for key in keys], schema.field(i).type) for i, name in enumerate(entity_keys)
        ]
        arrays.append(pa.array([_STATUS_NUMBERS[r.status] for r in results], pa.int8()))
        arrays.append(pa.array([r.event_time for r in results], _ARROW_TIMESTAMP))
        for j, f in enumerate(_features(self._definition)):
            values = [None if r.features is None else r.features[f.name] for r in results]
            arrays.append(pa.array(values, schema.field(len(entity_keys) + 2 + j).type))
        return pa.Table.from_arrays(arrays, schema=schema)
