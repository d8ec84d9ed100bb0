"""Every protobuf tag the server writes by hand, named by message and field.

Stored rows, GetFeatures replies and ReadBatchSource replies are assembled from bytes rather than through
the generated classes, for speed. The tags they use live here and nowhere else; `TAGS` names the field
behind each, and a test checks each one against the generated descriptors (field number and wire type).
"""

from __future__ import annotations

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
# GetViewFeaturesResponse.results (2), ViewFeatureVector.values (1), and ViewFeatureValue.status (1,
# varint), .value (2) and .effective_time (3); the others length-delimited.
VIEW_FEATURES_RESULT = b"\x12"
VIEW_VECTOR_VALUE = b"\x0a"
VIEW_VALUE_STATUS = b"\x08"
VIEW_VALUE_VALUE = b"\x12"
VIEW_VALUE_EFFECTIVE_TIME = b"\x1a"
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
    "VIEW_FEATURES_RESULT": ("featurepush.v1.GetViewFeaturesResponse", "results"),
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
