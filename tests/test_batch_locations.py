"""Batch source locations tried as an attacker would: nothing outside the operator's roots is reachable.

A secret (a random token) is planted outside the allowed root, in the data directory and in files that
are not what they claim to be; every reply the client gets (status, details, metadata, messages) is
searched for it.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import AD_IMPRESSIONS, Running, rich_error, rows_request, start
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from test_batch_source import history, source_doc

from featurepush.v1 import backfill_service_pb2 as pb
from featurepush.v1 import backfill_service_pb2_grpc
from featurepush_server.core.errors import Cancelled
from featurepush_server.core.locations import NOT_ALLOWED, BatchLocations, ListLimits

REFUSAL = NOT_ALLOWED.format(source="ad_impressions")
TOKEN = secrets.token_hex(16)


def exfiltrate(table: pa.Table) -> pa.Table:
    """A function of this module, so references into the module have something to aim at."""
    return table


class Place:
    """The file system an attacker aims at: an allowed root, a secret outside it, the data dir inside it."""

    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "root"
        self.outside = tmp_path / "outside"
        self.data = self.root / "data"
        for folder in (self.root, self.outside):
            folder.mkdir()
        # Shaped like /etc/passwd and like a valid source, so that only the rule keeps it out.
        self.secret = self.outside / "secret.csv"
        self.secret.write_text(f"root:x:0:0:{TOKEN}:/root:/bin/bash\nsecond,{TOKEN},line\n")
        self.secret_parquet = self.outside / "secret.parquet"
        pq.write_table(history().append_column("note", pa.array([TOKEN] * 10)), self.secret_parquet)
        (self.root / "link_to_secret.csv").symlink_to(self.secret)
        (self.root / "link_to_outside").symlink_to(self.outside, target_is_directory=True)
        (self.root / "inside").mkdir()


@pytest.fixture
def place(tmp_path: Path) -> Place:
    return Place(tmp_path)


@pytest.fixture
def server(place: Place) -> Iterator[Running]:
    r = start(
        place.data,
        batch_roots=(place.root,),
        batch_schemes=("s3",),
        post_processor_modules=(__name__,),
        offline_flush_interval_s=0.05,
    )
    try:
        yield r
    finally:
        r.close()


def replies(error: grpc.RpcError) -> str:
    """Everything a client can see of a failed call, as text."""
    parts = [str(error.code()), error.details() or "", repr(error.initial_metadata())]
    parts.append(repr(error.trailing_metadata()))
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is not None:
        parts.append(status.message)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                parts.append(repr(info))
    return "\n".join(parts)


def attack(
    running: Running, uri: str, fmt: str = "FILE_FORMAT_CSV", **batch: object
) -> tuple[list[str], str]:
    """Apply a source at `uri`, then read and backfill it: the status codes and all the client saw."""
    seen: list[str] = []
    codes = ["OK"]
    try:
        running.apply(source_doc(uri, fmt, **batch))
    except grpc.RpcError as e:
        return [e.code().name], replies(e)
    stub = backfill_service_pb2_grpc.BackfillServiceStub(running.channel)
    for call in (
        lambda: stub.ReadBatchSource(pb.ReadBatchSourceRequest(source="ad_impressions")),
        lambda: stub.Backfill(pb.BackfillRequest(source="ad_impressions")),
    ):
        try:
            seen.extend(repr(m) for m in call())
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
            seen.append(replies(e))
    return codes, "\n".join(seen)


def refused_alike(running: Running, uri: str, **batch: object) -> None:
    """`uri` is refused at apply with the one refusal, and the client saw nothing of the secret."""
    codes, seen = attack(running, uri, **batch)
    assert codes == ["FAILED_PRECONDITION"], seen
    assert REFUSAL in seen and "BATCH_LOCATION_NOT_ALLOWED" in seen
    assert TOKEN not in seen


@pytest.mark.parametrize(
    "uri",
    [
        "{secret}",
        "{secret_parquet}",
        "{outside}",
        "{outside}/missing.csv",
        "/nonexistent/missing.csv",
        "file://{secret}",
        "file://{outside}/missing.csv",
        "file://localhost{secret}",
        "file:{secret}",
        "{root}/../outside/secret.csv",
        "{root}/inside/../../outside/secret.csv",
        "file://{root}/%2E%2E/outside/secret.csv",
        "{root}/link_to_secret.csv",
        "{root}/link_to_outside",
        "{root}/link_to_outside/secret.csv",
        "{data}",
        "{data}/online/CURRENT",
        "{root}/inside?x=1",
        "{root}/inside#x",
        "/",
        "/etc/passwd",
        "/proc/self/environ",
        "gs://bucket/history.parquet",
        "memory://history.parquet",
        "http://127.0.0.1:1/history.csv",
        "S3://bucket/history.parquet",
        "s3://user:password@bucket/history.parquet",
        "s3://bucket:9000/history.parquet",
        "s3://bucket/history.parquet#x",
        "simplecache::s3://bucket/history.parquet",
        "offline://other_source",
        "offline://../offline/other_source",
    ],
)
def test_locations_outside_the_roots_are_refused_in_the_same_words(
    server: Running, place: Place, uri: str
) -> None:
    values = {k: str(getattr(place, k)) for k in ("secret", "secret_parquet", "outside", "root", "data")}
    target = uri.format(**values)
    codes, seen = attack(server, target)
    assert codes == ["FAILED_PRECONDITION"], seen
    assert TOKEN not in seen
    if not target.startswith("offline://"):
        assert REFUSAL in seen and "BATCH_LOCATION_NOT_ALLOWED" in seen
        # Nothing but the source's name: the refusal says nothing of the file system.
        assert rich_error_message(server, target) == REFUSAL


def rich_error_message(running: Running, uri: str) -> str:
    with pytest.raises(grpc.RpcError) as raised:
        running.apply(source_doc(uri, "FILE_FORMAT_PARQUET"))
    status = rpc_status.from_call(raised.value)  # type: ignore[arg-type]
    assert status is not None
    return status.message


def test_another_sources_offline_log_is_not_readable_by_its_path(server: Running, place: Place) -> None:
    server.apply(dict(AD_IMPRESSIONS, name="other", pushConfig={"logOffline": True}))
    row = {"user_id": TOKEN, "timestamp": "2026-11-25T10:00:00Z", "clicked": 1}
    server.ingest.Push(rows_request({"other": [row]}))
    logged = place.data / "offline" / "other"
    deadline = dt.datetime.now() + dt.timedelta(seconds=30)
    while not list(logged.rglob("*.parquet")):
        assert dt.datetime.now() < deadline, "the offline log was never flushed"
    for path in [logged, *logged.rglob("*")]:
        refused_alike(server, str(path), fileFormat="FILE_FORMAT_PARQUET")
        refused_alike(server, f"file://{path}")


def test_an_s3_uri_with_an_endpoint_never_reaches_it(server: Running) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        for uri in (
            f"s3://bucket/history.parquet?endpoint_override=127.0.0.1:{port}&scheme=http",
            f"s3://bucket/?endpoint_override=127.0.0.1%3A{port}",
            f"s3://key:secret@bucket/history.parquet?endpoint_override=localhost:{port}",
            f"s3://127.0.0.1:{port}/history.parquet",
        ):
            refused_alike(server, uri)
        ready, _, _ = select.select([listener], [], [], 0.5)
        assert not ready, "the server connected to the caller's endpoint"


def test_a_root_holding_the_data_dir_and_links_outside_lists_none_of_them(
    server: Running, place: Place
) -> None:
    codes, seen = attack(server, str(place.root), "FILE_FORMAT_PARQUET")
    assert codes == ["FAILED_PRECONDITION"] and "holds no files" in seen
    assert TOKEN not in seen


def test_existing_and_missing_paths_get_identical_refusals(server: Running, place: Place) -> None:
    messages = {
        rich_error_message(server, uri)
        for uri in (
            str(place.secret),
            str(place.outside / "missing.csv"),
            str(place.outside),
            str(place.outside / "missing"),
            f"file://{place.secret}",
            f"file://{place.outside}/missing.csv",
        )
    }
    assert messages == {REFUSAL}


def test_a_file_that_is_not_csv_never_shows_in_a_reply(server: Running, place: Place) -> None:
    notes = place.root / "inside" / "notes.txt"
    notes.write_text(f"{TOKEN} first line\nsecond,{TOKEN},line,of,many,fields\n")
    for fmt in ("FILE_FORMAT_CSV", "FILE_FORMAT_PARQUET", "FILE_FORMAT_ARROW_IPC"):
        codes, seen = attack(server, str(notes), fmt)
        assert codes == ["FAILED_PRECONDITION"], seen
        assert TOKEN not in seen and "ad_impressions" in seen


def test_a_bad_line_deep_in_a_csv_file_never_shows_in_a_reply(server: Running, place: Place) -> None:
    good = "".join(f"u{i % 3},2024-05-01T00:00:{i % 60:02d}Z,{i}\n" for i in range(60_000))
    path = place.root / "inside" / "history.csv"
    path.write_text(f"user_id,timestamp,clicked\n{good}u1,{TOKEN},1,{TOKEN}\n{good}")
    codes, seen = attack(server, str(path))
    assert codes == ["OK", "FAILED_PRECONDITION", "FAILED_PRECONDITION"]
    assert TOKEN not in seen
    assert "reading batch" in seen and "not valid CSV" in seen


def test_a_truncated_parquet_file_never_shows_in_a_reply(server: Running, place: Place) -> None:
    path = place.root / "inside" / "history.parquet"
    table = history(100_000).append_column("note", pa.array([TOKEN] * 100_000))
    pq.write_table(table, path, row_group_size=10_000)
    whole = path.read_bytes()
    codes, _ = attack(server, str(path), "FILE_FORMAT_PARQUET")
    assert codes == ["OK", "OK", "OK"]
    # Middle of the file overwritten with junk: the footer still describes the row groups.
    path.write_bytes(whole[: len(whole) // 2] + os.urandom(4096) + whole[len(whole) // 2 + 4096 :])
    stub = backfill_service_pb2_grpc.BackfillServiceStub(server.channel)
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.ReadBatchSource(pb.ReadBatchSourceRequest(source="ad_impressions", columns=["clicked"])))
    seen = replies(raised.value)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION, seen
    assert TOKEN not in seen


def test_a_definition_applied_under_wider_roots_is_refused_at_read_and_backfill(place: Place) -> None:
    wide = start(place.data, batch_roots=(place.root, place.outside))
    try:
        wide.apply(source_doc(str(place.secret_parquet), "FILE_FORMAT_PARQUET"))
    finally:
        wide.close()
    narrow = start(place.data, batch_roots=(place.root,))
    try:
        stub = backfill_service_pb2_grpc.BackfillServiceStub(narrow.channel)
        for call in (
            lambda: list(stub.ReadBatchSource(pb.ReadBatchSourceRequest(source="ad_impressions"))),
            lambda: list(stub.Backfill(pb.BackfillRequest(source="ad_impressions"))),
        ):
            with pytest.raises(grpc.RpcError) as raised:
                call()
            seen = replies(raised.value)
            assert TOKEN not in seen and REFUSAL in seen
            assert rich_error(raised.value)[2] == "BATCH_LOCATION_NOT_ALLOWED"
    finally:
        narrow.close()


def test_no_roots_by_default_leaves_only_the_offline_log(place: Place) -> None:
    running = start(place.data)
    try:
        refused_alike(running, str(place.root / "inside"))
        running.apply(
            dict(
                AD_IMPRESSIONS,
                pushConfig={"logOffline": True},
                batchConfig={"uri": "offline://ad_impressions", "fileFormat": "FILE_FORMAT_PARQUET"},
            )
        )
    finally:
        running.close()


@pytest.mark.parametrize(
    ("files", "depth", "settings", "match"),
    [
        (200, 0, {"batch_max_files": 100}, "holds more than 100 files and folders"),
        (1, 6, {"batch_max_depth": 4}, "is nested deeper than 4 folders"),
        (1, 1, {"batch_list_timeout_s": 1e-9}, "took longer than"),
    ],
)
def test_listing_a_location_stops_at_its_bounds(
    place: Place, files: int, depth: int, settings: dict[str, object], match: str
) -> None:
    folder = place.root / "big"
    leaf = folder.joinpath(*[f"d{i}" for i in range(depth)])
    leaf.mkdir(parents=True)
    for i in range(files):
        pq.write_table(history(1), leaf / f"{i}.parquet")
    running = start(place.data, batch_roots=(place.root,), **settings)
    try:
        with pytest.raises(grpc.RpcError) as raised:
            running.apply(source_doc(str(folder), "FILE_FORMAT_PARQUET"))
        code, _, reason = rich_error(raised.value)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and reason == "BATCH_LOCATION_TOO_LARGE"
        assert match in (raised.value.details() or "")
    finally:
        running.close()


def test_a_listing_stops_when_its_call_ends(place: Place) -> None:
    locations = BatchLocations([place.root], [], place.data)
    with pytest.raises(Cancelled):
        locations.listing(str(place.root), "ad_impressions", lambda: True)
    assert locations.listing(str(place.root / "inside"), "s", lambda: False).files == []


@pytest.mark.parametrize(
    "reference",
    [
        f"{__name__}:os.system",
        f"{__name__}:exfiltrate.__globals__",
        f"{__name__}:__builtins__",
        f"{__name__}:__loader__",
        f"{__name__}:_private",
        f"{__name__}:pa",
        f"{__name__}:secrets",
        f"{__name__}:start",
        f"{__name__}:Place",
        f"{__name__}:TOKEN",
        f"{__name__}:",
        f"{__name__}:exfiltrate:x",
        f"{__name__}.__init__:exfiltrate",
        f"{__name__}",
    ],
)
def test_post_processor_references_reach_only_functions_of_their_module(
    server: Running, place: Place, reference: str
) -> None:
    path = place.root / "inside" / "history.parquet"
    pq.write_table(history(), path)
    with pytest.raises(grpc.RpcError) as raised:
        server.apply(source_doc(str(path), "FILE_FORMAT_PARQUET", postProcessor=reference))
    code, _, reason = rich_error(raised.value)
    # A reference of the wrong shape is already refused as malformed by the schema check.
    assert (code, reason) in (
        (grpc.StatusCode.FAILED_PRECONDITION, "POST_PROCESSOR_NOT_FOUND"),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SOURCE"),
    )
    server.apply(source_doc(str(path), "FILE_FORMAT_PARQUET", postProcessor=f"{__name__}:exfiltrate"))


def _private(table: pa.Table) -> pa.Table:
    return table


def test_settings_come_from_the_file_the_environment_and_flags(tmp_path: Path) -> None:
    from featurepush_server.cli import build_parser
    from featurepush_server.config import ConfigError, ServerConfig, load_config

    assert (ServerConfig().batch_roots, ServerConfig().batch_schemes) == ((), ())
    path = tmp_path / "featurepush.toml"
    path.write_text('[server]\nbatch_roots = ["history"]\nbatch_schemes = ["s3"]\n')
    config = load_config(path, env={"FEATUREPUSH_STREAM_READ_AHEAD_BYTES": "1000000"})
    assert config.batch_roots == (tmp_path / "history",) and config.batch_schemes == ("s3",)
    assert config.stream_read_ahead_bytes == 1_000_000
    args = build_parser().parse_args(
        ["serve", "--batch-root", "/a", "--batch-root", "/b", "--batch-scheme", "gs"]
    )
    assert (args.batch_roots, args.batch_schemes) == ([Path("/a"), Path("/b")], ["gs"])
    for bad in ({"batch_schemes": ("file",)}, {"batch_schemes": ("s3://x",)}, {"batch_max_files": 0}):
        with pytest.raises(ConfigError):
            ServerConfig(**bad)  # type: ignore[arg-type]


def test_the_servers_own_offline_log_is_not_capped_by_the_file_bound(place: Place) -> None:
    log = place.data / "offline" / "s" / "date=2024-05-01"
    log.mkdir(parents=True)
    for i in range(5):
        (log / f"{i}.parquet").write_bytes(b"")
    locations = BatchLocations([place.root], [], place.data, ListLimits(max_entries=2, max_depth=1))
    assert len(locations.list_own(place.data / "offline" / "s", "s", lambda: False).files) == 5
