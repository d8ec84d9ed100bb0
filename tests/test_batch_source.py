"""Batch sources through ReadBatchSource: file formats, ranges, projection, post_processor, apply checks."""

from __future__ import annotations

import datetime as dt
import gc
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from conftest import AD_IMPRESSIONS, Running, start

from featurepush.batch import read_batch_source
from featurepush.errors import FailedPreconditionError, from_rpc_error
from featurepush.v1 import backfill_service_pb2 as pb
from featurepush.v1 import backfill_service_pb2_grpc

UTC = dt.UTC
DAY0 = dt.datetime(2024, 5, 1, tzinfo=UTC)


def history(n: int = 10) -> pa.Table:
    """n events, one per hour from DAY0, for users u0..u2."""
    return pa.table(
        {
            "user_id": [f"u{i % 3}" for i in range(n)],
            "timestamp": pa.array(
                [DAY0 + dt.timedelta(hours=i) for i in range(n)], pa.timestamp("us", "UTC")
            ),
            "clicked": pa.array(range(n), pa.int64()),
        }
    )


def source_doc(uri: str, fmt: str, **batch: object) -> dict[str, object]:
    """The seed's ad_impressions source with a batch config."""
    return dict(AD_IMPRESSIONS, batchConfig={"uri": uri, "fileFormat": fmt, **batch})


def doubled_clicks(table: pa.Table) -> pa.Table:
    """A post_processor: doubles clicks and drops a column the push schema lacks."""
    table = table.drop_columns(["extra"])
    return table.set_column(
        table.schema.get_field_index("clicked"), "clicked", pc.multiply(table["clicked"], 2)
    )


def failing(table: pa.Table) -> pa.Table:
    """A post_processor that fails on batches holding user u2."""
    if "u2" in table["user_id"].to_pylist():
        raise ValueError("no u2 here")
    return table


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Running]:
    r = start(
        tmp_path / "data",
        post_processor_modules=(__name__,),
        batch_roots=(tmp_path,),
        batch_schemes=("memory", "nosuchfs"),
    )
    try:
        yield r
    finally:
        r.close()


def write(table: pa.Table, fmt: str, folder: Path) -> str:
    """Write `table` in one format and return the batch config URI."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "FILE_FORMAT_PARQUET":
        pq.write_table(table, folder / "h.parquet")
        return str(folder / "h.parquet")
    if fmt == "FILE_FORMAT_CSV":
        pacsv.write_csv(table, folder / "h.csv")
        return str(folder / "h.csv")
    feather.write_feather(table, folder / "h.arrow")
    return str(folder / "h.arrow")


@pytest.mark.parametrize("fmt", ["FILE_FORMAT_PARQUET", "FILE_FORMAT_CSV", "FILE_FORMAT_ARROW_IPC"])
def test_every_file_format_reads_back_cast_to_the_push_schema(
    server: Running, tmp_path: Path, fmt: str
) -> None:
    server.apply(source_doc(write(history(), fmt, tmp_path / "src"), fmt))
    got = read_batch_source(server.channel, "ad_impressions").read_all()
    assert got.schema == pa.schema(
        [
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("timestamp", pa.timestamp("us", "UTC"), nullable=False),
            pa.field("clicked", pa.int64(), nullable=False),
        ]
    )
    assert got.to_pydict() == history().to_pydict()


def test_hive_partitioned_directory_with_a_renamed_time_column(server: Running, tmp_path: Path) -> None:
    table = history(48).rename_columns(["user_id", "event_time", "clicked"])
    table = table.append_column("day", pc.strftime(table["event_time"], format="%Y-%m-%d"))
    root = tmp_path / "hive"
    ds.write_dataset(table, root, format="parquet", partitioning=["day"], partitioning_flavor="hive")
    server.apply(
        source_doc(str(root), "FILE_FORMAT_PARQUET", hivePartitioning=True, timestampField="event_time")
    )
    got = read_batch_source(server.channel, "ad_impressions").read_all().sort_by("timestamp")
    assert got["clicked"].to_pylist() == list(range(48))


def test_time_range_and_projection(server: Running, tmp_path: Path) -> None:
    server.apply(source_doc(write(history(), "FILE_FORMAT_PARQUET", tmp_path), "FILE_FORMAT_PARQUET"))
    reader = read_batch_source(
        server.channel,
        "ad_impressions",
        start=DAY0 + dt.timedelta(hours=2),
        end=DAY0 + dt.timedelta(hours=5),
        columns=["clicked", "user_id"],
    )
    got = reader.read_all()
    assert got.column_names == ["clicked", "user_id"]
    assert got.to_pydict() == {"clicked": [2, 3, 4], "user_id": ["u2", "u0", "u1"]}


def test_batches_respect_row_and_byte_limits(server: Running, tmp_path: Path) -> None:
    server.apply(source_doc(write(history(1000), "FILE_FORMAT_PARQUET", tmp_path), "FILE_FORMAT_PARQUET"))
    by_rows = list(read_batch_source(server.channel, "ad_impressions", max_rows_per_batch=64))
    assert max(b.num_rows for b in by_rows) == 64 and sum(b.num_rows for b in by_rows) == 1000
    by_bytes = list(read_batch_source(server.channel, "ad_impressions", max_bytes_per_batch=2000))
    assert all(b.nbytes <= 2000 for b in by_bytes) and sum(b.num_rows for b in by_bytes) == 1000


def test_post_processor_runs_on_every_batch_before_the_cast(server: Running, tmp_path: Path) -> None:
    raw = history().append_column("extra", pa.array(["x"] * 10))
    uri = write(raw, "FILE_FORMAT_PARQUET", tmp_path)
    server.apply(source_doc(uri, "FILE_FORMAT_PARQUET", postProcessor=f"{__name__}:doubled_clicks"))
    got = read_batch_source(server.channel, "ad_impressions").read_all()
    assert got["clicked"].to_pylist() == [2 * i for i in range(10)]


def test_post_processor_failure_names_the_source_and_batch(server: Running, tmp_path: Path) -> None:
    uri = write(history().slice(0, 2), "FILE_FORMAT_PARQUET", tmp_path / "ok")
    server.apply(source_doc(uri, "FILE_FORMAT_PARQUET", postProcessor=f"{__name__}:failing"))
    pq.write_table(history(), uri)
    with pytest.raises(
        FailedPreconditionError, match=r"failing' of source 'ad_impressions' failed on batch 0"
    ) as e:
        read_batch_source(server.channel, "ad_impressions").read_all()
    assert e.value.reason == "POST_PROCESSOR_FAILED" and e.value.metadata["batch"] == "0"
    assert "no u2 here" in str(e.value)


@pytest.mark.parametrize(
    ("table", "match", "metadata"),
    [
        (history().drop_columns(["clicked"]), r"missing columns clicked", {"missing": "clicked"}),
        (
            history().set_column(2, "clicked", pa.array([True] * 10)),
            r"column clicked is bool, which cannot hold Int64",
            {"mistyped": "clicked"},
        ),
        (
            history().set_column(1, "timestamp", pa.array([DAY0.replace(tzinfo=None)] * 10)),
            r"column timestamp has no time zone",
            {"mistyped": "timestamp"},
        ),
    ],
)
def test_apply_refuses_a_batch_source_that_does_not_fit(
    server: Running, tmp_path: Path, table: pa.Table, match: str, metadata: dict[str, str]
) -> None:
    uri = write(table, "FILE_FORMAT_PARQUET", tmp_path)
    with pytest.raises(grpc.RpcError) as raised:
        server.apply(source_doc(uri, "FILE_FORMAT_PARQUET"))
    err = from_rpc_error(raised.value)
    assert isinstance(err, FailedPreconditionError)
    assert err.reason == "BATCH_SOURCE_SCHEMA_MISMATCH"
    assert re.search(match, err.message)
    for key, value in metadata.items():
        assert err.metadata[key] == value


def test_cancelling_a_read_releases_the_reader(server: Running, tmp_path: Path) -> None:
    uri = write(history(300_000), "FILE_FORMAT_PARQUET", tmp_path)
    server.apply(source_doc(uri, "FILE_FORMAT_PARQUET"))
    sources = server.server.batch_sources
    assert sources is not None
    stub = backfill_service_pb2_grpc.BackfillServiceStub(server.channel)
    call = stub.ReadBatchSource(pb.ReadBatchSourceRequest(source="ad_impressions", max_rows_per_batch=100))
    assert next(call).HasField("arrow_schema") and next(call).HasField("arrow_record_batch")
    assert sources.open_readers == 1
    call.cancel()
    wait_until(lambda: sources.open_readers == 0)


def test_dropping_the_client_reader_cancels_the_call(server: Running, tmp_path: Path) -> None:
    uri = write(history(300_000), "FILE_FORMAT_PARQUET", tmp_path)
    server.apply(source_doc(uri, "FILE_FORMAT_PARQUET"))
    sources = server.server.batch_sources
    assert sources is not None
    reader = read_batch_source(server.channel, "ad_impressions", max_rows_per_batch=100)
    assert reader.read_next_batch().num_rows == 100
    del reader
    gc.collect()
    wait_until(lambda: sources.open_readers == 0)


def wait_until(condition: Callable[[], bool]) -> None:
    """Wait for a condition the server reaches asynchronously; fail if it never does."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "the condition was never reached"
        time.sleep(0.01)


def test_a_post_processor_outside_the_allowed_modules_is_refused(server: Running, tmp_path: Path) -> None:
    uri = write(history(), "FILE_FORMAT_PARQUET", tmp_path)
    with pytest.raises(grpc.RpcError) as raised:
        server.apply(source_doc(uri, "FILE_FORMAT_PARQUET", postProcessor="os:getcwd"))
    err = from_rpc_error(raised.value)
    assert isinstance(err, FailedPreconditionError)
    assert err.reason == "POST_PROCESSOR_NOT_ALLOWED"
    assert "post_processor_modules" in err.message


def test_a_definitions_file_may_post_process_with_its_own_functions(tmp_path: Path) -> None:
    uri = write(history(), "FILE_FORMAT_PARQUET", tmp_path)
    definitions = tmp_path / "clicks_definitions_with_post.py"
    definitions.write_text(
        "import pyarrow.compute as pc\n"
        "from featurepush import Field, FileConfig, Int64, StreamSource, String, Timestamp\n"
        "def tenfold(table):\n"
        "    return table.set_column(2, 'clicked', pc.multiply(table['clicked'], 10))\n"
        "source = StreamSource(name='tenfold', entity_keys=['user_id'], timestamp_field='timestamp',\n"
        "    schema=[Field('user_id', String), Field('timestamp', Timestamp), Field('clicked', Int64)],\n"
        f"    batch_config=FileConfig(uri={uri!r}, file_format='parquet', post_processor=tenfold))\n"
    )
    running = start(tmp_path / "data", definitions=(definitions,), batch_roots=(tmp_path,))
    try:
        got = read_batch_source(running.channel, "tenfold").read_all()
        assert got["clicked"].to_pylist() == [c * 10 for c in history()["clicked"].to_pylist()]
    finally:
        running.close()


def test_a_uri_pyarrow_cannot_open_is_read_through_fsspec(server: Running) -> None:
    import fsspec

    memory = fsspec.filesystem("memory")
    with memory.open("/featurepush-test/history.parquet", "wb") as fh:
        pq.write_table(history(), fh)
    try:
        server.apply(source_doc("memory://featurepush-test/history.parquet", "FILE_FORMAT_PARQUET"))
        got = read_batch_source(server.channel, "ad_impressions").read_all()
        assert got["clicked"].to_pylist() == history()["clicked"].to_pylist()
    finally:
        memory.rm("/featurepush-test", recursive=True)


def test_a_uri_no_filesystem_can_open_is_refused_naming_the_extras(server: Running) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        server.apply(source_doc("nosuchfs://bucket/history.parquet", "FILE_FORMAT_PARQUET"))
    err = from_rpc_error(raised.value)
    assert isinstance(err, FailedPreconditionError)
    assert "featurepush[s3]" in err.message
