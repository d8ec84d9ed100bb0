"""The registry on a real server: idempotent apply, compatibility checks, pagination and deletion."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import AD_IMPRESSIONS, BOTH_STORES, Running, features, rich_error, rows_request, scalar, start

from featurepush.v1 import registry_service_pb2 as pb


def variant(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(AD_IMPRESSIONS)
    doc.update(changes)
    return doc


def with_fields(*extra: dict[str, Any], drop: str = "") -> dict[str, Any]:
    fields = [f for f in copy.deepcopy(AD_IMPRESSIONS["schema"]["fields"]) if f["name"] != drop]  # type: ignore[index]
    return variant(schema={"fields": fields + list(extra)})


def push_one(running: Running) -> None:
    running.ingest.Push(
        rows_request(
            {"ad_impressions": [{"user_id": "u1", "timestamp": "2026-11-25T10:00:00Z", "clicked": 1}]}
        )
    )


def test_applying_the_same_definition_twice_is_a_no_op(running: Running) -> None:
    first = running.registry.GetSource(pb.GetSourceRequest(name="ad_impressions")).source
    again = running.apply(AD_IMPRESSIONS)
    assert not again.changed and not again.created
    assert again.source == first
    changed = running.apply(variant(description="new words"))
    assert changed.changed and not changed.created
    assert changed.source.create_time == first.create_time
    assert changed.source.update_time.ToNanoseconds() >= first.update_time.ToNanoseconds()


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        (
            with_fields({"name": "clicked", "type": scalar("STRING")}, drop="clicked"),
            "field 'clicked' changes type from Int64 to String",
        ),
        (with_fields(drop="clicked"), "field 'clicked' is removed"),
        (with_fields({"name": "country", "type": scalar("STRING")}), "new field 'country' is not nullable"),
        (variant(entityKeys=["user_id", "clicked"]), "entity keys change"),
    ],
)
def test_incompatible_changes_are_refused_once_rows_exist(
    running: Running, doc: dict[str, Any], words: str
) -> None:
    push_one(running)
    with pytest.raises(grpc.RpcError) as info:
        running.apply(doc)
    code, _, reason = rich_error(info.value)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INCOMPATIBLE_SCHEMA_CHANGE")
    assert words in info.value.details()
    assert "new source name" in info.value.details()
    [result] = features(running, "ad_impressions", {"user_id": "u1"})
    assert result["features"]["clicked"] == "1"


@BOTH_STORES
def test_compatible_changes_apply_and_old_rows_stay_readable(running: Running) -> None:
    push_one(running)
    running.apply(with_fields({"name": "country", "type": scalar("STRING"), "nullable": True}))
    [result] = features(running, "ad_impressions", {"user_id": "u1"})
    assert result["features"]["clicked"] == "1"


def test_fields_added_later_read_as_null_in_rows_stored_before_them(tmp_path: Path) -> None:
    """Old rows list an added nullable field as null, like new rows pushed without it, across a restart."""
    country = {"name": "country", "type": scalar("STRING"), "nullable": True}
    score = {"name": "a_score", "type": scalar("FLOAT64"), "nullable": True}
    running = start(tmp_path / "data")
    try:
        running.apply(AD_IMPRESSIONS)
        push_one(running)
        running.apply(with_fields(country))
        running.ingest.Push(
            rows_request(
                {
                    "ad_impressions": [
                        {"user_id": "u2", "timestamp": "2026-11-25T10:00:01Z", "clicked": 2},
                        {"user_id": "u3", "timestamp": "2026-11-25T10:00:02Z", "clicked": 3, "country": "FR"},
                    ]
                }
            )
        )
        running.apply(with_fields(country, score))
    finally:
        running.close()
    running = start(tmp_path / "data")
    try:
        got = features(running, "ad_impressions", {"user_id": "u1"}, {"user_id": "u2"}, {"user_id": "u3"})
    finally:
        running.close()
    assert [r["features"] for r in got] == [
        {
            "user_id": "u1",
            "timestamp": "2026-11-25T10:00:00Z",
            "clicked": "1",
            "country": None,
            "a_score": None,
        },
        {
            "user_id": "u2",
            "timestamp": "2026-11-25T10:00:01Z",
            "clicked": "2",
            "country": None,
            "a_score": None,
        },
        {
            "user_id": "u3",
            "timestamp": "2026-11-25T10:00:02Z",
            "clicked": "3",
            "country": "FR",
            "a_score": None,
        },
    ]


def test_any_change_applies_while_the_source_holds_no_rows(running: Running) -> None:
    response = running.apply(with_fields({"name": "clicked", "type": scalar("FLOAT64")}, drop="clicked"))
    assert response.changed


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (variant(name="bad name"), "source.name"),
        (variant(entityKeys=["nope"]), "source.entity_keys[0]"),
        (variant(entityKeys=["timestamp"]), "source.entity_keys[0]"),
        (variant(timestampField="user_id"), "source.timestamp_field"),
        (variant(timestampField=""), "source.timestamp_field"),
        (variant(schema={"fields": []}), "source.schema.fields"),
        (variant(schema={"fields": [{"name": "user_id", "type": {}}]}), "source.schema.fields[0].type"),
        (
            variant(schema={"fields": [{"name": "user_id", "type": {"scalar": "SCALAR_TYPE_UNSPECIFIED"}}]}),
            "source.schema.fields[0].type.scalar",
        ),
        (variant(batchConfig={"uri": ""}), "source.batch_config.uri"),
    ],
)
def test_invalid_definitions_name_the_offending_field(
    running: Running, doc: dict[str, Any], path: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        running.apply(doc)
    code, violations, reason = rich_error(info.value)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SOURCE")
    assert path in [v[0] for v in violations]


def test_list_sources_pages_in_name_order(running: Running) -> None:
    for i in range(7):
        running.apply(variant(name=f"src_{i}"))
    names: list[str] = []
    token = ""
    while True:
        page = running.registry.ListSources(pb.ListSourcesRequest(page_size=3, page_token=token))
        assert len(page.sources) <= 3
        names += [s.name for s in page.sources]
        token = page.next_page_token
        if not token:
            break
    assert names == sorted(["ad_impressions", *(f"src_{i}" for i in range(7))])
    with pytest.raises(grpc.RpcError) as info:
        running.registry.ListSources(pb.ListSourcesRequest(page_size=5000))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "token",
    [
        "!!!!",  # nothing the decoder knows: it read as no name at all, and the list began again
        "bm90IGEgbmFtZQ==",  # "not a name"
        "c3JjXzE",  # "src_1" without its padding
        "c3JjXzE=\n",
        "////",
    ],
)
def test_a_page_token_not_handed_out_is_refused(running: Running, token: str) -> None:
    running.apply(variant(name="src_1"))
    with pytest.raises(grpc.RpcError) as info:
        running.registry.ListSources(pb.ListSourcesRequest(page_size=1, page_token=token))
    code, violations, _ = rich_error(info.value)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and [v[0] for v in violations] == ["page_token"]
    first = running.registry.ListSources(pb.ListSourcesRequest(page_size=1))
    second = running.registry.ListSources(
        pb.ListSourcesRequest(page_size=1, page_token=first.next_page_token)
    )
    assert [s.name for s in second.sources] == ["src_1"]


@BOTH_STORES
def test_delete_source_removes_its_rows(running: Running) -> None:
    push_one(running)
    assert running.registry.DeleteSource(pb.DeleteSourceRequest(name="ad_impressions")).rows_deleted == 1
    with pytest.raises(grpc.RpcError) as info:
        running.registry.GetSource(pb.GetSourceRequest(name="ad_impressions"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    running.apply(AD_IMPRESSIONS)
    assert features(running, "ad_impressions", {"user_id": "u1"})[0]["status"] == "FEATURE_STATUS_MISSING"


@BOTH_STORES
def test_a_push_validated_against_a_changed_definition_is_aborted_whole(running: Running) -> None:
    from featurepush_server.core.errors import Aborted
    from featurepush_server.core.stores.base import RowBatch
    from featurepush_server.core.stores.rocksdb import row_prefix
    from featurepush_server.status import status_of

    registry, store = running.server.registry, running.server.store
    stale = registry.get("ad_impressions")
    # No rows yet, so an incompatible change applies; a push validated before it must not land after it.
    running.apply(with_fields({"name": "clicked", "type": scalar("STRING")}, drop="clicked"))
    fresh = registry.get("ad_impressions")
    assert fresh.generation == stale.generation + 1
    key = row_prefix(stale.id) + b"u1"
    with pytest.raises(Aborted, match="changed or deleted while these records were validated") as info:
        store.write_latest([RowBatch("ad_impressions", [key], [b"\0" * 8], b"", stale.id, stale.generation)])
    assert status_of(info.value).code == grpc.StatusCode.ABORTED.value[0]
    assert store.read([key]) == [None]
    store.write_latest([RowBatch("ad_impressions", [key], [b"\0" * 8], b"", fresh.id, fresh.generation)])
    assert store.read([key]) == [b"\0" * 8]
    # A compatible change keeps the generation: pushes validated just before it still land.
    running.apply(
        with_fields(
            {"name": "clicked", "type": scalar("STRING")},
            {"name": "country", "type": scalar("STRING"), "nullable": True},
            drop="clicked",
        )
    )
    assert registry.get("ad_impressions").generation == fresh.generation
    store.write_latest([RowBatch("ad_impressions", [key], [b"\1" * 8], b"", fresh.id, fresh.generation)])
    running.registry.DeleteSource(pb.DeleteSourceRequest(name="ad_impressions"))
    with pytest.raises(Aborted):
        store.write_latest([RowBatch("ad_impressions", [key], [b"\2" * 8], b"", fresh.id, fresh.generation)])
