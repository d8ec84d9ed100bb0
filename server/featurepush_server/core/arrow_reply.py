"""The Arrow reply of a read of flat fields, written from stored rows' columns without pyarrow per call.

Every row's columns (see `encoding.py`) are taken apart for all rows at once by C loops over bytes: the
fixed parts (header, field count, slots, validity bytes) of all rows are joined, and each field's values
are then one strided slice of them, or of a view of the slots as 8-byte items; each string and bytes
field's variable parts are sliced out of the rows and joined. numpy is left to Float32 fields alone: a
read's few dozen numpy calls cost more than these slices once other work has left the CPU's caches.
The reply's record batch is then written as Arrow IPC by hand: its body is the buffers laid end to end,
8-byte aligned, and its metadata a small flatbuffer whose shape only depends on the number of columns, so
no Array, RecordBatch or IPC writer is built per call. Nested fields, rows stored before a field was added
and entity keys other than one String take the general path (`online.arrow_stream`).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from operator import add, itemgetter
from typing import cast

import numpy as np

from .framing import COLUMNS_AT, HEADER_BYTES
from .schema import FieldSpec, Kind

# How a feature's values are written from its 8-byte slot, or from its variable part.
_INT64, _FLOAT64, _INT32, _FLOAT32, _BOOL, _BINARY = range(6)
_READS = {
    Kind.INT64: _INT64,
    Kind.TIMESTAMP: _INT64,
    Kind.FLOAT64: _FLOAT64,
    Kind.INT32: _INT32,
    Kind.FLOAT32: _FLOAT32,
    Kind.BOOL: _BOOL,
    Kind.STRING: _BINARY,
    Kind.BYTES: _BINARY,
}
# A stored value's columns start with their 2-byte field count, then the 8-byte slots.
_SLOTS_AT = COLUMNS_AT + 2
_STATUS_PRESENT, _STATUS_MISSING, _STATUS_EXPIRED = 1, 2, 3
# The status column of a read whose every key is present.
_PRESENT = bytes([_STATUS_PRESENT])
# Each byte with its top bit flipped; and "0" for a zero byte, "1" for any other.
_FLIP_SIGN = bytes(b ^ 0x80 for b in range(256))
_DIGITS = b"0" + b"1" * 255
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_CONTINUATION = b"\xff\xff\xff\xff"
# The padding after a buffer, by its length's remainder modulo 8.
_PADDING_AFTER = [bytes(-i % 8) for i in range(8)]
# Arrow's MetadataVersion V5, and RecordBatch's place in the MessageHeader union.
_METADATA_V5 = 4
_HEADER_RECORD_BATCH = 3
_MESSAGE_HEAD = struct.Struct("<I" + "6H" + "iIqhBx4x" + "5H6x" + "iIqI4x" + "4xI")
_BUFFER_COUNT = struct.Struct("<4xI")
_META_LENGTH = struct.Struct("<i")


@dataclass(frozen=True, eq=False)
class ReplyPlan:
    """How to write one source's Arrow reply from stored columns; None of it changes between reads."""

    width: int
    # Per feature column in reply order: how its values are written, and its place among the stored
    # fields (in name order).
    columns: tuple[tuple[int, int], ...]
    # Per stored field (in name order) with a variable part that a reply column reads, the varying fields
    # whose parts come before its own in a row.
    before: dict[int, tuple[int, ...]]
    # A stored value of no fields' values, read where a key has none: every field null.
    null_row: bytes
    # A stored value's fixed part, and its slots, each taken from a row by one C call.
    fixed_part: Callable[[bytes], bytes]
    slot_part: Callable[[bytes], bytes]
    # The two bytes of the field count that every row stored with all of the schema's fields holds.
    count: tuple[bytes, bytes]
    schema_message: bytes
    # The formats of the record batch message's nodes and buffers, whose counts only the schema sets.
    nodes_format: struct.Struct
    buffers_format: struct.Struct

    @classmethod
    def of(
        cls,
        fields: Sequence[FieldSpec],
        keys: Sequence[FieldSpec],
        features: Sequence[FieldSpec],
        schema: bytes,
    ) -> ReplyPlan | None:
        """The plan, or None when the read needs the general path (nested types, other entity keys)."""
        if len(keys) != 1 or keys[0].dtype.kind is not Kind.STRING:
            return None
        if any(f.dtype.kind not in _READS for f in fields) or sys.byteorder != "little":
            # Slots and sizes are read as the machine's integers, which the stored bytes are on little-endian
            # machines only.
            return None
        ordered = sorted(fields, key=lambda f: f.name.encode())
        width = len(ordered)
        place = {f.name: j for j, f in enumerate(ordered)}
        varying = [j for j, f in enumerate(ordered) if _READS[f.dtype.kind] == _BINARY]
        columns = tuple((_READS[f.dtype.kind], place[f.name]) for f in features)
        before = {j: tuple(varying[: varying.index(j)]) for read, j in columns if read == _BINARY}
        fixed_width = 2 + 9 * width
        # The greatest header: the null row is never expired.
        null_row = b"\xff" * HEADER_BYTES + struct.pack(">IH", fixed_width, 0) + bytes(9 * width)
        null_row = null_row[:COLUMNS_AT] + struct.pack("<H", width) + null_row[_SLOTS_AT:]
        # Keys, status, event time, then the features: a node each, two or three buffers each.
        nodes = 2 * (3 + len(columns))
        buffers = 2 * (3 + 2 + 2 + sum(3 if read == _BINARY else 2 for read, _ in columns))
        return cls(
            width,
            columns,
            before,
            null_row,
            itemgetter(slice(None, len(null_row))),
            itemgetter(slice(_SLOTS_AT, _SLOTS_AT + 8 * width)),
            (bytes([width & 0xFF]), bytes([width >> 8])),
            schema,
            struct.Struct(f"<{nodes}q"),
            struct.Struct(f"<{buffers}q"),
        )


def _message(plan: ReplyPlan, length: int, nodes: list[int], buffers: list[int], body_size: int) -> bytes:
    """The encapsulated RecordBatch message's metadata, with the continuation and length before it."""
    node_bytes = plan.nodes_format.pack(*nodes)
    buffer_bytes = plan.buffers_format.pack(*buffers)
    # Written front to back, every offset pointing forward as flatbuffers require; 8-byte values on
    # 8-byte boundaries. Message vtable at 4, Message at 16, RecordBatch vtable at 40, RecordBatch at
    # 56, then the nodes' vector (length at 84) and the buffers' vector.
    nodes_at = 84
    buffers_at = nodes_at + 4 + len(node_bytes) + 4
    head = _MESSAGE_HEAD.pack(
        16,  # the root table, Message
        12, 20, 16, 18, 4, 8,  # its vtable: version, header_type, header, bodyLength
        12, 56 - 20, body_size, _METADATA_V5, _HEADER_RECORD_BATCH,
        10, 24, 8, 4, 16,  # RecordBatch's vtable: length, nodes, buffers
        16, nodes_at - 60, length, buffers_at - 72,
        len(nodes) // 2,
    )  # fmt: skip
    # Four bytes of padding put the buffers' 8-byte values on 8-byte boundaries.
    meta = b"".join([head, node_bytes, _BUFFER_COUNT.pack(len(buffers) // 2), buffer_bytes])
    meta += bytes(-(len(meta) + 8) % 8)
    return _CONTINUATION + _META_LENGTH.pack(len(meta)) + meta


def _strings(values: Sequence[str] | Sequence[bytes]) -> tuple[bytes, bytes]:
    """Arrow offsets and data of strings, given as str or as their UTF-8."""
    raws = cast(Sequence[bytes], values)
    if values and type(values[0]) is str:
        raws = [value.encode() for value in cast(Sequence[str], values)]
    return struct.pack(f"<{len(raws) + 1}i", *accumulate(map(len, raws), initial=0)), b"".join(raws)


def _bitmap(flags: bytes) -> bytes:
    """Arrow's bitmap of bytes that are each one value's flag: a set bit where the byte is not zero."""
    # The flags as binary digits, the first value's last: that number's little-endian bytes are the bitmap.
    return int(flags.translate(_DIGITS)[::-1], 2).to_bytes((len(flags) + 7) // 8, "little")


def reply_stream(
    plan: ReplyPlan, keys: Sequence[str] | Sequence[bytes], stored: list[bytes | None], cutoff: int | None
) -> bytes | None:
    """The reply's IPC stream for `keys` and their stored values, None where a key has none.

    `keys` are all str or all their UTF-8 bytes. Rows with event times before `cutoff` (microseconds) read
    as expired. None when a stored row lacks fields (stored before they were added) or is cut short: the
    caller takes the general path.
    """
    n, width = len(stored), plan.width
    if not n:
        return None
    found = b""
    if None in stored:
        is_found = bytes([v is not None for v in stored])
        rows: list[bytes] = [plan.null_row if v is None else v for v in stored]
    else:
        is_found = None
        rows = stored  # type: ignore[assignment]
    # Every row's fixed part (header, columns' length, field count, slots and validity bytes), one after
    # another: each byte of a field's part is then one strided slice for all rows, which C copies.
    fixed_end = len(plan.null_row)
    head = b"".join(map(plan.fixed_part, rows))
    if len(head) != n * fixed_end:
        return None
    low, high = plan.count
    if head[COLUMNS_AT::fixed_end] != low * n or head[COLUMNS_AT + 1 :: fixed_end] != high * n:
        return None
    # The event times, little-endian: each header's bytes in reverse order, its first with the sign flipped.
    micros = bytearray(8 * n)
    micros[7::8] = head[::fixed_end].translate(_FLIP_SIGN)
    for k in range(1, 8):
        micros[7 - k :: 8] = head[k::fixed_end]
    # Every row's slots, 8 bytes each: a field's values are the strided items of one view.
    slots = b"".join(map(plan.slot_part, rows))
    eights = memoryview(slots).cast("q")
    fresh = None
    if cutoff is not None:
        times = memoryview(micros).cast("q").tolist()
        if min(times) < cutoff:
            fresh = [t >= cutoff for t in times]
    if fresh is None and is_found is None:
        status = _PRESENT * n
    else:
        codes = [_STATUS_PRESENT] * n
        if fresh is not None:
            codes = [code if ok else _STATUS_EXPIRED for code, ok in zip(codes, fresh, strict=True)]
        if is_found is not None:
            codes = [code if ok else _STATUS_MISSING for code, ok in zip(codes, is_found, strict=True)]
        status = bytes(codes)
    # Expired rows keep their event time and read null features: their flags and sizes are cleared.
    kept = None if fresh is None else int.from_bytes(bytes([255 if ok else 0 for ok in fresh]), "little")
    at = _SLOTS_AT + 8 * width
    key_offsets, key_data = _strings(keys)
    nodes = [n, 0] * (3 + len(plan.columns))
    if is_found is not None:
        nodes[5] = is_found.count(0)
        found = _bitmap(is_found)
    buffers: list[bytes] = [b"", key_offsets, key_data, b"", status, found, bytes(micros)]
    node = 7
    for read, j in plan.columns:
        flags = head[at + j :: fixed_end]
        if kept is not None:
            flags = (int.from_bytes(flags, "little") & kept).to_bytes(n, "little")
        nulls = flags.count(0)
        nodes[node] = nulls
        node += 2
        validity = _bitmap(flags) if nulls else b""
        if read == _INT64 or read == _FLOAT64:
            buffers += (validity, eights[j::width].tobytes())
        elif read == _BINARY:
            sizes = eights[j::width].tolist()
            if fresh is not None:
                sizes = [size if ok else 0 for size, ok in zip(sizes, fresh, strict=True)]
            # Each field's variable parts, sliced out of the rows: a row's parts follow its fixed part in
            # field order.
            before = plan.before[j]
            if not before:
                parts = [v[fixed_end : fixed_end + size] for v, size in zip(rows, sizes, strict=True)]
                data = b"".join(parts)
            else:
                starts = [fixed_end] * n
                for k in before:
                    starts = list(map(add, starts, eights[k::width].tolist()))
                data = b"".join([v[s : s + size] for v, s, size in zip(rows, starts, sizes, strict=True)])
            # A row cut short (or a damaged size) gives parts shorter than their sizes, whose offsets would
            # point past the reply's data: the general path finds what the row holds.
            if len(data) >= 1 << 31 or len(data) != sum(sizes) or (sizes and min(sizes) < 0):
                return None
            offsets = struct.pack(f"<{n + 1}i", *accumulate(sizes, initial=0))
            buffers += (validity, offsets, data)
        elif read == _INT32:
            # An Int32's slot holds it sign-extended: its low four bytes are the value.
            buffers += (validity, memoryview(slots).cast("i")[2 * j :: 2 * width].tobytes())
        elif read == _BOOL:
            # A Bool's 0 or 1 is its slot's low byte.
            buffers += (validity, _bitmap(slots[8 * j :: 8 * width]))
        else:
            floats = np.frombuffer(slots, "<f8")[j::width]
            buffers += (validity, floats.astype("<f4").tobytes())
    # The body: the buffers laid end to end, each padded to 8 bytes, and each one's (offset, length); C
    # loops over the buffers rather than Python steps per buffer.
    lengths = list(map(len, buffers))
    body = buffers + buffers
    body[::2] = buffers
    body[1::2] = map(_PADDING_AFTER.__getitem__, map((7).__and__, lengths))
    ends = list(accumulate(map(len, body), initial=0))
    places = lengths + lengths
    places[::2] = ends[:-1:2]
    places[1::2] = lengths
    return b"".join([plan.schema_message, _message(plan, n, nodes, places, ends[-1]), *body, _END_OF_STREAM])
