"""What this process may use of its machine: cores and memory, within its control group's limits.

A container usually gets a share of a large host: `os.cpu_count()` and the physical memory describe the
host, and defaults derived from them (one front per core, a sixteenth of memory for pushes in flight)
would start dozens of processes in a two-core container or admit enough work to get it killed. Nothing
here imports grpc.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUPS = Path("/sys/fs/cgroup")
MEMBERSHIP = Path("/proc/self/cgroup")


def _group_dirs(cgroups: Path, membership: Path, controller: str) -> Iterator[tuple[int, Path]]:
    """The cgroup version and folder of this process's group and of each ancestor, for one controller.

    cgroup v2's unified hierarchy is mounted at the root (or, on hybrid systems, under unified/); a v1
    controller under its own name (cpu,cpuacct also as cpu). Inside a cgroup namespace the group is the
    mount's root, which the walk reaches last; a parent's limit binds its children too.
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            version, mounts = 2, [cgroups, cgroups / "unified"]
        elif controller in controllers.split(","):
            version, mounts = 1, [cgroups / controllers, cgroups / controller]
        else:
            continue
        parts = [p for p in path.split("/") if p and p not in (".", "..")]
        seen: set[Path] = set()
        for mount in mounts:
            for depth in range(len(parts), -1, -1):
                folder = mount.joinpath(*parts[:depth])
                if folder not in seen and folder.is_dir():
                    seen.add(folder)
                    yield version, folder


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_memory_limits(cgroups: Path = CGROUPS, membership: Path = MEMBERSHIP) -> list[int]:
    """The memory limits (bytes) set on this process's control group and its ancestors."""
    limits: list[int] = []
    for version, folder in _group_dirs(cgroups, membership, "memory"):
        text = _read(folder / ("memory.max" if version == 2 else "memory.limit_in_bytes"))
        # v2 says "max" for none; v1 a number near 2**63.
        if text is not None and text.isdigit():
            limits.append(int(text))
    return limits


def cgroup_cpu_limits(cgroups: Path = CGROUPS, membership: Path = MEMBERSHIP) -> list[float]:
    """The CPU quotas (cores' worth of time) set on this process's control group and its ancestors."""
    limits: list[float] = []
    for version, folder in _group_dirs(cgroups, membership, "cpu"):
        if version == 2:
            quota, _, period = (_read(folder / "cpu.max") or "").partition(" ")
        else:
            quota, period = (
                _read(folder / "cpu.cfs_quota_us") or "",
                _read(folder / "cpu.cfs_period_us") or "",
            )
        # v2 says "max" for none, v1 -1.
        if quota.isdigit() and period.isdigit() and int(period) > 0:
            limits.append(int(quota) / int(period))
    return limits


def memory_bytes(cgroups: Path = CGROUPS, membership: Path = MEMBERSHIP) -> int:
    """The memory this process may use: the machine's, or its group's limit where lower; 4 GiB if unknown."""
    try:
        physical = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        physical = 4 << 30
    return min([physical, *cgroup_memory_limits(cgroups, membership)])


def cpu_count(cgroups: Path = CGROUPS, membership: Path = MEMBERSHIP) -> int:
    """The cores this process may use: those it may run on, fewer where its group's CPU quota says so."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    # A quota of 1.5 cores keeps two threads busy part of the time: rounded up.
    quotas = [max(1, math.ceil(q)) for q in cgroup_cpu_limits(cgroups, membership)]
    return max(1, min([cores, *quotas]))
