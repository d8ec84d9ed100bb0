"""Feature views through the CLI and the Python client: apply from a definitions file, read, delete.

Once against a one-process server, and once against `featurepush serve --processes 2` started as
`make run` starts it, with the example's views among its definitions files.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AD_IMPRESSIONS, Running, start
from servers import ServedProcess
from test_cli import run

from featurepush import Client
from featurepush.aio import AsyncClient
from featurepush.definitions import Aggregate, StreamFeatureView
from featurepush.types import Field, Int64

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
H = 3_600_000_000


@pytest.fixture(params=["one-process", "processes"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The server's target and what applying the example's views reports on it."""
    if request.param == "one-process":
        r = start(
            tmp_path / "data",
            definitions=(EXAMPLES / "ad_impressions.py",),
            post_processor_modules=("ad_impressions_views",),
        )
        try:
            yield r.target, "created"
        finally:
            r.close()
        return
    served = ServedProcess(
        tmp_path / "data", "--processes", "2", "--definitions", str(EXAMPLES / "ad_impressions_views.py")
    )
    try:
        yield f"localhost:{served.port}", "unchanged"
    finally:
        served.signal()
        assert served.wait() == 0, served.log


def test_apply_push_and_read_a_view_and_a_service(
    target: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    address, outcome = target
    args = ("--target", address)
    code, out, err = run(capsys, "apply", str(EXAMPLES / "ad_impressions_views.py"), *args)
    assert (code, err) == (0, "")
    assert out == f"ad_impressions: unchanged\nuser_clicks: {outcome}\nads_ranking: {outcome}\n"
    hour = time.time_ns() // 1000 // H * H
    stamp = [dt.datetime.fromtimestamp((hour - H // 2 + i) / 1e6, dt.UTC) for i in range(3)]
    with Client(address) as client:
        client.push("ad_impressions", [{"user_id": "u", "timestamp": t, "clicked": 1} for t in stamp])
        [vector] = client.get_view_features([{"user_id": "u"}], view="user_clicks")
        assert vector["clicked_count_1d"].value == 3 and vector["clicked_count_1d"].status == "PRESENT"
        # Windows end at the start of the tile holding the read time, and never include a later event.
        later = dt.datetime.fromtimestamp((hour + 5) / 1e6, dt.UTC)
        [vector] = client.get_view_features([{"user_id": "u"}], service="ads_ranking", as_of=later)
        assert vector["user_clicks.clicked_sum_1h"].value == 3
        assert vector["user_clicks.value_mean_7d"].value == 12.5
        assert vector["user_clicks.clicked_last_n_1d"].value == [1, 1, 1]
        assert vector["user_clicks.clicked_sum_1h"].effective_time == dt.datetime.fromtimestamp(
            hour / 1e6, dt.UTC
        )
        earlier = dt.datetime.fromtimestamp((hour - H // 2) / 1e6, dt.UTC)
        [vector] = client.get_view_features([{"user_id": "u"}], view="user_clicks", as_of=earlier)
        assert vector["clicked_count_1d"].status == "MISSING"
    code, out, err = run(
        capsys, "get-view", "ads_ranking", "user_id=u", "--service", "--as-of", later.isoformat(), *args
    )
    assert code == 0 and json.loads(out)["features"]["user_clicks.clicked_count_1d"]["value"] == 3
    code, out, _ = run(capsys, "delete-view", "user_clicks", *args)
    assert code == 1  # the service still serves it
    code, out, err = run(capsys, "delete-service", "ads_ranking", *args)
    assert (code, out, err) == (0, "feature service ads_ranking deleted; its views stay\n", "")
    code, out, _ = run(capsys, "delete-view", "user_clicks", *args)
    assert code == 0 and out.startswith("feature view user_clicks deleted")
    code, out, err = run(capsys, "delete-service", "ads_ranking", *args)
    assert code == 1 and "ads_ranking" in err


def test_the_start_log_says_what_applying_each_definition_did(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    views = EXAMPLES / "ad_impressions_views.py"
    caplog.set_level("INFO", logger="featurepush_server.app")
    for _ in range(2):
        modules = ("ad_impressions_views",)
        start(tmp_path / "data", definitions=(views,), post_processor_modules=modules).close()
    said = [r.getMessage() for r in caplog.records if " from " in r.getMessage()]
    assert said == [
        f"{kind} from {views}: {state}"
        for state in ("created", "unchanged")
        for kind in ("source ad_impressions", "feature view user_clicks", "feature service ads_ranking")
    ]


def start_with_views(tmp_path: Path) -> Running:
    """A one-process server with the example's source, view and service applied at start."""
    return start(
        tmp_path / "data",
        definitions=(EXAMPLES / "ad_impressions.py", EXAMPLES / "ad_impressions_views.py"),
        post_processor_modules=("ad_impressions_views",),
    )


def test_view_reads_take_the_key_forms_get_features_takes(tmp_path: Path) -> None:
    r = start_with_views(tmp_path)
    try:
        now = dt.datetime.now(dt.UTC)
        with Client(r.target) as client:
            client.push("ad_impressions", [{"user_id": "u1", "timestamp": now, "clicked": 1}])
            later = now + dt.timedelta(hours=2)
            for target in ({"view": "user_clicks"}, {"service": "ads_ranking"}):
                by_name = client.get_view_features([{"user_id": "u1"}], as_of=later, **target)
                assert client.get_view_features(["u1"], as_of=later, **target) == by_name
                assert client.get_view_features([("u1",)], as_of=later, **target) == by_name
                table = client.get_view_features_arrow(["u1"], as_of=later, **target)
                assert table.equals(
                    client.get_view_features_arrow([{"user_id": "u1"}], as_of=later, **target)
                )
            # Bare keys ask the view's entity keys once per view or service, not once per read.
            metrics = r.server.metrics
            assert metrics is not None

            def asked() -> float:
                labels = {"method": "FeatureViewService/GetFeatureView", "code": "OK"}
                return metrics.registry.get_sample_value("featurepush_calls_total", labels) or 0.0

            before = asked()
            for _ in range(3):
                client.get_view_features(["u1"], view="user_clicks", as_of=later)
            assert asked() == before
            with pytest.raises(
                ValueError, match=r"has 2 part\(s\) but the view's entity keys are \['user_id'\]"
            ):
                client.get_view_features([("u1", "u2")], view="user_clicks")
            with pytest.raises(ValueError, match="is a list: pass a mapping, a tuple"):
                client.get_view_features([["u1"]], view="user_clicks")

            async def read() -> list[dict[str, object]]:
                async with AsyncClient(r.target) as aio:
                    return [
                        *await aio.get_view_features(["u1"], view="user_clicks", as_of=later),
                        *await aio.get_view_features([("u1",)], service="ads_ranking", as_of=later),
                    ]

            assert asyncio.run(read()) == [
                *client.get_view_features([{"user_id": "u1"}], view="user_clicks", as_of=later),
                *client.get_view_features([{"user_id": "u1"}], service="ads_ranking", as_of=later),
            ]
    finally:
        r.close()


def test_view_keys_a_client_kept_are_asked_again_once_the_view_names_others(tmp_path: Path) -> None:
    r = start(tmp_path / "data")
    try:
        r.apply(AD_IMPRESSIONS)
        fields = [
            {"name": "ad_id", "type": {"scalar": "SCALAR_TYPE_STRING"}},
            {"name": "timestamp", "type": {"scalar": "SCALAR_TYPE_TIMESTAMP"}},
            {"name": "clicked", "type": {"scalar": "SCALAR_TYPE_INT64"}},
        ]
        r.apply(dict(AD_IMPRESSIONS, name="ad_clicks", schema={"fields": fields}, entityKeys=["ad_id"]))
        counted = [Aggregate("clicked", "count", dt.timedelta(hours=1))]
        interval = dt.timedelta(minutes=1)
        by_user = StreamFeatureView(
            "v", "ad_impressions", ["user_id"], [Field("clicked", Int64)], counted, interval
        )
        by_ad = StreamFeatureView("v", "ad_clicks", ["ad_id"], [Field("clicked", Int64)], counted, interval)
        now = dt.datetime.now(dt.UTC)
        later = now + dt.timedelta(minutes=2)
        with Client(r.target) as reader, Client(r.target) as admin:
            admin.apply_views(by_user)
            assert reader.get_view_features(["u1"], view="v", as_of=later) == reader.get_view_features(
                [{"user_id": "u1"}], view="v", as_of=later
            )
            # Another client makes "v" a view keyed by ad_id: the reader's kept user_id no longer fits.
            admin.delete_view("v")
            admin.apply_views(by_ad)
            admin.push("ad_clicks", [{"ad_id": "a1", "timestamp": now, "clicked": 1}])
            [bare] = reader.get_view_features(["a1"], view="v", as_of=later)
            assert bare == reader.get_view_features([{"ad_id": "a1"}], view="v", as_of=later)[0]
            assert bare["clicked_count_1h"].value == 1

            async def read() -> list[dict[str, object]]:
                async with AsyncClient(r.target) as aio:
                    await aio.get_view_features(["a1"], view="v", as_of=later)
                    admin.delete_view("v")
                    admin.apply_views(by_user)
                    return await aio.get_view_features(["u1"], view="v", as_of=later)

            assert asyncio.run(read()) == reader.get_view_features([{"user_id": "u1"}], view="v", as_of=later)
    finally:
        r.close()


def test_push_results_count_the_events_a_view_left_out(tmp_path: Path) -> None:
    """SourceCounts.late_skipped carries the server's count: events older than the longest window."""
    r = start_with_views(tmp_path)
    try:
        now = dt.datetime.now(dt.UTC)
        # user_clicks' longest window is 7 days; the source's ttl of 30 still takes the rows.
        old = [{"user_id": "u1", "timestamp": now - dt.timedelta(days=10), "clicked": 1}]
        recent = [{"user_id": "u2", "timestamp": now, "clicked": 1}]
        with Client(r.target) as client:
            client.push("ad_impressions", recent)
            counts = client.push("ad_impressions", old + recent).counts["ad_impressions"]
            assert (counts.accepted, counts.late_skipped) == (2, 1)

        async def push_async() -> int:
            async with AsyncClient(r.target) as client:
                result = await client.push("ad_impressions", old)
                return result.counts["ad_impressions"].late_skipped

        assert asyncio.run(push_async()) == 1
    finally:
        r.close()
