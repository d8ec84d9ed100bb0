"""The shared store: Redis or Redis Cluster (through redis-py) holding sources, latest rows, idempotency
records and the offline-log queue, so that many stateless servers serve one set of sources and rows.
This module alone knows the key layout; every decision that two servers could race on is taken inside a
Lua script on the Redis side, never by a read in Python followed by a write.

Keys, for a namespace `ns` (the `{...}` part is the Redis Cluster hash tag, which picks the slot):
  {ns}:sources                  hash: source name -> 4-byte id, 8-byte signed generation, PushSource
  {ns}:next_id                  the last source id handed out (INCR)
  {ns}:gen:<id>                 the last generation of a source (INCR on an incompatible change)
  {ns}:late:<id>                the names, one per line, of fields added to a source holding rows
  {ns}:lock                     held (SET NX PX) by the server changing a definition
  {ns}:offline                  the offline-log queue: a stream whose entry ids are 0-<sequence>
  {ns}:offline_seq              the last sequence number handed out (at least Redis's clock in us)
  {ns}:offline_lease            held (SET NX PX) by the server draining the queue to Parquet
  {ns}:req:<request id>         an idempotency record: the JSON counts, expiring after the window
  {ns}:reqfp:<request id>       the fingerprint of the same request's records, expiring with it (a key
                                of its own, so that servers of a build without fingerprints read the
                                record as before while a fleet is upgraded)
  {ns}:wait                     empty; written before each WAIT for replicas, on the WAIT's connection
  {ns:<id>:<bucket>}wait        the same, on a cluster, for the primary holding that bucket
  {ns:<id>:<bucket>}m           hash: the source's generation (g) and ttl in ms (t), one per bucket
  {ns:<id>:<bucket>}r<entity>   a row: its stored value, framed as `framing.py` says
  {ns}:views                    hash: view name -> 4-byte id, 8-byte generation, StreamFeatureView
  {ns}:next_view_id             the last view id handed out (INCR)
  {ns}:vgen:<view id>           the view's generation (INCR on an incompatible change, -1 once deleted)
  {ns}:vstate:<view id>         the view's state: its watermark and backfilled ranges (core/tiles.py)
  {ns}:services                 hash: feature service name -> FeatureService
  {ns}:t<view id>:<entity>      hash: one entity's tiles of a view, by 8-byte start -> partial aggregates

A row's bucket is a hash of its entity key, so one source spreads over BUCKETS slots, and every key a
row's write reads (the row, its bucket's generation and ttl) shares one slot: the write script can run
on a cluster, and resharding moves whole buckets. On one Redis node a push (every source, the offline
entry and the idempotency record) is one script, so all or nothing. On a cluster each bucket is one
script, atomic on its own; the offline entry and the idempotency record are then written together last,
as the commit marker, so a push sent again with its request id completes it without logging twice.

Stream feature views live on one node only (a cluster refuses them, as NoViews says). A push with tile
updates WATCHes the view states and the tile hashes it merges into, reads and merges them here, then
writes rows, tiles, states, the offline entry and the request record in one script inside MULTI, which
also checks the views' generations; if another write changed a watched key meanwhile, it starts over.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from featurepush.v1 import source_pb2

from ..errors import Aborted, CoreError, ShuttingDown, StorageFull, Unavailable
from ..framing import HEADER_BYTES
from ..gate import UsageGate
from .base import BatchCounts, QueuedRecords, RowBatch, WriteResult, block_tile_count
from .no_views import NoViews

_LOGGER = logging.getLogger(__name__)

# Buckets per source: how many cluster slots one source's rows spread over.
BUCKETS = 16
# The row prefix handed to the core, as RocksDB's: a byte, then the 4-byte source id.
_ROW = b"r"
_PREFIX_BYTES = 5
_LEASE_MS = 30_000
_LOCK_MS = 10_000
# How often a running server asks Redis for its eviction policy again: an operator may change it with
# CONFIG SET at any time, and one CONFIG GET a minute costs Redis nothing.
_EVICTION_CHECK_S = 60.0
_DELETE_CHUNK = 1000
# A view tile's key as the core sees it: a byte, the 4-byte view id, the entity's 4-byte length, the
# entity, then the tile's start plus 2^63 as 8 bytes big-endian (the field in the entity's tile hash).
_TILE = b"t"
_START_OFFSET = 1 << 63
# How many times a push with tile updates is tried while other writes change the tiles it merged.
_TILE_TRIES = 50
NAMESPACE_PATTERN = r"[A-Za-z0-9_.-]+"

# Latest-by-event-time writes of rows, with the generation check, the offline entries and the request
# record. Headers are compared as two unsigned 32-bit integers: Lua's string comparison follows the
# server's locale, not byte order. Offline entries are numbered after the last number handed out and at
# least at Redis's clock in microseconds: a Redis restarted from an older snapshot (or empty) would
# otherwise hand out again numbers whose Parquet files exist, and the drain takes an existing file of a
# range for that range done, so the new records in it would never be written.
# KEYS: metas (n_meta), rows (n_rows), then the stream and its sequence key when n_off > 0, then the
#   request record's key and its fingerprint's key when a record is written.
# ARGV: dry, n_meta, n_rows, n_off, window ms ("" for no request record), grace ms, record ("" to build
#   it here), n_src, the records' fingerprint ("" for none), the fingerprint of a record to replace
#   ("" for none: a record whose fingerprint it is is taken as unseen), then n_src pairs
#   (name, accepted), then per meta (source index, expected generation or "" for none), then per row
#   (meta index, value), then the offline entries.
# Feature views (one node only) follow, where a push has tile updates: ARGV n_vg, n_tile, n_state, each
#   source's late-skipped count, the n_vg expected view generations, n_tile (field, value) pairs and
#   n_state view states; KEYS after the fingerprint's key: the n_vg view generation keys, the n_tile
#   tile hashes and the n_state view state keys. A changed view generation refuses the write whole.
_WRITE = """
local dry = ARGV[1] == '1'
local n_meta, n_rows, n_off = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local window, grace, record = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local n_src = tonumber(ARGV[8])
local k = n_meta + n_rows + 1
local t = 11 + 2 * n_src + 2 * n_meta + 2 * n_rows + n_off
local n_vg, n_tile = tonumber(ARGV[t] or '0'), tonumber(ARGV[t + 1] or '0')
local n_state = tonumber(ARGV[t + 2] or '0')
local kt = k + (n_off > 0 and 2 or 0) + (window ~= '' and 2 or 0)
local req, req_fp = nil, nil
if window ~= '' then
  req = KEYS[k + (n_off > 0 and 2 or 0)]
  req_fp = KEYS[k + (n_off > 0 and 2 or 0) + 1]
  local seen = redis.call('GET', req)
  if seen then
    local first = redis.call('GET', req_fp) or ''
    if ARGV[10] == '' or first ~= ARGV[10] then return {2, seen, first} end
  end
end
local a = 11 + 2 * n_src
local meta_src, ttl, written = {}, {}, {}
for i = 1, n_meta do
  meta_src[i] = tonumber(ARGV[a])
  local want = ARGV[a + 1]
  a = a + 2
  local m = redis.call('HMGET', KEYS[i], 'g', 't')
  if want ~= '' and m[1] ~= want then return {1, meta_src[i]} end
  ttl[i] = tonumber(m[2] or '0')
end
for i = 1, n_vg do
  if (redis.call('GET', KEYS[kt + i - 1]) or '0') ~= ARGV[t + 2 + n_src + i] then return {3, i} end
end
for s = 1, n_src do written[s] = 0 end
for r = 1, n_rows do
  local mi, v = tonumber(ARGV[a]), ARGV[a + 1]
  a = a + 2
  local key = KEYS[n_meta + r]
  local old = redis.call('GET', key)
  local nh, nl = struct.unpack('>I4I4', v)
  local newer = true
  if old then
    local oh, ol = struct.unpack('>I4I4', old)
    newer = nh > oh or (nh == oh and nl >= ol)
  end
  if newer then
    written[meta_src[mi]] = written[meta_src[mi]] + 1
    if not dry then
      if ttl[mi] > 0 then
        local at = math.floor(((nh - 2147483648) * 4294967296 + nl) / 1000) + ttl[mi] + grace
        redis.call('SET', key, v, 'PXAT', string.format('%.0f', math.max(at, 1)))
      else
        redis.call('SET', key, v)
      end
    end
  end
end
if record == '' then
  local counts = {}
  for s = 1, n_src do
    local accepted = tonumber(ARGV[10 + 2 * s])
    counts[ARGV[9 + 2 * s]] = {accepted, written[s], accepted - written[s], tonumber(ARGV[t + 2 + s] or '0')}
  end
  record = cjson.encode(counts)
end
if not dry then
  if n_off > 0 then
    local now = redis.call('TIME')
    local seq = tonumber(redis.call('GET', KEYS[k + 1]) or '0')
    seq = math.max(seq, tonumber(now[1]) * 1000000 + tonumber(now[2]) - 1)
    for j = 1, n_off do
      seq = seq + 1
      redis.call('XADD', KEYS[k], string.format('0-%.0f', seq), 'e', ARGV[a + j - 1])
    end
    redis.call('SET', KEYS[k + 1], string.format('%.0f', seq))
  end
  local v = t + 3 + n_src + n_vg
  for i = 1, n_tile do
    redis.call('HSET', KEYS[kt + n_vg + i - 1], ARGV[v], ARGV[v + 1])
    v = v + 2
  end
  for i = 1, n_state do
    redis.call('SET', KEYS[kt + n_vg + n_tile + i - 1], ARGV[v + i - 1])
  end
  if req then
    redis.call('SET', req, record, 'PX', window)
    if ARGV[9] ~= '' then redis.call('SET', req_fp, ARGV[9], 'PX', window) end
  end
end
return {0, record}
"""

# Take or keep a lease: KEYS[1] the lease, ARGV token and ms; returns 1 when this token holds it.
_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""

# Give a lease back if this token still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Redis errors that mean the server or the cluster cannot be reached now, as opposed to a refused command.
# redis-py raises RedisClusterException, which is no RedisError, when no node of a cluster answers.
_UNREACHABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterError,
    redis.exceptions.RedisClusterException,
)


def _refusal(e: redis.exceptions.ResponseError) -> CoreError:
    """What a caller is told of a write refused by a Redis that answers; nothing of the write landed."""
    metadata = {"error": str(e)[:200]}
    if isinstance(e, redis.exceptions.OutOfMemoryError):
        # Redis refuses a script at its first write, before anything of it is written.
        return StorageFull(
            "the server's Redis store is full (maxmemory) and refuses writes until memory is freed; "
            "reads go on",
            reason="STORE_FULL",
            metadata=metadata,
        )
    # The address leads to a replica now, as after a failover.
    return Unavailable(
        "the server's Redis store is a read-only replica now and refuses writes; send the request again "
        "later",
        reason="STORE_READ_ONLY",
        metadata=metadata,
    )


def _busy(e: redis.exceptions.ResponseError) -> Unavailable:
    """What a caller is told while Redis runs a long script and answers every other command BUSY."""
    # Redis refuses the command before running it, so a retry with the request id is safe: a cluster
    # push refused at one bucket is completed by it, a node push has written nothing.
    return Unavailable(
        "the server's Redis store is busy running a script and refuses every other command until it "
        "ends; send the request again later (with its request id, sending it again is safe)",
        reason="STORE_BUSY",
        metadata={"error": str(e)[:200]},
    )


def _is_busy(e: redis.exceptions.ResponseError) -> bool:
    """Whether Redis answered BUSY: redis-py raises a plain ResponseError for it."""
    return str(e).startswith("BUSY ")


# What the error of a connection refused for its credentials says: redis-py raises AuthenticationError
# (a ConnectionError) on one node, but a RedisClusterException carrying only its text for a cluster.
_AUTH_REFUSED = (
    "WRONGPASS",
    "NOAUTH",
    "invalid username-password",
    "Authentication required",
    "no password is set",
)


def _credentials_refused(e: BaseException) -> bool:
    """Whether Redis refused the credentials of the store URL, rather than being out of reach."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, redis.exceptions.AuthenticationError):
            return True
        if any(marker in str(seen) for marker in _AUTH_REFUSED):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _unreachable(e: Exception) -> Unavailable:
    """What a caller is told while Redis, or every node of a cluster, is out of reach or refuses the login."""
    if _credentials_refused(e):
        # The password is never in the message: the URL is not quoted, and Redis does not echo it.
        return Unavailable(
            "the server's Redis store refused the credentials (user and password) of the store URL; "
            "correct them in the store setting",
            reason="STORE_AUTH_REFUSED",
            metadata={"error": str(e)[:200]},
        )
    return Unavailable(
        "the server cannot reach its Redis store; it reconnects by itself, send the request again later",
        reason="STORE_UNAVAILABLE",
        metadata={"error": str(e)[:200]},
    )


def bucket_of(entity: bytes) -> int:
    """The bucket of an entity key: the same on every server and every run."""
    return zlib.crc32(entity) % BUCKETS


@dataclass(frozen=True)
class _Write:
    """A write's request id, records' fingerprint, dry run and record to replace (LatestRows.write_latest)."""

    request_id: str
    fingerprint: str
    dry_run: bool
    replace: str


class RedisStore(NoViews):
    """The Store protocol on Redis or a Redis Cluster, shared by any number of servers; thread-safe.

    Every call holds a usage gate, so `close()` waits for calls in progress. Calls fail with Unavailable
    within `timeout_s` while Redis cannot be reached; writes are then reported unwritable until a ping
    answers again (`recover()`). An acknowledged write is in Redis, and with `wait_replicas` on that
    many replicas too; how long it survives there is Redis's persistence setting.
    """

    store_name = "Redis Cluster"
    # Any server may drain the offline log while it holds the lease, renewed at each of its rounds.
    drain_lease_s = _LEASE_MS / 1000

    def __init__(
        self,
        client: Any,
        *,
        cluster: bool,
        namespace: str = "featurepush",
        idempotency_window_s: float = 600.0,
        expiry_grace_s: float = 3600.0,
        wait_replicas: int = 0,
        timeout_s: float = 2.0,
    ):
        if not re.fullmatch(NAMESPACE_PATTERN, namespace):
            raise ValueError(f"a Redis namespace is letters, digits, '_', '.' and '-', not {namespace!r}")
        self._redis = client
        self._cluster = cluster
        self._ns = namespace
        self._window_ms = int(idempotency_window_s * 1000)
        self._grace_ms = int(expiry_grace_s * 1000)
        self._wait_replicas = wait_replicas
        self._timeout_ms = int(timeout_s * 1000)
        self._gate = UsageGate()
        self._token = uuid.uuid4().hex
        self._write_script = client.register_script(_WRITE)
        self._lease_script = client.register_script(_LEASE)
        self._release_script = client.register_script(_RELEASE)
        # Definition changes by this process, serialized here before the cross-server lock.
        self._local = threading.Lock()
        # Source id -> the generation seen with its definition by the last get_source; views likewise.
        self._generations: dict[int, int] = {}
        self._view_generations: dict[int, int] = {}
        self._down: CoreError | None = None
        self._watchers: list[Callable[[bool], None]] = []
        # A cluster push writes each bucket with its own script; they run side by side.
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="featurepush-redis") if cluster else None
        # Set where Redis may evict this store's keys, as last asked; empty where it may not or was not asked.
        self.eviction_warning = ""
        # Whether CONFIG GET was refused at the last ask, so that a refusal is logged once, not every minute.
        self._eviction_refused = False
        self._eviction_checked_at = time.monotonic()
        # One ask at a time, so that a change is logged once however many threads ask.
        self._eviction_lock = threading.Lock()

    @classmethod
    def connect(cls, url: str, *, timeout_s: float = 2.0, **options: Any) -> RedisStore:
        """A store on `redis://[user:password@]host:port[/db]` or `redis-cluster://[user:password@]host:port,...`."""
        # No retries inside redis-py: a timed-out script may have run, and the caller's retry with its
        # request id is the one that is safe; the call fails within the timeout instead.
        common: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 0),
        }
        client: Any
        if url.startswith("redis-cluster://"):
            # user:password@ before the nodes, as in a redis:// URL; the password may hold '@' and ','.
            user_info, _, addresses = url.removeprefix("redis-cluster://").rpartition("@")
            if user_info:
                user, _, password = user_info.partition(":")
                common.update(username=unquote(user) or None, password=unquote(password) or None)
            nodes = []
            for part in addresses.split(","):
                host, _, port = part.strip().rpartition(":")
                nodes.append(ClusterNode(host, int(port)))  # type: ignore[no-untyped-call]
            try:
                # The cluster's nodes are asked for its slots here already.
                client = RedisCluster(startup_nodes=nodes, **common)
            except _UNREACHABLE as e:
                error = _unreachable(e)
                _LOGGER.error("%s: %s", error.message, e)
                raise error from None
            store = cls(client, cluster=True, timeout_s=timeout_s, **options)
        else:
            client = redis.Redis.from_url(url, **common)
            store = cls(client, cluster=False, timeout_s=timeout_s, **options)
        with store._calls():
            store._redis.ping()
            store.check_eviction()
        return store

    def check_eviction(self) -> None:
        """Set `eviction_warning` where Redis (any primary of a cluster) may evict keys; log only a change."""
        # The keys hold data, not a cache. Checked every minute, so a line per check would flood the log;
        # where Redis refuses CONFIG GET or is busy, the last answer stands.
        with self._eviction_lock:
            self._eviction_checked_at = time.monotonic()
            try:
                warning = self._eviction_policy_warning()
            except redis.exceptions.ResponseError as e:
                if _is_busy(e):
                    return  # running a script: asked again at the next check
                # Managed services rename or disable CONFIG, or an ACL user may not run it.
                if not self._eviction_refused:
                    _LOGGER.info("Redis's maxmemory-policy could not be checked (CONFIG GET refused): %s", e)
                self._eviction_refused = True
                return
            self._eviction_refused = False
            if warning == self.eviction_warning:
                return
            self.eviction_warning = warning
            if warning:
                _LOGGER.warning("%s", warning)
            else:
                _LOGGER.info("Redis's maxmemory-policy is noeviction again; its warning is withdrawn")

    def _recheck_eviction(self) -> None:
        """Ask the eviction policy again once `_EVICTION_CHECK_S` has passed since the last ask."""
        if time.monotonic() - self._eviction_checked_at < _EVICTION_CHECK_S:
            return
        try:
            with self._gate.use():
                self.check_eviction()
        except (redis.exceptions.RedisError, *_UNREACHABLE, ShuttingDown) as e:
            # Not taken for writes stopping: the calls that meet it say so themselves. The next check asks.
            _LOGGER.debug("Redis's maxmemory-policy could not be asked again: %s", e)

    def _eviction_policy_warning(self) -> str:
        """The warning naming each node whose maxmemory-policy is not noeviction, or "" where none."""
        if self._cluster:
            replies = self._redis.config_get("maxmemory-policy", target_nodes=RedisCluster.PRIMARIES)
        else:
            replies = {"": self._redis.config_get("maxmemory-policy")}
        # A cluster of one primary answers as one node does, without the node's name around it.
        if "maxmemory-policy" in replies or b"maxmemory-policy" in replies:
            replies = {"": replies}
        policies: dict[str, str] = {}
        for node, reply in replies.items():
            for name, value in reply.items():
                if _text(name) == "maxmemory-policy" and _text(value) != "noeviction":
                    policies[_text(node)] = _text(value)
        if not policies:
            return ""
        where = ", ".join(
            f"{policy} on {node}" if node else policy for node, policy in sorted(policies.items())
        )
        return (
            f"Redis's maxmemory-policy is {where}, not noeviction: at maxmemory Redis may drop sources, "
            "idempotency records, latest rows or the offline-log queue without an error; set it with "
            "CONFIG SET maxmemory-policy noeviction (and in redis.conf)"
        )

    # --- keys ----------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{{{self._ns}}}:{name}"

    def _tag(self, source_id: int, bucket: int) -> bytes:
        return f"{{{self._ns}:{source_id}:{bucket}}}".encode()

    def _meta(self, source_id: int, bucket: int) -> bytes:
        return self._tag(source_id, bucket) + b"m"

    def redis_key(self, key: bytes) -> bytes:
        """The Redis key of a core row key (the row prefix, then the entity key)."""
        entity = key[_PREFIX_BYTES:]
        return self._tag(int.from_bytes(key[1:_PREFIX_BYTES], "big"), bucket_of(entity)) + _ROW + entity

    # --- failures ------------------------------------------------------------------------------

    @contextmanager
    def _calls(self) -> Iterator[None]:
        """Map an unreachable Redis to Unavailable (writes stopped until a ping answers), refusals too."""
        try:
            yield
        except (redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError) as e:
            # Redis answers, so writes are not reported stopped: a ping would resume them at once.
            raise _refusal(e) from None
        except _UNREACHABLE as e:
            error = _unreachable(e)
            if self._down is None:
                _LOGGER.error("%s: %s", error.message, e)
                self._down = error
                for watch in self._watchers:
                    watch(False)
            raise error from None
        # After the unreachable errors: redis-py's ClusterDownError is a ResponseError too.
        except redis.exceptions.ResponseError as e:
            if not _is_busy(e):
                raise
            # Redis answers, and will again once the script ends: writes are not reported stopped.
            raise _busy(e) from None

    @property
    def writable(self) -> bool:
        """Whether writes are accepted: False once Redis could not be reached, until a ping answers."""
        return self._down is None

    def watch_writable(self, callback: Callable[[bool], None]) -> None:
        """Call `callback(writable)` whenever writes stop or start being accepted."""
        self._watchers.append(callback)

    def recover(self, timeout_s: float = 5.0) -> bool:
        """After Redis could not be reached, ping it; return whether writes are accepted again."""
        if self._gate.closed:
            return self._down is None
        if self._down is None:
            # The recovery thread calls this every storage_retry_interval_s: the periodic policy check
            # rides along rather than keeping a thread of its own.
            self._recheck_eviction()
            return True
        try:
            with self._gate.use():
                self._redis.ping()
        except (*_UNREACHABLE, CoreError):
            return False
        self._down = None
        _LOGGER.info("Redis answers again; writes resumed")
        for watch in self._watchers:
            watch(True)
        return True

    def setup_warnings(self) -> list[str]:
        """The eviction policy's warning where Redis may evict this store's keys, as last asked."""
        return [self.eviction_warning] if self.eviction_warning else []

    def statistic(self, name: str) -> int | None:
        """None: Redis reports its own statistics (INFO), not RocksDB's properties."""
        return None

    def sync_now(self) -> None:
        """Nothing to do: an acknowledged write is already in Redis."""

    def close(self, timeout_s: float = 10.0) -> bool:
        """Turn new calls away, wait up to `timeout_s` for running ones, give leases back and disconnect."""
        if self._gate.closed:
            return True
        drained = self._gate.close(timeout_s)
        try:
            self._release_script(keys=[self._key("offline_lease")], args=[self._token])
        except (redis.exceptions.RedisError, *_UNREACHABLE) as e:
            _LOGGER.debug("giving the offline-log lease back failed; it expires by itself: %s", e)
        if self._pool is not None:
            self._pool.shutdown(wait=drained)
        if drained:
            self._redis.close()
        return drained

    # --- sources -------------------------------------------------------------------------------

    def row_prefix(self, source_id: int) -> bytes:
        """The key prefix of every row of one source, as the core sees it."""
        return _ROW + source_id.to_bytes(4, "big")

    def get_source(self, name: str) -> tuple[int, bytes] | None:
        """The id and serialized definition of a source, or None."""
        with self._gate.use(), self._calls():
            raw = self._redis.hget(self._key("sources"), name.encode())
        if raw is None:
            return None
        source_id = int.from_bytes(raw[:4], "big")
        # Read with the definition, so a definition and the generation it is checked by always match.
        self._generations[source_id] = int.from_bytes(raw[4:12], "big", signed=True)
        return source_id, raw[12:]

    def list_sources(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, int, bytes]]:
        """Sources in name order, starting after `after`."""
        with self._gate.use(), self._calls():
            found = self._redis.hgetall(self._key("sources"))
        rows = sorted((k.decode(), int.from_bytes(v[:4], "big"), v[12:]) for k, v in found.items())
        rows = [row for row in rows if row[0] > after]
        return iter(rows if limit is None else rows[:limit])

    def put_source(
        self,
        name: str,
        definition: bytes,
        source_id: int | None = None,
        *,
        invalidate: bool = True,
        late_fields: Sequence[str] = (),
    ) -> int:
        """Store a definition, allocating a new id when none is given; return the id.

        `invalidate` starts a new generation, so rows validated against the old definition are refused
        by every server. Bucket generations are set before the definition, so a server that reads the
        new definition never writes under the old generation.
        """
        ttl = source_pb2.PushSource.FromString(definition).online_ttl
        ttl_ms = ttl.seconds * 1000 + ttl.nanos // 1_000_000
        with self._gate.use(), self._calls():
            if source_id is None:
                source_id = int(self._redis.incr(self._key("next_id")))
            gen_key = self._key(f"gen:{source_id}")
            generation = int(self._redis.incr(gen_key) if invalidate else self._redis.get(gen_key) or 0)
            self._set_metas(source_id, generation, ttl_ms)
            pipe = self._redis.pipeline(transaction=not self._cluster)
            late_key = self._key(f"late:{source_id}")
            if late_fields:
                pipe.set(late_key, "\n".join(late_fields).encode())
            else:
                pipe.delete(late_key)
            raw = source_id.to_bytes(4, "big") + generation.to_bytes(8, "big", signed=True) + definition
            pipe.hset(self._key("sources"), name.encode(), raw)
            pipe.execute()
        self._generations[source_id] = generation
        return source_id

    def _set_metas(self, source_id: int, generation: int, ttl_ms: int) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for bucket in range(BUCKETS):
            pipe.hset(self._meta(source_id, bucket), mapping={"g": generation, "t": ttl_ms})
        pipe.execute()

    def late_fields(self, source_id: int) -> tuple[str, ...]:
        """The fields added to a source while it held rows, which rows stored before may lack."""
        with self._gate.use(), self._calls():
            raw = self._redis.get(self._key(f"late:{source_id}"))
        return tuple(raw.decode().split("\n")) if raw else ()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Serialize definition changes across every server sharing this Redis.

        Row writes are not held off: an incompatible change bumps the generation that each write script
        checks, so writes validated against the old definition are refused from then on.
        """
        lock = self._key("lock")
        with self._gate.use(), self._local:
            deadline = time.monotonic() + 5.0
            while True:
                with self._calls():
                    if self._redis.set(lock, self._token, nx=True, px=_LOCK_MS):
                        break
                if time.monotonic() > deadline:
                    raise Unavailable(
                        "another server is changing source definitions; send the request again",
                        reason="REGISTRY_BUSY",
                    )
                time.sleep(0.02)
            # A change may outlast the lock's expiry (deleting a large source scans every node): it is
            # kept while the change runs, so that no other server's change starts meanwhile.
            done = threading.Event()
            keeper = threading.Thread(
                target=self._keep_lock, args=(lock, done), name="redis-definition-lock", daemon=True
            )
            keeper.start()
            try:
                yield
            finally:
                done.set()
                keeper.join()
                with self._calls():
                    self._release_script(keys=[lock], args=[self._token])

    def _keep_lock(self, lock: str, done: threading.Event) -> None:
        """Extend this server's hold of `lock` every third of its expiry until `done`."""
        while not done.wait(_LOCK_MS / 3000):
            try:
                with self._calls():
                    held = int(self._lease_script(keys=[lock], args=[self._token, _LOCK_MS]))
                if not held:
                    # Out of reach for longer than the expiry: another server's change may run alongside.
                    _LOGGER.warning("the definition lock expired while this server's change ran")
                    return
            except CoreError as e:
                # Redis out of reach: the next try may reach it; the change itself fails on its own.
                _LOGGER.debug("keeping the definition lock failed: %s", e)

    def generation(self, source_id: int) -> int:
        """The source's generation, as stored with the definition last read; -1 once it is deleted."""
        found = self._generations.get(source_id)
        if found is not None:
            return found
        with self._gate.use(), self._calls():
            raw = self._redis.hget(self._meta(source_id, 0), "g")
        return int(raw) if raw is not None else -1

    def delete_source(self, name: str, source_id: int) -> int:
        """Delete a source and its rows; return how many rows there were."""
        with self._gate.use(), self._calls():
            # Writes are refused first, so none lands between the scan and the end.
            self._set_metas(source_id, -1, 0)
            self._generations[source_id] = -1
            self._redis.hdel(self._key("sources"), name.encode())
            self._redis.delete(self._key(f"late:{source_id}"))
            rows = 0
            for chunk in self._row_chunks(source_id):
                rows += int(self._redis.delete(*chunk))
        return rows

    def _row_chunks(self, source_id: int) -> Iterator[list[bytes]]:
        """The source's row keys in chunks, from every node."""
        chunk: list[bytes] = []
        for key in self._redis.scan_iter(match=f"{{{self._ns}:{source_id}:*}}r*".encode(), count=1000):
            chunk.append(key)
            if len(chunk) >= _DELETE_CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def has_rows(self, source_id: int) -> bool:
        """Whether a source holds any online row."""
        with self._gate.use(), self._calls():
            return next(self._row_chunks(source_id), None) is not None

    def count_rows(self, source_id: int, limit: int | None = None) -> int:
        """How many rows a source holds, counting no further than `limit`, by a SCAN of every node."""
        counted = 0
        with self._gate.use(), self._calls():
            for chunk in self._row_chunks(source_id):
                counted += len(chunk)
                if limit is not None and counted >= limit:
                    return limit
        return counted

    def count_offline(self, limit: int | None = None) -> int:
        """How many entries are queued for the offline log (the stream's length), at most `limit`."""
        with self._gate.use(), self._calls():
            length = int(self._redis.xlen(self._key("offline")))
        return length if limit is None else min(length, limit)

    def delete_expired(self, source_id: int, cutoff_micros: int) -> int:
        """Nothing to sweep: Redis expires rows itself, `expiry_grace_s` after their ttl; returns 0."""
        return 0

    # --- rows ----------------------------------------------------------------------------------

    def rows_file(self, keys: Sequence[bytes], values: Sequence[bytes]) -> str:
        """No file: every row goes to Redis through the write's pipeline."""
        return ""

    def read(self, keys: list[bytes]) -> list[bytes | None]:
        """Stored values of the keys, None where absent: one round trip per node."""
        if not keys:
            return []
        names = [self.redis_key(k) for k in keys]
        with self._gate.use(), self._calls():
            if self._cluster:
                values: list[bytes | None] = self._redis.mget_nonatomic(names)
            else:
                values = self._redis.mget(names)
        return values

    def write_latest(
        self,
        batches: Sequence[RowBatch],
        *,
        request_id: str = "",
        fingerprint: str = "",
        dry_run: bool = False,
        replace: str = "",
    ) -> WriteResult:
        """Write each row unless a newer event of its entity is stored or later in the batch; atomically.

        On one node all of it is one script. On a cluster each bucket is one script, then the offline
        entries and the request record together; see the module's docstring.
        """
        w = _Write(request_id, fingerprint, dry_run, replace)
        with self._gate.use(), self._calls():
            if self._cluster:
                return self._write_cluster(batches, w)
            result = self._write_node(batches, w)
            if not dry_run:
                # A replay too: the first write may have reached the primary alone (its WAIT failed).
                self._wait([])
        return result

    def _write_node(self, batches: Sequence[RowBatch], w: _Write) -> WriteResult:
        if not any(batch.tiles for batch in batches):
            keys, args = self._write_args(batches, w)
            return self._result(self._write_script(keys=keys, args=args), batches)
        # Tiles are merged here from what Redis holds; the write lands only if none of it changed since.
        for _ in range(_TILE_TRIES):
            with self._redis.pipeline(transaction=True) as pipe:
                try:
                    return self._write_node_tiles(pipe, batches, w)
                except redis.WatchError:
                    continue
        raise Unavailable(
            "feature view tiles of this push were changed by other writes at every try; send it again",
            reason="TILES_BUSY",
        )

    def _write_node_tiles(self, pipe: Any, batches: Sequence[RowBatch], w: _Write) -> WriteResult:
        """One try of a push with tile updates: watch, read and merge the tiles, then write it all at once."""
        updates = [(index, update) for index, batch in enumerate(batches) for update in batch.tiles]
        state_keys = [self._view_key("vstate", update.view_id) for _, update in updates]
        pipe.watch(*set(state_keys))
        states: list[bytes | None] = self._redis.mget(state_keys)

        def read(keys: list[bytes]) -> list[bytes | None]:
            places = [self._tile_place(key) for key in keys]
            pipe.watch(*{name for name, _ in places})
            reads = self._redis.pipeline(transaction=False)
            for name, field in places:
                reads.hget(name, field)
            found: list[bytes | None] = reads.execute()
            return found

        puts: dict[tuple[bytes, bytes], bytes] = {}
        new_states: dict[str, bytes] = {}
        late = [0] * len(batches)
        for (index, update), key, state in zip(updates, state_keys, states, strict=True):
            merged = update.merge(state, read)
            for tile, value in zip(merged.keys, merged.values, strict=True):
                puts[self._tile_place(tile)] = value
            if merged.state is not None and merged.state != state:
                new_states[key] = merged.state
            late[index] = max(late[index], merged.skipped)
        expected = {update.view_id: (update.view, update.generation) for _, update in updates}
        keys, args = self._write_args(batches, w)
        keys += [self._view_key("vgen", view_id) for view_id in expected]
        keys += [name for name, _ in puts]
        keys += list(new_states)
        args += [len(expected), len(puts), len(new_states), *late]
        args += [str(generation) for _, generation in expected.values()]
        for (_, field), value in puts.items():
            args += [field, value]
        args += list(new_states.values())
        pipe.multi()
        self._write_script(keys=keys, args=args, client=pipe)
        reply = pipe.execute()[0]
        if int(reply[0]) == 3:
            view = list(expected.values())[int(reply[1]) - 1][0]
            raise Aborted(
                f"feature view {view!r} was changed or deleted while these records were validated; nothing "
                "was written, send them again",
                reason="VIEW_CHANGED",
                metadata={"view": view},
            )
        return self._result(reply, batches)

    def _write_args(self, batches: Sequence[RowBatch], w: _Write) -> tuple[list[bytes | str], list[Any]]:
        """The keys and arguments of the write script for a push on one node, without tiles."""
        metas: dict[bytes, int] = {}
        meta_args: list[bytes | str | int] = []
        row_keys: list[bytes] = []
        row_args: list[bytes | int] = []
        for index, batch in enumerate(batches, start=1):
            for key, value in _newest_per_key(batch):
                name = self.redis_key(key)
                meta = name[: name.index(b"}") + 1] + b"m"
                if meta not in metas:
                    metas[meta] = len(metas) + 1
                    meta_args += [index, _expected(batch)]
                row_keys.append(name)
                row_args += [metas[meta], value]
        offline = [] if w.dry_run else _offline_entries(batches)
        keys: list[bytes | str] = [*metas, *row_keys]
        if offline:
            keys += [self._key("offline"), self._key("offline_seq")]
        window = ""
        if w.request_id:
            # A dry run reads the record too (the script writes nothing then): it answers as the push would.
            keys += [self._key(f"req:{w.request_id}"), self._key(f"reqfp:{w.request_id}")]
            window = str(self._window_ms)
        args: list[Any] = ["1" if w.dry_run else "0", len(metas), len(row_keys), len(offline), window]
        args += [self._grace_ms, "", len(batches), w.fingerprint, w.replace]
        for batch in batches:
            args += [batch.source, len(batch.keys)]
        return keys, [*args, *meta_args, *row_args, *offline]

    def _result(self, reply: list[Any], batches: Sequence[RowBatch]) -> WriteResult:
        status = int(reply[0])
        if status == 1:
            _source_changed(batches[int(reply[1]) - 1])
        # The script's JSON has no object for a write without sources.
        counts = {s: BatchCounts(*c) for s, c in json.loads(reply[1]).items()}
        if status == 2:
            return WriteResult(counts, replayed=True, fingerprint=_text(reply[2]))
        return WriteResult(counts)

    def _write_cluster(self, batches: Sequence[RowBatch], w: _Write) -> WriteResult:
        assert self._pool is not None
        record_key = self._key(f"req:{w.request_id}")
        fingerprint_key = self._key(f"reqfp:{w.request_id}")
        # One script per source and bucket: its keys share a slot.
        groups: dict[tuple[int, bytes], list[tuple[bytes, bytes]]] = defaultdict(list)
        for index, batch in enumerate(batches):
            for key, value in _newest_per_key(batch):
                name = self.redis_key(key)
                groups[(index, name[: name.index(b"}") + 1])].append((name, value))
        # The slots this write touches: its buckets', and the one of the offline entries and request record.
        tags = [self._key("").encode(), *{tag for _, tag in groups}]
        if w.request_id:
            seen = self._redis.get(record_key)
            first = _text(self._redis.get(fingerprint_key) or "") if seen is not None else ""
            if seen is not None and not (w.replace and first == w.replace):
                if not w.dry_run:
                    # The first write may have reached the primaries alone (its WAIT failed).
                    self._wait(tags)
                return WriteResult(_counts(seen), replayed=True, fingerprint=first)

        def run(group: tuple[int, bytes]) -> Any:
            index, tag = group
            batch = batches[index]
            rows = groups[group]
            args: list[Any] = ["1" if w.dry_run else "0", 1, len(rows), 0, "", self._grace_ms, "", 1, "", ""]
            args += [batch.source, len(rows), 1, _expected(batch)]
            for _, value in rows:
                args += [1, value]
            with self._calls():
                return self._write_script(keys=[tag + b"m", *(name for name, _ in rows)], args=args)

        written: dict[str, int] = defaultdict(int)
        for group, reply in zip(groups, self._pool.map(run, list(groups)), strict=True):
            if int(reply[0]) == 1:
                _source_changed(batches[group[0]])
            for source, (_, n, *_) in json.loads(reply[1]).items():
                written[source] += n
        counts = {
            b.source: BatchCounts(len(b.keys), written[b.source], len(b.keys) - written[b.source])
            for b in batches
        }
        if w.dry_run:
            return WriteResult(counts)
        offline = _offline_entries(batches)
        result = WriteResult(counts)
        if offline or w.request_id:
            # The commit marker: the offline entries and the request record in one script, last.
            record = json.dumps({s: [c.accepted, c.written, c.superseded] for s, c in counts.items()})
            keys: list[str] = [self._key("offline"), self._key("offline_seq")] if offline else []
            window = ""
            if w.request_id:
                keys += [record_key, fingerprint_key]
                window = str(self._window_ms)
            args = [
                "0",
                0,
                0,
                len(offline),
                window,
                self._grace_ms,
                record,
                0,
                w.fingerprint,
                w.replace,
                *offline,
            ]
            reply = self._write_script(keys=keys, args=args)
            if int(reply[0]) == 2:
                result = WriteResult(_counts(reply[1]), replayed=True, fingerprint=_text(reply[2]))
        self._wait(tags)
        return result

    def _wait(self, tags: Sequence[bytes]) -> None:
        """Wait for `wait_replicas` replicas of each primary holding a slot of `tags` (on a cluster; the
        node otherwise) to have what it holds, or fail with Unavailable.

        WAIT counts the replicas that have what its own connection wrote, and redis-py hands any pooled
        connection to a command: a WAIT on a connection that wrote nothing since a replica stopped
        acknowledging answers at once. So each WAIT follows a write of a marker key on the same connection
        (one pipeline); replication is in order, so a replica that has the marker has everything the
        primary held before it, this write included.
        """
        if not self._wait_replicas:
            return
        if not self._cluster:
            acked = self._wait_on(self._redis, self._key("wait"))
        else:
            assert self._pool is not None
            cluster: Any = self._redis
            # One marker per primary, in a slot it holds.
            markers: dict[str, bytes] = {}
            for tag in tags:
                markers.setdefault(cluster.get_node_from_key(tag).name, tag + b"wait")

            def wait(node_marker: tuple[str, bytes]) -> int:
                client = cluster.get_redis_connection(cluster.get_node(node_name=node_marker[0]))
                with self._calls():
                    return self._wait_on(client, node_marker[1])

            acked = min(self._pool.map(wait, list(markers.items())))
        if acked < self._wait_replicas:
            raise Unavailable(
                f"the write reached {acked} of the {self._wait_replicas} Redis replicas required in time; "
                "send the records again with the same request id",
                reason="REPLICAS_BEHIND",
                metadata={"replicas": str(acked)},
            )

    def _wait_on(self, client: Any, marker: str | bytes) -> int:
        """Write `marker` and WAIT on one connection of `client`; return how many replicas have it."""
        # Half the socket timeout, so that Redis answers how many replicas have it before the socket gives up.
        wait_ms = max(self._timeout_ms // 2, 1)
        try:
            with client.pipeline(transaction=False) as pipe:
                pipe.set(marker, b"")
                pipe.execute_command("WAIT", self._wait_replicas, wait_ms)
                return int(pipe.execute()[1])
        except (redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError):
            # The slot moved since the write: the write stands, its replicas were not counted.
            raise Unavailable(
                "the Redis Cluster moved a slot of this write while its replicas were counted; send the "
                "records again with the same request id",
                reason="REPLICAS_BEHIND",
            ) from None

    # --- feature views and tiles (one node; a cluster refuses them) -----------------------------

    def _view_key(self, kind: str, view_id: int) -> str:
        return self._key(f"{kind}:{view_id}")

    def _tiles_prefix(self, view_id: int) -> bytes:
        return self._key(f"t{view_id}:").encode()

    def _tile_place(self, key: bytes) -> tuple[bytes, bytes]:
        """The Redis hash of a core tile key (its view and entity) and the field in it (the tile's start)."""
        return self._tiles_prefix(int.from_bytes(key[1:5], "big")) + key[5:-8], key[-8:]

    def _tile_hashes(self, view_id: int) -> Iterator[bytes]:
        return iter(self._redis.scan_iter(match=self._tiles_prefix(view_id) + b"*", count=1000))

    def get_view(self, name: str) -> tuple[int, bytes] | None:
        """The id and serialized definition of a view, or None."""
        if self._cluster:
            return super().get_view(name)
        with self._gate.use(), self._calls():
            raw = self._redis.hget(self._key("views"), name.encode())
        if raw is None:
            return None
        view_id = int.from_bytes(raw[:4], "big")
        # Read with the definition, so a definition and the generation it is checked by always match.
        self._view_generations[view_id] = int.from_bytes(raw[4:12], "big", signed=True)
        return view_id, raw[12:]

    def list_views(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, int, bytes]]:
        """Views in name order, starting after `after`."""
        if self._cluster:
            return super().list_views(after, limit)
        with self._gate.use(), self._calls():
            found = self._redis.hgetall(self._key("views"))
        rows = sorted((k.decode(), int.from_bytes(v[:4], "big"), v[12:]) for k, v in found.items())
        rows = [row for row in rows if row[0] > after]
        return iter(rows if limit is None else rows[:limit])

    def put_view(self, name: str, definition: bytes, view_id: int | None = None, *, invalidate: bool) -> int:
        """Store a view definition under its id, or a new one; return the id.

        `invalidate` starts a new generation first, so tiles computed against the old definition, on any
        server, are refused by the write script from then on.
        """
        if self._cluster:
            return super().put_view(name, definition, view_id, invalidate=invalidate)
        with self._gate.use(), self._calls():
            if view_id is None:
                view_id = int(self._redis.incr(self._key("next_view_id")))
            gen_key = self._view_key("vgen", view_id)
            generation = int(self._redis.incr(gen_key) if invalidate else self._redis.get(gen_key) or 0)
            raw = view_id.to_bytes(4, "big") + generation.to_bytes(8, "big", signed=True) + definition
            self._redis.hset(self._key("views"), name.encode(), raw)
        self._view_generations[view_id] = generation
        return view_id

    def delete_view(self, name: str, view_id: int) -> int:
        """Delete a view, its state and its tiles; return how many tiles there were."""
        if self._cluster:
            return super().delete_view(name, view_id)
        tiles = 0
        with self._gate.use(), self._calls():
            # Writes are refused first, so no tile lands between the scan and the end.
            self._redis.set(self._view_key("vgen", view_id), -1)
            self._view_generations[view_id] = -1
            self._redis.hdel(self._key("views"), name.encode())
            self._redis.delete(self._view_key("vstate", view_id))
            for name_of_hash in list(self._tile_hashes(view_id)):
                pipe = self._redis.pipeline(transaction=True)
                pipe.hvals(name_of_hash)
                pipe.delete(name_of_hash)
                tiles += sum(map(block_tile_count, pipe.execute()[0]))
        return tiles

    def view_generation(self, view_id: int) -> int:
        """The view's generation, as stored with the definition last read; -1 once it is deleted."""
        if self._cluster:
            return super().view_generation(view_id)
        found = self._view_generations.get(view_id)
        if found is not None:
            return found
        with self._gate.use(), self._calls():
            raw = self._redis.get(self._view_key("vgen", view_id))
        return int(raw or 0)

    def has_tiles(self, view_id: int) -> bool:
        """Whether a view holds any tile."""
        if self._cluster:
            return super().has_tiles(view_id)
        with self._gate.use(), self._calls():
            return next(self._tile_hashes(view_id), None) is not None

    def get_service(self, name: str) -> bytes | None:
        """The serialized definition of a feature service, or None."""
        if self._cluster:
            return super().get_service(name)
        with self._gate.use(), self._calls():
            raw: bytes | None = self._redis.hget(self._key("services"), name.encode())
        return raw

    def list_services(self, after: str = "", limit: int | None = None) -> Iterator[tuple[str, bytes]]:
        """Feature services in name order, starting after `after`."""
        if self._cluster:
            return super().list_services(after, limit)
        with self._gate.use(), self._calls():
            found = self._redis.hgetall(self._key("services"))
        rows = sorted((k.decode(), v) for k, v in found.items() if k.decode() > after)
        return iter(rows if limit is None else rows[:limit])

    def put_service(self, name: str, definition: bytes) -> None:
        """Store a feature service definition."""
        if self._cluster:
            return super().put_service(name, definition)
        with self._gate.use(), self._calls():
            self._redis.hset(self._key("services"), name.encode(), definition)

    def delete_service(self, name: str) -> None:
        """Delete a feature service definition."""
        if self._cluster:
            return super().delete_service(name)
        with self._gate.use(), self._calls():
            self._redis.hdel(self._key("services"), name.encode())

    def tile_key(self, view_id: int, entity: bytes, start_micros: int) -> bytes:
        """The core key of one entity's tile: the view id, the entity with its length, the start."""
        if self._cluster:
            return super().tile_key(view_id, entity, start_micros)
        head = _TILE + view_id.to_bytes(4, "big") + len(entity).to_bytes(4, "big")
        return head + entity + (start_micros + _START_OFFSET).to_bytes(8, "big")

    def tile_keys(self, view_id: int, entities: Sequence[bytes], starts: np.ndarray) -> list[bytes]:
        """The keys of each entity's tile starting at the matching start (int64 microseconds)."""
        if self._cluster:
            return super().tile_keys(view_id, entities, starts)
        head = _TILE + view_id.to_bytes(4, "big")
        shifted = (starts.astype(np.int64).view(np.uint64) + np.uint64(_START_OFFSET)).astype(">u8").tobytes()
        return [
            head + len(entity).to_bytes(4, "big") + entity + shifted[8 * i : 8 * i + 8]
            for i, entity in enumerate(entities)
        ]

    def read_tiles(self, keys: list[bytes]) -> list[bytes | None]:
        """Stored tiles of the keys, None where absent: one round trip."""
        if self._cluster or not keys:
            return super().read_tiles(keys)
        with self._gate.use(), self._calls():
            pipe = self._redis.pipeline(transaction=False)
            for name, field in map(self._tile_place, keys):
                pipe.hget(name, field)
            found: list[bytes | None] = pipe.execute()
        return found

    def scan_tiles(
        self, view_id: int, entities: Sequence[bytes], first_micros: int, last_micros: int
    ) -> tuple[list[int], np.ndarray, list[bytes]]:
        """Each entity's tiles with starts in [first_micros, last_micros], entity by entity, by start."""
        if self._cluster:
            return super().scan_tiles(view_id, entities, first_micros, last_micros)
        prefix = self._tiles_prefix(view_id)
        with self._gate.use(), self._calls():
            pipe = self._redis.pipeline(transaction=False)
            for entity in entities:
                pipe.hgetall(prefix + len(entity).to_bytes(4, "big") + entity)
            found: list[dict[bytes, bytes]] = pipe.execute()
        lo = (first_micros + _START_OFFSET).to_bytes(8, "big")
        hi = (last_micros + _START_OFFSET).to_bytes(8, "big")
        counts: list[int] = []
        fields: list[bytes] = []
        values: list[bytes] = []
        for tiles in found:
            inside = sorted((f, v) for f, v in tiles.items() if lo <= f <= hi)
            counts.append(len(inside))
            fields += [f for f, _ in inside]
            values += [v for _, v in inside]
        shifted = np.frombuffer(b"".join(fields), dtype=">u8").astype(np.uint64)
        return counts, (shifted - np.uint64(_START_OFFSET)).view(np.int64), values

    def view_state(self, view_id: int) -> bytes | None:
        """The view's stored state (its watermark and backfilled ranges), or None."""
        if self._cluster:
            return super().view_state(view_id)
        with self._gate.use(), self._calls():
            raw: bytes | None = self._redis.get(self._view_key("vstate", view_id))
        return raw

    def update_view_state(self, view_id: int, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Replace the view's state by `change(state)`, computed again if another write came first."""
        if self._cluster:
            return super().update_view_state(view_id, change)
        key = self._view_key("vstate", view_id)
        with self._gate.use(), self._calls():
            while True:
                with self._redis.pipeline(transaction=True) as pipe:
                    try:
                        pipe.watch(key)
                        new = change(pipe.get(key))
                        if new is None:
                            return None
                        pipe.multi()
                        pipe.set(key, new)
                        pipe.execute()
                        return new
                    except redis.WatchError:
                        continue

    def delete_tiles_before(self, view_id: int, start_micros: int) -> int:
        """Delete the view's tiles that start before `start_micros`; return how many."""
        if self._cluster:
            return super().delete_tiles_before(view_id, start_micros)
        cutoff = (start_micros + _START_OFFSET).to_bytes(8, "big")
        deleted = 0
        with self._gate.use(), self._calls():
            for name in list(self._tile_hashes(view_id)):
                stale = [f for f in self._redis.hkeys(name) if f < cutoff]
                if stale:
                    pipe = self._redis.pipeline(transaction=True)
                    pipe.hmget(name, stale)
                    pipe.hdel(name, *stale)
                    blocks, _ = pipe.execute()
                    deleted += sum(block_tile_count(b) for b in blocks if b is not None)
        return deleted

    # --- offline-log queue ---------------------------------------------------------------------

    def hold_drain(self) -> bool:
        """Take or renew the drain lease; False while another server holds it."""
        with self._gate.use(), self._calls():
            return bool(
                int(self._lease_script(keys=[self._key("offline_lease")], args=[self._token, _LEASE_MS]))
            )

    def queued_offline(self, max_bytes: int, last_seq: int | None = None) -> list[QueuedRecords]:
        """Queue entries from the oldest, up to about `max_bytes` (at least one) or through `last_seq`.

        Only the server holding the drain lease sees entries; the others see an empty queue, so one
        server at a time writes Parquet files.
        """
        out: list[QueuedRecords] = []
        stream = self._key("offline")
        if not self.hold_drain():
            return out
        with self._gate.use(), self._calls():
            start, total = "-", 0
            end = "+" if last_seq is None else f"0-{last_seq}"
            while True:
                entries = self._redis.xrange(stream, start, end, count=100)
                for entry_id, fields in entries:
                    raw = fields[b"e"]
                    if last_seq is None and out and total + len(raw) > max_bytes:
                        return out
                    n = int.from_bytes(raw[:2], "big")
                    seq = int(entry_id.split(b"-")[1])
                    out.append(QueuedRecords(seq, raw[2 : 2 + n].decode(), raw[2 + n :]))
                    total += len(raw)
                if len(entries) < 100:
                    return out
                start = "(" + entries[-1][0].decode()

    def delete_offline(self, first_seq: int, last_seq: int) -> None:
        """Drop the queue entries through `last_seq`; those before `first_seq` are already flushed."""
        with self._gate.use(), self._calls():
            self._redis.xtrim(self._key("offline"), minid=f"0-{last_seq + 1}", approximate=False)

    # --- idempotency records -------------------------------------------------------------------

    def seen_request(self, request_id: str) -> dict[str, BatchCounts] | None:
        """The counts recorded for a request id still within the window, or None."""
        with self._gate.use(), self._calls():
            raw = self._redis.get(self._key(f"req:{request_id}"))
        return None if raw is None else _counts(raw)

    def purge_requests(self) -> int:
        """Nothing to purge: Redis expires idempotency records at the end of the window; returns 0."""
        return 0


def _counts(raw: bytes | str) -> dict[str, BatchCounts]:
    return {s: BatchCounts(*c) for s, c in json.loads(raw).items()}


def _text(raw: bytes | str) -> str:
    """A short ASCII value Redis returned, as text whichever way the client decodes replies."""
    return raw.decode() if isinstance(raw, bytes) else raw


def _expected(batch: RowBatch) -> str:
    """The generation a write of `batch` must find, or "" when it is not checked."""
    return "" if batch.source_id is None else str(batch.generation)


def _source_changed(batch: RowBatch) -> None:
    raise Aborted(
        f"push source {batch.source!r} was changed or deleted while these records were validated; "
        "nothing was written, send them again",
        reason="SOURCE_CHANGED",
        metadata={"source": batch.source},
    )


def _newest_per_key(batch: RowBatch) -> list[tuple[bytes, bytes]]:
    """The batch's rows, one per entity: the newest event, the later one on a tie."""
    keys, values = batch.keys, batch.values
    if len(set(keys)) == len(keys):
        return list(zip(keys, values, strict=True))
    best: dict[bytes, bytes] = {}
    for key, value in zip(keys, values, strict=True):
        held = best.get(key)
        if held is None or value[:HEADER_BYTES] >= held[:HEADER_BYTES]:
            best[key] = value
    return list(best.items())


def _offline_entries(batches: Sequence[RowBatch]) -> list[bytes]:
    """The batches' offline-log entries: a 2-byte name length, the source name, the Arrow IPC stream."""
    out = []
    for batch in batches:
        if batch.offline:
            name = batch.source.encode()
            out.append(len(name).to_bytes(2, "big") + name + batch.offline)
    return out
