"""The Arrow reply of a read of flat fields, written from stored rows' columns without pyarrow per call.

Every row's columns (see `encoding.py`) are taken apart for all rows at once with a few numpy operations:
the fixed parts (header, field count, slots, validity bytes) of all rows are sliced out and read as one
matrix, and the variable parts of every string and bytes field come out of one gather. The reply's
record batch is then written as Arrow IPC by hand: its body is the buffers laid end to end, 8-byte
aligned, and its metadata a small flatbuffer whose shape only depends on the number of columns, so no
Array, RecordBatch or IPC writer is built per call. Nested fields, rows stored before a field was added
and entity keys other than one String take the general path (`online.arrow_stream`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

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
_SIGN = np.uint64(1 << 63)
_STATUS_PRESENT, _STATUS_MISSING, _STATUS_EXPIRED = 1, 2, 3
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_CONTINUATION = b"\xff\xff\xff\xff"
_PADDING = [bytes(i) for i in range(8)]
_ZERO_OFFSET = bytes(4)
# Arrow's MetadataVersion V5, and RecordBatch's place in the MessageHeader union.
_METADATA_V5 = 4
_HEADER_RECORD_BATCH = 3


@dataclass(frozen=True, eq=False)
class ReplyPlan:
    """How to write one source's Arrow reply from stored columns; None of it changes between reads."""

    width: int
    reads: tuple[int, ...]
    # Per feature column in reply order, its place among the stored fields (in name order).
    slots: tuple[int, ...]
    # The stored fields (in name order) with a variable part, and those of them that are reply columns.
    varying: np.ndarray
    used: np.ndarray
    # Per feature column, its place among `used`, or -1 for a fixed-width one.
    parts: tuple[int, ...]
    # A stored value of no fields' values, read where a key has none: every field null.
    null_row: bytes
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
        slots = tuple(place[f.name] for f in features)
        used = [k for k, j in enumerate(varying) if j in slots]
        parts = tuple(used.index(varying.index(j)) if j in varying else -1 for j in slots)
        reads = tuple(_READS[f.dtype.kind] for f in features)
        fixed_width = 2 + 9 * width
        # The greatest header: the null row is never expired.
        null_row = b"\xff" * HEADER_BYTES + struct.pack(">IH", fixed_width, 0) + bytes(9 * width)
        null_row = null_row[:_COLUMNS_AT] + struct.pack("<H", width) + null_row[_SLOTS_AT:]
        return cls(
            width,
            reads,
            slots,
            np.array(varying, dtype=np.int64),
            np.array(used, dtype=np.int64),
            parts,
            null_row,
            schema,
        )


class _Body:
    """An IPC body being laid out: buffers 8-byte aligned, with their (offset, length) and the nodes."""

    __slots__ = ("buffers", "nodes", "pieces", "size")

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.buffers: list[int] = []
        self.nodes: list[int] = []
        self.size = 0

    def add(self, data: bytes) -> None:
        length = len(data)
        self.buffers += (self.size, length)
        if length:
            self.pieces.append(data)
            pad = -length % 8
            if pad:
                self.pieces.append(_PADDING[pad])
            self.size += length + pad

    def node(self, length: int, nulls: int) -> None:
        self.nodes += (length, nulls)


def _message(length: int, body: _Body) -> list[bytes]:
    """The encapsulated RecordBatch message's parts: continuation, metadata length, metadata, body."""
    nodes = struct.pack(f"<{len(body.nodes)}q", *body.nodes)
    buffers = struct.pack(f"<{len(body.buffers)}q", *body.buffers)
    # Written front to back, every offset pointing forward as flatbuffers require; 8-byte values on
    # 8-byte boundaries. Message vtable at 4, Message at 16, RecordBatch vtable at 40, RecordBatch at
    # 56, then the nodes' vector (length at 84) and the buffers' vector.
    nodes_at = 84
    buffers_at = nodes_at + 4 + len(nodes) + 4
    head = struct.pack(
        "<I" + "6H" + "iIqhBx4x" + "5H6x" + "iIqI4x" + "4xI",
        16,  # the root table, Message
        12, 20, 16, 18, 4, 8,  # its vtable: version, header_type, header, bodyLength
        12, 56 - 20, body.size, _METADATA_V5, _HEADER_RECORD_BATCH,
        10, 24, 8, 4, 16,  # RecordBatch's vtable: length, nodes, buffers
        16, nodes_at - 60, length, buffers_at - 72,
        len(body.nodes) // 2,
    )  # fmt: skip
    meta = head + nodes + b"\x00\x00\x00\x00" + struct.pack("<I", len(body.buffers) // 2) + buffers
    meta += bytes(-(len(meta) + 8) % 8)
    return [_CONTINUATION, struct.pack("<i", len(meta)), meta, *body.pieces]


def _strings(values: Sequence[str]) -> tuple[np.ndarray, bytes]:
    """Arrow offsets and UTF-8 data of strings."""
    text = "".join(values)
    data = text.encode()
    if len(data) == len(text):
        # ASCII: each string's byte length is its length.
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    else:
        encoded = [v.encode() for v in values]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype="<i4")
    np.cumsum(lengths, out=offsets[1:])
    return offsets, data


def reply_stream(
    plan: ReplyPlan, keys: Sequence[str], stored: list[bytes | None], cutoff: int | None
) -> bytes | None:
    """The reply's IPC stream for `keys` and their stored values, None where a key has none.

    Rows with event times before `cutoff` (microseconds) read as expired. None when a stored row lacks
    fields (stored before they were added): the caller takes the general path.
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
    # Every row's header, columns' length, field count, slots and validity bytes, one row per stored value.
    fixed_end = len(plan.null_row)
    head = b"".join([v[:fixed_end] for v in rows])
    if len(head) != n * fixed_end:
        return None
    fixed = np.frombuffer(head, dtype=np.uint8).reshape(n, fixed_end)
    if (fixed[:, _COLUMNS_AT:_SLOTS_AT].view("<u2") != width).any():
        return None
    micros = (fixed[:, :HEADER_BYTES].view(">u8")[:, 0] ^ _SIGN).view(np.int64)
    at = _SLOTS_AT + 8 * width
    columns = np.ascontiguousarray(np.ascontiguousarray(fixed[:, _SLOTS_AT:at]).view("<i8").T)
    valid = fixed[:, at:]
    status = np.full(n, _STATUS_PRESENT, dtype=np.int8)
    fresh = None
    if cutoff is not None:
        fresh = micros >= cutoff
        if fresh.all():
            fresh = None
        else:
            # Expired rows keep their event time and read null features.
            valid = valid * fresh[:, None]
            status[~fresh] = _STATUS_EXPIRED
    if is_found is not None:
        status[~is_found] = _STATUS_MISSING
    bitmaps = None
    if valid.all():
        nulls = np.zeros(width, dtype=np.int64)
    else:
        nulls = n - np.count_nonzero(valid, axis=0)
        bitmaps = np.packbits(valid.T, axis=1, bitorder="little")
    if len(plan.used):
        blob = np.frombuffer(b"".join(rows), dtype=np.uint8)
        row_sizes = np.fromiter(map(len, rows), dtype=np.int64, count=n)
        sizes = columns[plan.varying]
        # Each row's variable parts follow its fixed part, one after another in field order.
        part_starts = (np.cumsum(row_sizes) - row_sizes + fixed_end) + np.cumsum(sizes, axis=0) - sizes
        taken = sizes[plan.used]
        if fresh is not None:
            taken *= fresh
        # Every variable part of every reply field in one gather, field after field, row after row.
        lengths = taken.ravel()
        ends = np.cumsum(lengths)
        if ends[-1] >= 1 << 31:
            return None
        data = blob[
            np.repeat(part_starts[plan.used].ravel() - (ends - lengths), lengths) + np.arange(ends[-1])
        ]
        ends = ends.reshape(taken.shape)
        # Each field's offsets start at zero: its ends less where its first part starts.
        firsts = ends[:, 0] - taken[:, 0]
        offsets = (ends - firsts[:, None]).astype("<i4")
    body = _Body()
    key_offsets, key_data = _strings(keys)
    body.node(n, 0)
    body.add(b"")
    body.add(key_offsets.tobytes())
    body.add(key_data)
    body.node(n, 0)
    body.add(b"")
    body.add(status.tobytes())
    if is_found is None:
        body.node(n, 0)
        body.add(b"")
    else:
        body.node(n, n - int(np.count_nonzero(is_found)))
        body.add(np.packbits(is_found, bitorder="little").tobytes())
    body.add(micros.tobytes())
    for read, j, k in zip(plan.reads, plan.slots, plan.parts, strict=True):
        null_count = int(nulls[j])
        body.node(n, null_count)
        body.add(bitmaps[j].tobytes() if bitmaps is not None and null_count else b"")
        if read == _INT64 or read == _FLOAT64:
            # A slot holds the value's own 8 bytes: int64 and microseconds, or float64.
            body.add(columns[j].tobytes())
        elif read == _INT32:
            body.add(columns[j].astype("<i4").tobytes())
        elif read == _FLOAT32:
            body.add(columns[j].view("<f8").astype("<f4").tobytes())
        elif read == _BOOL:
            body.add(np.packbits(columns[j] != 0, bitorder="little").tobytes())
        else:
            first, last = int(firsts[k]), int(ends[k, -1])
            body.add(_ZERO_OFFSET + offsets[k].tobytes())
            body.add(data[first:last].tobytes())
    return b"".join([plan.schema_message, *_message(n, body), _END_OF_STREAM])
