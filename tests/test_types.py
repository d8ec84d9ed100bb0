"""Every type, valid and invalid, through Push and GetFeatures on a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Running, features, rich_error, rows_request, scalar, start

S = scalar


def _array(element: dict[str, object], nullable: bool = False) -> dict[str, object]:
    return {"array": {"elementType": element, "elementNullable": nullable}}


def _map(value: dict[str, object], nullable: bool = False) -> dict[str, object]:
    return {"map": {"valueType": value, "valueNullable": nullable}}


def _struct(**fields: dict[str, object]) -> dict[str, object]:
    return {"struct": {"fields": [{"name": n, "type": t} for n, t in fields.items()]}}


# (type, pushed JSON value, canonical value GetFeatures returns)
VALID = [
    (S("STRING"), "héllo ☃", "héllo ☃"),
    (S("STRING"), "", ""),
    (S("INT32"), 2147483647, 2147483647),
    (S("INT32"), "-2147483648", -2147483648),
    (S("INT32"), 3.0, 3),
    (S("INT64"), 1, "1"),
    (S("INT64"), "9223372036854775807", "9223372036854775807"),
    (S("INT64"), "-9223372036854775808", "-9223372036854775808"),
    (S("INT64"), "9007199254740993", "9007199254740993"),
    (S("FLOAT32"), 1.5, 1.5),
    (S("FLOAT32"), 0.1, 0.10000000149011612),
    (S("FLOAT32"), "NaN", "NaN"),
    (S("FLOAT32"), "-Infinity", "-Infinity"),
    (S("FLOAT64"), 0.1, 0.1),
    (S("FLOAT64"), 1e300, 1e300),
    (S("FLOAT64"), "Infinity", "Infinity"),
    (S("FLOAT64"), "2.5", 2.5),
    (S("BOOL"), True, True),
    (S("BOOL"), False, False),
    (S("TIMESTAMP"), "2026-11-25T10:00:00Z", "2026-11-25T10:00:00Z"),
    (S("TIMESTAMP"), "2026-11-25T12:30:00.5+02:30", "2026-11-25T10:00:00.500Z"),
    (S("TIMESTAMP"), "1969-12-31T23:59:59.999999Z", "1969-12-31T23:59:59.999999Z"),
    (S("TIMESTAMP"), "2026-11-25t10:00:00.123456000z", "2026-11-25T10:00:00.123456Z"),
    (S("TIMESTAMP"), "0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"),
    (S("BYTES"), "aGVsbG8=", "aGVsbG8="),
    (S("BYTES"), "aGVsbG8", "aGVsbG8="),
    (S("BYTES"), "-_8=", "+/8="),
    (S("BYTES"), "", ""),
    (_array(S("INT64")), [1, "2", 3], ["1", "2", "3"]),
    (_array(S("STRING")), [], []),
    (_array(S("FLOAT64"), nullable=True), [1.5, None], [1.5, None]),
    (_map(S("INT32")), {"a": 1, "b": "2"}, {"a": 1, "b": 2}),
    (_map(_array(S("BOOL"))), {"x": [True, False]}, {"x": [True, False]}),
    (
        _struct(a=S("STRING"), b=_array(S("TIMESTAMP"))),
        {"a": "x", "b": ["2026-01-01T00:00:00+01:00"]},
        {"a": "x", "b": ["2025-12-31T23:00:00Z"]},
    ),
]

# (type, pushed JSON value, path suffix of the violation, words the description must contain)
INVALID = [
    (S("STRING"), 3, "", "expected a String"),
    (S("STRING"), None, "", "must not be null"),
    (S("INT32"), 2147483648, "", "out of range for Int32"),
    (S("INT32"), 1.5, "", "not a whole number"),
    (S("INT64"), 3.9, "", "not a whole number"),
    (S("INT64"), 1e300, "", "out of range for Int64"),
    (S("INT64"), "abc", "", "decimal string"),
    (S("INT64"), "1.0", "", "decimal string"),
    (S("INT64"), "9223372036854775808", "", "out of range"),
    (S("INT64"), True, "", "expected an Int64"),
    (S("FLOAT32"), 1e39, "", "out of range for Float32"),
    (S("FLOAT32"), "nan", "", "Float32"),
    (S("FLOAT64"), True, "", "expected a Float64"),
    (S("FLOAT64"), "1e999", "", "out of range"),
    (S("BOOL"), "true", "", "expected a Bool"),
    (S("BOOL"), 1, "", "expected a Bool"),
    (S("TIMESTAMP"), "2026-11-25", "", "RFC 3339"),
    (S("TIMESTAMP"), "2026-11-25T10:00:00", "", "RFC 3339"),
    (S("TIMESTAMP"), "2026-02-30T10:00:00Z", "", "not a real date"),
    (S("TIMESTAMP"), "2026-11-25T10:00:00.123456789Z", "", "microsecond"),
    (S("TIMESTAMP"), 1764064800, "", "RFC 3339"),
    (S("BYTES"), "not base64!", "", "base64"),
    (S("BYTES"), 12, "", "base64"),
    (S("BYTES"), "AA-C/w==", "", "outside the base64 alphabet"),  # two alphabets mixed
    (S("BYTES"), "AAEC_w.=", "", "outside the base64 alphabet"),  # a stray character, URL-safe
    (S("BYTES"), "AAEC\n/w==", "", "outside the base64 alphabet"),
    (S("BYTES"), "Zg=", "", "wrong length or padding"),
    (S("BYTES"), "Zg===", "", "outside the base64 alphabet"),
    (S("BYTES"), "Zm9vY", "", "wrong length or padding"),
    (S("BYTES"), "Zh==", "", "nonzero bits"),
    (_array(S("INT64")), [1, 2.5], "[1]", "not a whole number"),
    (_array(S("INT64")), [None], "[0]", "must not be null"),
    (_array(S("INT64")), "1,2", "", "as a list"),
    (_map(S("INT32")), {"k": "x"}, '["k"]', "Int32"),
    (_map(S("INT32")), [1], "", "as an object"),
    (_struct(a=S("STRING")), {"a": "x", "b": 1}, ".b", "unknown field"),
    (_struct(a=S("STRING")), {}, ".a", "is required"),
    (_struct(a=_struct(b=S("BOOL"))), {"a": {"b": "no"}}, ".a.b", "expected a Bool"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One server for the whole table."""
    running = start(Path(tmp_path_factory.mktemp("types")))
    try:
        yield running
    finally:
        running.close()


def _apply(server: Running, name: str, dtype: dict[str, object], nullable: bool = False) -> None:
    server.apply(
        {
            "name": name,
            "schema": {
                "fields": [
                    {"name": "id", "type": S("STRING")},
                    {"name": "ts", "type": S("TIMESTAMP")},
                    {"name": "v", "type": dtype, "nullable": nullable},
                ]
            },
            "entityKeys": ["id"],
            "timestampField": "ts",
        }
    )


@pytest.mark.parametrize(("dtype", "pushed", "expected"), VALID)
def test_valid_values_round_trip(
    server: Running,
    request: pytest.FixtureRequest,
    dtype: dict[str, object],
    pushed: object,
    expected: object,
) -> None:
    name = f"valid_{request.node.callspec.id.replace('-', '_')}"[:100]
    name = "".join(c if c.isalnum() else "_" for c in name)
    _apply(server, name, dtype)
    server.ingest.Push(rows_request({name: [{"id": "k", "ts": "2026-11-25T10:00:00Z", "v": pushed}]}))
    [result] = features(server, name, {"id": "k"})
    assert result["status"] == "FEATURE_STATUS_PRESENT"
    assert result["features"]["v"] == expected


@pytest.mark.parametrize(("dtype", "pushed", "suffix", "words"), INVALID)
def test_invalid_values_are_rejected_by_path(
    server: Running,
    request: pytest.FixtureRequest,
    dtype: dict[str, Any],
    pushed: object,
    suffix: str,
    words: str,
) -> None:
    name = "".join(c if c.isalnum() else "_" for c in f"bad_{request.node.callspec.id}")[:100]
    _apply(server, name, dtype)
    with pytest.raises(grpc.RpcError) as info:
        server.ingest.Push(
            rows_request(
                {
                    name: [
                        {"id": "ok", "ts": "2026-11-25T10:00:00Z", "v": sample(dtype)},
                        {"id": "k", "ts": "2026-11-25T10:00:00Z", "v": pushed},
                    ]
                }
            )
        )
    code, violations, reason = rich_error(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason == "INVALID_RECORDS"
    assert [path for path, _ in violations] == [f'records["{name}"][1].v{suffix}']
    assert words in violations[0][1]
    # Atomic: the valid first record was not written either.
    assert features(server, name, {"id": "ok"})[0]["status"] == "FEATURE_STATUS_MISSING"


_SCALAR_SAMPLES = {
    "STRING": "s",
    "INT32": 1,
    "INT64": "1",
    "FLOAT32": 1.5,
    "FLOAT64": 2.5,
    "BOOL": True,
    "TIMESTAMP": "2026-11-25T10:00:00Z",
    "BYTES": "AA==",
}


def sample(dtype: dict[str, Any]) -> object:
    """A valid JSON value of a type."""
    if "scalar" in dtype:
        return _SCALAR_SAMPLES[dtype["scalar"].removeprefix("SCALAR_TYPE_")]
    if "array" in dtype:
        return [sample(dtype["array"]["elementType"])]
    if "map" in dtype:
        return {"k": sample(dtype["map"]["valueType"])}
    return {f["name"]: sample(f["type"]) for f in dtype["struct"]["fields"]}


def test_nullable_field_takes_null_and_absence(server: Running) -> None:
    _apply(server, "nullable", S("INT64"), nullable=True)
    server.ingest.Push(
        rows_request(
            {
                "nullable": [
                    {"id": "a", "ts": "2026-11-25T10:00:00Z", "v": None},
                    {"id": "b", "ts": "2026-11-25T10:00:00Z"},
                ]
            }
        )
    )
    results = features(server, "nullable", {"id": "a"}, {"id": "b"})
    assert [r["features"]["v"] for r in results] == [None, None]


def test_missing_required_and_unknown_fields_are_all_named(server: Running) -> None:
    _apply(server, "strict", S("INT64"))
    with pytest.raises(grpc.RpcError) as info:
        server.ingest.Push(rows_request({"strict": [{"id": "a", "extra": 1, "other": "x"}]}))
    _, violations, _ = rich_error(info.value)
    assert sorted(path for path, _ in violations) == sorted(
        [
            'records["strict"][0].ts',
            'records["strict"][0].v',
            'records["strict"][0].extra',
            'records["strict"][0].other',
        ]
    )
