"""Starting the servers a benchmark measures: featurepush itself and the empty-handler ceiling."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import grpc


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def wait_ready(target: str) -> None:
    """Block until a server answers at `target`."""
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)


def start_serve(
    data_dir: Path, fsync: str, batch_root: Path | None = None, processes: int = 1
) -> tuple[subprocess.Popen[bytes], str]:
    """A `featurepush serve` process on a free port, with no sources applied; batch files under batch_root."""
    port = free_port()
    # The interpreter running the bench, so a checkout on PYTHONPATH serves as well as an installed one.
    command = [sys.executable, "-m", "featurepush_server.cli", "serve", "--listen", f"localhost:{port}"]
    command += ["--data-dir", str(data_dir), "--fsync", fsync]
    command += ["--processes", str(processes)]
    if batch_root is not None:
        command += ["--batch-root", str(batch_root)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"localhost:{port}"
    wait_ready(target)
    return process, target


def start_empty(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    """The empty-handler server (bench/empty_server.py) on a free port."""
    port = free_port()
    command = [sys.executable, "-m", "bench.empty_server", "--port", str(port), *args]
    process = subprocess.Popen(command, cwd=Path(__file__).parent.parent)
    target = f"localhost:{port}"
    wait_ready(target)
    return process, target
