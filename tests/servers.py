"""`featurepush serve` in a child process, for tests of signals, crashes and full disks."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from featurepush.v1 import (
    backfill_service_pb2_grpc,
    ingest_service_pb2_grpc,
    online_service_pb2_grpc,
    registry_service_pb2_grpc,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ad_impressions.py"


class ServedProcess:
    """A server process on a port it picks itself; its log is kept in `log` for checks."""

    def __init__(self, data_dir: Path, *flags: str, definitions: Path = EXAMPLE, fsync: str = "always"):
        cmd = [
            sys.executable,
            "-m",
            "featurepush_server.cli",
            "serve",
            "--listen",
            "localhost:0",
            "--data-dir",
            str(data_dir),
            "--definitions",
            str(definitions),
            "--fsync",
            fsync,
            # Batch files the tests write sit beside the data folder.
            "--batch-root",
            str(data_dir.parent),
            *flags,
        ]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        port = threading.Event()
        self.port = 0

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                found = re.search(r"\(port (\d+)\)", line)
                if found:
                    self.port = int(found.group(1))
                    port.set()
            port.set()

        # Draining the log keeps a chatty server from blocking on a full pipe.
        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        port.wait(60)
        assert self.port, "the server did not report its port:\n" + self.log
        self.channel = grpc.insecure_channel(f"localhost:{self.port}")
        self.registry = registry_service_pb2_grpc.RegistryServiceStub(self.channel)
        self.ingest = ingest_service_pb2_grpc.IngestServiceStub(self.channel)
        self.online = online_service_pb2_grpc.OnlineServiceStub(self.channel)
        self.backfill = backfill_service_pb2_grpc.BackfillServiceStub(self.channel)

    @property
    def log(self) -> str:
        """Everything the server wrote to stderr so far."""
        return "".join(self.lines)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal, if the process still runs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout_s: float = 60) -> int:
        """Wait for the process to exit and its log to be read; return its exit code."""
        code = self.proc.wait(timeout_s)
        self._reader.join(10)
        self.channel.close()
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code

    def finish(self) -> None:
        """Make sure the process is gone."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(30)


def wait_until(check: object, timeout_s: float = 30.0, every_s: float = 0.05) -> bool:
    """Call `check` until it returns true or the time is up; return its last answer."""
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(every_s)
