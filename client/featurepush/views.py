"""Reading stream feature views: GetViewFeatures responses decoded into Python values by feature type."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from featurepush.v1 import feature_view_service_pb2, online_service_pb2, schema_pb2

if TYPE_CHECKING:
    import pyarrow as pa

_STATUS = {
    online_service_pb2.FEATURE_STATUS_PRESENT: "PRESENT",
    online_service_pb2.FEATURE_STATUS_MISSING: "MISSING",
}
_INTEGRAL = (schema_pb2.SCALAR_TYPE_INT32, schema_pb2.SCALAR_TYPE_INT64)
_FLOATING = (schema_pb2.SCALAR_TYPE_FLOAT32, schema_pb2.SCALAR_TYPE_FLOAT64)


@dataclass(frozen=True)
class ViewFeatureValue:
    """One feature of one entity: its value (None when MISSING), status, and the end of its window."""

    value: Any
    status: str
    effective_time: dt.datetime


def decode_value(value: Any, dtype: schema_pb2.DataType) -> Any:
    """A value from its canonical JSON form (as json_format gives it) and its type."""
    if value is None:
        return None
    if dtype.HasField("array"):
        return [decode_value(v, dtype.array.element_type) for v in value]
    if dtype.scalar in _INTEGRAL:
        return int(value)
    if dtype.scalar in _FLOATING:
        return float(value) if not isinstance(value, str) else float(value.replace("Infinity", "inf"))
    return value


def view_vectors(
    response: feature_view_service_pb2.GetViewFeaturesResponse, keys: int
) -> list[dict[str, ViewFeatureValue]]:
    """One mapping of feature name to value per requested entity (`keys` of them), in request order.

    ValueError for a reply of another number of vectors, which could only be paired with the wrong keys.
    """
    from google.protobuf import json_format

    if len(response.results) != keys:
        raise ValueError(f"the server answered {len(response.results)} vectors for {keys} keys")
    features = list(response.features)
    out: list[dict[str, ViewFeatureValue]] = []
    for vector in response.results:
        row: dict[str, ViewFeatureValue] = {}
        for feature, v in zip(features, vector.values, strict=True):
            raw = json_format.MessageToDict(v.value) if v.HasField("value") else None
            row[feature.name] = ViewFeatureValue(
                decode_value(raw, feature.type),
                _STATUS.get(v.status, "UNSPECIFIED"),
                v.effective_time.ToDatetime(tzinfo=dt.UTC),
            )
        out.append(row)
    return out


def view_table(response: feature_view_service_pb2.GetViewFeaturesResponse, keys: int) -> pa.Table:
    """The Arrow form of a GetViewFeaturesResponse: a row per requested entity (`keys`), in request order.

    ValueError for a reply that does not read, or of another number of rows.
    """
    import pyarrow as pa

    try:
        table = pa.ipc.open_stream(response.arrow_ipc).read_all()
        # As featurepush.batch.read_batch: offsets inside buffers are only checked by a full validation.
        table.validate(full=True)
    except ValueError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"the server's Arrow reply could not be read: {e}") from None
    if table.num_rows != keys:
        raise ValueError(f"the server answered {table.num_rows} rows for {keys} keys")
    return table


def keyed_by_name(keys: Sequence[Mapping[str, Any] | Any]) -> bool:
    """Whether every key is a mapping, so none needs the view's entity keys to be sent."""
    return all(isinstance(k, Mapping) for k in keys)


def key_mappings(keys: Sequence[Mapping[str, Any] | Any], entity_keys: Sequence[str]) -> list[dict[str, Any]]:
    """Keys as Client.get_features takes them (a mapping, a tuple in entity key order, or a single value
    where there is one entity key) as mappings of the view's `entity_keys`; ValueError for any other."""
    out = []
    for key in keys:
        if isinstance(key, Mapping):
            out.append(dict(key))
            continue
        if isinstance(key, list | set | frozenset):
            raise ValueError(
                f"key {key!r} is a {type(key).__name__}: pass a mapping, a tuple of {list(entity_keys)} in "
                "order, or one value where there is one entity key"
            )
        parts = key if isinstance(key, tuple) else (key,)
        if len(parts) != len(entity_keys):
            raise ValueError(
                f"key {key!r} has {len(parts)} part(s) but the view's entity keys are {list(entity_keys)}"
            )
        out.append(dict(zip(entity_keys, parts, strict=True)))
    return out


def check_target(view: str, service: str) -> None:
    """ValueError unless exactly one of a view and a feature service is named."""
    if bool(view) == bool(service):
        raise ValueError("name exactly one of view or service")


def view_request(
    keys: Sequence[Mapping[str, Any]],
    *,
    view: str = "",
    service: str = "",
    as_of: dt.datetime | None = None,
    arrow: bool = False,
) -> feature_view_service_pb2.GetViewFeaturesRequest:
    """A GetViewFeaturesRequest for a view or a feature service, asking for the Arrow form if `arrow`."""
    check_target(view, service)
    request = feature_view_service_pb2.GetViewFeaturesRequest(keys=[dict(k) for k in keys])
    if view:
        request.feature_view = view
    else:
        request.feature_service = service
    if as_of is not None:
        request.as_of.FromDatetime(as_of)
    if arrow:
        request.response_format = online_service_pb2.RESPONSE_FORMAT_ARROW
    return request
