"""Push rows (google.protobuf.Struct) read column by column straight from their wire bytes.

A push of many JSON-like rows usually repeats one layout: the same keys in the same order, each with a
value of the same form (number, string or bool). Reading such rows through protobuf objects costs a map
lookup and an attribute read per value; here each key's values of all rows are taken from the bytes with
a few numpy operations. Row 0 gives the layout (its keys, their forms and every fixed byte); every row
must then match it byte for byte outside its values, and strings must be valid UTF-8, so a row read here
is a well-formed Struct whose parse would give the same values. Anything else (another key order, a
null, a nested value, a long varint, unknown fields) is declined and the rows are parsed as messages.

The wire form of a Struct row: map entries `0x0A len (0x0A len key) (0x12 len value)`, and a value one of
`0x11 <8-byte little-endian double>`, `0x1A len <UTF-8>` or `0x20 <0 or 1>` (the tags are wire.py's).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from google.protobuf import struct_pb2

from .wire import STRUCT_ENTRY_KEY, STRUCT_ENTRY_VALUE, STRUCT_FIELD, VALUE_BOOL, VALUE_NUMBER, VALUE_STRING

NUMBER, STRING, BOOL = "number_value", "string_value", "bool_value"
_VALUE_TAGS = {VALUE_NUMBER[0]: NUMBER, VALUE_STRING[0]: STRING, VALUE_BOOL[0]: BOOL}
# Rows read at once: about 1 KiB of index arrays per row and field of a long key is live during a read.
CHUNK_ROWS = 16_384
_FIELD, _VALUE, _STRING = STRUCT_FIELD[0], STRUCT_ENTRY_VALUE[0], VALUE_STRING[0]


@dataclass(frozen=True)
class WireColumns:
    """Each key's values in all rows: float64 numbers, an Arrow string array, or bools, with their form."""

    forms: dict[str, str]
    values: dict[str, np.ndarray | pa.Array]


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """A varint of at most two bytes at `at` and the position after it; (-1, at) if longer."""
    b0 = data[at] if at < len(data) else 0
    if b0 < 0x80:
        return b0, at + 1
    b1 = data[at + 1] if at + 1 < len(data) else 0x80
    if b1 >= 0x80:
        return -1, at
    return (b0 & 0x7F) | (b1 << 7), at + 2


@dataclass(frozen=True)
class _Entry:
    """One map entry of row 0: its key, its value's form and the bytes every row repeats around the value."""

    key: bytes
    form: str
    # For a number or bool, the whole entry up to its payload (the lengths are fixed); for a string, the
    # bytes between the entry's length and the value's length: 0x0A, key length, key, 0x12.
    template: bytes


def _layout(row: bytes) -> list[_Entry] | None:
    """Row 0's entries, or None when its layout is not one read here."""
    entries: list[_Entry] = []
    at = 0
    while at < len(row):
        start = at
        if row[at] != _FIELD:
            return None
        size, body = _varint(row, at + 1)
        end = body + size
        if size < 0 or end > len(row) or row[body : body + 1] != STRUCT_ENTRY_KEY:
            return None
        key_size = row[body + 1] if body + 1 < end else 0x80
        key_at = body + 2
        if key_size >= 0x80 or key_at + key_size + 2 > end or row[key_at + key_size] != _VALUE:
            return None
        key = row[key_at : key_at + key_size]
        value_size, value_at = _varint(row, key_at + key_size + 1)
        if value_size < 1 or value_at + value_size != end:
            return None
        form = _VALUE_TAGS.get(row[value_at])
        if form == NUMBER and value_size == 9:
            template = row[start : value_at + 1]
        elif form == BOOL and value_size == 2:
            template = row[start : value_at + 1]
        elif form == STRING:
            template = row[body : key_at + key_size + 1]
        else:
            return None
        entries.append(_Entry(key, form, template))
        at = end
    keys = [e.key for e in entries]
    if not entries or len(set(keys)) != len(keys):
        return None
    try:
        for key in keys:
            key.decode()
    except UnicodeDecodeError:
        return None
    return entries


def _take(buf: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Bytes at positions, as int64; positions past the end read the last byte (the checks catch them)."""
    return np.take(buf, at, mode="clip").astype(np.int64)


def _read_varint(buf: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Varints of at most two bytes at each position: values, positions after them, and whether all fit."""
    b0 = _take(buf, at)
    b1 = _take(buf, at + 1)
    two = b0 >= 0x80
    fits = not bool((two & (b1 >= 0x80)).any())
    return np.where(two, (b0 & 0x7F) | (b1 << 7), b0), at + 1 + two, fits


def read_columns(rows: Sequence[bytes], chunk: int = CHUNK_ROWS) -> WireColumns | None:
    """The rows' values by key when every row has row 0's layout; None otherwise (parse them instead).

    Rows are read `chunk` at a time, so the index arrays a read builds (several per row and field) stay
    bounded however many rows a request carries.
    """
    if len(rows) == 0:
        return None
    entries = _layout(rows[0])
    if entries is None:
        return None
    parts: list[dict[str, np.ndarray | pa.Array]] = []
    for start in range(0, len(rows), chunk):
        part = _read_chunk(rows[start : start + chunk], entries)
        if part is None:
            return None
        parts.append(part)
    forms = {e.key.decode(): e.form for e in entries}
    if len(parts) == 1:
        return WireColumns(forms, parts[0])
    values: dict[str, np.ndarray | pa.Array] = {}
    for name, form in forms.items():
        pieces = [part[name] for part in parts]
        values[name] = pa.concat_arrays(pieces) if form == STRING else np.concatenate(pieces)
    return WireColumns(forms, values)


def _read_chunk(rows: Sequence[bytes], entries: list[_Entry]) -> dict[str, np.ndarray | pa.Array] | None:
    """The values by key of rows that all have the layout `entries`; None if one does not."""
    n = len(rows)
    sizes = np.fromiter(map(len, rows), dtype=np.int64, count=n)
    ends = np.cumsum(sizes)
    buf = np.frombuffer(b"".join(rows), dtype=np.uint8)
    at = ends - sizes
    values: dict[str, np.ndarray | pa.Array] = {}
    last = len(buf) - 1
    for entry in entries:
        name = entry.key.decode()
        template = np.frombuffer(entry.template, dtype=np.uint8)
        if entry.form != STRING:
            # Fixed bytes, then an 8-byte double or a 1-byte bool.
            width = len(template)
            if not (buf[np.minimum(at[:, None] + np.arange(width), last)] == template).all():
                return None
            payload = at + width
            if entry.form == NUMBER:
                raw = np.take(buf, payload[:, None] + np.arange(8), mode="clip")
                values[name] = raw.view("<f8").reshape(n)
                at = payload + 8
            else:
                flags = np.take(buf, payload, mode="clip")
                if not (flags <= 1).all():
                    return None
                values[name] = flags.astype(bool)
                at = payload + 1
            continue
        # 0x0A, entry length, [0x0A, key length, key, 0x12], value length, 0x1A, string length, string.
        entry_size, body, fits_entry = _read_varint(buf, at + 1)
        fixed = body[:, None] + np.arange(len(template))
        value_size, value_at, fits_value = _read_varint(buf, body + len(template))
        text_size, text_at, fits_text = _read_varint(buf, value_at + 1)
        end = body + entry_size
        if not (
            fits_entry
            and fits_value
            and fits_text
            and (_take(buf, at) == _FIELD).all()
            and (np.take(buf, fixed, mode="clip") == template).all()
            and (_take(buf, value_at) == _STRING).all()
            and (value_at + value_size == end).all()
            and (text_at + text_size == end).all()
            and (end <= ends).all()
        ):
            return None
        # The strings lie in order in the rows' bytes with gaps between them: as the even elements of a
        # binary array over those bytes they are copied out by one take, no index per byte.
        bounds = np.empty(2 * n, dtype=np.int64)
        bounds[0::2] = text_at
        bounds[1::2] = end
        if bounds[-1] >= 1 << 31 or not (np.diff(bounds) >= 0).all():
            return None
        pieces = pa.Array.from_buffers(
            pa.binary(), 2 * n - 1, [None, pa.py_buffer(bounds.astype(np.int32)), pa.py_buffer(buf)]
        )
        text = pieces.take(pa.array(np.arange(0, 2 * n, 2))).view(pa.string())
        try:
            text.validate(full=True)  # UTF-8, as protobuf's parser demands of a string
        except pa.ArrowInvalid:
            return None
        values[name] = text
        at = end
    if not (at == ends).all():
        return None
    return values


class WireRows(Sequence[struct_pb2.Struct]):
    """A push's rows kept as their wire bytes, with their columns when read_columns takes them.

    Without columns the rows are parsed at once (a malformed one raises protobuf's DecodeError, as the
    request's parse would have); with them, only when a caller looks at a row. With `deferred`, nothing
    is read until `load()`, which raises that DecodeError then: a push stream reads its next batches in
    one thread and writes in another, and the reading is left to the writing thread, where it does not
    contend with the write for the interpreter.
    """

    def __init__(self, raw: Sequence[bytes], *, min_rows: int = 0, deferred: bool = False):
        self.raw = raw
        self._min_rows = min_rows
        self.columns: WireColumns | None = None
        self._parsed: list[struct_pb2.Struct] | None = None
        self._loaded = False
        if not deferred:
            self.load()

    def load(self) -> None:
        """Read the columns, or parse the rows where there are none; protobuf's DecodeError for a bad row."""
        if self._loaded:
            return
        self.columns = read_columns(self.raw) if len(self.raw) > self._min_rows else None
        if self.columns is None:
            self._parse()
        self._loaded = True

    def _parse(self) -> list[struct_pb2.Struct]:
        if self._parsed is None:
            self._parsed = [struct_pb2.Struct.FromString(row) for row in self.raw]
        return self._parsed

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: Any) -> Any:
        return self._parse()[index]

    def __iter__(self) -> Iterator[struct_pb2.Struct]:
        return iter(self._parse())
