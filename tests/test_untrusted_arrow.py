"""Arrow IPC pushes from an attacker: mutated, forged and oversized streams are refused, never a crash."""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pyarrow as pa
import pytest
from conftest import Running, rich_error, source_from_json, start
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featurepush.v1 import ingest_service_pb2 as pb
from featurepush.v1 import ingest_service_pb2_grpc, registry_service_pb2, registry_service_pb2_grpc
from featurepush_server.core.errors import InvalidInput, LimitExceeded
from featurepush_server.core.ingest import SourcePayload, read_arrow, source_path
from featurepush_server.core.ipc import IpcLimits, arrow_ipc
from featurepush_server.core.offline_log import QUARANTINE_DIR, TIMESTAMP_FIELD_KEY
from featurepush_server.core.stores.base import RowBatch


def _scalar(name: str) -> dict[str, object]:
    return {"scalar": f"SCALAR_TYPE_{name}"}


SOURCE = "untrusted"
NESTED = {
    "name": SOURCE,
    "schema": {
        "fields": [
            {"name": "user_id", "type": _scalar("STRING")},
            {"name": "ts", "type": _scalar("TIMESTAMP")},
            {"name": "clicks", "type": _scalar("INT64"), "nullable": True},
            {"name": "tags", "type": {"array": {"elementType": _scalar("STRING")}}, "nullable": True},
            {
                "name": "scores",
                "type": {"map": {"valueType": _scalar("FLOAT64"), "valueNullable": True}},
                "nullable": True,
            },
            {
                "name": "geo",
                "type": {
                    "struct": {
                        "fields": [
                            {"name": "country", "type": _scalar("STRING")},
                            {"name": "seen", "type": _scalar("TIMESTAMP"), "nullable": True},
                        ]
                    }
                },
                "nullable": True,
            },
        ]
    },
    "entityKeys": ["user_id"],
    "timestampField": "ts",
    "pushConfig": {"logOffline": True},
}
PATH = source_path(SOURCE)
T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
MIB = 1024 * 1024


def nested_table(n: int = 8, *, dictionary: bool = False) -> pa.Table:
    """Valid records of NESTED, with lists, maps and structs, and a dictionary column if asked."""
    users = pa.array([f"u{i % 3}" for i in range(n)])
    return pa.table(
        {
            "user_id": users.dictionary_encode() if dictionary else users,
            "ts": pa.array([T0 + dt.timedelta(hours=i) for i in range(n)], pa.timestamp("us", tz="UTC")),
            "clicks": pa.array([i if i % 4 else None for i in range(n)], pa.int64()),
            "tags": pa.array(
                [["a", "bb"][: i % 3] if i % 5 else None for i in range(n)], pa.list_(pa.string())
            ),
            "scores": pa.array(
                [[("x", float(i)), ("y", None)] if i % 2 else [] for i in range(n)],
                pa.map_(pa.string(), pa.float64()),
            ),
            "geo": pa.array(
                [{"country": "FR", "seen": T0} if i % 3 else None for i in range(n)],
                pa.struct([("country", pa.string()), ("seen", pa.timestamp("us", tz="UTC"))]),
            ),
        }
    )


def stream(table: pa.Table, *, compression: str | None = None, chunk: int | None = None) -> bytes:
    """`table` as an IPC stream, compressed and split into batches if asked."""
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        for batch in table.to_batches(max_chunksize=chunk):
            writer.write_batch(batch)
    return bytes(sink.getvalue())


BASES = [
    stream(nested_table()),
    stream(nested_table(dictionary=True)),
    stream(nested_table(), compression="zstd"),
    stream(nested_table(), compression="lz4"),
    stream(nested_table(dictionary=True), compression="zstd", chunk=3),
]
# Values an attacker writes over lengths and offsets: zero, off by one, sign bits, huge.
INTERESTING = [0, 1, -1, 7, 8, 255, 1000, 100_000, 2**31 - 1, -(2**31), 2**32 - 1, 2**62, 2**63 - 1, -(2**63)]
Op = tuple[str, int, int, int]


def mutate(base: bytes, ops: Sequence[Op]) -> bytes:
    """Apply byte flips, truncations, splices of other streams and overwrites of int32/int64 fields."""
    data = bytearray(base)
    for kind, where, a, b in ops:
        if not data:
            break
        pos = where % len(data)
        if kind == "flip":
            data[pos] ^= 1 << (a % 8)
        elif kind == "truncate":
            del data[pos:]
        elif kind == "splice":
            other = BASES[a % len(BASES)]
            start = b % len(other)
            data[pos:pos] = other[start : start + 1 + a % 64]
        else:
            width = 4 if a % 2 else 8
            pos -= pos % width  # lengths and offsets are aligned
            value = INTERESTING[b % len(INTERESTING)] & ((1 << (8 * width)) - 1)
            data[pos : pos + width] = value.to_bytes(width, "little")
    return bytes(data)


def random_ops(rng: random.Random) -> list[Op]:
    """One to four random mutations."""
    kinds = ["flip", "truncate", "splice", "overwrite", "overwrite"]
    return [
        (rng.choice(kinds), rng.randrange(1 << 20), rng.randrange(1 << 16), rng.randrange(1 << 16))
        for _ in range(rng.randint(1, 4))
    ]


ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["flip", "truncate", "splice", "overwrite"]),
        st.integers(0, 1 << 20),
        st.integers(0, 1 << 16),
        st.integers(0, 1 << 16),
    ),
    min_size=1,
    max_size=4,
)


def patch_int32(data: bytes, old: int, new: int) -> bytes:
    """Replace the last little-endian int32 `old` (an offset in the last body) by `new`."""
    at = data.rfind(struct.pack("<i", old))
    assert at > 0
    return data[:at] + struct.pack("<i", new) + data[at + 4 :]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One in-process server with NESTED applied; the flusher runs only when a test calls it."""
    running = start(tmp_path_factory.mktemp("untrusted") / "data", offline_flush_interval_s=3600.0)
    try:
        running.apply(NESTED)
        yield running
    finally:
        running.close()


def push_in_process(running: Running, data: bytes) -> str:
    """Push through read_arrow, conform and encode without writing; 'ok' or the error's class name."""
    try:
        running.server.ingestor.push({SOURCE: SourcePayload(arrow_ipc=data)}, dry_run=True)
    except (InvalidInput, LimitExceeded) as e:
        return type(e).__name__
    return "ok"


def push(stub: ingest_service_pb2_grpc.IngestServiceStub, data: bytes) -> grpc.StatusCode:
    """The status code of a push of `data` to SOURCE."""
    try:
        stub.Push(pb.PushRequest(records={SOURCE: pb.SourceRecords(arrow_ipc=data)}), timeout=30)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


REFUSED = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_the_base_streams_are_accepted(server: Running) -> None:
    for data in BASES:
        assert push_in_process(server, data) == "ok"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.integers(0, len(BASES) - 1), ops=ops_strategy)
def test_mutated_streams_are_refused_or_valid_in_process(server: Running, base: int, ops: list[Op]) -> None:
    data = mutate(BASES[base], ops)
    assert push_in_process(server, data) in ("ok", "InvalidInput", "LimitExceeded")


def list_offsets_past_values() -> bytes:
    """A stream whose one list's offsets end far past its 777 values."""
    values = pa.array(["t"] * 777)
    tags = pa.ListArray.from_arrays(pa.array([0, 777], pa.int32()), values)
    table = nested_table(1).set_column(3, "tags", tags)
    return patch_int32(stream(table), 777, 1_000_000)


def dictionary_offsets_past_values() -> bytes:
    """A stream whose dictionary's one string ends far past its data."""
    users = pa.DictionaryArray.from_arrays(pa.array([0], pa.int32()), pa.array(["u" * 555]))
    table = nested_table(1).set_column(0, "user_id", users)
    return patch_int32(stream(table), 555, 1_000_000)


def index_past_dictionary() -> bytes:
    """A stream whose dictionary index points past its dictionary."""
    users = pa.DictionaryArray.from_arrays(pa.array([0], pa.int32()), pa.array(["u"]))
    table = nested_table(1).set_column(0, "user_id", users)
    return _patch_index(stream(table))


def _patch_index(data: bytes) -> bytes:
    """Set the last batch's first int32 dictionary index to a number past the dictionary."""
    reader = pa.ipc.MessageReader.open_stream(pa.BufferReader(data))
    messages = []
    while True:
        try:
            messages.append(reader.read_next_message())
        except StopIteration:
            break
    body = messages[-1].body
    assert body is not None
    # The first column's buffers lead the body: no validity bitmap (no nulls), then the indices.
    start = len(data) - body.size - 8  # the stream ends with an 8-byte end-of-stream marker
    assert data[start : start + 4] == b"\x00\x00\x00\x00"
    return data[:start] + struct.pack("<i", 4444) + data[start + 4 :]


FORGED = {
    "list_offsets_past_values": list_offsets_past_values,
    "dictionary_offsets_past_values": dictionary_offsets_past_values,
    "index_past_dictionary": index_past_dictionary,
}


@pytest.mark.parametrize("make", FORGED.values(), ids=FORGED.keys())
def test_forged_offsets_are_refused_before_anything_reads_them(server: Running, make: object) -> None:
    assert callable(make)
    with pytest.raises(InvalidInput) as info:
        read_arrow(make(), PATH)
    [violation] = info.value.violations
    assert violation.path == 'records["untrusted"].arrow_ipc'
    assert len(violation.description) < 300
    with pytest.raises(grpc.RpcError) as err:
        server.ingest.Push(pb.PushRequest(records={SOURCE: pb.SourceRecords(arrow_ipc=make())}))
    code, violations, reason = rich_error(err.value)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARROW")
    assert [path for path, _ in violations] == ['records["untrusted"].arrow_ipc']


@pytest.fixture(scope="module")
def zstd_bomb() -> bytes:
    """About 16 KB of zstd IPC that decompresses to 320 MB of zeros."""
    zeros = pa.py_buffer(bytes(64 * MIB))
    blobs = pa.Array.from_buffers(
        pa.binary(), 1, [None, pa.py_buffer(struct.pack("<ii", 0, 64 * MIB)), zeros]
    )
    table = pa.table({"blob": pa.chunked_array([blobs] * 5)})
    data = stream(table, compression="zstd")
    del table, blobs, zeros
    assert len(data) < 64 * 1024
    return data


def test_a_zstd_bomb_is_refused_before_it_is_decompressed(zstd_bomb: bytes) -> None:
    before = pa.total_allocated_bytes()
    peak = [before]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], pa.total_allocated_bytes())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(InvalidInput, match=r"decodes to more than 268435456 bytes") as info:
            read_arrow(zstd_bomb, PATH)
    finally:
        stop.set()
        watcher.join()
    assert info.value.reason == "ARROW_TOO_LARGE"
    assert peak[0] - before < MIB


def test_a_zstd_bomb_push_is_refused(server: Running, zstd_bomb: bytes) -> None:
    with pytest.raises(grpc.RpcError) as err:
        server.ingest.Push(pb.PushRequest(records={SOURCE: pb.SourceRecords(arrow_ipc=zstd_bomb)}))
    code, _, reason = rich_error(err.value)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ARROW_TOO_LARGE")


def test_a_dictionary_that_expands_past_the_limit_is_refused() -> None:
    users = pa.DictionaryArray.from_arrays(pa.array([0] * 1000, pa.int32()), pa.array(["u" * 100_000]))
    data = stream(nested_table(1000).set_column(0, "user_id", users))
    assert len(data) < MIB
    with pytest.raises(InvalidInput, match="dictionaries expand to more than"):
        read_arrow(data, PATH, IpcLimits(max_decoded_bytes=10 * MIB))


def wide(columns: int) -> bytes:
    return stream(pa.table({f"c{i}": pa.array([1]) for i in range(columns)}))


def deep(levels: int) -> bytes:
    arr: pa.Array = pa.array([1])
    for _ in range(levels - 1):
        arr = pa.ListArray.from_arrays(pa.array([0, 1], pa.int32()), arr)
    return stream(pa.table({"deep": arr}))


LIMITS = [
    ("batches", stream(nested_table(10), chunk=1), IpcLimits(max_batches=9), "more than 9 batches"),
    (
        "batches_with_dictionaries",
        stream(nested_table(6, dictionary=True), chunk=2),
        IpcLimits(max_batches=3),
        "more than 3 batches",
    ),
    ("columns", wide(11), IpcLimits(max_columns=10), "more than 10 fields"),
    ("nested_columns", deep(11), IpcLimits(max_columns=10), "more than 10 fields"),
    ("nesting", deep(6), IpcLimits(max_nesting=5), "deeper than 5 levels"),
    ("rows", stream(nested_table(11)), IpcLimits(max_rows=10), "more than 10 records"),
    ("decoded_bytes", stream(nested_table(100)), IpcLimits(max_decoded_bytes=1000), "more than 1000 bytes"),
]


@pytest.mark.parametrize(("data", "limits", "match"), [c[1:] for c in LIMITS], ids=[c[0] for c in LIMITS])
def test_limits_are_checked_from_the_metadata(data: bytes, limits: IpcLimits, match: str) -> None:
    before = pa.total_allocated_bytes()
    # The record limit is the push's, as for rows; every other limit refuses the stream itself.
    with pytest.raises(LimitExceeded if "records" in match else InvalidInput, match=match):
        read_arrow(data, PATH, limits)
    assert pa.total_allocated_bytes() == before


def test_the_server_applies_its_arrow_settings(tmp_path: Path) -> None:
    running = start(tmp_path / "data", max_arrow_batches=2, max_arrow_columns=12, max_records_per_request=5)
    try:
        running.apply(NESTED)
        for data, code, reason in [
            (stream(nested_table(3), chunk=1), grpc.StatusCode.INVALID_ARGUMENT, "ARROW_TOO_LARGE"),
            (stream(nested_table(6)), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_RECORDS"),
            (wide(13), grpc.StatusCode.INVALID_ARGUMENT, "ARROW_TOO_LARGE"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                running.ingest.Push(pb.PushRequest(records={SOURCE: pb.SourceRecords(arrow_ipc=data)}))
            assert rich_error(err.value)[::2] == (code, reason)
    finally:
        running.close()


def test_dictionary_deltas_are_refused() -> None:
    schema = pa.schema([("user_id", pa.dictionary(pa.int32(), pa.string()))])
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(emit_dictionary_deltas=True)
    with pa.ipc.new_stream(sink, schema, options=options) as writer:
        writer.write_batch(pa.record_batch([pa.array(["a"]).dictionary_encode()], schema=schema))
        grown = pa.DictionaryArray.from_arrays(pa.array([1], pa.int32()), pa.array(["a", "b"]))
        writer.write_batch(pa.record_batch([grown], schema=schema))
    with pytest.raises(InvalidInput) as info:
        read_arrow(bytes(sink.getvalue()), PATH)
    assert "dictionary deltas" in info.value.violations[0].description


_ZONED = pa.timestamp("us", tz="Etc/UTC")


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        (_ZONED, "ts"),
        (pa.list_(_ZONED), "ts.item"),
        (pa.dictionary(pa.int32(), _ZONED), "ts"),
        (pa.struct([("at", _ZONED)]), "ts.at"),
        # pyarrow reads arrow.opaque back as itself (from pyarrow 18): an extension over a timestamp.
        *([(pa.opaque(_ZONED, "instant", "elsewhere"), "ts")] if hasattr(pa, "opaque") else []),
    ],
    ids=["timestamp", "list", "dictionary", "struct", "extension"][: 5 if hasattr(pa, "opaque") else 4],
)
def test_a_time_zone_that_is_not_utf8_is_refused_as_a_malformed_stream(
    kind: pa.DataType, field: str, server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrow keeps a time zone as the stream's bytes; reading it as text was an unexpected error, logged
    # with a traceback, and refused with a message that named no cause.
    storage = kind.storage_type if isinstance(kind, pa.BaseExtensionType) else kind
    column = pa.nulls(1, storage)
    if isinstance(kind, pa.BaseExtensionType):
        column = pa.ExtensionArray.from_storage(kind, column)
    table = pa.table({"user_id": pa.array(["u"]), "ts": column})
    data = arrow_ipc(table)
    assert data.count(b"Etc/UTC") == 1
    forged = data.replace(b"Etc/UTC", b"Etc/\xd4\x01C")
    with pytest.raises(InvalidInput) as info:
        read_arrow(forged, PATH)
    assert f"the time zone of field {field!r} is not UTF-8" in info.value.violations[0].description
    with pytest.raises(grpc.RpcError) as refused:
        server.ingest.Push(pb.PushRequest(records={SOURCE: pb.SourceRecords(arrow_ipc=forged)}))
    code, violations, reason = rich_error(refused.value)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARROW")
    assert f"the time zone of field {field!r} is not UTF-8" in violations[0][1]
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xff\xff\xff\x00\x00\x00\x00",
        b"garbage" * 10,
        BASES[0][:40],
        b"\xff\xff\xff\xff\x10\x00\x00\x00" + bytes(16),
    ],
    ids=["empty", "end_marker_only", "garbage", "truncated_schema", "zeroed_flatbuffer"],
)
def test_streams_without_a_readable_schema_are_invalid(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        read_arrow(data, PATH)


# --- the offline log --------------------------------------------------------------------------


def logged_stream(table: pa.Table) -> bytes:
    """What a push queues for the offline log."""
    return arrow_ipc(table.replace_schema_metadata({TIMESTAMP_FIELD_KEY: b"ts"}))


def plant(running: Running, entry: bytes) -> None:
    """Queue an offline-log entry for SOURCE directly through the store, as if a push had."""
    running.server.store.write_latest([RowBatch(SOURCE, [], [], entry)])


BAD_ENTRIES = [
    arrow_ipc(nested_table(1)),  # no metadata naming the timestamp column
    patch_int32(logged_stream(nested_table(1).set_column(3, "tags", pa.array([["t"] * 777]))), 777, 10**6),
    b"not arrow at all",
    logged_stream(nested_table(2).drop_columns(["ts"])),
]


def test_a_bad_queue_entry_is_quarantined_and_the_log_goes_on(tmp_path: Path) -> None:
    running = start(tmp_path / "data", offline_flush_interval_s=3600.0)
    try:
        running.apply(NESTED)
        assert push(running.ingest, stream(nested_table(4))) == grpc.StatusCode.OK
        for entry in BAD_ENTRIES:
            plant(running, entry)
        assert push(running.ingest, stream(nested_table(6))) == grpc.StatusCode.OK
        log = running.server.offline_log
        assert log is not None
        assert log.flush() == 10
        assert log.quarantined == len(BAD_ENTRIES)
        assert running.server.store.queued_offline(1) == []
    finally:
        running.close()
    quarantine = tmp_path / "data" / "offline" / QUARANTINE_DIR
    assert sorted(p.read_bytes() for p in quarantine.iterdir()) == sorted(BAD_ENTRIES)
    assert all(re.fullmatch(r"\d{20}\.arrows", p.name) for p in quarantine.iterdir())


def test_a_restart_with_a_bad_queue_entry_comes_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    running = start(tmp_path / "data", offline_flush_interval_s=3600.0)
    try:
        running.apply(NESTED)
        plant(running, BAD_ENTRIES[1])
        assert push(running.ingest, stream(nested_table(3))) == grpc.StatusCode.OK
        # Stopping flushes; the server stops cleanly past the bad entry.
    finally:
        running.close()
    running = start(tmp_path / "data", offline_flush_interval_s=3600.0)
    try:
        plant(running, BAD_ENTRIES[0])
    finally:
        running.close()
    with caplog.at_level("ERROR"):
        running = start(tmp_path / "data", offline_flush_interval_s=0.05)
        try:
            assert push(running.ingest, stream(nested_table(2))) == grpc.StatusCode.OK
        finally:
            running.close()
    assert any("is quarantined" in r.getMessage() and SOURCE in r.getMessage() for r in caplog.records)
    assert len(list((tmp_path / "data" / "offline" / QUARANTINE_DIR).iterdir())) == 2
    rows = pa.dataset.dataset(tmp_path / "data" / "offline" / SOURCE, format="parquet").count_rows()  # type: ignore[attr-defined]
    assert rows == 5


# --- a real server process, which a crash would kill ------------------------------------------


class ServerProcess:
    """`featurepush serve` in a child process, flushing the offline log every 0.1 s."""

    def __init__(self, data_dir: Path):
        env = dict(os.environ, FEATUREPUSH_OFFLINE_FLUSH_INTERVAL_S="0.1")
        cmd = [sys.executable, "-m", "featurepush_server.cli", "serve", "--listen", "localhost:0"]
        cmd += ["--data-dir", str(data_dir)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        assert self.proc.stderr is not None
        self.port = 0
        self.log: list[str] = []
        for line in self.proc.stderr:
            self.log.append(line)
            match = re.search(r"\(port (\d+)\)", line)
            if match:
                self.port = int(match.group(1))
                break
        self._drain = threading.Thread(target=lambda: self.log.extend(self.proc.stderr or ()), daemon=True)
        self._drain.start()
        assert self.port, "the server did not come up:\n" + "".join(self.log)

    def stop(self) -> int:
        """SIGTERM, then the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self._drain.join()
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


def test_mutated_pushes_never_crash_a_server_process(tmp_path: Path) -> None:
    rng = random.Random(20260301)
    child = ServerProcess(tmp_path / "data")
    accepted = 0
    try:
        with grpc.insecure_channel(f"localhost:{child.port}") as channel:
            registry = registry_service_pb2_grpc.RegistryServiceStub(channel)
            registry.ApplySource(registry_service_pb2.ApplySourceRequest(source=source_from_json(NESTED)))
            ingest = ingest_service_pb2_grpc.IngestServiceStub(channel)
            for i in range(300):
                data = mutate(BASES[i % len(BASES)], random_ops(rng))
                code = push(ingest, data)
                assert code in REFUSED, f"mutation {i} answered {code}"
                assert child.proc.poll() is None, f"mutation {i} killed the server:\n" + "".join(
                    child.log[-40:]
                )
                accepted += code == grpc.StatusCode.OK
            for data in FORGED.values():
                assert push(ingest, data()) == grpc.StatusCode.INVALID_ARGUMENT
            assert push(ingest, BASES[0]) == grpc.StatusCode.OK
    finally:
        code = child.stop()
    assert code == 0, "".join(child.log[-40:])
    again = ServerProcess(tmp_path / "data")
    try:
        with grpc.insecure_channel(f"localhost:{again.port}") as channel:
            assert push(ingest_service_pb2_grpc.IngestServiceStub(channel), BASES[1]) == grpc.StatusCode.OK
    finally:
        code = again.stop()
    assert code == 0, "".join(again.log[-40:])
    running = start(tmp_path / "data", offline_flush_interval_s=3600.0)
    try:
        assert running.server.store.queued_offline(1) == []
        assert running.server.offline_log is not None
        assert running.server.offline_log.flush() == 0
    finally:
        running.close()
    assert (tmp_path / "data" / "offline" / SOURCE).is_dir()


def test_what_a_compressed_push_decodes_to_counts_against_the_push_bytes(tmp_path: Path) -> None:
    from conftest import AD_IMPRESSIONS

    running = start(tmp_path / "data", max_push_bytes=8 << 20)
    try:
        running.apply(AD_IMPRESSIONS)
        rows = 4_000
        table = pa.table(
            {
                # Each key a kilobyte of one repeated character: zstd makes the 4 MB column a few KB.
                "user_id": [f"{i:06d}" + "u" * 1024 for i in range(rows)],
                "timestamp": pa.array(
                    [dt.datetime(2026, 1, 1, tzinfo=dt.UTC)] * rows, pa.timestamp("us", "UTC")
                ),
                "clicked": pa.array([1] * rows, pa.int64()),
            }
        )
        data = stream(table, compression="zstd")
        assert len(data) < 200_000 < table.nbytes
        request = pb.PushRequest()
        request.records["ad_impressions"].arrow_ipc = data
        gate = running.server.admission.gate("push")  # type: ignore[union-attr]
        # Another push holding 6 MiB of the 8: this one's 4 MB of decoded keys do not fit beside it.
        gate.take_bytes(6 << 20)
        try:
            with pytest.raises(grpc.RpcError) as caught:
                running.ingest.Push(request)
            code, _, reason = rich_error(caught.value)
            assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED")
            assert "decodes to" in caught.value.details()
            assert gate.held_bytes == 6 << 20
        finally:
            gate.give_bytes(6 << 20)
        # Alone, the same push is taken, and every byte it counted is given back.
        assert running.ingest.Push(request).counts["ad_impressions"].written == rows
        assert gate.held_bytes == 0 and gate.extra_holders == 0
    finally:
        running.close()
