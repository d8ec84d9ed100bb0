"""The GetViewFeatures reply serialized with numpy is byte for byte what protobuf writes of the message."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from featurepush.v1 import feature_view_service_pb2 as pb
from featurepush.v1 import online_service_pb2
from featurepush_server.core.aggregates import _json_value
from featurepush_server.core.schema import Kind
from featurepush_server.core.view_reply import _FEWEST, _MOST, Feature, _decimals, _digits, vectors

PRESENT = online_service_pb2.FEATURE_STATUS_PRESENT
MISSING = online_service_pb2.FEATURE_STATUS_MISSING
KINDS = [Kind.INT64, Kind.INT32, Kind.FLOAT64]

floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 2.0**63, -(2.0**63), 2.0**63 - 1024, 1e25, -1e25, 2.0**53 + 2]),
)
integral = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(float),
    st.integers(-(2**31), 2**31 - 1).map(float),
    st.sampled_from([0.0, -0.0, 2.0**63, 2.0**64, -(2.0**63), 1e25, -1e34, 9.0, 10.0, 99.0, 100.0]),
    st.integers(0, 18).map(lambda e: float(10**e)),
    st.integers(0, 18).map(lambda e: float(1 - 10**e)),
)


@st.composite
def numeric(draw: st.DrawFn, rows: int) -> tuple[Kind, list[float], list[bool], list[bool]]:
    """A numeric feature: its kind, values, where they are set, and where the window holds events."""
    kind = draw(st.sampled_from(KINDS))
    values = draw(st.lists(floats if kind is Kind.FLOAT64 else integral, min_size=rows, max_size=rows))
    if kind is Kind.INT32:
        values = [v if abs(v) < 2**31 else 7.0 for v in values]
    has = draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    present = [h or draw(st.booleans()) for h in has]
    return kind, values, has, present


@settings(max_examples=300, deadline=None)
# Up to 12 entities: both sides of the count below which values are written one by one.
@given(rows=st.integers(0, 12), data=st.data())
def test_vectors_are_the_bytes_protobuf_writes(rows: int, data: st.DataObject) -> None:
    drawn = data.draw(st.lists(numeric(rows), max_size=6))
    # Features of Values built in Python (lists here), anywhere between the numeric ones.
    listed = data.draw(st.lists(st.lists(st.text(max_size=300), max_size=30), min_size=rows, max_size=rows))
    places = data.draw(st.lists(st.integers(0, len(drawn)), max_size=2))
    plan: list[tuple[Kind, list[float], list[bool], list[bool]] | None] = list(drawn)
    for at in sorted(places, reverse=True):
        plan.insert(at, None)
    features: list[Feature] = []
    expected = [pb.ViewFeatureVector() for _ in range(rows)]
    for item in plan:
        # Views of different intervals in one feature service end their windows at different times.
        end = data.draw(st.integers(-(2**40), 2**52))
        if item is None:
            wanted = [_json_value(values, Kind.STRING) for values in listed]
            present = [bool(values) for values in listed]
            serialized = [v.SerializeToString() for v in wanted]
            features.append(Feature(np.array(present, dtype=bool), end, values=serialized))
        else:
            kind, values, has, present = item
            wanted = [_json_value(v if h else None, kind) for v, h in zip(values, has, strict=True)]
            feature = Feature(
                np.array(present, dtype=bool),
                end,
                np.array(values, dtype=np.float64),
                np.array(has, dtype=bool),
                kind,
            )
            features.append(feature)
        for vector, value, p in zip(expected, wanted, present, strict=True):
            entry = vector.values.add(status=PRESENT if p else MISSING)
            entry.value.CopyFrom(value)
            entry.effective_time.FromMicroseconds(end)
    assert vectors(features, rows) == pb.GetViewFeaturesResponse(results=expected).SerializeToString()


def test_values_numpy_does_not_write_are_written_as_python_does() -> None:
    every = np.ones(10, dtype=bool)
    floats = Feature(every, 0, np.array([math.nan, math.inf, -math.inf, 1.5, 3.0] * 2), every, Kind.FLOAT64)
    big = [2.0**64, -(2.0**63), 2.0**63 - 1024, -1e34, 0.0] * 2
    ints = Feature(every, 0, np.array(big), every, Kind.INT64)
    reply = pb.GetViewFeaturesResponse.FromString(vectors([floats, ints], 10))
    assert [v.values[0].value.string_value for v in reply.results[:3]] == ["NaN", "Infinity", "-Infinity"]
    assert [v.values[0].value.number_value for v in reply.results[3:5]] == [1.5, 3.0]
    # Past the Int64 range (a sum of many large integers), the range's end.
    assert [v.values[1].value.string_value for v in reply.results[:5]] == [
        str(2**63 - 1),
        str(-(2**63)),
        str(2**63 - 1024),
        str(-(2**63)),
        "0",
    ]


def test_an_int64_value_far_past_the_range_is_written_as_its_end_on_either_path() -> None:
    for rows in (10, 2):
        every = np.ones(rows, dtype=bool)
        values = np.array([1e120] + [5.0] * (rows - 1))
        huge = Feature(every, 1_700_000_000_123_456, values, every, Kind.INT64)
        reply = pb.GetViewFeaturesResponse.FromString(vectors([huge], rows))
        written = [v.values[0].value.string_value for v in reply.results]
        assert written == [str(2**63 - 1)] + ["5"] * (rows - 1)
        assert reply.results[0].values[0].effective_time.ToMicroseconds() == 1_700_000_000_123_456


def test_small_decimals_looked_up_are_those_computed() -> None:
    values = np.arange(_FEWEST, _MOST, dtype=np.int64)
    chars, lengths = _decimals(values)
    computed, computed_lengths = _digits(values)
    assert np.array_equal(lengths, computed_lengths)
    assert np.array_equal(chars, computed)
    assert [bytes(c[:n]).decode() for c, n in zip(chars.tolist(), lengths.tolist(), strict=True)] == [
        str(v) for v in values.tolist()
    ]
    # One value outside the table: every value is computed.
    mixed = np.array([[_FEWEST - 1, 7], [-3, _MOST]], dtype=np.int64)
    chars, lengths = _decimals(mixed)
    assert [bytes(c[:n]).decode() for c, n in zip(chars.reshape(4, -1), lengths.ravel(), strict=True)] == [
        str(v) for v in mixed.ravel().tolist()
    ]
