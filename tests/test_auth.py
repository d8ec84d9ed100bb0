"""API keys, probed as an attacker would: every scope against every method, every way to present a bad key."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import AD_IMPRESSIONS, rich_error, rows_request, source_from_json, start
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from featurepush import Client, FeatureStatus, PermissionDeniedError, UnauthenticatedError
from featurepush.aio import AsyncClient
from featurepush.v1 import registry_service_pb2
from featurepush_server.app import SERVICE_NAMES
from featurepush_server.auth import GUARDED_FILES, METHOD_SCOPES, required_scope
from featurepush_server.config import ConfigError, ServerConfig, load_config
from featurepush_server.core.keys import SCOPES, add_key, read_keys, revoke_key, split_key

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
# A record value that must never reach a log line.
SECRET_VALUE = "value-that-must-not-be-logged-7f3a"


def all_methods() -> Iterator[tuple[str, bool, bool, str]]:
    """(full method path, client streaming, server streaming, request type) of every featurepush method."""
    for file in GUARDED_FILES:
        for service in file.services_by_name.values():
            for m in service.methods:
                path = f"/{service.full_name}/{m.name}"
                yield path, m.client_streaming, m.server_streaming, m.input_type.full_name


def call(channel: grpc.Channel, method: str, metadata: list[tuple[str, str]] | None) -> grpc.StatusCode:
    """Call `method` with an empty request and the given metadata; the status code it ends with."""
    _, client_streaming, server_streaming, request_type = next(m for m in all_methods() if m[0] == method)
    cls = message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(request_type))
    request = cls()
    serialize = cls.SerializeToString

    def deserialize(data: bytes) -> bytes:
        return data

    try:
        if client_streaming:
            responses = channel.stream_stream(method, serialize, deserialize)(
                iter([request]), metadata=metadata, timeout=10
            )
            list(responses)
        elif server_streaming:
            list(channel.unary_stream(method, serialize, deserialize)(request, metadata=metadata, timeout=10))
        else:
            channel.unary_unary(method, serialize, deserialize)(request, metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


class Secured:
    """A server requiring keys, one key per scope, and a revoked key."""

    def __init__(self, tmp_path: Path) -> None:
        self.keys_file = tmp_path / "keys.json"
        self.keys = {scope: add_key(self.keys_file, [scope], f"{scope} key")[1] for scope in SCOPES}
        revoked, self.revoked = add_key(self.keys_file, SCOPES, "revoked admin")
        revoke_key(self.keys_file, revoked.id)
        self.running = start(tmp_path / "data", keys_file=self.keys_file)
        self.target = self.running.target
        self.channel = self.running.channel
        self.running.registry.ApplySource(
            registry_service_pb2.ApplySourceRequest(source=source_from_json(AD_IMPRESSIONS)),
            metadata=bearer(self.keys["admin"]),
        )


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    s = Secured(tmp_path)
    try:
        yield s
    finally:
        s.running.close()


def test_every_method_of_every_service_has_a_scope() -> None:
    """A new RPC or service cannot ship without someone deciding which scope may call it."""
    guarded = {service.full_name for file in GUARDED_FILES for service in file.services_by_name.values()}
    assert guarded == set(SERVICE_NAMES)
    methods = {m[0] for m in all_methods()}
    assert methods == set(METHOD_SCOPES), "METHOD_SCOPES must list exactly the featurepush methods"
    assert set(METHOD_SCOPES.values()) <= set(SCOPES)
    # Fails closed: a featurepush method missing from the table needs admin; other services are open.
    assert required_scope("/featurepush.v1.RegistryService/NewMethod") == "admin"
    assert required_scope("/grpc.health.v1.Health/Check") is None


def test_the_scope_matrix(secured: Secured) -> None:
    """Each scope calls its own methods and is refused the rest with PERMISSION_DENIED; admin calls all."""
    wrong = []
    for scope, key in secured.keys.items():
        for method, needed in METHOD_SCOPES.items():
            code = call(secured.channel, method, bearer(key))
            allowed = scope in (needed, "admin")
            if (
                allowed == (code == grpc.StatusCode.PERMISSION_DENIED)
                or code == grpc.StatusCode.UNAUTHENTICATED
            ):
                wrong.append((scope, method, code))
    assert wrong == []


def test_a_wrong_scope_is_permission_denied_with_error_info(secured: Secured) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        secured.running.ingest.Push(
            rows_request({"ad_impressions": []}), metadata=bearer(secured.keys["read"])
        )
    code, _, reason = rich_error(caught.value)
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "API_KEY_SCOPE_MISSING")
    assert "'ingest' scope" in caught.value.details()  # type: ignore[attr-defined]


def presented(secured: Secured) -> dict[str, tuple[list[tuple[str, str]] | None, str]]:
    """Every bad way to present a key, with the ErrorInfo reason it must get."""
    admin_id, admin_secret = split_key(secured.keys["admin"]) or ("", "")
    read_id, _ = split_key(secured.keys["read"]) or ("", "")
    return {
        "no metadata": (None, "API_KEY_MISSING"),
        "other metadata only": ([("x-api-key", secured.keys["admin"])], "API_KEY_MISSING"),
        "basic scheme": ([("authorization", f"Basic {secured.keys['admin']}")], "API_KEY_MALFORMED"),
        "bare key": ([("authorization", secured.keys["admin"])], "API_KEY_MALFORMED"),
        "empty bearer": ([("authorization", "Bearer ")], "API_KEY_MALFORMED"),
        "not a key": (bearer("hunter2"), "API_KEY_MALFORMED"),
        "truncated key": (bearer(secured.keys["admin"][:-1]), "API_KEY_MALFORMED"),
        "two headers": (bearer(secured.keys["read"]) + bearer(secured.keys["admin"]), "API_KEY_MALFORMED"),
        "unknown id": (bearer(f"fpk_{'0' * 12}_{admin_secret}"), "API_KEY_INVALID"),
        "wrong secret": (bearer(f"fpk_{admin_id}_{'A' * 43}"), "API_KEY_INVALID"),
        "secret of another key": (bearer(f"fpk_{read_id}_{admin_secret}"), "API_KEY_INVALID"),
        "revoked key": (bearer(secured.revoked), "API_KEY_INVALID"),
    }


def test_every_bad_key_is_unauthenticated_on_every_method(secured: Secured) -> None:
    """Streams included; nothing is read or written before the key is checked."""
    wrong = []
    for name, (metadata, _) in presented(secured).items():
        for method in METHOD_SCOPES:
            code = call(secured.channel, method, metadata)
            if code != grpc.StatusCode.UNAUTHENTICATED:
                wrong.append((name, method, code))
    assert wrong == []


def test_bad_keys_carry_their_reason(secured: Secured) -> None:
    for name, (metadata, reason) in presented(secured).items():
        with pytest.raises(grpc.RpcError) as caught:
            secured.running.registry.ListSources(registry_service_pb2.ListSourcesRequest(), metadata=metadata)
        assert rich_error(caught.value)[::2] == (grpc.StatusCode.UNAUTHENTICATED, reason), name
        # Unknown, wrong and revoked keys are indistinguishable to the caller.
        assert secured.keys["admin"] not in caught.value.details()  # type: ignore[attr-defined]


def test_the_scheme_is_case_insensitive(secured: Secured) -> None:
    code = call(
        secured.channel,
        "/featurepush.v1.RegistryService/ListSources",
        [("authorization", f"bearer {secured.keys['read']}")],
    )
    assert code == grpc.StatusCode.OK


def test_health_stays_open_without_a_key(secured: Secured) -> None:
    stub = health_pb2_grpc.HealthStub(secured.channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def list_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    return [s.name for r in responses for s in r.list_services_response.service]


def test_reflection_is_open_by_default_and_off_when_configured(secured: Secured, tmp_path: Path) -> None:
    assert "featurepush.v1.IngestService" in list_services(secured.channel)
    closed = start(tmp_path / "closed", keys_file=secured.keys_file, reflection=False)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            list_services(closed.channel)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    finally:
        closed.close()


def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll `check` until it is true; the keys file is re-read about once a second."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the server did not notice the keys file change"
        time.sleep(0.1)


def test_keys_file_changes_apply_without_a_restart(secured: Secured) -> None:
    method = "/featurepush.v1.RegistryService/ListSources"
    _, fresh = add_key(secured.keys_file, ["read"], "added while serving")
    eventually(lambda: call(secured.channel, method, bearer(fresh)) == grpc.StatusCode.OK)
    revoke_key(secured.keys_file, fresh.split("_")[1])
    eventually(lambda: call(secured.channel, method, bearer(fresh)) == grpc.StatusCode.UNAUTHENTICATED)
    # A broken file keeps the keys read before in force rather than locking everyone out.
    secured.keys_file.write_text("{not json")
    time.sleep(1.2)
    assert call(secured.channel, method, bearer(secured.keys["read"])) == grpc.StatusCode.OK


def test_keys_are_stored_only_as_salted_hashes(secured: Secured) -> None:
    text = secured.keys_file.read_text()
    assert os.stat(secured.keys_file).st_mode & 0o777 == 0o600
    for key in [*secured.keys.values(), secured.revoked]:
        key_id, secret = split_key(key) or ("", "")
        assert key_id in text and secret not in text
    stored = list(read_keys(secured.keys_file).values())
    assert len({k.salt for k in stored}) == len(stored)


def record(i: int) -> dict[str, object]:
    return {"user_id": f"u{i}", "timestamp": T0, "clicked": i}


def test_the_clients_send_their_key(secured: Secured) -> None:
    with Client(secured.target, api_key=secured.keys["ingest"]) as ingest:
        assert ingest.push("ad_impressions", [record(0)]).counts["ad_impressions"].written == 1
        with ingest.pusher("ad_impressions", max_rows=2) as pusher:
            pusher.add_many(record(i) for i in range(1, 5))
        assert pusher.stats.written == 4
        with pytest.raises(PermissionDeniedError, match="'read' scope"):
            list(ingest.list_sources())
    with Client(secured.target, api_key=secured.keys["read"]) as reader:
        results = reader.get_features("ad_impressions", ["u0", "u4"])
        assert [r.status for r in results] == [FeatureStatus.PRESENT] * 2
    with Client(secured.target) as anonymous, pytest.raises(UnauthenticatedError) as caught:
        list(anonymous.list_sources())
    assert caught.value.reason == "API_KEY_MISSING"
    with pytest.raises(ValueError, match="api_key must be one word"):
        Client(secured.target, api_key="fpk_x\nInjected: yes")


def test_the_async_client_sends_its_key(secured: Secured) -> None:
    async def scenario() -> None:
        async with AsyncClient(secured.target, api_key=secured.keys["admin"]) as client:
            await client.push("ad_impressions", [record(0)])
            async with client.pusher("ad_impressions", max_rows=2) as pusher:
                await pusher.add_many(record(i) for i in range(1, 5))
            assert pusher.stats.written == 4
            results = await client.get_features("ad_impressions", ["u4"])
            assert results[0].status == FeatureStatus.PRESENT
        async with AsyncClient(secured.target, api_key=secured.revoked) as client:
            with pytest.raises(UnauthenticatedError):
                await client.get_features("ad_impressions", ["u4"])

    asyncio.run(scenario())


def test_no_key_or_record_value_is_logged(secured: Secured, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rows = [{"user_id": SECRET_VALUE, "timestamp": T0, "clicked": 1}]
    for scope in SCOPES:
        with Client(secured.target, api_key=secured.keys[scope]) as client:
            for attempt in (lambda: client.push("ad_impressions", rows), lambda: list(client.list_sources())):
                try:
                    attempt()
                except (PermissionDeniedError, UnauthenticatedError):
                    pass
    for metadata, _ in presented(secured).values():
        call(secured.channel, "/featurepush.v1.IngestService/Push", metadata)
    assert "refused" in caplog.text
    for key in [*secured.keys.values(), secured.revoked]:
        assert split_key(key)[1] not in caplog.text  # type: ignore[index]
    assert SECRET_VALUE not in caplog.text


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "10.1.2.3:0", "myhost.example:0"])
def test_a_reachable_address_without_keys_is_refused(listen: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no keys_file is set"):
        ServerConfig(listen=listen)
    ServerConfig(listen=listen, allow_unauthenticated=True)
    ServerConfig(listen=listen, keys_file=tmp_path / "keys.json")


@pytest.mark.parametrize("listen", ["localhost:0", "127.0.0.1:0", "127.8.0.1:0", "[::1]:0"])
def test_loopback_needs_no_keys(listen: str) -> None:
    ServerConfig(listen=listen)


def test_start_up_says_who_can_call(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    open_server = start(tmp_path / "open")
    open_server.close()
    assert "no keys_file" in caplog.text and "loopback only" in caplog.text


@pytest.mark.parametrize(
    ("contents", "match"),
    [
        (None, r"keys_file: cannot read keys file .*keys\.json"),
        ("{", "is not valid JSON"),
        ('{"keys": []}', "is not a featurepush keys file"),
        ('{"version": 1, "keys": [{"id": "x"}]}', "malformed key entry"),
    ],
)
def test_a_bad_keys_file_stops_the_start(tmp_path: Path, contents: str | None, match: str) -> None:
    path = tmp_path / "keys.json"
    if contents is not None:
        path.write_text(contents)
    with pytest.raises(ConfigError, match=match):
        start(tmp_path / "data", keys_file=path)


def test_security_settings_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "featurepush.toml"
    path.write_text(
        '[server]\nlisten = "0.0.0.0:1"\nkeys_file = "keys.json"\n'
        'tls_cert = "s.pem"\ntls_key = "/abs/s.key"\n'
    )
    config = load_config(path, env={"FEATUREPUSH_REFLECTION": "false"})
    assert (config.keys_file, config.tls_cert, config.tls_key) == (
        tmp_path / "keys.json",
        tmp_path / "s.pem",
        Path("/abs/s.key"),
    )
    assert config.reflection is False and config.allow_unauthenticated is False
    with pytest.raises(ConfigError, match="allow_unauthenticated must be a bool, not 'maybe'"):
        load_config(env={"FEATUREPUSH_ALLOW_UNAUTHENTICATED": "maybe"})
