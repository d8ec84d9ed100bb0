"""Concurrent writers to the embedded store share WAL syncs and every acknowledged write survives."""

from __future__ import annotations

import threading
from pathlib import Path

from featurepush_server.core.stores.base import RowBatch
from featurepush_server.core.stores.rocksdb import RocksDBStore, row_prefix

THREADS = 8
WRITES = 25


def test_concurrent_synced_writes_all_return_and_survive_a_reopen(tmp_path: Path) -> None:
    store = RocksDBStore(tmp_path / "db", fsync=True)
    prefix = row_prefix(1)
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        start.wait()
        try:
            for n in range(WRITES):
                key = prefix + f"w{worker}-{n}".encode()
                store.write_latest([RowBatch("s", [key], [(n + 1).to_bytes(8, "big") + b"v"], b"")])
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(THREADS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        # Never more syncs than writes; fewer whenever writers overlapped one.
        assert store._syncs_finished == store._syncs_begun <= THREADS * WRITES
        assert store._last_good_sync == store._syncs_finished
    finally:
        store.close()
    again = RocksDBStore(tmp_path / "db", fsync=True)
    try:
        keys = [prefix + f"w{w}-{n}".encode() for w in range(THREADS) for n in range(WRITES)]
        assert all(value is not None for value in again.read(keys))
    finally:
        again.close()
