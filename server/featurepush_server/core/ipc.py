"""Reading Arrow IPC streams from untrusted bytes: limits checked from message metadata, then full validation.

Writing one (`arrow_ipc`) is trivial and lives here too, so that one module handles the format.

An IPC stream is a sequence of messages, each a flatbuffer header and a body of buffers. A first pass reads
only the headers (the bodies stay zero-copy slices of the input) and refuses a stream whose row count,
batch count, columns, nesting or decoded size is over a limit, before Arrow decodes or decompresses
anything. A second pass decodes each batch and validates it fully, dictionaries included, before any other
code touches it: Arrow's kernels trust offsets and indices, so unchecked data can make them read out of
bounds.

Flatbuffer layout used here (Arrow's format/Message.fbs and Schema.fbs): a table starts with an int32
back-offset to its vtable; the vtable lists uint16 field offsets (0: absent) after two uint16 sizes;
references to tables, vectors and strings are uint32 offsets forward from where they are stored.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

# Message.fbs: union MessageHeader { Schema = 1, DictionaryBatch = 2, RecordBatch = 3, ... }.
_HEADER_SCHEMA = 1
_HEADER_DICTIONARY = 2
_HEADER_RECORD_BATCH = 3
# Message table slots: version, header_type, header, bodyLength, custom_metadata.
_MESSAGE_HEADER_TYPE, _MESSAGE_HEADER, _MESSAGE_BODY_LENGTH = 1, 2, 3
# RecordBatch slots: length, nodes, buffers, compression; DictionaryBatch: id, data, isDelta.
_BATCH_LENGTH, _BATCH_NODES, _BATCH_BUFFERS, _BATCH_COMPRESSION = 0, 1, 2, 3
_DICTIONARY_DATA, _DICTIONARY_IS_DELTA = 1, 2
# BodyCompression slots: codec (LZ4_FRAME = 0, ZSTD = 1), method (BUFFER = 0).
_COMPRESSION_CODEC, _COMPRESSION_METHOD = 0, 1
_CODECS = (0, 1)
# Schema slot 1 is its fields; Field slot 5 its children.
_SCHEMA_FIELDS = 1
_FIELD_CHILDREN = 5
# FieldNode and Buffer are both structs of two little-endian int64s.
_PAIR = struct.Struct("<qq")
# A compressed buffer starts with its uncompressed length; -1 means it is stored uncompressed.
_UNCOMPRESSED = -1
_PREFIX = struct.Struct("<q")


class MalformedStream(ValueError):
    """The bytes are not a valid Arrow IPC stream; the message says what is wrong, in a sentence."""


class StreamTooLarge(ValueError):
    """The stream is over a limit; `what` names the limit (rows, batches, columns, nesting, bytes)."""

    def __init__(self, message: str, what: str, limit: int):
        super().__init__(message)
        self.what = what
        self.limit = limit


@dataclass(frozen=True)
class IpcLimits:
    """What one stream may hold; every limit is checked before the data it bounds is decoded."""

    max_rows: int = 10_000
    # Bytes of all buffers once decompressed, dictionaries expanded included.
    max_decoded_bytes: int = 256 * 1024 * 1024
    # Record and dictionary batches together.
    max_batches: int = 1024
    # Fields at every level of the schema.
    max_columns: int = 10_000
    # Levels of fields: a flat column is 1, a list of int 2, a list of structs 3, a map 3.
    max_nesting: int = 64


class _Table:
    """One flatbuffer table inside `buf`, every offset bounds-checked before it is followed."""

    def __init__(self, buf: bytes, pos: int):
        _need(buf, pos, 4)
        vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        _need(buf, vtable, 4)
        size = struct.unpack_from("<H", buf, vtable)[0]
        if size < 4 or size % 2:
            raise MalformedStream("a message header has a malformed flatbuffer vtable")
        _need(buf, vtable, size)
        self._buf = buf
        self._pos = pos
        self._vtable = vtable
        self._vtable_size = size

    def _field(self, slot: int) -> int | None:
        entry = 4 + 2 * slot
        if entry + 2 > self._vtable_size:
            return None
        offset = struct.unpack_from("<H", self._buf, self._vtable + entry)[0]
        return None if offset == 0 else self._pos + offset

    def scalar(self, slot: int, fmt: str, default: int) -> int:
        """A scalar field, or its default when absent."""
        at = self._field(slot)
        if at is None:
            return default
        _need(self._buf, at, struct.calcsize(fmt))
        value: int = struct.unpack_from(fmt, self._buf, at)[0]
        return value

    def _target(self, slot: int) -> int | None:
        at = self._field(slot)
        if at is None:
            return None
        _need(self._buf, at, 4)
        # Unsigned and forward, so following references always moves on through a finite buffer.
        return at + int(struct.unpack_from("<I", self._buf, at)[0])

    def table(self, slot: int) -> _Table | None:
        """A table field, or None when absent."""
        target = self._target(slot)
        return None if target is None else _Table(self._buf, target)

    def _vector(self, slot: int, item_size: int) -> tuple[int, int]:
        target = self._target(slot)
        if target is None:
            return 0, 0
        _need(self._buf, target, 4)
        count = int(struct.unpack_from("<I", self._buf, target)[0])
        _need(self._buf, target + 4, count * item_size)
        return target + 4, count

    def vector_length(self, slot: int, item_size: int) -> int:
        """How many items a vector field holds (0 when absent), after checking they fit the buffer."""
        return self._vector(slot, item_size)[1]

    def pairs(self, slot: int) -> Iterator[tuple[int, int]]:
        """The items of a vector of two-int64 structs (FieldNode, Buffer)."""
        start, count = self._vector(slot, _PAIR.size)
        for i in range(count):
            yield _PAIR.unpack_from(self._buf, start + i * _PAIR.size)

    def tables(self, slot: int) -> Iterator[_Table]:
        """The items of a vector of tables."""
        start, count = self._vector(slot, 4)
        for i in range(count):
            at = start + 4 * i
            yield _Table(self._buf, at + int(struct.unpack_from("<I", self._buf, at)[0]))


def _need(buf: bytes, pos: int, size: int) -> None:
    if pos < 0 or size < 0 or pos + size > len(buf):
        raise MalformedStream("a message header points outside itself (malformed flatbuffer)")


def _message(metadata: bytes) -> _Table:
    _need(metadata, 0, 4)
    return _Table(metadata, int(struct.unpack_from("<I", metadata, 0)[0]))


def _check_fields(parent: _Table, slot: int, depth: int, limits: IpcLimits, counted: list[int]) -> None:
    """Count the fields under `parent` and refuse too many or too deep, before Arrow reads the schema."""
    for field in parent.tables(slot):
        counted[0] += 1
        if counted[0] > limits.max_columns:
            raise StreamTooLarge(
                f"the schema has more than {limits.max_columns} fields (nested ones included)",
                "columns",
                limits.max_columns,
            )
        if depth > limits.max_nesting:
            raise StreamTooLarge(
                f"the schema nests fields deeper than {limits.max_nesting} levels",
                "nesting",
                limits.max_nesting,
            )
        _check_fields(field, _FIELD_CHILDREN, depth + 1, limits, counted)


def _decoded_bytes(batch: _Table, body: memoryview, limits: IpcLimits) -> int:
    """The bytes a batch's buffers take once decompressed, read from its metadata and buffer prefixes."""
    nodes = batch.vector_length(_BATCH_NODES, _PAIR.size)
    buffers = batch.vector_length(_BATCH_BUFFERS, _PAIR.size)
    # Each field has at most three buffers (validity, offsets, data); more means a forged header.
    if nodes > limits.max_columns or buffers > 3 * limits.max_columns:
        raise StreamTooLarge(
            f"a batch has more than {limits.max_columns} columns", "columns", limits.max_columns
        )
    compression = batch.table(_BATCH_COMPRESSION)
    compressed = compression is not None
    if compression is not None and (
        compression.scalar(_COMPRESSION_CODEC, "<b", 0) not in _CODECS
        or compression.scalar(_COMPRESSION_METHOD, "<b", 0) != 0
    ):
        raise MalformedStream("a batch names an unknown compression codec or method")
    total = 0
    for _, null_count in batch.pairs(_BATCH_NODES):
        if null_count < 0:
            raise MalformedStream("a batch has a negative null count")
    for offset, length in batch.pairs(_BATCH_BUFFERS):
        if offset < 0 or length < 0 or offset + length > len(body):
            raise MalformedStream("a batch has a buffer outside its message body")
        if not compressed or length == 0:
            total += length
            continue
        if length < _PREFIX.size:
            raise MalformedStream("a compressed buffer is shorter than its length prefix")
        size = _PREFIX.unpack_from(body, offset)[0]
        if size == _UNCOMPRESSED:
            total += length - _PREFIX.size
        elif size < 0:
            raise MalformedStream("a compressed buffer declares a negative uncompressed length")
        else:
            total += size
    return total


def check_limits(data: bytes, limits: IpcLimits) -> int:
    """Refuse a stream over a limit or with malformed headers, reading message metadata only.

    Returns the bytes its batches and dictionaries decode to, as their headers declare them.
    """
    reader = pa.ipc.MessageReader.open_stream(pa.BufferReader(data))
    rows = batches = decoded = 0
    first = True
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            break
        metadata = message.metadata.to_pybytes()
        header = _message(metadata)
        kind = header.scalar(_MESSAGE_HEADER_TYPE, "<B", 0)
        body_length = header.scalar(_MESSAGE_BODY_LENGTH, "<q", 0)
        body = memoryview(message.body) if message.body is not None else memoryview(b"")
        if body_length != len(body):
            raise MalformedStream("a message's body length does not match its header")
        content = header.table(_MESSAGE_HEADER)
        if content is None:
            raise MalformedStream("a message has no header")
        if first:
            if kind != _HEADER_SCHEMA:
                raise MalformedStream("the stream does not start with a schema")
            _check_fields(content, _SCHEMA_FIELDS, 1, limits, [0])
            first = False
            continue
        batches += 1
        if batches > limits.max_batches:
            raise StreamTooLarge(
                f"the stream has more than {limits.max_batches} batches", "batches", limits.max_batches
            )
        if kind == _HEADER_DICTIONARY:
            # Arrow concatenates a delta to the dictionary before the batch using it can be validated.
            if content.scalar(_DICTIONARY_IS_DELTA, "<?", False):
                raise MalformedStream("dictionary deltas are not accepted; send whole dictionaries")
            data_table = content.table(_DICTIONARY_DATA)
            if data_table is None:
                raise MalformedStream("a dictionary batch has no data")
            decoded += _decoded_bytes(data_table, body, limits)
        elif kind == _HEADER_RECORD_BATCH:
            length = content.scalar(_BATCH_LENGTH, "<q", 0)
            if length < 0:
                raise MalformedStream("a batch has a negative length")
            rows += length
            if rows > limits.max_rows:
                raise StreamTooLarge(
                    f"the stream has more than {limits.max_rows} rows", "rows", limits.max_rows
                )
            decoded += _decoded_bytes(content, body, limits)
        else:
            raise MalformedStream("the stream holds a message other than a schema, dictionary or batch")
        if decoded > limits.max_decoded_bytes:
            raise StreamTooLarge(
                f"the stream decodes to more than {limits.max_decoded_bytes} bytes",
                "bytes",
                limits.max_decoded_bytes,
            )
    if first:
        raise MalformedStream("the stream is empty: it has no schema message")
    return decoded


def _has_dictionary(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return True
    return any(_has_dictionary(t.field(i).type) for i in range(t.num_fields))


def expanded_bytes(arr: pa.Array) -> int:
    """An upper bound of the bytes `arr` takes once its dictionaries are decoded into plain values."""
    t = arr.type
    if not _has_dictionary(t):
        return int(arr.nbytes)
    if pa.types.is_dictionary(t):
        indices, dictionary = arr.indices, arr.dictionary
        value = dictionary.type
        if pa.types.is_binary(value) or pa.types.is_string(value):
            lengths = pc.take(pc.binary_length(dictionary), indices)
            return int(pc.sum(lengths).as_py() or 0) + 4 * len(indices) + len(indices) // 8 + 1
        if pa.types.is_large_binary(value) or pa.types.is_large_string(value):
            lengths = pc.take(pc.binary_length(dictionary), indices)
            return int(pc.sum(lengths).as_py() or 0) + 8 * len(indices) + len(indices) // 8 + 1
        # Any one value is no larger than the whole dictionary.
        return len(indices) * max(expanded_bytes(dictionary), 1)
    if isinstance(arr, pa.ListArray | pa.LargeListArray | pa.FixedSizeListArray | pa.MapArray):
        return int(arr.nbytes) + expanded_bytes(arr.values)
    if isinstance(arr, pa.StructArray):
        return sum(expanded_bytes(arr.field(i)) for i in range(t.num_fields))
    return int(arr.nbytes)


def _check_names(schema: pa.Schema) -> None:
    """Refuse field names and time zones that are not UTF-8: Arrow keeps them as bytes, Python as text."""
    pending = [("", schema.field(i)) for i in range(len(schema))]
    while pending:
        parent, field = pending.pop()
        try:
            path = parent + field.name
        except UnicodeDecodeError:
            raise MalformedStream("a field name is not UTF-8") from None
        kind = field.type
        while isinstance(kind, pa.DictionaryType | pa.BaseExtensionType):
            kind = kind.value_type if isinstance(kind, pa.DictionaryType) else kind.storage_type
        if isinstance(kind, pa.TimestampType):
            try:
                kind.tz  # noqa: B018 - decoding is the check
            except UnicodeDecodeError:
                raise MalformedStream(f"the time zone of field {path!r} is not UTF-8") from None
        pending.extend((path + ".", kind.field(i)) for i in range(kind.num_fields))


def _brief(err: BaseException) -> str:
    """The first line of an Arrow error, short: enough to debug a writer, never a dump of the input."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= 160 else text[:160] + "..."


# Everything Arrow's reader and validator raise on bad input; ArrowException covers its own classes
# (ArrowInvalid, ArrowIndexError, ArrowCapacityError, ArrowSerializationError, ...).
READ_ERRORS = (
    pa.ArrowException,
    OSError,
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    MemoryError,
    OverflowError,
    struct.error,
)


def read_stream(
    data: bytes, limits: IpcLimits, before_decode: Callable[[int], object] | None = None
) -> pa.Table:
    """Read an untrusted IPC stream into a table of fully validated batches, or raise.

    Raises MalformedStream when the bytes are not a valid stream, StreamTooLarge when over a limit.
    `before_decode` is told the bytes the stream declares it decodes to, once its headers passed the
    limits and before anything is decoded or decompressed; it may raise to stop the read.
    """
    try:
        decoded = check_limits(data, limits)
    except (MalformedStream, StreamTooLarge):
        raise
    except READ_ERRORS as e:
        raise MalformedStream(f"the message framing is broken ({_brief(e)})") from None
    if before_decode is not None:
        before_decode(decoded)
    batches: list[pa.RecordBatch] = []
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
    except READ_ERRORS as e:
        raise MalformedStream(f"the schema cannot be read ({_brief(e)})") from None
    with reader:
        _check_names(reader.schema)
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except READ_ERRORS as e:
                raise MalformedStream(f"batch {len(batches)} cannot be decoded ({_brief(e)})") from None
            try:
                batch.validate(full=True)
            except READ_ERRORS as e:
                raise MalformedStream(f"batch {len(batches)} is inconsistent ({_brief(e)})") from None
            batches.append(batch)
        schema = reader.schema
    try:
        expanded = sum(expanded_bytes(column) for batch in batches for column in batch.columns)
        table = pa.Table.from_batches(batches, schema)
    except READ_ERRORS as e:
        raise MalformedStream(f"the batches do not form a table ({_brief(e)})") from None
    if expanded > limits.max_decoded_bytes:
        raise StreamTooLarge(
            f"the stream's dictionaries expand to more than {limits.max_decoded_bytes} bytes",
            "bytes",
            limits.max_decoded_bytes,
        )
    return table


def arrow_ipc(table: pa.Table) -> bytes:
    """A table as one Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())
