"""API keys: their format, the keys file that stores them as salted hashes, and checking a presented key."""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_LOGGER = logging.getLogger(__name__)
# Ordered from least to most powerful; admin implies every other scope.
SCOPES = ("read", "ingest", "backfill", "admin")
KEY_PREFIX = "fpk_"
FILE_VERSION = 1
# The id is public (it names the key in `keys list` and in logs); the secret after it is never stored.
_KEY_PATTERN = re.compile(r"^fpk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_ID_PATTERN = re.compile(r"^[0-9a-f]{12}$")


class KeysFileError(ValueError):
    """The keys file cannot be read or written, or is not a keys file; the message says which and why."""


@dataclass(frozen=True)
class ApiKey:
    """One stored key: its public id, a name, scopes, creation time, and the salted hash of its secret."""

    id: str
    name: str
    scopes: frozenset[str]
    created: dt.datetime
    salt: bytes
    digest: bytes
    revoked: dt.datetime | None = None

    def allows(self, scope: str) -> bool:
        """Whether a call needing `scope` may run with this key."""
        return self.revoked is None and (scope in self.scopes or "admin" in self.scopes)

    def to_json(self) -> dict[str, Any]:
        """The key's entry in the keys file."""
        entry: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "scopes": [s for s in SCOPES if s in self.scopes],
            "created": self.created.isoformat(),
            "salt": self.salt.hex(),
            "sha256": self.digest.hex(),
        }
        if self.revoked is not None:
            entry["revoked"] = self.revoked.isoformat()
        return entry

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> ApiKey:
        """A key from its keys-file entry; raises KeysFileError if the entry is malformed."""
        try:
            scopes = frozenset(entry["scopes"])
            key = cls(
                id=str(entry["id"]),
                name=str(entry.get("name", "")),
                scopes=scopes,
                created=dt.datetime.fromisoformat(entry["created"]),
                salt=bytes.fromhex(entry["salt"]),
                digest=bytes.fromhex(entry["sha256"]),
                revoked=dt.datetime.fromisoformat(entry["revoked"]) if entry.get("revoked") else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise KeysFileError(f"malformed key entry ({type(e).__name__}: {e})") from None
        if not _ID_PATTERN.match(key.id) or not scopes or not scopes <= set(SCOPES) or len(key.digest) != 32:
            raise KeysFileError(f"malformed key entry {key.id!r}")
        return key


def _digest(salt: bytes, secret: str) -> bytes:
    # Keys are 256-bit random secrets, so one keyed hash is as strong as a slow KDF and costs microseconds.
    return hmac.new(salt, secret.encode(), hashlib.sha256).digest()


def parse_scopes(values: Iterable[str]) -> frozenset[str]:
    """Scopes from repeated and comma-separated values; raises ValueError naming an unknown one."""
    scopes = frozenset(s.strip() for v in values for s in v.split(",") if s.strip())
    unknown = sorted(scopes - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}")
    if not scopes:
        raise ValueError(f"a key needs at least one scope of {', '.join(SCOPES)}")
    return scopes


def new_key(scopes: Iterable[str], name: str = "") -> tuple[ApiKey, str]:
    """A fresh key: the stored record and the full key string, which exists only in this return value."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    record = ApiKey(
        id=key_id,
        name=name,
        scopes=frozenset(scopes),
        created=dt.datetime.now(dt.UTC).replace(microsecond=0),
        salt=salt,
        digest=_digest(salt, secret),
    )
    return record, f"{KEY_PREFIX}{key_id}_{secret}"


def split_key(text: str) -> tuple[str, str] | None:
    """The (id, secret) of a well-formed key string, or None."""
    match = _KEY_PATTERN.match(text)
    return (match.group(1), match.group(2)) if match else None


def read_keys(path: Path) -> dict[str, ApiKey]:
    """The keys of a keys file by id; raises KeysFileError if it is missing or malformed."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise KeysFileError(f"cannot read keys file {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise KeysFileError(f"keys file {path} is not valid JSON: {e}") from None
    entries = doc.get("keys") if isinstance(doc, dict) and doc.get("version") == FILE_VERSION else None
    if not isinstance(entries, list):
        raise KeysFileError(f"{path} is not a featurepush keys file (version {FILE_VERSION})")
    keys: dict[str, ApiKey] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise KeysFileError(f"{path}: each key must be a JSON object")
        try:
            key = ApiKey.from_json(entry)
        except KeysFileError as e:
            raise KeysFileError(f"{path}: {e}") from None
        keys[key.id] = key
    return keys


def write_keys(path: Path, keys: Iterable[ApiKey]) -> None:
    """Replace the keys file atomically; it is readable and writable by its owner only."""
    doc = {"version": FILE_VERSION, "keys": [k.to_json() for k in keys]}
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file with mode 0600, so the hashes are never readable by others, even briefly.
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise KeysFileError(f"cannot write keys file {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except OSError as e:
        Path(temp).unlink(missing_ok=True)
        raise KeysFileError(f"cannot write keys file {path}: {e.strerror or e}") from None


@contextmanager
def _editing(path: Path) -> Iterator[None]:
    """Hold the keys file's edit lock, so two `keys create` at once both land instead of one losing."""
    folder = path.parent if str(path.parent) else Path(".")
    lock = folder / f".{path.name}.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise KeysFileError(f"cannot lock keys file {path}: {e.strerror or e}") from None
    try:
        # The file is replaced on every write, so the lock lives on a sibling that stays put.
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_key(path: Path, scopes: Iterable[str], name: str = "") -> tuple[ApiKey, str]:
    """Create a key in the keys file (creating the file if needed); returns its record and key string."""
    record, text = new_key(scopes, name)
    with _editing(path):
        keys = read_keys(path) if path.exists() else {}
        keys[record.id] = record
        write_keys(path, keys.values())
    return record, text


def revoke_key(path: Path, key_id: str) -> ApiKey:
    """Mark a key revoked in the keys file; raises KeyError if there is no such key."""
    with _editing(path):
        keys = read_keys(path)
        if key_id not in keys:
            raise KeyError(key_id)
        key = keys[key_id]
        if key.revoked is None:
            key = keys[key_id] = ApiKey(
                key.id,
                key.name,
                key.scopes,
                key.created,
                key.salt,
                key.digest,
                revoked=dt.datetime.now(dt.UTC).replace(microsecond=0),
            )
            write_keys(path, keys.values())
    return key


@dataclass(frozen=True)
class Verdict:
    """The result of checking a presented key: the key if it is valid, else why not (a reason code)."""

    key: ApiKey | None
    reason: str


class KeyRing:
    """The keys of a keys file, re-read when the file changes (checked at most every `recheck_s` seconds).

    Thread-safe. A file that turns unreadable or malformed while serving keeps the last good keys in force,
    so a bad edit cannot lock every caller out; `last_error` says what is wrong with it.
    """

    def __init__(self, path: Path, recheck_s: float = 1.0) -> None:
        self._path = path
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._keys = read_keys(path)
        self._checked = time.monotonic()
        self.last_error: str | None = None
        # Unknown ids are checked against this, so they take as long as a wrong secret.
        self._decoy = new_key(["read"])[0]

    @property
    def path(self) -> Path:
        """The keys file."""
        return self._path

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def keys(self) -> dict[str, ApiKey]:
        """The keys in force, re-reading the file first if it changed and the recheck interval has passed."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= self._recheck_s:
                self._checked = now
                signature = self._stat()
                if signature != self._signature:
                    self._signature = signature
                    try:
                        self._keys = read_keys(self._path)
                        self.last_error = None
                        _LOGGER.info("keys file %s re-read: %d keys", self._path, len(self._keys))
                    except KeysFileError as e:
                        self.last_error = str(e)
                        _LOGGER.error("%s; the keys read before stay in force", e)
            return self._keys

    def verify(self, text: str) -> Verdict:
        """Check a presented key string; the reason is API_KEY_MALFORMED, API_KEY_INVALID or OK."""
        parts = split_key(text)
        if parts is None:
            return Verdict(None, "API_KEY_MALFORMED")
        key_id, secret = parts
        key = self.keys().get(key_id)
        stored = key if key is not None else self._decoy
        matches = hmac.compare_digest(_digest(stored.salt, secret), stored.digest)
        # Unknown, wrong and revoked keys look alike to the caller, so a probe learns nothing about ids.
        if key is None or not matches or key.revoked is not None:
            return Verdict(None, "API_KEY_INVALID")
        return Verdict(key, "OK")
