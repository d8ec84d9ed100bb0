"""The Arrow reply of a read of flat fields, written from stored rows' columns without pyarrow per call.

Every row's columns (see `encoding.py`) are taken apart for all rows at once with a few numpy operations:
one gather for the slots, one for the validity bytes and one for the variable parts of every string and
bytes field. The reply's record batch is then written as Arrow IPC by hand: its body is the buffers laid
end to end, 8-byte aligned, and its metadata a small flatbuffer whose shape only depends on the number
of columns, so no Array, RecordBatch or IPC writer is built per call. Nested fields, rows stored before
a field was added and entity keys other than one string take the general path in `online.py`.
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
# Arrow's MetadataVersion V5, and RecordBatch's place in the MessageHeader union.
_METADATA_V5 = 4
_HEADER_RECORD_BATCH = 3


@dataclass(frozen=True)
class ReplyPlan:
    """How to write one source's Arrow reply from stored columns; None of it changes between reads."""

    width: int
    reads: tuple[int, ...]
    # Per feature column in reply order, its place among the stored fields (in name order).
    slots: tuple[int, ...]
    # Per stored field with a variable part (in name order), its place among the stored fields.
    varying: tuple[int, ...]
    # Per feature column, its place among `varying`, or -1 for a fixed-width one.
    parts: tuple[int, ...]
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
        place = {f.name: j for j, f in enumerate(ordered)}
        varying = tuple(j for j, f in enumerate(ordered) if _READS[f.dtype.kind] == _BINARY)
        slots = tuple(place[f.name] for f in features)
        parts = tuple(varying.index(j) if j in varying else -1 for j in slots)
        reads = tuple(_READS[f.dtype.kind] for f in features)
        return cls(len(ordered), reads, slots, varying, parts, schema)


class _Body:
    """An IPC body being laid out: buffers 8-byte aligned, with their (offset, length) and the nodes."""

    __slots__ = ("buffers", "nodes", "pieces", "size")

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.buffers: list[int] = []
        self.nodes: list[int] = []
        self.size = 0

    def add(self, data: bytes | np.ndarray) -> None:
        length = data.nbytes if isinstance(data, np.ndarray) else len(data)
        self.buffers += (self.size, length)
        if length:
            self.pieces.append(data.tobytes() if isinstance(data, np.ndarray) else data)
            pad = -length % 8
            if pad:
                self.pieces.append(bytes(pad))
            self.size += length + pad

    def node(self, length: int, nulls: int) -> None:
        self.nodes += (length, nulls)


def _message(length: int, body: _Body) -> bytes:
    """The encapsulated RecordBatch message: continuation, metadata length, flatbuffer metadata, body."""
    nodes = np.array(body.nodes, dtype="<i8").tobytes()
    buffers = np.array(body.buffers, dtype="<i8").tobytes()
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
    return b"".join([_CONTINUATION, struct.pack("<i", len(meta)), meta, *body.pieces])


def _strings(values: Sequence[bytes]) -> tuple[np.ndarray, bytes]:
    """Arrow offsets and data of byte strings."""
    offsets = np.zeros(len(values) + 1, dtype="<i4")
    np.cumsum(np.fromiter(map(len, values), dtype=np.int64, count=len(values)), out=offsets[1:])
    return offsets, b"".join(values)


def reply_stream(
    plan: ReplyPlan, keys: Sequence[bytes], stored: Sequence[bytes | None], cutoff: int | None
) -> bytes | None:
    """The reply's IPC stream, or None when a stored row lacks fields (stored before they were added)."""
    n = len(stored)
    found = [v for v in stored if v is not None]
    is_found = None if len(found) == n else np.fromiter((v is not None for v in stored), dtype=bool, count=n)
    m, width = len(found), plan.width
    fixed_width = 2 + 9 * width
    blob = np.frombuffer(b"".join(found), dtype=np.uint8)
    sizes = np.fromiter(map(len, found), dtype=np.int64, count=m)
    starts = np.zeros(m, dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    if m:
        if (sizes < _COLUMNS_AT + fixed_width).any():
            return None
        head = blob[starts[:, None] + np.arange(_SLOTS_AT)]
        if (head[:, _COLUMNS_AT:].copy().view("<u2").ravel() != width).any():
            return None
    else:
        head = np.zeros((0, _SLOTS_AT), dtype=np.uint8)
    micros = (head[:, :HEADER_BYTES].copy().view(">u8").ravel() ^ _SIGN).astype(np.uint64).view(np.int64)
    slots = blob[(starts + _SLOTS_AT)[:, None] + np.arange(8 * width)].view("<i8")
    valid = blob[(starts + _SLOTS_AT + 8 * width)[:, None] + np.arange(width)]
    fresh = None if cutoff is None else micros >= cutoff
    if fresh is not None and fresh.all():
        fresh = None
    if fresh is not None:
        # Expired rows keep their event time and read null features.
        valid = valid * fresh[:, None]
    if plan.varying:
        part_sizes = slots[:, plan.varying]
        # Each row's variable parts follow its fixed part, one after another in field order.
        part_starts = (
            (starts + _COLUMNS_AT + fixed_width)[:, None] + np.cumsum(part_sizes, axis=1) - part_sizes
        )
        taken = part_sizes if fresh is None else part_sizes * fresh[:, None]
    status = np.full(n, _STATUS_PRESENT, dtype=np.int8)
    if fresh is not None:
        status_found = np.where(fresh, _STATUS_PRESENT, _STATUS_EXPIRED).astype(np.int8)
    if is_found is not None:
        # Rows without a stored value read as zero-length, all-null rows.
        status[:] = _STATUS_MISSING
        status[is_found] = _STATUS_PRESENT if fresh is None else status_found
        spread = np.zeros(n, dtype=np.int64)
        spread[is_found] = micros
        micros = spread
        spread_slots = np.zeros((n, width), dtype=np.int64)
        spread_slots[is_found] = slots
        slots = spread_slots
        spread_valid = np.zeros((n, width), dtype=np.uint8)
        spread_valid[is_found] = valid
        valid = spread_valid
        if plan.varying:
            spread_starts = np.zeros((n, len(plan.varying)), dtype=np.int64)
            spread_starts[is_found] = part_starts
            part_starts = spread_starts
            spread_taken = np.zeros((n, len(plan.varying)), dtype=np.int64)
            spread_taken[is_found] = taken
            taken = spread_taken
    elif fresh is not None:
        status[:] = status_found
    columns = np.ascontiguousarray(slots.T)
    nulls = n - np.count_nonzero(valid, axis=0)
    bitmaps = np.packbits(valid.T, axis=1, bitorder="little")
    if plan.varying:
        # Every variable part of every field in one gather, field after field, row after row.
        lengths = np.ascontiguousarray(taken.T).ravel()
        ends = np.cumsum(lengths)
        data = blob[
            np.repeat(part_starts.T.ravel() - (ends - lengths), lengths) + np.arange(ends[-1] if n else 0)
        ]
        ends = ends.reshape(len(plan.varying), n)
        if n and ends[-1, -1] >= 1 << 31:
            return None
    body = _Body()
    key_offsets, key_data = _strings(keys)
    body.node(n, 0)
    body.add(b"")
    body.add(key_offsets)
    body.add(key_data)
    body.node(n, 0)
    body.add(b"")
    body.add(status)
    if is_found is None:
        body.node(n, 0)
        body.add(b"")
    else:
        body.node(n, n - m)
        body.add(np.packbits(is_found, bitorder="little"))
    body.add(micros)
    for read, j, k in zip(plan.reads, plan.slots, plan.parts, strict=True):
        null_count = int(nulls[j])
        body.node(n, null_count)
        body.add(bitmaps[j] if null_count else b"")
        if read == _INT64 or read == _FLOAT64:
            # A slot holds the value's own 8 bytes: int64 and microseconds, or float64.
            body.add(columns[j])
        elif read == _INT32:
            body.add(columns[j].astype("<i4"))
        elif read == _FLOAT32:
            body.add(columns[j].view("<f8").astype("<f4"))
        elif read == _BOOL:
            body.add(np.packbits(columns[j] != 0, bitorder="little"))
        else:
            first = int(ends[k, 0] - taken[0, k]) if n else 0
            offsets = np.zeros(n + 1, dtype="<i4")
            offsets[1:] = ends[k] - first
            body.add(offsets)
            body.add(data[first : first + int(offsets[-1])])
    return b"".join([plan.schema_message, _message(n, body), _END_OF_STREAM])
