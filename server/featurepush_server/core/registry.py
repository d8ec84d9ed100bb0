"""The registry of push sources: apply, get, list and delete, with schema-compatibility checks."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from featurepush.v1 import source_pb2

from .errors import FailedPrecondition, InvalidInput, NotFound, Unavailable, Violation, shown
from .schema import NAME_RE, SourceSpec, compile_source
from .stores.base import Store

MAX_PAGE_SIZE = 1000
# The most bytes of definitions one List page holds: half a default client's 4 MiB receive limit, so a
# page of sources, views or services always reaches it (a definition is at most MAX_DEFINITION_BYTES).
MAX_PAGE_BYTES = 2 * 1024 * 1024
# How long a load waits for a catalog change written by another process to finish.
CATALOG_WAIT_S = 10.0
DEFAULT_PAGE_SIZE = 100


def settled_version(read: Callable[[], int], what: str) -> int:
    """The catalog counter once no change is being written elsewhere (it is odd while one is).

    Raises Unavailable naming `what` if a change takes longer than CATALOG_WAIT_S.
    """
    deadline = time.monotonic() + CATALOG_WAIT_S
    version = read()
    while version % 2:
        if time.monotonic() > deadline:
            raise Unavailable(f"{what} are being changed; send the request again shortly")
        time.sleep(0.001)
        version = read()
    return version


def page_start(page_size: int, page_token: str, what: str) -> tuple[int, str]:
    """A List call's page size (the default for 0) and the name its page starts after ("" at the start)."""
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        raise InvalidInput(
            "page_size is out of range",
            [Violation("page_size", f"must be 0 to {MAX_PAGE_SIZE}, got {page_size}")],
        )
    after = ""
    if page_token:
        try:
            after = base64.urlsafe_b64decode(page_token.encode()).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            after = ""
        # A token is a name this server handed out: anything else (which the decoder may have read as
        # nothing, skipping the characters it does not know) would list from somewhere the caller never was.
        if not NAME_RE.match(after) or page_token != base64.urlsafe_b64encode(after.encode()).decode():
            raise InvalidInput(
                "page_token is not valid",
                [Violation("page_token", f"pass a next_page_token returned by {what}")],
            )
    return page_size or DEFAULT_PAGE_SIZE, after


def page_of(rows: Sequence[tuple[str, bytes]], size: int) -> tuple[int, str]:
    """How many of `rows` one List page takes, and the next page's token ("" at the end).

    `rows` are names and stored definitions, `size` + 1 of them read; a page takes at most `size` and
    MAX_PAGE_BYTES of them, and at least one.
    """
    count = used = 0
    for _, raw in rows[:size]:
        # Each definition is a length-delimited field of the reply: a tag and a length of up to 5 bytes.
        used += len(raw) + 6
        if count and used > MAX_PAGE_BYTES:
            break
        count += 1
    return count, base64.urlsafe_b64encode(rows[count - 1][0].encode()).decode() if count < len(rows) else ""


@dataclass(frozen=True)
class Source:
    """A registered source: its store id, compiled spec, and the store's generation of that definition."""

    id: int
    spec: SourceSpec
    generation: int = 0
    # Nullable fields added while the source held rows: rows stored before them lack their entries.
    late_fields: tuple[str, ...] = ()

    @functools.cached_property
    def fields_digest(self) -> str:
        """A short digest of the field names, which a request id's fingerprint names the source with."""
        return hashlib.sha256("\n".join(f.name for f in self.spec.fields).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class ApplyOutcome:
    """The stored definition and whether the apply created or changed it."""

    source: source_pb2.PushSource
    changed: bool
    created: bool


def _definition_only(src: source_pb2.PushSource) -> source_pb2.PushSource:
    copy = source_pb2.PushSource()
    copy.CopyFrom(src)
    copy.ClearField("create_time")
    copy.ClearField("update_time")
    return copy


def incompatibilities(old: SourceSpec, new: SourceSpec) -> list[str]:
    """The changes from `old` to `new` that would make rows stored under `old` unreadable."""
    problems: list[str] = []
    if old.entity_keys != new.entity_keys:
        problems.append(f"entity keys change from {list(old.entity_keys)} to {list(new.entity_keys)}")
    if old.timestamp_field != new.timestamp_field:
        problems.append(
            f"the timestamp field changes from {old.timestamp_field!r} to {new.timestamp_field!r}"
        )
    new_fields = {f.name: f for f in new.fields}
    old_names = {f.name for f in old.fields}
    for f in old.fields:
        nf = new_fields.get(f.name)
        if nf is None:
            problems.append(f"field {f.name!r} is removed")
        elif nf.dtype != f.dtype:
            problems.append(f"field {f.name!r} changes type from {f.dtype} to {nf.dtype}")
        elif f.nullable and not nf.nullable:
            problems.append(f"field {f.name!r} becomes non-nullable")
    for f in new.fields:
        if f.name not in old_names and not f.nullable:
            problems.append(f"new field {f.name!r} is not nullable, and stored rows lack it")
    return problems


class Registry:
    """Source definitions kept in the online store's database, cached in memory; thread-safe.

    Where other processes change the same store's definitions, `catalog_version` reads a counter that
    is odd while such a change is written and moves with each one; the cache is dropped when it moves.
    """

    def __init__(
        self,
        store: Store,
        check_batch_source: Callable[[SourceSpec, Callable[[], bool]], None] | None = None,
        catalog_version: Callable[[], int] | None = None,
        refresh_s: float | None = None,
    ):
        self._store = store
        self._cache: dict[str, Source] = {}
        # A store other servers change too: cached definitions are read again after `refresh_s` seconds.
        self._refresh_s = refresh_s
        self._loaded: dict[str, float] = {}
        self._lock = threading.Lock()
        self._check_batch_source = check_batch_source
        self._catalog_version = catalog_version
        self._cached_version = catalog_version() if catalog_version is not None else 0
        # Asked before a source is deleted; each may refuse, such as while feature views read the source.
        self.delete_checks: list[Callable[[str], None]] = []
        # Asked with a source's new definition before it is applied; each may refuse, such as a feature view
        # reading the source whose entity keys the change would move.
        self.apply_checks: list[Callable[[SourceSpec], None]] = []

    def get(self, name: str) -> Source:
        """The source called `name`; raise NotFound."""
        cached = self._cache.get(name)
        if cached is not None and (self._fresh(name)):
            return cached
        # Loaded under the lock apply() holds, so a cached definition always matches its generation.
        with self._lock:
            return self._load(name)

    def _settled_version(self) -> int:
        """The catalog counter once no change is being written elsewhere; the cache is dropped if it moved."""
        if self._catalog_version is None:
            return 0
        version = settled_version(self._catalog_version, "source definitions")
        if version != self._cached_version:
            self._cache.clear()
            self._cached_version = version
        return version

    def _load(self, name: str) -> Source:
        while True:
            version = self._settled_version()
            source = self._read(name)
            # A change written elsewhere while the definition and its generation were read: read again.
            if self._catalog_version is None or self._catalog_version() == version:
                self._cache[name] = source
                self._loaded[name] = time.monotonic()
                return source

    def _fresh(self, name: str) -> bool:
        """Whether the cached definition of `name` may still be used: no change seen from elsewhere."""
        if self._catalog_version is not None and self._catalog_version() != self._cached_version:
            return False
        return self._refresh_s is None or time.monotonic() - self._loaded.get(name, 0.0) < self._refresh_s

    def _read(self, name: str) -> Source:
        found = self._store.get_source(name)
        if found is None:
            raise NotFound(
                f"push source {shown(name)!r} does not exist; apply it first (featurepush apply)",
                reason="SOURCE_NOT_FOUND",
                metadata={"source": shown(name)},
            )
        source_id, raw = found
        spec = compile_source(source_pb2.PushSource.FromString(raw))
        names = {f.name for f in spec.fields}
        late = tuple(f for f in self._store.late_fields(source_id) if f in names)
        return Source(source_id, spec, self._store.generation(source_id), late)

    def apply(
        self,
        definition: source_pb2.PushSource,
        *,
        validate_only: bool = False,
        stop: Callable[[], bool] = lambda: False,
    ) -> ApplyOutcome:
        """Create or update a source; an unchanged definition is a no-op. `stop` ends a batch-source check."""
        wanted = _definition_only(definition)
        spec = compile_source(wanted)
        if self._check_batch_source is not None and wanted.HasField("batch_config"):
            self._check_batch_source(spec, stop)
        # The store's write lock makes the row check and the change one step: no push lands between them.
        with self._lock, self._store.exclusive():
            for check in self.apply_checks:
                check(spec)
            found = self._store.get_source(wanted.name)
            problems: list[str] = []
            late: list[str] = []
            if found is not None:
                source_id, raw = found
                stored = source_pb2.PushSource.FromString(raw)
                if _definition_only(stored) == wanted:
                    return ApplyOutcome(stored, changed=False, created=False)
                old = compile_source(stored)
                problems = incompatibilities(old, spec)
                # Rows stored so far lack the fields added now, as do pushes already validated against
                # the old definition, and as rows may lack those added before; reads list them as null.
                names = {f.name for f in spec.fields}
                added = names - {f.name for f in old.fields}
                late = sorted(added | (names & set(self._store.late_fields(source_id))))
                if problems and self._store.has_rows(source_id):
                    raise FailedPrecondition(
                        f"push source {wanted.name!r} holds online rows that the new definition "
                        "could not read: "
                        + "; ".join(problems)
                        + ". Apply the change under a new source name, or delete the source (and its rows) "
                        "first with DeleteSource / `featurepush delete`.",
                        reason="INCOMPATIBLE_SCHEMA_CHANGE",
                        metadata={"source": wanted.name},
                    )
            result = source_pb2.PushSource()
            result.CopyFrom(wanted)
            now = time.time_ns()
            if found is not None:
                result.create_time.CopyFrom(stored.create_time)
            else:
                result.create_time.FromNanoseconds(now // 1000 * 1000)
            result.update_time.FromNanoseconds(now // 1000 * 1000)
            if validate_only:
                return ApplyOutcome(result, changed=True, created=found is None)
            # Dropped first, so no push picks up the old definition again. Pushes validated against it
            # still land after a compatible change; after an incompatible one they fail their check.
            self._cache.pop(wanted.name, None)
            self._store.put_source(
                wanted.name,
                result.SerializeToString(),
                None if found is None else found[0],
                invalidate=bool(problems),
                late_fields=late,
            )
        return ApplyOutcome(result, changed=True, created=found is None)

    def list(self, page_size: int = 0, page_token: str = "") -> tuple[list[source_pb2.PushSource], str]:
        """One page of sources in name order and the token of the next page ("" at the end)."""
        size, after = page_start(page_size, page_token, "ListSources")
        rows = [(name, raw) for name, _, raw in self._store.list_sources(after, size + 1)]
        count, token = page_of(rows, size)
        return [source_pb2.PushSource.FromString(raw) for _, raw in rows[:count]], token

    def delete(self, name: str) -> int:
        """Delete a source and its rows; return the number of rows deleted."""
        # Under the store's write lock, as a view's apply writes it: no view of the source lands between the
        # check and the deletion.
        with self._lock, self._store.exclusive():
            for check in self.delete_checks:
                check(name)
            source = self._load(name)
            self._cache.pop(name, None)
            rows = self._store.delete_source(name, source.id)
        return rows
