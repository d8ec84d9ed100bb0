"""Server configuration: one frozen dataclass, read from a TOML file, the environment and flags."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "FEATUREPUSH_"
FSYNC_POLICIES = ("always", "never")


class ConfigError(ValueError):
    """The configuration is invalid; the message says which setting and why."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything `featurepush serve` can be told; validated on construction."""

    # host:port to listen on; port 0 picks a free port.
    listen: str = "localhost:50051"
    # Folder of the RocksDB database (sources and online rows) and the offline log.
    data_dir: Path = Path("./data")
    # Largest request or response message, in bytes.
    max_message_bytes: int = 64 * 1024 * 1024
    # Most records (rows or Arrow rows, all sources together) in one push.
    max_records_per_request: int = 10_000
    # Most entity keys in one GetFeatures.
    max_keys_per_request: int = 10_000
    # "always": an acknowledged push is fsynced to disk; "never": it survives a crash of the server
    # process but not a power loss, and pushes are faster.
    fsync: str = "always"
    # Definitions files (Python, with StreamSource objects) applied at start.
    definitions: tuple[Path, ...] = ()
    # Threads serving RPCs.
    workers: int = 16
    # How long a push's request_id is remembered, in seconds.
    idempotency_window_s: float = 600.0
    # How many batches of one PushStream are read ahead of the one being written.
    stream_read_ahead: int = 4
    # Seconds between flushes of acknowledged log_offline records from RocksDB to the Parquet offline log.
    offline_flush_interval_s: float = 1.0
    # Modules (or packages) whose functions a source may name as its post_processor, besides the
    # definitions files applied at start. Applying a source makes the server import and run that code,
    # so nothing else is imported.
    post_processor_modules: tuple[str, ...] = ()
    # Entity keys whose latest event time is kept in memory (about 150 bytes each), so most writes skip
    # reading the stored row first.
    latest_index_entries: int = 1_000_000
    # Seconds between sweeps that delete rows older than their source's online_ttl; 0 never sweeps.
    expired_sweep_interval_s: float = 3600.0

    # Stopping and disk errors.
    # Seconds a stop (SIGTERM) gives running calls and streams to end before the server exits anyway;
    # streams and backfills end at their next batch and tell the client to retry.
    shutdown_grace_s: float = 10.0
    # Seconds between checks whether the disk takes writes again after a full disk or an I/O error.
    storage_retry_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.fsync not in FSYNC_POLICIES:
            raise ConfigError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {self.fsync!r}")
        for name in (
            "max_message_bytes",
            "max_records_per_request",
            "max_keys_per_request",
            "workers",
            "stream_read_ahead",
            "latest_index_entries",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.expired_sweep_interval_s < 0:
            raise ConfigError("expired_sweep_interval_s must not be negative (0 turns sweeping off)")
        if self.idempotency_window_s <= 0:
            raise ConfigError("idempotency_window_s must be positive")
        if self.offline_flush_interval_s <= 0:
            raise ConfigError("offline_flush_interval_s must be positive")
        if self.shutdown_grace_s < 0:
            raise ConfigError("shutdown_grace_s must not be negative")
        if self.storage_retry_interval_s <= 0:
            raise ConfigError("storage_retry_interval_s must be positive")
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"listen must be host:port, such as localhost:50051, not {self.listen!r}")


_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELDS[name].type
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "Path":
            return Path(value)
        if kind == "tuple[str, ...]":
            items = value.split(",") if isinstance(value, str) else value
            return tuple(str(v).strip() for v in items if str(v).strip())
        if kind == "tuple[Path, ...]":
            items = value.split(",") if isinstance(value, str) else value
            return tuple(Path(v) for v in items if str(v))
        return str(value)
    except (TypeError, ValueError):
        article = "an" if kind[0] in "aeiou" else "a"
        raise ConfigError(f"{name} must be {article} {kind}, not {value!r}") from None


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Defaults, then the TOML file's [server] table, then FEATUREPUSH_* variables, then flags."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        table = doc.get("server", doc)
        for key, value in table.items():
            if key not in _FIELDS:
                raise ConfigError(f"unknown setting {key!r} in {path}; known: {', '.join(_FIELDS)}")
            values[key] = _coerce(key, value)
        # Paths in a config file are relative to the file, wherever the server starts.
        if "data_dir" in values and not values["data_dir"].is_absolute():
            values["data_dir"] = path.parent / values["data_dir"]
        if "definitions" in values:
            values["definitions"] = tuple(
                p if p.is_absolute() else path.parent / p for p in values["definitions"]
            )
    for key, value in (env if env is not None else os.environ).items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in _FIELDS:
                values[name] = _coerce(name, value)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value)
    return ServerConfig(**values)
