"""The store format version: written at creation, checked at every open, refused in one line when foreign."""

from __future__ import annotations

from pathlib import Path

import pytest
import rocksdict
from conftest import start
from test_cli import assert_one_error_line, run

from featurepush_server.core.stores.base import StoreFormatError
from featurepush_server.core.stores.rocksdb import (
    FORMAT_KEY,
    FORMAT_VERSION,
    SOURCE,
    TILE,
    UNVERSIONED_FORMAT,
    RocksDBStore,
)


def _raw(path: Path) -> rocksdict.Rdict:
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    return rocksdict.Rdict(str(path), options)


def _plant(path: Path, items: dict[bytes, bytes]) -> None:
    db = _raw(path)
    for key, value in items.items():
        db[key] = value
    db.close()


def _version(path: Path) -> int | None:
    db = _raw(path)
    try:
        raw = db.get(FORMAT_KEY)
    finally:
        db.close()
    return None if raw is None else int.from_bytes(raw, "big")


def test_a_new_data_directory_gets_the_current_format(tmp_path: Path) -> None:
    RocksDBStore(tmp_path / "db").close()
    assert _version(tmp_path / "db") == FORMAT_VERSION


def test_a_directory_from_before_the_version_is_refused_as_format_one(tmp_path: Path) -> None:
    # Data without a version key was written in format 1, whose stored values lack the row's columns.
    assert UNVERSIONED_FORMAT == 1 < FORMAT_VERSION
    _plant(tmp_path / "db", {SOURCE + b"old": b"\x00\x00\x00\x07"})
    refused = f"written in store format 1; .* reads format {FORMAT_VERSION}"
    with pytest.raises(StoreFormatError, match=refused):
        RocksDBStore(tmp_path / "db")
    assert _version(tmp_path / "db") is None


@pytest.mark.parametrize(
    ("planted", "advice"),
    [(FORMAT_VERSION + 1, "upgrade featurepush"), (2, "export its sources")],
)
def test_another_format_is_refused_at_open(tmp_path: Path, planted: int, advice: str) -> None:
    # A view tile, which format 2 laid out otherwise.
    _plant(tmp_path / "db", {FORMAT_KEY: planted.to_bytes(4, "big"), TILE + b"\x00\x00\x00\x01\x01u": b"x"})
    with pytest.raises(StoreFormatError, match=f"written in store format {planted}; .* reads format") as e:
        RocksDBStore(tmp_path / "db")
    assert advice in e.value.message and "start on a new data directory" in e.value.message
    # Refused without touching it, and closed: the next open sees the same version and can open it again.
    assert _version(tmp_path / "db") == planted


def test_serve_refuses_another_format_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    start(data).close()
    _plant(data / "online", {FORMAT_KEY: (FORMAT_VERSION + 1).to_bytes(4, "big")})
    code, _, err = run(capsys, "serve", "--listen", "localhost:0", "--data-dir", str(data))
    assert code == 1
    newer = f"written in store format {FORMAT_VERSION + 1}"
    assert_one_error_line(err, newer, "start on a new data directory")


def test_a_format_two_directory_without_view_tiles_is_stamped_as_the_current_format(tmp_path: Path) -> None:
    # Format 3 moved view tiles into blocks and changed nothing else; format 4 reads what format 3 wrote.
    assert FORMAT_VERSION == 4
    _plant(tmp_path / "db", {FORMAT_KEY: (2).to_bytes(4, "big"), SOURCE + b"old": b"\x00\x00\x00\x07"})
    RocksDBStore(tmp_path / "db").close()
    assert _version(tmp_path / "db") == FORMAT_VERSION


def test_a_format_three_directory_with_view_tiles_is_stamped_as_format_four(tmp_path: Path) -> None:
    # Format 4 stores tiles' squared deviations negated (its codec reads format 3's sums of squares) and
    # reads idempotency records without a fingerprint.
    _plant(tmp_path / "db", {FORMAT_KEY: (3).to_bytes(4, "big"), TILE + b"\x00\x00\x00\x01\x01u": b"x"})
    RocksDBStore(tmp_path / "db").close()
    assert _version(tmp_path / "db") == FORMAT_VERSION == 4
