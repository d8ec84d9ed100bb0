"""Where batch sources may read: the operator's local roots and remote schemes, listed within bounds.

A batch config's URI is the caller's; the places it may point to are the operator's. A local path is
canonicalized (`..` and symbolic links resolved) and must then lie under a root and outside the data
directory; a remote URI must use an allowed scheme and carry nothing but a bucket and a path, so the
caller chooses no endpoint, credential or option. Every refusal has the same words, so a refusal tells
nothing about the file system. A location is listed here, not by pyarrow, so the listing stops at a
number of entries, a depth, a time limit or the end of its call.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from .errors import Cancelled, FailedPrecondition

StopCheck = Callable[[], bool]

NOT_ALLOWED = (
    "batch_config.uri of source {source!r} is not a location this server may read; the operator sets "
    "batch_roots/batch_schemes"
)
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
# Files pyarrow's own discovery skips too: hidden files, temporary files and _SUCCESS-style markers.
_IGNORED_PREFIXES = (".", "_")


@dataclass(frozen=True)
class ListLimits:
    """How much one listing may visit: entries (files and folders), folder depth below it, and seconds."""

    max_entries: int = 10_000
    max_depth: int = 8
    timeout_s: float = 10.0


@dataclass(frozen=True)
class Listing:
    """A listed location: the filesystem to open its files with, its base folder and its files, sorted."""

    filesystem: pafs.FileSystem
    base: str
    files: list[str]


def _local_files() -> pafs.LocalFileSystem:
    """Local files read with read calls into buffers, never memory-mapped.

    The pages of a mapped file that a read has touched stay in the process's resident memory until the
    file is closed, so a read held as much of it as it had read; and a file truncated while mapped kills
    the process with SIGBUS, where a read call fails with an error the read reports.
    """
    return pafs.LocalFileSystem(use_mmap=False)


def not_allowed(source: str) -> FailedPrecondition:
    """The one refusal of a location outside the operator's roots and schemes."""
    return FailedPrecondition(
        NOT_ALLOWED.format(source=source),
        reason="BATCH_LOCATION_NOT_ALLOWED",
        metadata={"source": source},
    )


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


class BatchLocations:
    """Checks batch URIs against the allowed roots and schemes, and lists them; thread-safe, immutable."""

    def __init__(
        self,
        roots: Sequence[Path],
        schemes: Sequence[str],
        data_dir: Path,
        limits: ListLimits = ListLimits(),
    ):
        # Canonical once, so a root given through a symbolic link still contains its files.
        self._roots = tuple(os.path.realpath(r) for r in roots)
        self._schemes = frozenset(schemes)
        self._data_dir = os.path.realpath(data_dir)
        self.limits = limits

    def listing(self, uri: str, source: str, stop: StopCheck) -> Listing:
        """The files at `uri`; raise FailedPrecondition if it is not allowed or cannot be listed in bounds."""
        if "://" not in uri or uri.startswith("file:"):
            real = self._local(uri, source)
            return Listing(_local_files(), real, self._walk_local(real, source, stop))
        fs, path = self._remote(uri, source)
        return Listing(fs, path, self._walk_remote(fs, path, source, stop))

    def list_own(self, folder: Path, source: str, stop: StopCheck) -> Listing:
        """The files of a folder the server owns (a source's offline log), listed without the roots' rule."""
        folder.mkdir(parents=True, exist_ok=True)
        real = os.path.realpath(folder)
        files = self._walk_local(real, source, stop, own=True)
        return Listing(_local_files(), real, files)

    # --- checking ------------------------------------------------------------------------------

    def allowed_path(self, real: str) -> bool:
        """Whether a canonical local path lies under a root and outside the data directory."""
        return any(_inside(real, root) for root in self._roots) and not _inside(real, self._data_dir)

    def _local(self, uri: str, source: str) -> str:
        """The canonical path of a local URI or path, if the roots allow it."""
        if uri.startswith("file:"):
            parts = urlsplit(uri)
            if not uri.startswith("file://") or parts.netloc or "?" in uri or "#" in uri:
                raise not_allowed(source)
            path = unquote(parts.path)
        else:
            path = uri
        if not path or "\x00" in path or "?" in path or "#" in path:
            raise not_allowed(source)
        real = os.path.realpath(path)
        if not self.allowed_path(real):
            raise not_allowed(source)
        return real

    def _remote(self, uri: str, source: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem and path of a remote URI, if its scheme is allowed and it carries no options."""
        scheme, _, rest = uri.partition("://")
        parts = urlsplit(uri)
        if (
            not _SCHEME.fullmatch(scheme)
            or scheme not in self._schemes
            or parts.query
            or parts.fragment
            or "?" in uri
            or "#" in uri
            or "@" in parts.netloc
            or ":" in parts.netloc
            or "\x00" in uri
            or not parts.netloc
        ):
            raise not_allowed(source)
        # pyarrow's own filesystem when it has one (the URI holds only a bucket and a path), else fsspec's.
        with contextlib.suppress(ValueError, NotImplementedError, OSError, ImportError):
            fs, path = pafs.FileSystem.from_uri(f"{scheme}://{rest}")
            return fs, path
        try:
            fsspec = importlib.import_module("fsspec")
            handler = pafs.FSSpecHandler(fsspec.filesystem(scheme))
        except (ImportError, ValueError):
            raise FailedPrecondition(
                f"the server has no filesystem for {scheme}:// to read source {source!r}; the operator "
                "installs featurepush[s3] or featurepush[gcs]",
                reason="BATCH_SOURCE_UNREADABLE",
                metadata={"source": source},
            ) from None
        return pafs.PyFileSystem(handler), rest

    # --- listing -------------------------------------------------------------------------------

    def _bounds(self, source: str, stop: StopCheck, own: bool = False) -> Callable[[int, int], None]:
        """A check called per entry with the entries seen and the depth; raises past a bound.

        The server's own offline log gains a file per flush, so only time and the call bound its listing.
        """
        max_entries = sys.maxsize if own else self.limits.max_entries
        max_depth = sys.maxsize if own else self.limits.max_depth
        deadline = time.monotonic() + self.limits.timeout_s

        def check(seen: int, depth: int) -> None:
            if stop():
                raise Cancelled("the call ended while its batch location was being listed")
            if seen > max_entries:
                raise _too_big(source, f"holds more than {self.limits.max_entries:,} files and folders")
            if depth > max_depth:
                raise _too_big(source, f"is nested deeper than {self.limits.max_depth} folders")
            if time.monotonic() > deadline:
                raise _too_big(source, f"took longer than {self.limits.timeout_s:g} s to list")

        return check

    def _walk_local(self, real: str, source: str, stop: StopCheck, own: bool = False) -> list[str]:
        """Regular files at or under `real`, skipping the data directory and links leading outside."""
        try:
            mode = os.stat(real).st_mode
        except OSError:
            return []
        if stat.S_ISREG(mode):
            return [real]
        if not stat.S_ISDIR(mode):
            return []
        check = self._bounds(source, stop, own)
        files: list[str] = []
        seen = 0
        folders = [(real, 0)]
        while folders:
            folder, depth = folders.pop()
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        seen += 1
                        check(seen, depth)
                        if entry.name.startswith(_IGNORED_PREFIXES):
                            continue
                        if entry.is_symlink():
                            # Followed only to a file the roots allow; folders behind links are not walked.
                            target = os.path.realpath(entry.path)
                            if (own or self.allowed_path(target)) and os.path.isfile(target):
                                files.append(entry.path)
                        elif entry.is_dir(follow_symlinks=False):
                            if not own and _inside(entry.path, self._data_dir):
                                continue
                            check(seen, depth + 1)
                            folders.append((entry.path, depth + 1))
                        elif entry.is_file(follow_symlinks=False):
                            files.append(entry.path)
            except OSError:
                raise FailedPrecondition(
                    f"a folder of the batch location of source {source!r} cannot be listed",
                    reason="BATCH_SOURCE_UNREADABLE",
                    metadata={"source": source},
                ) from None
        return sorted(files)

    def _walk_remote(self, fs: pafs.FileSystem, path: str, source: str, stop: StopCheck) -> list[str]:
        """Files at or under `path` of a remote filesystem, one folder listed at a time."""
        check = self._bounds(source, stop)
        try:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                return [path]
            if info.type != pafs.FileType.Directory:
                return []
            files: list[str] = []
            seen = 0
            folders = [(path, 0)]
            while folders:
                folder, depth = folders.pop()
                for entry in fs.get_file_info(pafs.FileSelector(folder, recursive=False)):
                    seen += 1
                    check(seen, depth)
                    if entry.base_name.startswith(_IGNORED_PREFIXES):
                        continue
                    if entry.type == pafs.FileType.Directory:
                        check(seen, depth + 1)
                        folders.append((entry.path, depth + 1))
                    elif entry.type == pafs.FileType.File:
                        files.append(entry.path)
        except (OSError, ValueError):
            raise FailedPrecondition(
                f"the batch location of source {source!r} cannot be listed",
                reason="BATCH_SOURCE_UNREADABLE",
                metadata={"source": source},
            ) from None
        return sorted(files)


def _too_big(source: str, what: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"the batch location of source {source!r} {what}; name a smaller folder or a file",
        reason="BATCH_LOCATION_TOO_LARGE",
        metadata={"source": source},
    )
