"""The latest-event index stays within its byte bound whatever the length of callers' entity keys."""

from __future__ import annotations

from pathlib import Path

from featurepush_server.core.stores.base import RowBatch
from featurepush_server.core.stores.rocksdb import RocksDBStore, row_prefix


def _head(t: int) -> bytes:
    return t.to_bytes(8, "big")


def test_long_keys_keep_the_index_under_its_byte_bound_and_writes_stay_latest(tmp_path: Path) -> None:
    store = RocksDBStore(tmp_path / "db", fsync=False, latest_cache_bytes=200_000)
    try:
        prefix = row_prefix(1)
        keys = [prefix + (b"%05d" % i) * 2000 for i in range(200)]  # 10 KB keys
        for round_ in range(3):
            for start in range(0, len(keys), 10):
                part = keys[start : start + 10]
                store.write_latest([RowBatch("s", part, [_head(10 + round_) + b"v"] * len(part), b"")])
                # Bounded: at most the bound plus one batch's keys, never the 2 MB of all keys.
                assert store._latest_bytes <= 200_000 + 10 * (20_000 + 200)
                assert sum(map(len, store._latest)) <= 200_000 + 10 * 20_000
        # After the index started over, an older event still loses to the stored newer one.
        result = store.write_latest([RowBatch("s", keys[:5], [_head(5) + b"old"] * 5, b"")])
        assert result.counts["s"].written == 0 and result.counts["s"].superseded == 5
        assert store.read(keys[:1]) == [_head(12) + b"v"]
    finally:
        store.close()
