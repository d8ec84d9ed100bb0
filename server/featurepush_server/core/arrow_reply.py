"""The Arrow reply of a read of flat fields, written from stored rows' columns without pyarrow per call.

Every row's columns (see `encoding.py`) are taken apart for all rows at once with a few numpy operations:
the fixed parts (header, field count, slots, validity bytes) of all rows are sliced out and read as one
matrix, and each string and bytes field's variable parts are sliced out of the rows and joined. The reply's
record batch is then written as Arrow IPC by hand: its body is the buffers laid end to end, 8-byte
aligned, and its metadata a small flatbuffer whose shape only depends on the number of columns, so no
Array, RecordBatch or IPC writer is built per call. Nested fields, rows stored before a field was added
and entity keys other than one String take the general path (`online.arrow_stream`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter
from typing import cast

import numpy as np

from .framing import HEADER_BYTES
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
# A stored value: the header, the columns' 4-byte length, then the columns' 2-byte field count.
_COLUMNS_AT = HEADER_BYTES + 4
_SLOTS_AT = _COLUMNS_AT + 2
# The header's sign bit, flipped so that byte order is time order.
_SIGN = np.int64(-(1 << 63))
_STATUS_PRESENT, _STATUS_MISSING, _STATUS_EXPIRED = 1, 2, 3
# The status column of a read whose every key is present.
_PRESENT = bytes([_STATUS_PRESENT])
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_CONTINUATION = b"\xff\xff\xff\xff"
# The padding after a buffer, by its length's remainder modulo 8.
_PADDING_AFTER = [bytes(-i % 8) for i in range(8)]
# Arrow's MetadataVersion V5, and RecordBatch's place in the MessageHeader union.
_METADATA_V5 = 4
_HEADER_RECORD_BATCH = 3


@dataclass(frozen=True, eq=False)
class ReplyPlan:
    """How to write one source's Arrow reply from stored columns; None of it changes between reads."""

    width: int
    # Per feature column in reply order: how its values are written, its place among the stored fields
    # (in name order), and its row among its group in `picked`.
    columns: tuple[tuple[int, int, int], ...]
    # The stored fields (in name order) with a variable part.
    varying: np.ndarray
    # Per String and Bytes reply column (in name order), which varying fields come before its variable
    # part in a row: None where none do.
    before: np.ndarray | None
    # The stored fields (in name order) whose slots a read takes, in groups: the Int64, Timestamp and
    # Float64 reply columns, the String and Bytes ones (in name order), then the Int32, Float32 and Bool
    # ones; and where each group ends. Each group is converted and written out for all its columns at once.
    picked: np.ndarray
    ends: tuple[int, int, int, int, int]
    # A stored value of no fields' values, read where a key has none: every field null.
    null_row: bytes
    # A stored value's fixed part, taken from each row by one C call.
    fixed_part: Callable[[bytes], bytes]
    # The two bytes of the field count that every row stored with all of the schema's fields holds.
    count: tuple[bytes, bytes]
    schema_message: bytes

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
        if any(f.dtype.kind not in _READS for f in fields):
            return None
        ordered = sorted(fields, key=lambda f: f.name.encode())
        width = len(ordered)
        place = {f.name: j for j, f in enumerate(ordered)}
        varying = [j for j, f in enumerate(ordered) if _READS[f.dtype.kind] == _BINARY]
        slots = [place[f.name] for f in features]
        reads = [_READS[f.dtype.kind] for f in features]
        used = [j for j in varying if j in slots]
        eights: list[int] = []
        groups: dict[int, list[int]] = {_INT64: eights, _FLOAT64: eights, _INT32: [], _FLOAT32: [], _BOOL: []}
        groups[_BINARY] = used
        columns = []
        for read, j in zip(reads, slots, strict=True):
            group = groups[read]
            if read != _BINARY:
                group.append(j)
            columns.append((read, j, group.index(j)))
        picked = [*eights, *used, *groups[_INT32], *groups[_FLOAT32], *groups[_BOOL]]
        ends = tuple(accumulate(map(len, (eights, used, groups[_INT32], groups[_FLOAT32], groups[_BOOL]))))
        fixed_width = 2 + 9 * width
        # The greatest header: the null row is never expired.
        null_row = b"\xff" * HEADER_BYTES + struct.pack(">IH", fixed_width, 0) + bytes(9 * width)
        null_row = null_row[:_COLUMNS_AT] + struct.pack("<H", width) + null_row[_SLOTS_AT:]
        index = np.int64
        before = np.zeros((len(used), len(varying)), dtype=index)
        for k, j in enumerate(used):
            before[k, : varying.index(j)] = 1
        return cls(
            width,
            tuple(columns),
            np.array(varying, dtype=index),
            before if before.any() else None,
            np.array(picked, dtype=index),
            cast(tuple[int, int, int, int, int], ends),
            null_row,
            itemgetter(slice(None, len(null_row))),
            (bytes([width & 0xFF]), bytes([width >> 8])),
            schema,
        )


def _message(length: int, nodes: list[int], buffers: list[int], body_size: int) -> bytes:
    """The encapsulated RecordBatch message's metadata, with the continuation and length before it."""
    node_bytes = struct.pack(f"<{len(nodes)}q", *nodes)
    buffer_bytes = struct.pack(f"<{len(buffers)}q", *buffers)
    # Written front to back, every offset pointing forward as flatbuffers require; 8-byte values on
    # 8-byte boundaries. Message vtable at 4, Message at 16, RecordBatch vtable at 40, RecordBatch at
    # 56, then the nodes' vector (length at 84) and the buffers' vector.
    nodes_at = 84
    buffers_at = nodes_at + 4 + len(node_bytes) + 4
    head = struct.pack(
        "<I" + "6H" + "iIqhBx4x" + "5H6x" + "iIqI4x" + "4xI",
        16,  # the root table, Message
        12, 20, 16, 18, 4, 8,  # its vtable: version, header_type, header, bodyLength
        12, 56 - 20, body_size, _METADATA_V5, _HEADER_RECORD_BATCH,
        10, 24, 8, 4, 16,  # RecordBatch's vtable: length, nodes, buffers
        16, nodes_at - 60, length, buffers_at - 72,
        len(nodes) // 2,
    )  # fmt: skip
    # Four bytes of padding put the buffers' 8-byte values on 8-byte boundaries.
    meta = b"".join([head, node_bytes, struct.pack("<4xI", len(buffers) // 2), buffer_bytes])
    meta += bytes(-(len(meta) + 8) % 8)
    return _CONTINUATION + struct.pack("<i", len(meta)) + meta


def _strings(values: Sequence[str] | Sequence[bytes]) -> tuple[bytes, bytes]:
    """Arrow offsets and data of strings, given as str or as their UTF-8."""
    raws = cast(Sequence[bytes], values)
    if values and type(values[0]) is str:
        raws = [value.encode() for value in cast(Sequence[str], values)]
    return struct.pack(f"<{len(raws) + 1}i", *accumulate(map(len, raws), initial=0)), b"".join(raws)


def reply_stream(
    plan: ReplyPlan, keys: Sequence[str] | Sequence[bytes], stored: list[bytes | None], cutoff: int | None
) -> bytes | None:
    """The reply's IPC stream for `keys` and their stored values, None where a key has none.

    `keys` are all str or all their UTF-8 bytes. Rows with event times before `cutoff` (microseconds) read
    as expired. None when a stored row lacks fields (stored before they were added): the caller takes the
    general path.
    """
    n, width = len(stored), plan.width
    if not n:
        return None
    is_found = None
    if None in stored:
        is_found = np.fromiter((v is not None for v in stored), dtype=bool, count=n)
        null = plan.null_row
        rows: list[bytes] = [null if v is None else v for v in stored]
    else:
        rows = stored  # type: ignore[assignment]
    # Every row's header, columns' length, field count, slots and validity bytes, one after another; each
    # part is then read for all rows at once through a strided view of these bytes, without copying.
    fixed_end = len(plan.null_row)
    head = b"".join(map(plan.fixed_part, rows))
    if len(head) != n * fixed_end:
        return None
    low, high = plan.count
    if head[_COLUMNS_AT::fixed_end] != low * n or head[_COLUMNS_AT + 1 :: fixed_end] != high * n:
        return None
    micros = np.ndarray((n,), ">i8", head, 0, (fixed_end,)) ^ _SIGN
    at = _SLOTS_AT + 8 * width
    # Per stored field (in name order), its slots of every row.
    columns = np.ascontiguousarray(np.ndarray((width, n), "<i8", head, _SLOTS_AT, (8, fixed_end)))
    valid = np.ndarray((width, n), np.uint8, head, at, (1, fixed_end))
    fresh = None
    if cutoff is not None:
        fresh = micros >= cutoff
        if fresh.all():
            fresh = None
        else:
            # Expired rows keep their event time and read null features.
            valid = valid * fresh
    if fresh is None and is_found is None:
        status = _PRESENT * n
    else:
        codes = np.full(n, _STATUS_PRESENT, dtype=np.int8)
        if fresh is not None:
            codes[~fresh] = _STATUS_EXPIRED
        if is_found is not None:
            codes[~is_found] = _STATUS_MISSING
        status = codes.tobytes()
    bitmaps = None
    if np.count_nonzero(valid) == valid.size:
        nulls = [0] * width
    else:
        nulls = (n - np.count_nonzero(valid, axis=1)).tolist()
        bitmaps = np.packbits(valid, axis=1, bitorder="little")
    # Every slot the reply reads, group after group, in one call.
    eights, used, int32s, float32s, bools = plan.ends
    picked = columns.take(plan.picked, axis=0)
    if used > eights:
        taken = picked[eights:used]
        if fresh is not None:
            taken = taken * fresh
        # Each field's variable parts, sliced out of the rows: for a hundred rows a slice per row costs less
        # than the dozen numpy calls a gather takes. A row's parts follow its fixed part in field order.
        sizes = taken.tolist()
        if plan.before is None:
            datas = [
                b"".join([v[fixed_end : fixed_end + size] for v, size in zip(rows, field_sizes, strict=True)])
                for field_sizes in sizes
            ]
        else:
            part_starts = (plan.before @ columns.take(plan.varying, axis=0) + fixed_end).tolist()
            datas = [
                b"".join(
                    [v[at : at + size] for v, at, size in zip(rows, field_starts, field_sizes, strict=True)]
                )
                for field_starts, field_sizes in zip(part_starts, sizes, strict=True)
            ]
        if max(map(len, datas)) >= 1 << 31:
            return None
        int32s_of_n = f"<{n + 1}i"
        offsets = [struct.pack(int32s_of_n, *accumulate(field_sizes, initial=0)) for field_sizes in sizes]
    # Each group's values for all its columns, converted and written out at once, then cut per column: a
    # slot holds the value's own 8 bytes for int64 and microseconds, or float64; a Bool's 0 or 1 is its
    # slot's low byte.
    eight_bytes = picked[:eights].tobytes()
    values = [(eight_bytes, 8 * n), (eight_bytes, 8 * n), (b"", 0), (b"", 0), (b"", 0)]
    if int32s > used:
        values[_INT32] = (picked[used:int32s].astype("<i4").tobytes(), 4 * n)
    if float32s > int32s:
        values[_FLOAT32] = (picked[int32s:float32s].view("<f8").astype("<f4").tobytes(), 4 * n)
    if bools > float32s:
        packed = np.packbits(picked[float32s:bools].view(np.uint8)[:, ::8], axis=1, bitorder="little")
        values[_BOOL] = (packed.tobytes(), (n + 7) // 8)
    key_offsets, key_data = _strings(keys)
    # Each column's node: its length and null count.
    nodes = [n, 0] * (3 + len(plan.columns))
    if bitmaps is not None:
        nodes[7::2] = [nulls[j] for _, j, _ in plan.columns]
    found = b""
    if is_found is not None:
        nodes[5] = n - int(np.count_nonzero(is_found))
        found = np.packbits(is_found, bitorder="little").tobytes()
    buffers: list[bytes] = [b"", key_offsets, key_data, b"", status, found, micros.tobytes()]
    for read, j, row in plan.columns:
        validity = b"" if bitmaps is None or not nulls[j] else bitmaps[j].tobytes()
        if read == _BINARY:
            buffers += (validity, offsets[row], datas[row])
        else:
            data, size = values[read]
            buffers += (validity, data[size * row : size * (row + 1)])
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
    return b"".join([plan.schema_message, _message(n, nodes, places, ends[-1]), *body, _END_OF_STREAM])
