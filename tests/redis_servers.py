"""Real `redis-server` processes on free loopback ports in temp folders: one node, or a 3-node cluster."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    """A loopback port nothing listens on now, nor on the cluster bus port 10000 above it.

    Picked below 55536, since a cluster node's bus port is its port plus 10000.
    """
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 55000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port


def have_redis() -> bool:
    """Whether redis-server and redis-cli are installed (`make test` installs them)."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


class RedisServer:
    """One redis-server with an append-only file in `folder`; `kill()` and `start()` take it down and up."""

    def __init__(self, folder: Path, *flags: str, port: int = 0, password: str = ""):
        self.folder = folder
        self.port = port or free_port()
        self.flags = flags
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.start()

    @property
    def url(self) -> str:
        user_info = f":{self.password}@" if self.password else ""
        return f"redis://{user_info}127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server (again, on the same port and data) and wait until it answers."""
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        cmd += ["--save", "", "--appendonly", "yes", "--logfile", "redis.log", *self.flags]
        if self.password:
            cmd += ["--requirepass", self.password, "--masterauth", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, password=self.password or None, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server and wait for it to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Stop the server for good."""
        self.kill()


class RedisCluster:
    """Three redis-server primaries with cluster mode on, the slots spread over them, and `replicas` replica
    nodes for each (listed after the primaries in `nodes`)."""

    def __init__(self, folder: Path, password: str = "", replicas: int = 0):
        self.password = password
        self.nodes = [
            RedisServer(
                folder / f"node{i}",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                password=password,
            )
            for i in range(3 * (1 + replicas))
        ]
        try:
            addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
            auth = ["-a", password, "--no-auth-warning"] if password else []
            subprocess.run(
                [
                    "redis-cli",
                    *auth,
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    str(replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self._wait_ok()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        user_info = f":{self.password}@" if self.password else ""
        return "redis-cluster://" + user_info + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + 30
        for node in self.nodes:
            client = redis.Redis(port=node.port, password=self.password or None)
            try:
                while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the Redis Cluster did not become ready")
                    time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()
