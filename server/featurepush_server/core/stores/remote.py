"""A store served by one owner process to the gRPC fronts of `serve --processes`, over a Unix socket.

The owner opens the real store (RocksDB) and answers `StoreOwner` requests; each front uses a
`RemoteStore`, which implements the Store protocol by sending those requests. This module alone writes
and reads the framing:

  request  u32 length, u8 op code, then the op's fields
  reply    u32 length, u8 status (0 ok, 1 error), u8 writable (1 or 0), then the result's fields
           (for an error: the exception's class name, message, reason and JSON metadata)

Fields are big-endian: integers as i64, flags as u8, strings and byte strings as a u32 length then the
bytes. A list of byte strings (a read's keys) is a u32 count, the u32 lengths of all items, then their
bytes one after another; in a read's reply a length of 0xFFFFFFFF is a missing value. A column of byte
strings (a RowBatch's keys or values) is a u32 count n, n + 1 little-endian i32 offsets from 0, then the
bytes: Arrow's layout of a binary array, so the owner takes it apart in Arrow's C++ code, not per item.
Arrays of numbers (tile starts, partial aggregates) are a byte string of little-endian int64s or
float64s.

After a batch's columns comes the name of its rows file ("" for none): a large backfill write's rows,
written by the front or worker as an SST file in the folder the owner names (op ROWS_FOLDER), which the
owner may ingest whole instead of writing the rows (RocksDBStore.write_latest).

A push's feature-view tile updates (tiles.ViewTiles, computed by the front) follow their batch's rows:
per update the view's name, id, generation and backfill run, the parts of its spec a merge reads (interval,
longest window, moment, list and sketch columns), then the tile keys, starts, fixed blocks and the JSON of
the variable parts; the owner merges them under the store's lock in the same write as the rows.

Catalog changes (put_source, delete_source, put_view, delete_view) are announced through an 8-byte counter
in a shared file, written like a seqlock: odd while a change is being written, even once it is done, and
increased by each owner at start. A front's registry and views drop their cached definitions when the
counter moves. Source and view generations carry the owner's start count in their upper bits, so a
definition validated under an earlier owner is refused with ABORTED rather than checked against a
restarted owner's counts. A second such counter counts the owner's writes, by which a front knows whether
its read-only snapshot of the database may answer a read (core/stores/snapshots.py); reads it cannot
answer come here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import select
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from .. import errors
from ..errors import Aborted, CoreError, Unavailable
from ..gate import UsageGate
from ..tiles import Codec, ViewTiles, merge_spec
from .base import (
    BatchCounts,
    BinaryColumn,
    QueuedRecords,
    RowBatch,
    Store,
    StoreFormatError,
    TileUpdate,
    WriteResult,
)

if TYPE_CHECKING:
    from .snapshots import SnapshotReader

_LOGGER = logging.getLogger(__name__)

_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_MISSING = 0xFFFFFFFF
# Generations are (owner start count << 32) | the owner's own count of the source's definition writes.
_GENERATION_BITS = 32

(
    GET_SOURCE,
    LIST_SOURCES,
    PUT_SOURCE,
    LATE_FIELDS,
    DELETE_SOURCE,
    GENERATION,
    EXCLUSIVE_BEGIN,
    ROW_PREFIX,
    WRITE_LATEST,
    READ,
    DELETE_EXPIRED,
    HAS_ROWS,
    SEEN_REQUEST,
    PURGE_REQUESTS,
    QUEUED_OFFLINE,
    DELETE_OFFLINE,
    RECOVER,
    STATISTIC,
    SYNC_NOW,
    COUNT_ROWS,
    COUNT_OFFLINE,
    GET_VIEW,
    LIST_VIEWS,
    PUT_VIEW,
    DELETE_VIEW,
    VIEW_GENERATION,
    HAS_TILES,
    GET_SERVICE,
    LIST_SERVICES,
    PUT_SERVICE,
    DELETE_SERVICE,
    TILE_KEY,
    TILE_KEYS,
    READ_TILES,
    SCAN_TILES,
    VIEW_STATE,
    UPDATE_VIEW_STATE,
    DELETE_TILES_BEFORE,
    ROWS_FOLDER,
) = range(1, 40)


class _Out:
    """The fields of one frame, appended in order."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, value: int) -> _Out:
        self.parts.append(_U8.pack(value))
        return self

    def i64(self, value: int) -> _Out:
        self.parts.append(_I64.pack(value))
        return self

    def blob(self, value: bytes) -> _Out:
        self.parts.append(_U32.pack(len(value)))
        self.parts.append(value)
        return self

    def text(self, value: str) -> _Out:
        return self.blob(value.encode())

    def blobs(self, items: Sequence[bytes | None]) -> _Out:
        n = len(items)
        lengths = [_MISSING if item is None else len(item) for item in items]
        self.parts.append(_U32.pack(n))
        self.parts.append(struct.pack(f">{n}I", *lengths))
        self.parts.extend(item for item in items if item)
        return self

    def texts(self, items: Sequence[str]) -> _Out:
        return self.blobs([item.encode() for item in items])

    def column(self, items: Sequence[bytes]) -> _Out:
        n = len(items)
        offsets = np.zeros(n + 1, dtype="<i4")
        np.cumsum(np.fromiter(map(len, items), dtype=np.int64, count=n), out=offsets[1:])
        self.parts += (_U32.pack(n), offsets.tobytes(), b"".join(items))
        return self

    def maybe(self, value: bytes | None) -> _Out:
        """A byte string or None: a presence flag, then the bytes."""
        return self.u8(value is not None).blob(value or b"")


class _In:
    """Reads the fields of one frame in the order they were written; each field read is a copy.

    A field that runs past the frame raises ValueError (struct.error for a fixed-width one): a body cut
    short is never read as shorter values.
    """

    def __init__(self, data: bytes | memoryview):
        self.data = memoryview(data)
        self.at = 0

    def u8(self) -> int:
        if self.at >= len(self.data):
            raise ValueError("a field runs past its frame")
        value: int = self.data[self.at]
        self.at += 1
        return value

    def i64(self) -> int:
        (value,) = _I64.unpack_from(self.data, self.at)
        self.at += 8
        return int(value)

    def blob(self) -> bytes:
        (n,) = _U32.unpack_from(self.data, self.at)
        start = self.at + 4
        if start + n > len(self.data):
            raise ValueError("a field runs past its frame")
        self.at = start + n
        return self.data[start : self.at].tobytes()

    def text(self) -> str:
        return self.blob().decode()

    def blobs(self) -> list[bytes | None]:
        (n,) = _U32.unpack_from(self.data, self.at)
        lengths = struct.unpack_from(f">{n}I", self.data, self.at + 4)
        at = self.at + 4 + 4 * n
        data = self.data
        out: list[bytes | None] = []
        append = out.append
        for length in lengths:
            if length == _MISSING:
                append(None)
            else:
                append(data[at : at + length].tobytes())
                at += length
        if at > len(data):
            # Slices stop at the end: an item past it came back short.
            raise ValueError("a field runs past its frame")
        self.at = at
        return out

    def present_blobs(self) -> list[bytes]:
        return [b"" if item is None else item for item in self.blobs()]

    def texts(self) -> list[str]:
        return [item.decode() for item in self.present_blobs()]

    def column(self) -> list[bytes]:
        items: list[bytes] = self.column_array().to_numpy(zero_copy_only=False).tolist()
        return items

    def column_array(self) -> pa.Array:
        """A column as a validated Arrow binary array over the frame's bytes, valid until the next frame."""
        (n,) = _U32.unpack_from(self.data, self.at)
        start = self.at + 4 + 4 * (n + 1)
        offsets = np.frombuffer(self.data, dtype="<i4", count=n + 1, offset=self.at + 4)
        end = start + int(offsets[-1])
        if offsets[0] != 0 or end > len(self.data):
            raise ValueError("a column's offsets run past its frame")
        data = pa.py_buffer(memoryview(self.data)[start:end])
        array = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), data])
        array.validate(full=True)
        self.at = end
        return array

    def maybe(self) -> bytes | None:
        present = self.u8()
        value = self.blob()
        return value if present else None


class _LargeBuffers:
    """Buffers for frames larger than a connection keeps, shared by every connection of an owner.

    A backfill chunk's frame is tens of megabytes. Kept by each connection that ever carried one, such
    buffers added up to gigabytes across the dozens of connections of a large machine; allocated afresh for
    each frame, they cost the kernel a page fault per page again. Here they are reused by whichever
    connection needs one next, and at most `idle` of them, `idle_bytes` in all, wait between frames.
    """

    def __init__(self, idle: int = 4, idle_bytes: int = 256 << 20) -> None:
        self._idle = idle
        self._idle_bytes = idle_bytes
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> bytearray:
        """A buffer of at least n bytes: the smallest idle one that fits, or a new one."""
        with self._lock:
            fits = [b for b in self._free if len(b) >= n]
            if fits:
                buffer = min(fits, key=len)
                self._free.remove(buffer)
                return buffer
        # A little room over the frame lets the next, slightly larger chunk reuse it.
        return bytearray(n + n // 8)

    def give(self, buffer: bytearray) -> None:
        """Return a buffer; past `idle_bytes` waiting the largest goes, past `idle` buffers the smallest."""
        with self._lock:
            self._free.append(buffer)
            # One very large frame (a push near the message limit) must not stay in memory for good.
            while self._free and sum(map(len, self._free)) > self._idle_bytes:
                self._free.remove(max(self._free, key=len))
            if len(self._free) > self._idle:
                self._free.remove(min(self._free, key=len))

    @property
    def idle_bytes(self) -> int:
        """Bytes of the buffers waiting between frames."""
        with self._lock:
            return sum(map(len, self._free))


class _Frames:
    """Receives a connection's frames: up to `keep` bytes into its own buffer, larger ones into shared ones.

    A fresh buffer of a few megabytes costs the kernel a page fault per page touched, which for a write of
    thousands of rows cost more than parsing it, so buffers are reused; what one connection holds between
    frames is at most `keep` bytes (see _LargeBuffers for larger frames). A frame's body is valid until the
    next receive; `_In` copies out whatever it reads, so nothing holds on to it beyond its request.
    """

    def __init__(self, large: _LargeBuffers | None = None, keep: int = 8 << 20) -> None:
        self._keep = keep
        self._large = large or _LargeBuffers()
        self._buffer = bytearray(min(64 * 1024, keep))
        self._lent: bytearray | None = None

    @property
    def kept(self) -> int:
        """Bytes of the connection's own buffer."""
        return len(self._buffer)

    def receive(self, sock: socket.socket) -> memoryview | None:
        """The body of the next frame, or None when the peer closed the connection between frames."""
        if self._lent is not None:
            # The previous frame's body is no longer valid: its shared buffer goes back.
            self._large.give(self._lent)
            self._lent = None
        head = _recv_exact(sock, 4, eof_ok=True)
        if head is None:
            return None
        (n,) = _U32.unpack(head)
        if n > self._keep:
            buffer = self._lent = self._large.take(n)
        else:
            if len(self._buffer) < n:
                # A new buffer rather than a resized one: views of the old one may still exist.
                self._buffer = bytearray(min(max(n, 2 * len(self._buffer)), self._keep))
            buffer = self._buffer
        view = memoryview(buffer)[:n]
        got = 0
        while got < n:
            k = sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionError("the store connection closed in the middle of a frame")
            got += k
        return view

    def close(self) -> None:
        """Return a shared buffer still lent to this connection."""
        if self._lent is not None:
            self._large.give(self._lent)
            self._lent = None


def _recv_frame(sock: socket.socket) -> bytes | None:
    """The body of the next frame, or None when the peer closed the connection between frames."""
    head = _recv_exact(sock, 4, eof_ok=True)
    if head is None:
        return None
    (n,) = _U32.unpack(head)
    body = _recv_exact(sock, n, eof_ok=False)
    assert body is not None
    return body


def _recv_exact(sock: socket.socket, n: int, *, eof_ok: bool) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if eof_ok and got == 0:
                return None
            raise ConnectionError("the store connection closed in the middle of a frame")
        got += k
    return bytes(buf)


# At most this many buffers go to one sendmsg call (the system's limit is 1024); more are joined first.
_GATHER_MAX = 64


def _send_frame(sock: socket.socket, out: _Out) -> None:
    """Send one frame; its parts go out as they are, without joining megabytes of rows into one copy."""
    parts = [p for p in out.parts if p]
    header = _U32.pack(sum(map(len, parts)))
    if len(parts) > _GATHER_MAX:
        sock.sendall(header + b"".join(parts))
        return
    views = [memoryview(header), *(memoryview(p) for p in parts)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


def _counts_out(out: _Out, counts: dict[str, BatchCounts]) -> None:
    out.i64(len(counts))
    for source, c in counts.items():
        out.text(source).i64(c.accepted).i64(c.written).i64(c.superseded).i64(c.late_skipped)


def _counts_in(inp: _In) -> dict[str, BatchCounts]:
    return {inp.text(): BatchCounts(inp.i64(), inp.i64(), inp.i64(), inp.i64()) for _ in range(inp.i64())}


def _tiles_out(out: _Out, update: TileUpdate) -> None:
    """One view's tile update of a push or backfill batch, as the front computed it."""
    if not isinstance(update, ViewTiles):
        raise CoreError(f"the tile update of feature view {update.view!r} cannot be sent to the store")
    spec = update.spec
    out.text(update.view).i64(update.view_id).i64(update.generation).text(update.run)
    out.i64(spec.interval).i64(spec.longest_window).texts(spec.moments)
    out.texts([column for column, _, _ in spec.lists]).texts([kind for _, kind, _ in spec.lists])
    out.blob(np.array([n for _, _, n in spec.lists], dtype="<i8").tobytes()).texts(spec.sketches)
    out.blobs(update.keys)
    out.blob(update.starts.astype("<i8").tobytes())
    out.blob(update.fixed.astype("<f8").tobytes())
    out.blob(json.dumps(update.var, separators=(",", ":")).encode() if update.codec.has_var else b"")


def _tiles_in(inp: _In) -> ViewTiles:
    """A tile update as `_tiles_out` wrote it, ready for the store to merge."""
    view, view_id, generation, run = inp.text(), inp.i64(), inp.i64(), inp.text()
    interval, longest, moments = inp.i64(), inp.i64(), tuple(inp.texts())
    columns, kinds = inp.texts(), inp.texts()
    sizes = np.frombuffer(inp.blob(), dtype="<i8").tolist()
    lists = tuple(zip(columns, kinds, sizes, strict=True))
    spec = merge_spec(view, interval, longest, moments, lists, tuple(inp.texts()))
    codec = Codec(spec)
    keys = inp.present_blobs()
    starts = np.frombuffer(inp.blob(), dtype="<i8")
    fixed = np.frombuffer(inp.blob(), dtype="<f8").reshape(len(keys), codec.width)
    var_json = inp.blob()
    var = json.loads(var_json) if var_json else [None] * len(keys)
    if not len(starts) == len(var) == len(keys):
        raise CoreError(f"the tile update of feature view {view!r} is malformed")
    rows = fixed[:, 0].copy()
    return ViewTiles(view, view_id, generation, spec, codec, keys, starts, rows, fixed, var, run)


# The core errors a reply may carry, by class name; anything else comes back as a plain CoreError.
_ERRORS: dict[str, type[CoreError]] = {
    cls.__name__: cls
    for cls in (*vars(errors).values(), StoreFormatError)
    if isinstance(cls, type) and issubclass(cls, CoreError)
}


class SharedCounter:
    """An 8-byte counter in a file mapped into memory: one process writes it, every other reads it."""

    def __init__(self, path: Path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self._map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)
        self._lock = threading.Lock()

    def read(self) -> int:
        """The counter now."""
        value: int = _I64.unpack_from(self._map, 0)[0]
        return value

    def bump(self) -> int:
        """Add one and return the new value; the writing process's threads may call it at once."""
        with self._lock:
            value = self.read() + 1
            _I64.pack_into(self._map, 0, value)
        return value


class CatalogVersion(SharedCounter):
    """The shared counter of catalog changes (see the module docstring); odd while one is being written."""

    def start_owner(self) -> int:
        """A new owner's start: skip to the next even value, so every front drops its cache; return it."""
        value = self.read()
        value += 2 if value % 2 == 0 else 1
        _I64.pack_into(self._map, 0, value)
        return value


class StoreOwner:
    """Serves one Store to the fronts on a Unix socket, a thread per connection; `close()` stops it.

    The store's own lock decides every write, so latest-by-event-time, atomic multi-source writes and
    request-id replays hold across fronts as within one process; a reply is sent only once the store
    returned, so after its WAL sync under fsync=always.
    """

    def __init__(self, store: Store, socket_path: Path, catalog: CatalogVersion):
        self._store = store
        self._catalog = catalog
        self._epoch = catalog.start_owner() << _GENERATION_BITS
        self._large_buffers = _LargeBuffers()
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                owner._serve_connection(self.request)

        class Server(socketserver.ThreadingUnixStreamServer):
            # Every front and backfill worker may connect at once: with socketserver's default backlog
            # of 5, the connections past it would be refused (EAGAIN) while the owner is healthy.
            request_queue_size = socket.SOMAXCONN

        socket_path.unlink(missing_ok=True)
        self._server = Server(str(socket_path), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="featurepush-store-owner", daemon=True
        )

    def start(self) -> None:
        """Accept connections in a background thread."""
        self._thread.start()

    def close(self) -> None:
        """Stop accepting connections; calls in progress finish against the store, which closes later."""
        self._server.shutdown()
        self._server.server_close()

    def _serve_connection(self, sock: socket.socket) -> None:
        # A front holding the store exclusively keeps it until it closes the connection.
        frames = _Frames(self._large_buffers)
        with ExitStack() as held:
            held.callback(frames.close)
            while True:
                try:
                    body = frames.receive(sock)
                except OSError:
                    return
                if body is None:
                    return
                inp = _In(body)
                op = inp.u8()
                out = _Out()
                try:
                    result = _Out()
                    if op == EXCLUSIVE_BEGIN:
                        held.enter_context(self._store.exclusive())
                    else:
                        self._dispatch(op, inp, result)
                    out.u8(0).u8(self._store.writable)
                    out.parts += result.parts
                except CoreError as e:
                    out = _Out().u8(1).u8(self._store.writable)
                    out.text(type(e).__name__).text(e.message).text(e.reason).text(json.dumps(e.metadata))
                except Exception as e:  # noqa: BLE001 - the front reports it; the owner serves on
                    _LOGGER.exception("store request %d failed", op)
                    out = _Out().u8(1).u8(self._store.writable)
                    out.text("CoreError").text(f"the store failed: {type(e).__name__}").text("INTERNAL").text(
                        "{}"
                    )
                try:
                    _send_frame(sock, out)
                except OSError:
                    return

    def _generation(self, source_id: int) -> int:
        own = self._store.generation(source_id)
        return -1 if own < 0 else self._epoch | own

    def _view_generation(self, view_id: int) -> int:
        own = self._store.view_generation(view_id)
        return -1 if own < 0 else self._epoch | own

    def _own_tiles(self, update: ViewTiles) -> ViewTiles:
        """The update with the store's own view generation; refused if computed under an earlier owner."""
        epoch = self._epoch >> _GENERATION_BITS
        if update.generation >= 0 and update.generation >> _GENERATION_BITS != epoch:
            raise Aborted(
                f"feature view {update.view!r} was read before the store restarted; nothing was written, "
                "send the records again",
                reason="VIEW_CHANGED",
                metadata={"view": update.view},
            )
        if update.generation < 0:
            return update
        return dataclasses.replace(update, generation=update.generation & ((1 << _GENERATION_BITS) - 1))

    def _catalog_change(self, change: Callable[[], None]) -> None:
        """Run a definition change under the store's write lock, announced to the fronts' caches."""
        # Odd while the change is written, even after: a front reading definitions meanwhile retries.
        with self._store.exclusive():
            self._catalog.bump()
            try:
                change()
            finally:
                self._catalog.bump()

    def _dispatch(self, op: int, inp: _In, out: _Out) -> None:
        store = self._store
        if op == WRITE_LATEST:
            request_id = inp.text()
            fingerprint = inp.text()
            replace = inp.text()
            dry_run = bool(inp.u8())
            batches = []
            for _ in range(inp.i64()):
                source = inp.text()
                has_id = inp.u8()
                source_id = inp.i64()
                generation = inp.i64()
                offline = inp.blob()
                keys = inp.column()
                columns = inp.column_array()
                rows_file = inp.text()
                # Left in Arrow: the store reads the event-time headers from the column whole, and a rows
                # file's values only where it writes them instead of the file. The write is done before
                # this connection's next frame reuses the bytes they are read from.
                values = BinaryColumn(columns)
                if has_id and generation >> _GENERATION_BITS != self._epoch >> _GENERATION_BITS:
                    raise Aborted(
                        f"push source {source!r} was validated before the store restarted; nothing was "
                        "written, send the records again",
                        reason="SOURCE_CHANGED",
                        metadata={"source": source},
                    )
                own = generation & ((1 << _GENERATION_BITS) - 1)
                tiles = [self._own_tiles(_tiles_in(inp)) for _ in range(inp.i64())]
                known = source_id if has_id else None
                batches.append(RowBatch(source, keys, values, offline, known, own, tiles, rows_file))
            result = store.write_latest(
                batches, request_id=request_id, fingerprint=fingerprint, dry_run=dry_run, replace=replace
            )
            out.u8(result.replayed)
            _counts_out(out, result.counts)
            out.text(result.fingerprint)
        elif op == READ:
            out.blobs(store.read(inp.present_blobs()))
        elif op == GET_SOURCE:
            found = store.get_source(inp.text())
            out.u8(found is not None)
            if found is not None:
                out.i64(found[0]).blob(found[1])
        elif op == GENERATION:
            out.i64(self._generation(inp.i64()))
        elif op == LATE_FIELDS:
            out.texts(store.late_fields(inp.i64()))
        elif op == ROW_PREFIX:
            out.blob(store.row_prefix(inp.i64()))
        elif op == LIST_SOURCES:
            after = inp.text()
            limit = inp.i64()
            found_all = list(store.list_sources(after, None if limit < 0 else limit))
            out.i64(len(found_all))
            for name, source_id, raw in found_all:
                out.text(name).i64(source_id).blob(raw)
        elif op == PUT_SOURCE:
            name, definition = inp.text(), inp.blob()
            has_id, source_id = inp.u8(), inp.i64()
            invalidate = bool(inp.u8())
            late = inp.texts()
            put: list[int] = []
            known = source_id if has_id else None
            self._catalog_change(
                lambda: put.append(
                    store.put_source(name, definition, known, invalidate=invalidate, late_fields=late)
                )
            )
            out.i64(put[0])
        elif op == DELETE_SOURCE:
            name, source_id = inp.text(), inp.i64()
            deleted: list[int] = []
            self._catalog_change(lambda: deleted.append(store.delete_source(name, source_id)))
            out.i64(deleted[0])
        elif op == HAS_ROWS:
            out.u8(store.has_rows(inp.i64()))
        elif op == DELETE_EXPIRED:
            out.i64(store.delete_expired(inp.i64(), inp.i64()))
        elif op == SEEN_REQUEST:
            seen = store.seen_request(inp.text())
            out.u8(seen is not None)
            if seen is not None:
                _counts_out(out, seen)
        elif op == PURGE_REQUESTS:
            out.i64(store.purge_requests())
        elif op == QUEUED_OFFLINE:
            max_bytes, last = inp.i64(), inp.i64()
            entries = store.queued_offline(max_bytes, None if last < 0 else last)
            out.i64(len(entries))
            for entry in entries:
                out.i64(entry.seq).text(entry.source).blob(entry.arrow_ipc)
        elif op == DELETE_OFFLINE:
            store.delete_offline(inp.i64(), inp.i64())
        elif op == RECOVER:
            out.u8(store.recover(inp.i64() / 1000))
        elif op == STATISTIC:
            value = store.statistic(inp.text())
            out.u8(value is not None).i64(value or 0)
        elif op == SYNC_NOW:
            store.sync_now()
        elif op == ROWS_FOLDER:
            out.text(str(getattr(store, "rows_folder", "")))
        elif op in (COUNT_ROWS, COUNT_OFFLINE):
            source_id = inp.i64() if op == COUNT_ROWS else 0
            limit = inp.i64()
            bound = None if limit < 0 else limit
            out.i64(store.count_rows(source_id, bound) if op == COUNT_ROWS else store.count_offline(bound))
        else:
            self._dispatch_views(op, inp, out)

    def _dispatch_views(self, op: int, inp: _In, out: _Out) -> None:
        """The TileStore requests: views, services, tiles and view states."""
        store = self._store
        if op == SCAN_TILES:
            view_id, entities = inp.i64(), inp.present_blobs()
            first, last = inp.i64(), inp.i64()
            counts, starts, values = store.scan_tiles(view_id, entities, first, last)
            out.blob(np.asarray(counts, dtype="<i8").tobytes()).blob(starts.astype("<i8").tobytes())
            out.blobs(values)
        elif op == READ_TILES:
            out.blobs(store.read_tiles(inp.present_blobs()))
        elif op == GET_VIEW:
            found = store.get_view(inp.text())
            out.u8(found is not None)
            if found is not None:
                out.i64(found[0]).blob(found[1])
        elif op == LIST_VIEWS:
            after, limit = inp.text(), inp.i64()
            views = list(store.list_views(after, None if limit < 0 else limit))
            out.i64(len(views))
            for name, view_id, raw in views:
                out.text(name).i64(view_id).blob(raw)
        elif op == PUT_VIEW:
            name, definition = inp.text(), inp.blob()
            has_id, view_id, invalidate = inp.u8(), inp.i64(), bool(inp.u8())
            put: list[int] = []
            self._catalog_change(
                lambda: put.append(
                    store.put_view(name, definition, view_id if has_id else None, invalidate=invalidate)
                )
            )
            out.i64(put[0])
        elif op == DELETE_VIEW:
            name, view_id = inp.text(), inp.i64()
            deleted: list[int] = []
            self._catalog_change(lambda: deleted.append(store.delete_view(name, view_id)))
            out.i64(deleted[0])
        elif op == VIEW_GENERATION:
            out.i64(self._view_generation(inp.i64()))
        elif op == HAS_TILES:
            out.u8(store.has_tiles(inp.i64()))
        elif op == GET_SERVICE:
            out.maybe(store.get_service(inp.text()))
        elif op == LIST_SERVICES:
            after, limit = inp.text(), inp.i64()
            services = list(store.list_services(after, None if limit < 0 else limit))
            out.i64(len(services))
            for name, raw in services:
                out.text(name).blob(raw)
        elif op == PUT_SERVICE:
            store.put_service(inp.text(), inp.blob())
        elif op == DELETE_SERVICE:
            store.delete_service(inp.text())
        elif op == TILE_KEY:
            out.blob(store.tile_key(inp.i64(), inp.blob(), inp.i64()))
        elif op == TILE_KEYS:
            view_id, entities = inp.i64(), inp.present_blobs()
            out.blobs(store.tile_keys(view_id, entities, np.frombuffer(inp.blob(), dtype="<i8")))
        elif op == VIEW_STATE:
            out.maybe(store.view_state(inp.i64()))
        elif op == UPDATE_VIEW_STATE:
            view_id = inp.i64()
            expected, new = inp.maybe(), inp.maybe()
            current: list[bytes | None] = []

            def change(state: bytes | None) -> bytes | None:
                # Compare and set: the front computed `new` from `expected`, and computes it again if
                # another change came first.
                if state != expected:
                    current.append(state)
                    return None
                return new

            result = store.update_view_state(view_id, change)
            out.u8(bool(current)).maybe(current[0] if current else result)
        elif op == DELETE_TILES_BEFORE:
            out.i64(store.delete_tiles_before(inp.i64(), inp.i64()))
        else:
            raise CoreError(f"unknown store request {op}")


class RemoteStore:
    """The Store protocol over a connection pool to a `StoreOwner`; thread-safe.

    Each call borrows a connection for its request and reply; `exclusive()` keeps one for the calling
    thread until it ends. When the owner cannot be reached (it died or is restarting) a call raises
    Unavailable at once, or after `timeout_s` without a reply; a write that failed so may have landed,
    which callers settle by sending it again with its request id.
    """

    # The owner's embedded store, which the owner alone drains.
    drain_lease_s: float | None = None

    def __init__(
        self,
        socket_path: Path,
        catalog: CatalogVersion,
        *,
        timeout_s: float = 60.0,
        local: SnapshotReader | None = None,
    ):
        self._path = str(socket_path)
        # Answers row and tile reads in this process while it is up to date (core/stores/snapshots.py).
        self.local = local
        self.catalog = catalog
        self._timeout_s = timeout_s
        self._idle: list[socket.socket] = []
        self._pool_lock = threading.Lock()
        self._pinned = threading.local()
        self._gate = UsageGate()
        self._writable = True
        self._watchers: list[Callable[[bool], None]] = []
        self._prefixes: dict[int, bytes] = {}
        # The owner's folder for rows files (RocksDBStore.rows_folder), asked once; "" where it has none.
        self._rows_folder: str | None = None

    # --- the connection ------------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        give_up = time.monotonic() + self._timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._timeout_s)
            try:
                sock.connect(self._path)
                return sock
            except BlockingIOError:
                # The owner's backlog is full (a burst of connections): it is there, so wait for it.
                sock.close()
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.005)
            except OSError:
                sock.close()
                raise

    def _borrow(self) -> socket.socket:
        """An idle connection whose owner is still there, or a new one."""
        while True:
            with self._pool_lock:
                sock = self._idle.pop() if self._idle else None
            if sock is None:
                return self._connect()
            # Nothing is ever unread between calls: readable means the owner closed it (it restarted).
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            if not poller.poll(0):
                return sock
            sock.close()

    def _drop_idle(self) -> None:
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def _call(self, out: _Out) -> _In:
        """Send one request and return its reply's result fields; raise the owner's error or Unavailable."""
        with self._gate.use():
            pinned: socket.socket | None = getattr(self._pinned, "sock", None)
            sock = pinned
            try:
                if sock is None:
                    sock = self._borrow()
                _send_frame(sock, out)
                body = _recv_frame(sock)
                if body is None:
                    raise ConnectionError("the store owner closed the connection")
            except OSError as e:
                if sock is not None:
                    sock.close()
                if pinned is not None:
                    self._pinned.sock = None
                # The other idle connections went to the same owner, which is gone.
                self._drop_idle()
                raise Unavailable(
                    "the server's store process is not answering (it may be restarting); send the request "
                    "again shortly",
                    reason="STORE_UNAVAILABLE",
                    metadata={"error": str(e)[:200]},
                ) from None
            if pinned is None:
                with self._pool_lock:
                    self._idle.append(sock)
        inp = _In(body)
        status = inp.u8()
        self._set_writable(bool(inp.u8()))
        if status:
            kind, message, reason, metadata = inp.text(), inp.text(), inp.text(), inp.text()
            cls = _ERRORS.get(kind, CoreError)
            error = cls(message, reason=reason, metadata=json.loads(metadata))
            raise error
        return inp

    def _set_writable(self, writable: bool) -> None:
        if writable != self._writable:
            self._writable = writable
            for watch in self._watchers:
                watch(writable)

    # --- the Store protocol --------------------------------------------------------------------

    def get_source(self, name: str) -> tuple[int, bytes] | None:
        """The id and serialized definition of a source, or None."""
        inp = self._call(_Out().u8(GET_SOURCE).text(name))
        return (inp.i64(), inp.blob()) if inp.u8() else None

    def list_sources(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, int, bytes]]:
        """Sources in name order, starting after `after`."""
        inp = self._call(_Out().u8(LIST_SOURCES).text(after).i64(-1 if limit is None else limit))
        return iter([(inp.text(), inp.i64(), inp.blob()) for _ in range(inp.i64())])

    def put_source(
        self,
        name: str,
        definition: bytes,
        source_id: int | None = None,
        *,
        invalidate: bool = True,
        late_fields: Sequence[str] = (),
    ) -> int:
        """Store a definition under its id, or a new one; return the id."""
        out = _Out().u8(PUT_SOURCE).text(name).blob(definition)
        out.u8(source_id is not None).i64(source_id or 0).u8(invalidate).texts(late_fields)
        return self._call(out).i64()

    def late_fields(self, source_id: int) -> tuple[str, ...]:
        """The fields added to a source while it held rows."""
        return tuple(self._call(_Out().u8(LATE_FIELDS).i64(source_id)).texts())

    def delete_source(self, name: str, source_id: int) -> int:
        """Delete a source and its rows; return how many rows there were."""
        return self._call(_Out().u8(DELETE_SOURCE).text(name).i64(source_id)).i64()

    def generation(self, source_id: int) -> int:
        """The owner's generation of the source's definition; -1 once it is deleted."""
        return self._call(_Out().u8(GENERATION).i64(source_id)).i64()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off every row write in every front, until the block ends; on one connection of this thread."""
        if getattr(self._pinned, "sock", None) is not None:
            self._pinned.depth += 1
            try:
                yield
            finally:
                self._pinned.depth -= 1
            return
        with self._gate.use():
            try:
                self._pinned.sock = self._connect()
            except OSError as e:
                raise Unavailable(
                    "the server's store process is not answering; send the request again shortly",
                    reason="STORE_UNAVAILABLE",
                    metadata={"error": str(e)[:200]},
                ) from None
            self._pinned.depth = 0
            try:
                self._call(_Out().u8(EXCLUSIVE_BEGIN))
                yield
            finally:
                sock = self._pinned.sock
                self._pinned.sock = None
                # Closing the connection ends the hold too, whatever state the last call left it in.
                if sock is not None:
                    sock.close()

    def row_prefix(self, source_id: int) -> bytes:
        """The prefix of every row key of one source, as the owner's store lays keys out."""
        prefix = self._prefixes.get(source_id)
        if prefix is None:
            prefix = self._call(_Out().u8(ROW_PREFIX).i64(source_id)).blob()
            self._prefixes[source_id] = prefix
        return prefix

    def write_latest(
        self,
        batches: Sequence[RowBatch],
        *,
        request_id: str = "",
        fingerprint: str = "",
        dry_run: bool = False,
        replace: str = "",
    ) -> WriteResult:
        """Write each row unless a newer event of its entity is stored or later in the batch; atomically."""
        out = _Out().u8(WRITE_LATEST).text(request_id).text(fingerprint).text(replace).u8(dry_run)
        out.i64(len(batches))
        for b in batches:
            out.text(b.source).u8(b.source_id is not None).i64(b.source_id or 0).i64(b.generation)
            out.blob(b.offline).column(b.keys).column(b.values).text(b.rows_file).i64(len(b.tiles))
            for update in b.tiles:
                _tiles_out(out, update)
        try:
            inp = self._call(out)
        except BaseException:
            # An owner that answered has dropped the files already; one that never read the request (gone,
            # or this store closing) has not. One still at the write finds its file gone and writes the rows.
            for b in batches:
                if b.rows_file and self._rows_folder:
                    (Path(self._rows_folder) / b.rows_file).unlink(missing_ok=True)
            raise
        replayed = bool(inp.u8())
        counts = _counts_in(inp)
        return WriteResult(counts, replayed=replayed, fingerprint=inp.text())

    def rows_file(self, keys: Sequence[bytes], values: Sequence[bytes]) -> str:
        """Write the rows to a file in the owner's rows folder, in this process; "" if the owner has none."""
        if self._rows_folder is None:
            self._rows_folder = self._call(_Out().u8(ROWS_FOLDER)).text()
        if not self._rows_folder:
            return ""
        from .rocksdb import write_rows_file  # needs rocksdict, which a RemoteStore never needs otherwise

        return write_rows_file(Path(self._rows_folder), keys, values)

    def read(self, keys: list[bytes]) -> list[bytes | None]:
        """Stored values of the keys, None where absent."""
        if not keys:
            return []
        if self.local is not None:
            with self._gate.use():
                values = self.local.read(keys)
            if values is not None:
                return values
        return self._call(_Out().u8(READ).blobs(keys)).blobs()

    def delete_expired(self, source_id: int, cutoff_micros: int) -> int:
        """Delete the source's rows whose event time is before `cutoff_micros`; return how many."""
        return self._call(_Out().u8(DELETE_EXPIRED).i64(source_id).i64(cutoff_micros)).i64()

    def has_rows(self, source_id: int) -> bool:
        """Whether a source holds any row."""
        return bool(self._call(_Out().u8(HAS_ROWS).i64(source_id)).u8())

    def count_rows(self, source_id: int, limit: int | None = None) -> int:
        """How many rows a source holds, counting no further than `limit` (None: every row)."""
        return self._call(_Out().u8(COUNT_ROWS).i64(source_id).i64(-1 if limit is None else limit)).i64()

    def count_offline(self, limit: int | None = None) -> int:
        """How many entries are queued for the offline log, counting no further than `limit`."""
        return self._call(_Out().u8(COUNT_OFFLINE).i64(-1 if limit is None else limit)).i64()

    def seen_request(self, request_id: str) -> dict[str, BatchCounts] | None:
        """The counts recorded for a request id still within the window, or None."""
        inp = self._call(_Out().u8(SEEN_REQUEST).text(request_id))
        return _counts_in(inp) if inp.u8() else None

    def purge_requests(self) -> int:
        """Drop the records older than the window; return how many."""
        return self._call(_Out().u8(PURGE_REQUESTS)).i64()

    def hold_drain(self) -> bool:
        """Always True: this store's offline log has one drainer."""
        return True

    def queued_offline(self, max_bytes: int, last_seq: int | None = None) -> list[QueuedRecords]:
        """Queue entries from the oldest, up to about `max_bytes` (at least one) or through `last_seq`."""
        inp = self._call(_Out().u8(QUEUED_OFFLINE).i64(max_bytes).i64(-1 if last_seq is None else last_seq))
        return [QueuedRecords(inp.i64(), inp.text(), inp.blob()) for _ in range(inp.i64())]

    def delete_offline(self, first_seq: int, last_seq: int) -> None:
        """Drop the queue entries from `first_seq` through `last_seq`, durably."""
        self._call(_Out().u8(DELETE_OFFLINE).i64(first_seq).i64(last_seq))

    # --- feature views and tiles ---------------------------------------------------------------

    def get_view(self, name: str) -> tuple[int, bytes] | None:
        """The id and serialized definition of a view, or None."""
        inp = self._call(_Out().u8(GET_VIEW).text(name))
        return (inp.i64(), inp.blob()) if inp.u8() else None

    def list_views(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, int, bytes]]:
        """Views in name order, starting after `after`."""
        inp = self._call(_Out().u8(LIST_VIEWS).text(after).i64(-1 if limit is None else limit))
        return iter([(inp.text(), inp.i64(), inp.blob()) for _ in range(inp.i64())])

    def put_view(self, name: str, definition: bytes, view_id: int | None = None, *, invalidate: bool) -> int:
        """Store a view definition under its id, or a new one; return the id."""
        out = _Out().u8(PUT_VIEW).text(name).blob(definition)
        return self._call(out.u8(view_id is not None).i64(view_id or 0).u8(invalidate)).i64()

    def delete_view(self, name: str, view_id: int) -> int:
        """Delete a view, its state and its tiles; return how many tiles there were."""
        return self._call(_Out().u8(DELETE_VIEW).text(name).i64(view_id)).i64()

    def view_generation(self, view_id: int) -> int:
        """The owner's generation of the view's definition; -1 once it is deleted."""
        return self._call(_Out().u8(VIEW_GENERATION).i64(view_id)).i64()

    def has_tiles(self, view_id: int) -> bool:
        """Whether a view holds any tile."""
        return bool(self._call(_Out().u8(HAS_TILES).i64(view_id)).u8())

    def get_service(self, name: str) -> bytes | None:
        """The serialized definition of a feature service, or None."""
        return self._call(_Out().u8(GET_SERVICE).text(name)).maybe()

    def list_services(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, bytes]]:
        """Feature services in name order, starting after `after`."""
        inp = self._call(_Out().u8(LIST_SERVICES).text(after).i64(-1 if limit is None else limit))
        return iter([(inp.text(), inp.blob()) for _ in range(inp.i64())])

    def put_service(self, name: str, definition: bytes) -> None:
        """Store a feature service definition."""
        self._call(_Out().u8(PUT_SERVICE).text(name).blob(definition))

    def delete_service(self, name: str) -> None:
        """Delete a feature service definition."""
        self._call(_Out().u8(DELETE_SERVICE).text(name))

    def tile_key(self, view_id: int, entity: bytes, start_micros: int) -> bytes:
        """The key of one entity's tile starting at `start_micros`, as the owner's store lays keys out."""
        return self._call(_Out().u8(TILE_KEY).i64(view_id).blob(entity).i64(start_micros)).blob()

    def tile_keys(self, view_id: int, entities: Sequence[bytes], starts: np.ndarray) -> list[bytes]:
        """The keys of each entity's tile starting at the matching start (int64 microseconds)."""
        out = _Out().u8(TILE_KEYS).i64(view_id).blobs(entities).blob(starts.astype("<i8").tobytes())
        return self._call(out).present_blobs()

    def read_tiles(self, keys: list[bytes]) -> list[bytes | None]:
        """Stored tiles of the keys, None where absent."""
        if not keys:
            return []
        if self.local is not None:
            with self._gate.use():
                values = self.local.read(keys)
            if values is not None:
                return values
        return self._call(_Out().u8(READ_TILES).blobs(keys)).blobs()

    def scan_tiles(
        self, view_id: int, entities: Sequence[bytes], first_micros: int, last_micros: int
    ) -> tuple[list[int], np.ndarray, list[bytes]]:
        """Each entity's tiles with starts in [first_micros, last_micros], entity by entity, by start."""
        out = _Out().u8(SCAN_TILES).i64(view_id).blobs(entities).i64(first_micros).i64(last_micros)
        inp = self._call(out)
        counts = np.frombuffer(inp.blob(), dtype="<i8").tolist()
        starts = np.frombuffer(inp.blob(), dtype="<i8").astype(np.int64)
        return counts, starts, inp.present_blobs()

    def view_state(self, view_id: int) -> bytes | None:
        """The view's stored state (its watermark and backfilled ranges), or None."""
        return self._call(_Out().u8(VIEW_STATE).i64(view_id)).maybe()

    def update_view_state(self, view_id: int, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Replace the view's state by `change(state)` atomically in the owner; return the new state.

        A function cannot travel to the owner, so this compares and sets: `change` runs here on the state
        last read, and again on the newer state whenever another change landed first.
        """
        state = self.view_state(view_id)
        while True:
            new = change(state)
            inp = self._call(_Out().u8(UPDATE_VIEW_STATE).i64(view_id).maybe(state).maybe(new))
            conflict, found = bool(inp.u8()), inp.maybe()
            if not conflict:
                return found
            state = found

    def delete_tiles_before(self, view_id: int, start_micros: int) -> int:
        """Delete the view's tiles that start before `start_micros`; return how many."""
        return self._call(_Out().u8(DELETE_TILES_BEFORE).i64(view_id).i64(start_micros)).i64()

    @property
    def writable(self) -> bool:
        """Whether the owner accepted writes at its last reply."""
        return self._writable

    def watch_writable(self, callback: Callable[[bool], None]) -> None:
        """Call `callback(writable)` whenever a reply shows writes stopped or started being accepted."""
        self._watchers.append(callback)

    def recover(self, timeout_s: float = 5.0) -> bool:
        """Ask the owner to take writes again after a storage error; return whether writable."""
        return bool(self._call(_Out().u8(RECOVER).i64(int(timeout_s * 1000))).u8())

    def setup_warnings(self) -> list[str]:
        """None: the owner's store is the embedded one, which has no such setting."""
        return []

    def statistic(self, name: str) -> int | None:
        """The owner's store statistic by name, or None (also when the owner is not answering)."""
        try:
            inp = self._call(_Out().u8(STATISTIC).text(name))
        except Unavailable:
            return None
        present, value = inp.u8(), inp.i64()
        return value if present else None

    def sync_now(self) -> None:
        """Ask the owner to sync its write-ahead log; best effort, for a last step before exit."""
        try:
            self._call(_Out().u8(SYNC_NOW))
        except CoreError as e:
            _LOGGER.warning("syncing the store before exit failed: %s", e.message)

    def close(self, timeout_s: float = 10.0) -> bool:
        """Turn new calls away, wait up to `timeout_s` for running ones, then drop the connections."""
        drained = self._gate.close(timeout_s)
        self._drop_idle()
        if self.local is not None:
            self.local.close()
        return drained
