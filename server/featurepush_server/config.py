"""Server configuration: one frozen dataclass, read from a TOML file, the environment and flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import machine

ENV_PREFIX = "FEATUREPUSH_"
FSYNC_POLICIES = ("always", "never")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
# The most backfill workers a front may be told to run (`backfill_workers`).
MAX_BACKFILL_WORKERS = 64
# gRPC's core reads a larger port modulo 65,536 and listens there, on a port nobody asked for.
_MAX_PORT = 65535


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
    # Threads for calls no admission class bounds (health, reflection) and for refusing calls; the pool
    # also gets one thread for each call the admission classes below let run or wait.
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
    # reading the stored row first. 0: as many as latest_index_bytes holds.
    latest_index_entries: int = 0
    # And at most about this many bytes, keys included: callers choose how long entity keys are. 0 derives
    # it from the machine: a sixteenth of its memory, at least 256 MiB and at most 4 GiB.
    latest_index_bytes: int = 0
    # Seconds between sweeps that delete rows older than their source's online_ttl; 0 never sweeps.
    expired_sweep_interval_s: float = 3600.0
    # Limits on one push's Arrow IPC streams, checked from message headers before anything is decoded:
    # bytes once decompressed (dictionaries expanded included), record and dictionary batches, fields at
    # every level of a schema, and levels of field nesting.
    max_arrow_decoded_bytes: int = 256 * 1024 * 1024
    max_arrow_batches: int = 1024
    max_arrow_columns: int = 10_000
    max_arrow_nesting: int = 64

    # Admission: past these bounds a call is refused at once with RESOURCE_EXHAUSTED and a RetryInfo delay,
    # so that a flood of one kind of call leaves reads, health and the registry their latency. 0 derives
    # the bound from the machine: pushes as many as its cores (twice that waiting, each at most
    # 1 s), a sixteenth of its memory for push request bytes (this bound, derived or set, is shared by
    # serve --processes' fronts), 4 reads per core, 4 push streams per core.
    max_concurrent_pushes: int = 0
    max_waiting_pushes: int = 0
    max_push_bytes: int = 0
    max_concurrent_reads: int = 0
    max_push_streams: int = 0
    max_concurrent_backfills: int = 0
    # Working memory of GetViewFeatures reads, estimated per read from its keys, features and windows:
    # a read estimated past it is refused (READ_TOO_LARGE), and a read that would take the reads running
    # past it waits for none but is refused (OVERLOADED, retry after). 0: an eighth of memory, at least
    # 512 MiB, at most 4 GiB (shared by serve --processes' fronts).
    max_view_read_bytes: int = 0
    # A PushStream that sends nothing for this many seconds is closed with UNAVAILABLE, freeing its slot;
    # the client's pusher opens a new one when it has records again.
    stream_idle_timeout_s: float = 60.0
    # A call whose request message has not arrived after this many seconds is cancelled (as is a
    # reflection stream's next message); it holds a thread of the pool meanwhile.
    request_timeout_s: float = 60.0
    # Calls still receiving their request after a second, from one address and in all, past which further
    # calls are refused (RESOURCE_EXHAUSTED) and the newest such calls cancelled. 0: half of `workers` in
    # all, half of that from one address. Behind a proxy every call comes from its address.
    max_slow_requests: int = 0
    max_slow_requests_per_address: int = 0

    # Security (README "Security"). TLS: the server's PEM certificate chain and private key, both or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # PEM CA bundle; when set, every client must present a certificate it signed (mutual TLS).
    tls_client_ca: Path | None = None
    # JSON keys file written by `featurepush keys`; when set, every featurepush call needs an API key
    # with the right scope. Changes to the file apply within a second, without a restart.
    keys_file: Path | None = None
    # Without keys_file, only a loopback listen address is accepted unless this is true.
    allow_unauthenticated: bool = False
    # gRPC reflection (service and message descriptions), open to callers without a key.
    reflection: bool = True

    # Operability. host:port of the Prometheus /metrics endpoint; empty (the default) serves none.
    metrics_listen: str = ""
    # Log level (DEBUG, INFO, WARNING, ERROR) and format: "text" lines or "json", one object a line.
    log_level: str = "INFO"
    log_format: str = "text"

    # --- Batch source locations and streaming memory ---
    # Local folders whose files batch sources may read (symbolic links are resolved first, so nothing
    # outside them is reachable); none by default, which leaves only offline://<source>. The data_dir is
    # never readable by path, even inside a root.
    batch_roots: tuple[Path, ...] = ()
    # Remote URI schemes batch sources may read, such as "s3" or "gs", with the server's own
    # credentials and endpoints; none by default.
    batch_schemes: tuple[str, ...] = ()
    # Bounds on listing one batch location: files and folders, folder depth, and seconds.
    batch_max_files: int = 10_000
    batch_max_depth: int = 8
    batch_list_timeout_s: float = 10.0
    # Bytes of decoded data one ReadBatchSource or Backfill call holds ahead of what it has handed to
    # gRPC, so a slow or stalled reader keeps the server's memory flat.
    stream_read_ahead_bytes: int = 32 * 1024 * 1024

    # Stopping and disk errors.
    # Seconds a stop (SIGTERM) gives running calls and streams to end before the server exits anyway;
    # streams and backfills end at their next batch and tell the client to retry.
    shutdown_grace_s: float = 10.0
    # Seconds between checks whether the disk takes writes again after a full disk or an I/O error.
    storage_retry_interval_s: float = 1.0

    # --- Every core: serve --processes ---
    # Processes that serve gRPC (decoding, validation, encoding) on the one listen port, besides one that
    # owns the store and its background work; 1 serves everything from one process. Default: the cores this
    # process may use (machine.cpu_count: its CPU affinity, less where its cgroup's CPU quota is lower).
    processes: int = dataclasses.field(default_factory=machine.cpu_count)
    # Whether each front answers reads of rows and view tiles itself, from a read-only snapshot of the
    # owner's RocksDB opened once its writes pause, while no write landed since (else the owner answers
    # them); costs each front a 64 MiB block cache and a copy of the owner's unflushed writes.
    front_reads: bool = True
    # Backfill worker processes each front runs while it backfills (embedded store), which validate, encode
    # and write its chunks; 0: one per process, at least two and at most eight; at most MAX_BACKFILL_WORKERS.
    backfill_workers: int = 0

    # --- Store (README "Redis and Redis Cluster") ---
    # Where sources, online rows, idempotency records and the offline-log queue live: "rocksdb" (the
    # embedded database in data_dir, one server), "redis://host:port[/db]" (one Redis shared by any
    # number of servers) or "redis-cluster://host:port,host:port" (a Redis Cluster, by some of its nodes).
    store: str = "rocksdb"
    # Prefix of every Redis key, so several deployments can share one Redis: letters, digits, "_.-".
    redis_namespace: str = "featurepush"
    # Seconds a Redis call may take before the request fails with UNAVAILABLE.
    redis_timeout_s: float = 2.0
    # Replicas (WAIT) that must hold a write before it is acknowledged; 0: once the primary has it.
    redis_wait_replicas: int = 0
    # Seconds after its source's online_ttl that Redis deletes a row; until then it reads as EXPIRED.
    redis_expiry_grace_s: float = 3600.0
    # Seconds a server uses a cached source definition before reading it again, so a change applied
    # through another server reaches this one.
    redis_registry_refresh_s: float = 1.0

    def slow_request_bounds(self) -> tuple[int, int]:
        """How many calls may be slow to send their request, in all and from one address."""
        total = self.max_slow_requests or max(self.workers // 2, 2)
        return total, min(self.max_slow_requests_per_address or max(total // 2, 1), total)

    def latest_index_bounds(self, memory_bytes: int) -> tuple[int, int]:
        """The latest-event index's bounds in entries and bytes on a machine with this much memory."""
        size = self.latest_index_bytes or min(max(memory_bytes // 16, 256 << 20), 4 << 30)
        # An entry takes at least 128 bytes (a short key, its header and the dict's share), so the
        # derived entry bound never binds before the byte bound does.
        return self.latest_index_entries or size // 128, size

    @property
    def online_dir(self) -> Path:
        """The embedded store's RocksDB database inside the data directory."""
        return self.data_dir / "online"

    def __post_init__(self) -> None:
        if self.fsync not in FSYNC_POLICIES:
            raise ConfigError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {self.fsync!r}")
        for name in (
            "max_message_bytes",
            "max_records_per_request",
            "max_keys_per_request",
            "workers",
            "processes",
            "stream_read_ahead",
            "max_arrow_decoded_bytes",
            "max_arrow_batches",
            "max_arrow_columns",
            "max_arrow_nesting",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in (
            "max_concurrent_pushes",
            "max_waiting_pushes",
            "max_push_bytes",
            "max_concurrent_reads",
            "max_push_streams",
            "max_concurrent_backfills",
            "max_view_read_bytes",
            "latest_index_entries",
            "latest_index_bytes",
            "backfill_workers",
            "max_slow_requests",
            "max_slow_requests_per_address",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative (0 derives it from the machine)")
        if self.stream_idle_timeout_s <= 0:
            raise ConfigError("stream_idle_timeout_s must be positive")
        if self.request_timeout_s <= 0:
            raise ConfigError("request_timeout_s must be positive")
        if self.expired_sweep_interval_s < 0:
            raise ConfigError("expired_sweep_interval_s must not be negative (0 turns sweeping off)")
        if self.idempotency_window_s <= 0:
            raise ConfigError("idempotency_window_s must be positive")
        if self.offline_flush_interval_s <= 0:
            raise ConfigError("offline_flush_interval_s must be positive")
        for name in ("batch_max_files", "batch_max_depth", "stream_read_ahead_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.batch_list_timeout_s <= 0:
            raise ConfigError("batch_list_timeout_s must be positive")
        for scheme in self.batch_schemes:
            if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or scheme in ("file", "offline"):
                raise ConfigError(
                    f"batch_schemes holds {scheme!r}; name remote URI schemes such as s3 or gs "
                    "(local files are allowed through batch_roots)"
                )
        if self.shutdown_grace_s < 0:
            raise ConfigError("shutdown_grace_s must not be negative")
        if self.storage_retry_interval_s <= 0:
            raise ConfigError("storage_retry_interval_s must be positive")
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > _MAX_PORT:
            raise ConfigError(
                f"listen must be host:port with a port up to {_MAX_PORT}, such as localhost:50051, "
                f"not {self.listen!r}"
            )
        if self.backfill_workers > MAX_BACKFILL_WORKERS:
            # Each is an interpreter per backfilling front: a stray digit must not fork thousands.
            raise ConfigError(
                f"backfill_workers must be at most {MAX_BACKFILL_WORKERS}, not {self.backfill_workers}"
            )
        if self.max_arrow_nesting > 256:
            raise ConfigError(f"max_arrow_nesting must be at most 256, not {self.max_arrow_nesting}")
        if self.metrics_listen:
            m_host, m_sep, m_port = self.metrics_listen.rpartition(":")
            if not m_sep or not m_port.isdigit() or int(m_port) > _MAX_PORT:
                raise ConfigError(
                    f"metrics_listen must be host:port with a port up to {_MAX_PORT}, such as "
                    f"localhost:9464, not {self.metrics_listen!r}"
                )
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
        self._check_security(host)
        self._check_store()

    def _check_store(self) -> None:
        if self.store != "rocksdb" and not re.fullmatch(
            r"redis://\S+|redis-cluster://([^@]*@)?[^,@\s]+:\d+(,[^,@\s]+:\d+)*", self.store
        ):
            # A Redis URL may carry a password, which an error line must not show.
            shown = re.sub(r"//.*@", "//...@", self.store, flags=re.DOTALL)
            raise ConfigError(
                "store must be rocksdb, redis://host:port or redis-cluster://host:port,host:port, "
                f"not {shown!r}"
            )
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.redis_namespace):
            raise ConfigError(
                f"redis_namespace must be letters, digits, '_', '.' and '-', not {self.redis_namespace!r}"
            )
        for name in ("redis_timeout_s", "redis_registry_refresh_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.redis_wait_replicas < 0 or self.redis_expiry_grace_s < 0:
            raise ConfigError("redis_wait_replicas and redis_expiry_grace_s must not be negative")

    def _check_security(self, host: str) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key must be set together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.keys_file is None and not self.allow_unauthenticated and not is_loopback(host):
            raise ConfigError(
                f"listen {self.listen} is reachable from other machines but no keys_file is set, so anyone "
                "could apply, delete and backfill sources: set keys_file (see `featurepush keys create`), "
                "listen on localhost, or set allow_unauthenticated = true"
            )


def is_loopback(host: str) -> bool:
    """Whether a listen host only accepts connections from this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # Any other name may resolve to an outside interface.
        return False


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
        if kind == "Path | None":
            return Path(value) if str(value) else None
        if kind == "bool":
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.strip().lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
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
        for name in ("tls_cert", "tls_key", "tls_client_ca", "keys_file"):
            if values.get(name) is not None and not values[name].is_absolute():
                values[name] = path.parent / values[name]
        if "batch_roots" in values:
            values["batch_roots"] = tuple(
                p if p.is_absolute() else path.parent / p for p in values["batch_roots"]
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
