"""Definitions are bounded in size, so every Get and List page reaches a client with default limits."""

from __future__ import annotations

import copy
from typing import Any

import grpc
import pytest
from conftest import AD_IMPRESSIONS, Running, rich_error, scalar
from views_helpers import apply, stub, view

from featurepush.v1 import feature_view_pb2 as fv_pb2
from featurepush.v1 import feature_view_service_pb2 as fvs_pb2
from featurepush.v1 import registry_service_pb2 as pb
from featurepush_server.core.schema import (
    MAX_DESCRIPTION_CHARS,
    MAX_FIELDS,
    MAX_OWNER_CHARS,
    MAX_TAG_KEY_CHARS,
    MAX_TAG_VALUE_CHARS,
    MAX_TAGS,
)


def source(name: str = "big", **changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(AD_IMPRESSIONS)
    doc.update(name=name, **changes)
    return doc


def nested(count: int) -> dict[str, Any]:
    """A nullable struct field of `count` Int64 subfields."""
    fields = [{"name": f"f{i}", "type": scalar("INT64")} for i in range(count)]
    return {"name": "deep", "type": {"struct": {"fields": fields}}, "nullable": True}


def refused_at(running: Running, doc: dict[str, Any]) -> list[str]:
    with pytest.raises(grpc.RpcError) as info:
        running.apply(doc)
    code, violations, _ = rich_error(info.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    return [path for path, _ in violations]


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"description": "d" * (MAX_DESCRIPTION_CHARS + 1)}, "source.description"),
        ({"description": "d" * 20_000_000}, "source.description"),
        ({"owner": "o" * (MAX_OWNER_CHARS + 1)}, "source.owner"),
        ({"tags": {f"t{i}": "v" * 1024 for i in range(10_000)}}, "source.tags"),
        ({"tags": {"k" * (MAX_TAG_KEY_CHARS + 1): "v"}}, f'source.tags["{"k" * 61}..."]'),
        ({"tags": {"k": "v" * (MAX_TAG_VALUE_CHARS + 1)}}, 'source.tags["k"]'),
        ({"entityKeys": ["user_id"] + ["u" * 128] * 3000}, "source"),
    ],
)
def test_oversized_source_definitions_are_refused(
    running: Running, changes: dict[str, Any], path: str
) -> None:
    assert path in refused_at(running, source(**changes))
    with pytest.raises(grpc.RpcError) as info:
        running.registry.GetSource(pb.GetSourceRequest(name="big"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("count", [MAX_FIELDS, 50_000])
def test_fields_are_counted_at_every_level(running: Running, count: int) -> None:
    fields = copy.deepcopy(AD_IMPRESSIONS["schema"]["fields"])  # type: ignore[index]
    doc = source(schema={"fields": [*fields, nested(count)]})
    assert "source.schema.fields" in refused_at(running, doc)
    doc = source(
        schema={
            "fields": [*fields, {"name": "items", "type": {"array": {"elementType": nested(count)["type"]}}}]
        }
    )
    assert "source.schema.fields" in refused_at(running, doc)
    fields.append(nested(MAX_FIELDS - len(fields) - 1))
    assert running.apply(source(schema={"fields": fields})).created


def test_oversized_views_and_services_are_refused(running: Running) -> None:
    proto = view().to_proto()
    proto.description = "d" * (MAX_DESCRIPTION_CHARS + 1)
    with pytest.raises(grpc.RpcError) as info:
        stub(running).ApplyFeatureView(fvs_pb2.ApplyFeatureViewRequest(view=proto))
    assert "view.description" in [p for p, _ in rich_error(info.value)[1]]
    apply(running, view())
    service = fv_pb2.FeatureService(name="s", features=[fv_pb2.FeatureReference(view="clicks")])
    for i in range(MAX_TAGS + 1):
        service.tags[f"t{i}"] = "v"
    with pytest.raises(grpc.RpcError) as info:
        stub(running).ApplyFeatureService(fvs_pb2.ApplyFeatureServiceRequest(service=service))
    assert [p for p, _ in rich_error(info.value)[1]] == ["service.tags"]


def test_list_pages_of_the_largest_definitions_reach_a_default_client(running: Running) -> None:
    """20 sources of about 220 KB each are 4.4 MB, past the 4 MiB a default client takes in one reply."""
    names = [f"n{i:03d}_" + "x" * 120 for i in range(MAX_FIELDS - 100)]
    fields = copy.deepcopy(AD_IMPRESSIONS["schema"]["fields"]) + [  # type: ignore[operator]
        {"name": n, "type": scalar("INT64"), "nullable": True} for n in names
    ]
    tags = {f"{i:03d}" + "k" * 100: "v" * MAX_TAG_VALUE_CHARS for i in range(MAX_TAGS)}
    for i in range(20):
        running.apply(
            source(
                f"wide_{i:02d}", description="d" * MAX_DESCRIPTION_CHARS, tags=tags, schema={"fields": fields}
            )
        )
    listed: list[str] = []
    token = ""
    pages = 0
    while True:
        response = running.registry.ListSources(pb.ListSourcesRequest(page_size=1000, page_token=token))
        assert response.ByteSize() < 4 * 1024 * 1024
        listed += [s.name for s in response.sources]
        pages += 1
        token = response.next_page_token
        if not token:
            break
    assert listed == ["ad_impressions", *(f"wide_{i:02d}" for i in range(20))]
    assert pages > 1
