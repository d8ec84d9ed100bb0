"""Cores and memory within the control group's limits (cgroup v2 and v1), from fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from featurepush_server import machine
from featurepush_server.admission import PUSH, Overloaded, default_limits
from featurepush_server.config import ServerConfig


def tree(root: Path, files: dict[str, str], membership: str) -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup under root/fs and a /proc/self/cgroup at root/cgroup."""
    (root / "fs").mkdir(parents=True)
    for name, text in files.items():
        (root / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "fs" / name).write_text(text)
    (root / "cgroup").write_text(membership)
    return root / "fs", root / "cgroup"


def test_memory_is_the_groups_limit_where_it_is_lower(tmp_path: Path) -> None:
    physical = machine.memory_bytes(tmp_path / "none", tmp_path / "none")
    # v2, a limit on the parent and none ("max") on the group itself: the parent's binds.
    fs, own = tree(
        tmp_path / "v2",
        {"pods/a/memory.max": "max\n", "pods/memory.max": f"{2 << 30}\n", "memory.max": "max\n"},
        "0::/pods/a\n",
    )
    assert machine.cgroup_memory_limits(fs, own) == [2 << 30]
    assert machine.memory_bytes(fs, own) == min(physical, 2 << 30)
    # Inside a cgroup namespace the group is the mount's root.
    fs, own = tree(tmp_path / "ns", {"memory.max": "1073741824\n"}, "0::/\n")
    assert machine.memory_bytes(fs, own) == min(physical, 1 << 30)
    # v1 beside v2's empty unified hierarchy; v1's "no limit" is a number near 2**63.
    fs, own = tree(
        tmp_path / "v1",
        {
            "memory/job/7/memory.limit_in_bytes": "536870912\n",
            "memory/job/memory.limit_in_bytes": "9223372036854771712\n",
            "memory/memory.limit_in_bytes": "9223372036854771712\n",
            "unified/cgroup.procs": "",
        },
        "4:memory:/job/7\n1:cpu:/\n0::/\n",
    )
    assert machine.memory_bytes(fs, own) == min(physical, 512 << 20)
    # No limit, no membership to read, or a limit past the machine's: the machine's memory.
    fs, own = tree(tmp_path / "open", {"memory.max": "max\n"}, "0::/\n")
    assert machine.memory_bytes(fs, own) == physical
    assert machine.memory_bytes(fs, tmp_path / "missing") == physical
    fs, own = tree(tmp_path / "big", {"memory.max": f"{physical * 4}\n"}, "0::/\n")
    assert machine.memory_bytes(fs, own) == physical


def test_cores_are_the_groups_quota_rounded_up_where_it_is_lower(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert machine.cpu_count(tmp_path / "none", tmp_path / "none") == cores
    # v2: 1.5 cores' worth of time keeps two threads busy part of the time.
    fs, own = tree(
        tmp_path / "v2", {"pod/cpu.max": "150000 100000\n", "cpu.max": "max 100000\n"}, "0::/pod\n"
    )
    assert machine.cgroup_cpu_limits(fs, own) == [1.5]
    assert machine.cpu_count(fs, own) == min(cores, 2)
    # v1 under the combined cpu,cpuacct mount: a quota on the parent, none (-1) on the group.
    fs, own = tree(
        tmp_path / "v1",
        {
            "cpu,cpuacct/job/7/cpu.cfs_quota_us": "-1\n",
            "cpu,cpuacct/job/7/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/job/cpu.cfs_quota_us": "50000\n",
            "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n",
        },
        "3:cpu,cpuacct:/job/7\n0::/\n",
    )
    assert machine.cgroup_cpu_limits(fs, own) == [0.5]
    assert machine.cpu_count(fs, own) == 1
    # No quota, or one above what the process may run on: its cores.
    fs, own = tree(tmp_path / "open", {"cpu.max": "max 100000\n"}, "0::/\n")
    assert machine.cpu_count(fs, own) == cores
    fs, own = tree(tmp_path / "wide", {"cpu.max": f"{(cores + 8) * 100000} 100000\n"}, "0::/\n")
    assert machine.cpu_count(fs, own) == cores


def test_the_defaults_follow_what_the_process_may_use(tmp_path: Path) -> None:
    fs, own = tree(tmp_path, {"memory.max": f"{2 << 30}\n"}, "0::/\n")
    physical = machine.memory_bytes(tmp_path / "none", tmp_path / "none")
    limits = default_limits(4, machine.memory_bytes(fs, own), 64 << 20)
    assert limits[PUSH].bytes == max(64 << 20, min(2 << 30, physical) // 16)
    # serve --processes defaults to the cores this process may use.
    assert ServerConfig().processes == machine.cpu_count()


def test_the_fronts_of_one_machine_share_its_push_bytes(tmp_path: Path) -> None:
    from conftest import start

    running = start(tmp_path / "fronts", fronts=2, processes=2)
    alone = start(tmp_path / "alone", processes=2)
    try:
        cpus, memory, message = machine.cpu_count(), machine.memory_bytes(), ServerConfig().max_message_bytes
        # A sixteenth of memory for one process; each of two fronts admits half of that.
        for front in running.fronts:
            assert front.server.admission is not None
            bound = front.server.admission.gates[PUSH].limit.bytes
            assert bound == default_limits(cpus, memory // 2, message)[PUSH].bytes
        assert alone.server.admission is not None
        assert (
            alone.server.admission.gates[PUSH].limit.bytes
            == default_limits(cpus, memory, message)[PUSH].bytes
        )
    finally:
        running.close()
        alone.close()


def test_a_set_push_bytes_bound_is_shared_by_the_fronts(tmp_path: Path) -> None:
    from conftest import start

    message = ServerConfig().max_message_bytes
    running = start(tmp_path / "fronts", fronts=2, processes=2, max_push_bytes=6 * message)
    alone = start(tmp_path / "alone", processes=2, max_push_bytes=6 * message)
    # A share below one largest message: a front still admits one such push when it holds no other.
    small = start(tmp_path / "small", fronts=2, processes=2, max_push_bytes=message)
    try:
        for front in running.fronts:
            assert front.server.admission is not None
            assert front.server.admission.gates[PUSH].limit.bytes == 3 * message
        for front in small.fronts:
            assert front.server.admission is not None
            gate = front.server.admission.gates[PUSH]
            assert gate.limit.bytes == message // 2
            gate.enter(message)
            with pytest.raises(Overloaded):
                gate.enter(1)
            gate.leave(message)
        assert alone.server.admission is not None
        assert alone.server.admission.gates[PUSH].limit.bytes == 6 * message
    finally:
        running.close()
        alone.close()
        small.close()
