"""The owner protocol of `serve --processes`: RemoteStore to StoreOwner over a real RocksDB, in-process."""

from __future__ import annotations

import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurepush_server.core.errors import Unavailable
from featurepush_server.core.framing import time_header
from featurepush_server.core.stores.base import ROWS_FILES_INGESTED, BatchCounts, RowBatch
from featurepush_server.core.stores.remote import (
    CatalogVersion,
    RemoteStore,
    StoreOwner,
    _Frames,
    _In,
    _LargeBuffers,
    _Out,
    _send_frame,
)
from featurepush_server.core.stores.rocksdb import RocksDBStore, row_prefix


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[tuple[RemoteStore, RocksDBStore]]:
    store = RocksDBStore(tmp_path / "online", fsync=False)
    # Unix socket paths are short; the test's temp folder may not be.
    runtime = Path(tempfile.mkdtemp(prefix="fp-"))
    owner = StoreOwner(store, runtime / "s", CatalogVersion(runtime / "c"))
    owner.start()
    front = RemoteStore(runtime / "s", CatalogVersion(runtime / "c"))
    try:
        yield front, store
    finally:
        front.close()
        owner.close()
        store.close()
        for path in runtime.iterdir():
            path.unlink()
        runtime.rmdir()


def test_columns_and_fields_come_back_as_sent() -> None:
    items = [b"", b"\x00\xff", b"x" * 70_000, *(b"k%d" % i for i in range(5_000))]
    out = _Out().u8(7).column(items).column([]).text("caf\u00e9").blobs([b"a", None, b""]).i64(-3)
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=_send_frame, args=(a, out))
        sender.start()
        inp = _In(_Frames().receive(b) or b"")
        sender.join()
    assert inp.u8() == 7
    assert inp.column() == items
    assert inp.column() == []
    assert inp.text() == "caf\u00e9"
    assert inp.blobs() == [b"a", None, b""]
    assert inp.i64() == -3


def test_a_column_whose_offsets_run_past_the_frame_is_refused() -> None:
    out = _Out().column([b"abc", b"def"])
    body = bytearray(b"".join(out.parts))
    body[4 + 8 : 4 + 12] = (1000).to_bytes(4, "little")
    with pytest.raises(ValueError, match="offsets"):
        _In(bytes(body)).column()


def test_frames_reuse_their_buffer_and_what_was_read_stays_intact() -> None:
    a, b = socket.socketpair()
    frames = _Frames()
    kept: list[list[bytes]] = []
    with a, b:
        # Large, then small, then large again: the small one lands in the large one's buffer.
        for size in (200_000, 10, 300_000, 3):
            items = [bytes([size % 251]) * (size // 10)] * 10
            sender = threading.Thread(target=_send_frame, args=(a, _Out().column(items)))
            sender.start()
            body = frames.receive(b)
            assert body is not None
            kept.append(_In(body).column())
            sender.join()
        a.close()
        assert frames.receive(b) is None
    for size, items in zip((200_000, 10, 300_000, 3), kept, strict=True):
        assert items == [bytes([size % 251]) * (size // 10)] * 10


def test_frames_past_what_a_connection_keeps_share_a_bounded_set_of_buffers() -> None:
    large = _LargeBuffers(idle=2, idle_bytes=1_500_000)
    pairs = [socket.socketpair() for _ in range(3)]
    readers = [_Frames(large, keep=100_000) for _ in pairs]

    def frame(size: int) -> _Out:
        return _Out().column([bytes([size % 251]) * (size // 10)] * 10)

    def exchange(i: int, size: int) -> list[bytes]:
        sender = threading.Thread(target=_send_frame, args=(pairs[i][0], frame(size)))
        sender.start()
        body = readers[i].receive(pairs[i][1])
        assert body is not None
        items = _In(body).column()
        sender.join()
        return items

    try:
        # Three connections each take a large frame; none grows its own buffer past what it keeps.
        assert exchange(0, 500_000) == [bytes([500_000 % 251]) * 50_000] * 10
        assert exchange(1, 400_000) == [bytes([400_000 % 251]) * 40_000] * 10
        assert exchange(2, 600_000) == [bytes([600_000 % 251]) * 60_000] * 10
        assert [r.kept for r in readers] == [65_536] * 3
        assert large.idle_bytes == 0  # each is still lent: its frame's body stays valid until the next
        # Small frames hand them back; two wait for the next large frame, the third is dropped.
        for i in range(3):
            assert exchange(i, 30) == [bytes([30 % 251]) * 3] * 10
        idle = large.idle_bytes
        assert 1_000_000 < idle < 1_400_000
        # The next large frame, on any connection, reuses one of them.
        assert exchange(1, 550_000) == [bytes([550_000 % 251]) * 55_000] * 10
        assert large.idle_bytes < idle
        readers[1].close()
        assert large.idle_bytes == idle
        # A frame past what may wait in all is received whole, and its buffer is not kept after it.
        assert exchange(0, 2_000_000) == [bytes([2_000_000 % 251]) * 200_000] * 10
        assert exchange(0, 30) == [bytes([30 % 251]) * 3] * 10
        assert large.idle_bytes == idle
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_large_write_through_the_owner_keeps_the_latest_event_per_entity(
    remote: tuple[RemoteStore, RocksDBStore],
) -> None:
    front, store = remote
    keys = [b"r\x00\x00\x00\x01" + b"user%d" % i for i in range(20_000)]
    first = [time_header(10) + b"old%d" % i for i in range(20_000)]
    assert front.write_latest([RowBatch("s", keys, first)]).counts == {"s": BatchCounts(20_000, 20_000, 0)}
    # Newer for even entities, older for odd ones; a repeated key keeps its newest event.
    values = [time_header(20 if i % 2 == 0 else 5) + b"new%d" % i for i in range(20_000)]
    result = front.write_latest([RowBatch("s", [*keys, keys[0]], [*values, time_header(15) + b"stale"])])
    assert result.counts == {"s": BatchCounts(20_001, 10_000, 10_001)}
    assert front.read(keys[:4]) == [values[0], first[1], values[2], first[3]]
    assert store.read(keys[-2:]) == [values[-2], first[-1]]
    assert front.read([b"r\x00\x00\x00\x01nobody"]) == [None]


def test_every_front_and_worker_connecting_at_once_reaches_the_owner(
    remote: tuple[RemoteStore, RocksDBStore],
) -> None:
    front, _ = remote
    path, catalog = Path(front._path), front.catalog
    failed: list[Exception] = []
    start = threading.Barrier(64)

    def connect_and_read() -> None:
        store = RemoteStore(path, catalog)
        start.wait()
        try:
            assert store.read([b"r\x00\x00\x00\x01nobody"]) == [None]
        except Exception as e:  # noqa: BLE001 - collected for the assertion below
            failed.append(e)
        finally:
            store.close()

    threads = [threading.Thread(target=connect_and_read) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failed


def test_a_connection_past_a_full_backlog_waits_until_it_is_taken() -> None:
    runtime = Path(tempfile.mkdtemp(prefix="fp-"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(runtime / "s"))
    listener.listen(0)
    pending: list[socket.socket] = []
    try:
        # Fill the backlog until the kernel turns connections away.
        while True:
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            filler.setblocking(False)
            pending.append(filler)
            try:
                filler.connect(str(runtime / "s"))
            except BlockingIOError:
                break
        store = RemoteStore(runtime / "s", CatalogVersion(runtime / "c"), timeout_s=30)
        connected: list[socket.socket] = []
        waiter = threading.Thread(target=lambda: connected.append(store._connect()))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive()  # still trying: the owner is there, only busy
        listener.settimeout(5)
        while waiter.is_alive():
            pending.append(listener.accept()[0])
            waiter.join(0.05)
        assert len(connected) == 1
        connected[0].close()
    finally:
        for sock in [*pending, listener]:
            sock.close()
        for path in runtime.iterdir():
            path.unlink()
        runtime.rmdir()


def test_the_owner_keeps_the_latest_row_of_each_entity_within_and_across_writes(
    remote: tuple[RemoteStore, RocksDBStore],
) -> None:
    front, store = remote
    keys = [b"r\x00\x00\x00\x01" + b"e%d" % i for i in range(4)]
    # Entity 0 twice (the later, newer one wins), entity 1 twice at one time (the later one wins).
    rows = [(0, 10, b"a"), (1, 12, b"b"), (0, 11, b"c"), (2, 5, b"d"), (1, 12, b"e")]
    batch = RowBatch("s", [keys[i] for i, _, _ in rows], [time_header(t) + p for _, t, p in rows])
    result = front.write_latest([batch])
    assert (result.counts["s"].accepted, result.counts["s"].written) == (5, 3)
    assert store.read(keys[:3]) == [time_header(11) + b"c", time_header(12) + b"e", time_header(5) + b"d"]
    older = front.write_latest(
        [RowBatch("s", [keys[0], keys[3]], [time_header(9) + b"x", time_header(1) + b"y"])]
    )
    assert (older.counts["s"].written, older.counts["s"].superseded) == (1, 1)


_FIELDS = st.one_of(
    st.tuples(st.just("u8"), st.integers(0, 255)),
    st.tuples(st.just("i64"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("blob"), st.binary(max_size=20)),
    st.tuples(st.just("text"), st.text(max_size=10)),
    st.tuples(st.just("blobs"), st.lists(st.one_of(st.none(), st.binary(max_size=10)), max_size=5)),
    st.tuples(st.just("column"), st.lists(st.binary(max_size=10), max_size=5)),
    st.tuples(st.just("maybe"), st.one_of(st.none(), st.binary(max_size=10))),
)


@settings(max_examples=200, deadline=None)
@given(fields=st.lists(_FIELDS, min_size=1, max_size=6), data=st.data())
def test_a_frame_cut_short_is_refused_never_read_as_shorter_fields(
    fields: list[tuple[str, Any]], data: st.DataObject
) -> None:
    """Every field of a whole frame comes back as sent; a frame cut anywhere fails before its last field."""
    out = _Out()
    for kind, value in fields:
        getattr(out, kind)(value)
    body = b"".join(out.parts)
    inp = _In(body)
    assert [getattr(inp, kind)() for kind, _ in fields] == [value for _, value in fields]
    assert inp.at == len(body)
    cut = data.draw(st.integers(0, len(body) - 1))
    inp = _In(body[:cut])
    with pytest.raises((ValueError, struct.error)):
        for kind, _ in fields:
            getattr(inp, kind)()


@pytest.mark.parametrize(
    ("out", "read"),
    [
        (_Out().blob(b"abcdef"), _In.blob),
        (_Out().text("abcdef"), _In.text),
        (_Out().blobs([b"abc", None, b"def"]), _In.blobs),
        (_Out().maybe(b"abcdef"), _In.maybe),
        (_Out().u8(1), _In.u8),
    ],
)
def test_a_field_past_the_end_of_its_frame_is_refused(out: _Out, read: Any) -> None:
    # The frame's last byte cut: the field was read back one byte short.
    body = b"".join(out.parts)[:-1]
    with pytest.raises(ValueError, match="past its frame"):
        read(_In(body))


def test_a_rows_file_built_by_a_front_is_taken_by_the_owner_or_dropped_by_the_front(
    remote: tuple[RemoteStore, RocksDBStore],
) -> None:
    front, store = remote
    keys = [row_prefix(1) + b"k%d" % i for i in range(3)]
    values = [time_header(10 + i) + b"v" for i in range(3)]
    name = front.rows_file(keys, values)
    assert (store.rows_folder / name).exists()
    front.write_latest([RowBatch("s", keys, values, rows_file=name)])
    assert store.statistic(ROWS_FILES_INGESTED) == 1
    assert store.read(keys) == values and not list(store.rows_folder.iterdir())
    # A write that never reaches the owner (here the front's store is closing) leaves no file behind.
    name = front.rows_file(keys, [time_header(20) + b"w"] * 3)
    front.close()
    with pytest.raises(Unavailable):
        front.write_latest([RowBatch("s", keys, values, rows_file=name)])
    assert not list(store.rows_folder.iterdir())
