"""Every protobuf tag the server writes or reads by hand, named by message and field.

Stored rows, GetFeatures replies and ReadBatchSource replies are assembled from bytes rather than through
the generated classes, for speed, and the common GetFeatures request is read back from its bytes. The tags
they use live here and nowhere else; `TAGS` names the field behind each, and a test checks each one
against the generated descriptors (field number and wire type).
"""

from __future__ import annotations

from typing import NamedTuple

from featurepush.v1 import online_service_pb2

# GetFeaturesResponse.results (1, length-delimited): one FeatureVector.
GET_FEATURES_RESULT = b"\x0a"
# GetFeaturesResponse.arrow_ipc (2, length-delimited): the vectors as an Arrow IPC stream.
GET_FEATURES_ARROW_IPC = b"\x12"
# FeatureVector.status (1, varint), .event_time (2, length-delimited) and .features (3, length-delimited).
FEATURE_VECTOR_STATUS = b"\x08"
FEATURE_VECTOR_EVENT_TIME = b"\x12"
FEATURE_VECTOR_FEATURES = b"\x1a"
# google.protobuf.Timestamp.seconds (1, varint) and .nanos (2, varint).
TIMESTAMP_SECONDS = b"\x08"
TIMESTAMP_NANOS = b"\x10"
# google.protobuf.Struct.fields (1, length-delimited): one map entry, key (1) then value (2).
STRUCT_FIELD = b"\x0a"
STRUCT_ENTRY_KEY = b"\x0a"
STRUCT_ENTRY_VALUE = b"\x12"
# google.protobuf.Value: null_value (1, varint), number_value (2, fixed64), string_value (3,
# length-delimited), bool_value (4, varint).
VALUE_NULL = b"\x08"
VALUE_NUMBER = b"\x11"
VALUE_STRING = b"\x1a"
VALUE_BOOL = b"\x20"
# GetFeaturesRequest.source (1) and .keys (2), both length-delimited, and .response_format (3, varint).
GET_FEATURES_SOURCE = b"\x0a"
GET_FEATURES_KEYS = b"\x12"
GET_FEATURES_FORMAT = b"\x18"
# GetViewFeaturesRequest.keys (3), length-delimited.
VIEW_REQUEST_KEYS = b"\x1a"
# GetViewFeaturesResponse.results (2), ViewFeatureVector.values (1), and ViewFeatureValue.status (1,
# varint), .value (2) and .effective_time (3); the others length-delimited.
VIEW_FEATURES_RESULT = b"\x12"
VIEW_VECTOR_VALUE = b"\x0a"
VIEW_VALUE_STATUS = b"\x08"
VIEW_VALUE_VALUE = b"\x12"
VIEW_VALUE_EFFECTIVE_TIME = b"\x1a"
# GetViewFeaturesResponse.arrow_ipc (3), bytes.
VIEW_FEATURES_ARROW_IPC = b"\x1a"
# ReadBatchSourceResponse.arrow_schema (1) and .arrow_record_batch (2), both bytes.
READ_BATCH_SCHEMA = b"\x0a"
READ_BATCH_RECORD_BATCH = b"\x12"

# Each tag's message (full name) and field, for the check against the descriptors.
TAGS: dict[str, tuple[str, str]] = {
    "GET_FEATURES_RESULT": ("featurepush.v1.GetFeaturesResponse", "results"),
    "GET_FEATURES_ARROW_IPC": ("featurepush.v1.GetFeaturesResponse", "arrow_ipc"),
    "FEATURE_VECTOR_STATUS": ("featurepush.v1.FeatureVector", "status"),
    "FEATURE_VECTOR_EVENT_TIME": ("featurepush.v1.FeatureVector", "event_time"),
    "FEATURE_VECTOR_FEATURES": ("featurepush.v1.FeatureVector", "features"),
    "TIMESTAMP_SECONDS": ("google.protobuf.Timestamp", "seconds"),
    "TIMESTAMP_NANOS": ("google.protobuf.Timestamp", "nanos"),
    "STRUCT_FIELD": ("google.protobuf.Struct", "fields"),
    "STRUCT_ENTRY_KEY": ("google.protobuf.Struct.FieldsEntry", "key"),
    "STRUCT_ENTRY_VALUE": ("google.protobuf.Struct.FieldsEntry", "value"),
    "VALUE_NULL": ("google.protobuf.Value", "null_value"),
    "VALUE_NUMBER": ("google.protobuf.Value", "number_value"),
    "VALUE_STRING": ("google.protobuf.Value", "string_value"),
    "VALUE_BOOL": ("google.protobuf.Value", "bool_value"),
    "GET_FEATURES_SOURCE": ("featurepush.v1.GetFeaturesRequest", "source"),
    "GET_FEATURES_KEYS": ("featurepush.v1.GetFeaturesRequest", "keys"),
    "GET_FEATURES_FORMAT": ("featurepush.v1.GetFeaturesRequest", "response_format"),
    "VIEW_REQUEST_KEYS": ("featurepush.v1.GetViewFeaturesRequest", "keys"),
    "VIEW_FEATURES_RESULT": ("featurepush.v1.GetViewFeaturesResponse", "results"),
    "VIEW_FEATURES_ARROW_IPC": ("featurepush.v1.GetViewFeaturesResponse", "arrow_ipc"),
    "VIEW_VECTOR_VALUE": ("featurepush.v1.ViewFeatureVector", "values"),
    "VIEW_VALUE_STATUS": ("featurepush.v1.ViewFeatureValue", "status"),
    "VIEW_VALUE_VALUE": ("featurepush.v1.ViewFeatureValue", "value"),
    "VIEW_VALUE_EFFECTIVE_TIME": ("featurepush.v1.ViewFeatureValue", "effective_time"),
    "READ_BATCH_SCHEMA": ("featurepush.v1.ReadBatchSourceResponse", "arrow_schema"),
    "READ_BATCH_RECORD_BATCH": ("featurepush.v1.ReadBatchSourceResponse", "arrow_record_batch"),
}


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Lengths of fields and records are nearly always below 2**14: look those up instead of computing them.
_SMALL_VARINTS = [_varint(n) for n in range(1 << 14)]
# The low 14 bits of a larger number: two bytes, both with the continuation bit set.
_LOW_14 = [bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80)) for n in range(1 << 14)]


def varint(n: int) -> bytes:
    """The protobuf varint of a non-negative integer."""
    if n < 16384:
        return _SMALL_VARINTS[n]
    return _LOW_14[n & 0x3FFF] + varint(n >> 14)


def _string_key_prefix(tag: bytes, name: bytes, size: int) -> bytes:
    """The bytes of a request's key {name: <string of `size` bytes>}, in field `tag`, before the string."""
    value = VALUE_STRING + varint(size)
    entry = (
        STRUCT_ENTRY_KEY + varint(len(name)) + name + STRUCT_ENTRY_VALUE + varint(len(value) + size) + value
    )
    struct = STRUCT_FIELD + varint(len(entry) + size) + entry
    return tag + varint(len(struct) + size) + struct


# Per keys field and entity key name, the prefix of each key of up to _SHORT_KEY bytes by its length.
_SHORT_KEY = 100
_PREFIXES: dict[tuple[bytes, str], list[bytes]] = {}


def _prefixes(tag: bytes, name: str) -> list[bytes]:
    found = _PREFIXES.get((tag, name))
    if found is None:
        raw = name.encode()
        if len(_PREFIXES) >= 1024:
            _PREFIXES.clear()
        found = _PREFIXES[tag, name] = [_string_key_prefix(tag, raw, size) for size in range(_SHORT_KEY)]
    return found


def single_string_keys(serialized: bytes, source: str, response_format: int, name: str) -> list[bytes] | None:
    """The keys of a serialized GetFeaturesRequest as UTF-8, where every key is {name: <a short string>}.

    `serialized` is the request as protobuf serializes it (fields in number order), with `source` and
    `response_format`. None when the request holds anything else (another key field, a non-string
    value, a long key, unknown fields): the caller then reads the parsed keys.
    """
    raw_source = source.encode()
    head = GET_FEATURES_SOURCE + varint(len(raw_source)) + raw_source if source else b""
    tail = GET_FEATURES_FORMAT + varint(response_format) if response_format else b""
    return string_keys_between(serialized, head, GET_FEATURES_KEYS, tail, name)


def string_keys_between(
    serialized: bytes, head: bytes, tag: bytes, tail: bytes, name: str
) -> list[bytes] | None:
    """The keys (Structs in field `tag`) of a serialized request that is `head`, the keys, then `tail`.

    Each key must be {name: <a string shorter than 100 bytes>}, its name also shorter than 100 bytes; the
    UTF-8 of each comes back, or None when the request holds anything else (the caller then reads the
    parsed keys).
    """
    if len(name) >= _SHORT_KEY or len(name.encode()) >= _SHORT_KEY:
        # A key of a longer name has two-byte lengths that the split below cannot find; and the prefixes
        # cached per name would be a hundred copies of it, taken from the request's bytes.
        return None
    prefixes = _prefixes(tag, name)
    # Every short key is its prefix, whose middle names the key field, then its string: split on that
    # middle, each piece is the rest of one key's prefix (3 bytes), its string, and the next key's first
    # 4 bytes. Whatever the pieces hold, the keys are only taken if writing them back gives the request.
    pieces = serialized.split(prefixes[0][4:-3])
    if len(pieces) < 2:
        return None
    last = pieces[-1]
    raws = [piece[3:-4] for piece in pieces[1:-1]]
    raws.append(last[3 : len(last) - len(tail)])
    sizes = list(map(len, raws))
    if max(sizes) >= _SHORT_KEY:
        return None
    parts: list[bytes] = raws + raws
    parts[::2] = map(prefixes.__getitem__, sizes)
    parts[1::2] = raws
    if b"".join([head, *parts, tail]) != serialized:
        return None
    return raws


_VARINT_MAX = 10


def read_varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at `at` in `data` and where it ends; IndexError where `data` ends first.

    At most ten bytes, as protobuf writes any 64-bit number: a run of continuation bytes sent to stall
    the reader (each step would shift an ever larger number) is refused at the eleventh.
    """
    value, shift = 0, 0
    for pos in range(at, at + _VARINT_MAX):
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos + 1
        shift += 7
    raise IndexError("a varint longer than ten bytes")


class StringKeysRequest(NamedTuple):
    """A GetFeaturesRequest whose every key is {name: <a short string>}, read from its bytes unparsed."""

    source: str
    response_format: int
    name: str
    # Each key's string as UTF-8, in request order.
    raws: list[bytes]
    data: bytes

    @property
    def message(self) -> online_service_pb2.GetFeaturesRequest:
        """The request as protobuf parses it, for reads that need more than the keys' strings."""
        return online_service_pb2.GetFeaturesRequest.FromString(self.data)


def string_keys_request(data: bytes) -> StringKeysRequest | None:
    """A serialized GetFeaturesRequest read without parsing it, where its keys are all one short string field.

    Only requests laid out as protobuf writes them are read: the source, the keys, then response_format,
    each key {name: <a string shorter than 100 bytes>} of a name shorter than 100 bytes, and nothing else.
    They are read only when writing the parts back gives `data` exactly and every string is UTF-8, so they
    are what parsing would give.
    None otherwise: the caller parses the request.
    """
    try:
        source, at = b"", 0
        if data[:1] == GET_FEATURES_SOURCE:
            size, at = read_varint(data, 1)
            source = data[at : at + size]
            at += size
        head = data[:at]
        tail, response_format = b"", 0
        if data[-2:-1] == GET_FEATURES_FORMAT and data[-1] < 0x80:
            tail, response_format = data[-2:], data[-1]
        # The first key names the key field: the key's tag and length, its one entry's tag and length, then
        # the entry's key.
        if data[at : at + 1] != GET_FEATURES_KEYS:
            return None
        _, at = read_varint(data, at + 1)
        if data[at : at + 1] != STRUCT_FIELD:
            return None
        _, at = read_varint(data, at + 1)
        if data[at : at + 1] != STRUCT_ENTRY_KEY:
            return None
        size, at = read_varint(data, at + 1)
        if size >= _SHORT_KEY:
            return None
        name = data[at : at + size].decode()
        text = source.decode()
    except (IndexError, UnicodeDecodeError):
        return None
    raws = string_keys_between(data, head, GET_FEATURES_KEYS, tail, name)
    if raws is None:
        return None
    if not b"".join(raws).isascii():
        try:
            for raw in raws:
                raw.decode()
        except UnicodeDecodeError:
            return None
    return StringKeysRequest(text, response_format, name, raws, data)
