"""The built wheel installed into a fresh virtual environment: client alone, then with the server extra."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import tarfile
import threading
import venv
import zipfile
from pathlib import Path
from typing import IO

import grpc
import pytest
from conftest import Running
from grpc_health.v1 import health_pb2, health_pb2_grpc

import featurepush

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, without the test environment's own import paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must succeed."""
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def read_lines(stream: IO[str], into: queue.Queue[str]) -> None:
    """Put each line of `stream` into `into`, until it ends."""
    for line in stream:
        into.put(line)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built the way pip builds it for an install."""
    out = tmp_path_factory.mktemp("wheel")
    # The build backend comes from a package index: with none reachable there is nothing to build with.
    probe = run(
        sys.executable, "-m", "pip", "download", "--no-deps", "--dest", out, "setuptools>=77", cwd=out
    )
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach a package index: {probe.stderr.strip().splitlines()[-1:]}")
    ok(run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", out, ROOT, cwd=out))
    [built] = out.glob("featurepush-*.whl")
    return built


def test_the_wheel_carries_the_contract(wheel: Path) -> None:
    """The .proto files and the descriptor set reflection serves are in the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())
    protos = sorted(p.name for p in (ROOT / "proto" / "featurepush" / "v1").glob("*.proto"))
    assert {f"featurepush/proto/featurepush/v1/{name}" for name in protos} <= names
    assert "featurepush/v1/featurepush.binpb" in names
    assert wheel.name.startswith(f"featurepush-{featurepush.__version__}-")


def test_the_sdist_can_run_the_tests(tmp_path: Path) -> None:
    """The source distribution holds the tests with their fixtures, the protos and what `make test` runs."""
    code = f"import setuptools.build_meta as b; print(b.build_sdist({str(tmp_path)!r}))"
    name = ok(run(sys.executable, "-c", code, cwd=ROOT)).strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as sdist:
        members = {m.split("/", 1)[1] for m in sdist.getnames() if "/" in m}
    wanted = {
        "Makefile",
        "buf.yaml",
        "buf.gen.yaml",
        "tests/conftest.py",
        "tests/test_packaging.py",
        "tools/check_generated.py",
        "examples/ad_impressions.py",
        "proto/featurepush/v1/source.proto",
        "client/featurepush/v1/featurepush.binpb",
    }
    assert wanted <= members, wanted - members


# The client alone pushes and reads a server, columns included (more keys than SMALL_READ_KEYS).
CLIENT_ALONE = """
import datetime as dt, sys
from featurepush import Client
now = dt.datetime.now(dt.timezone.utc)
with Client(sys.argv[1]) as client:
    client.push("ad_impressions", [{"user_id": f"u{i}", "timestamp": now, "clicked": i} for i in range(20)])
    results = client.get_features("ad_impressions", [f"u{i}" for i in range(20)])
    print(sum(r.features["clicked"] for r in results), results.to_arrow().num_rows)
"""


def test_a_fresh_install_serves_with_the_server_extra_only(
    wheel: Path, tmp_path: Path, running: Running
) -> None:
    """The client alone reads columns and names what `serve` lacks; with [server] the server starts."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    ok(run(bin_dir / "python", "-m", "pip", "install", "--quiet", wheel, cwd=tmp_path))
    version = ok(run(bin_dir / "featurepush", "--version", cwd=tmp_path))
    assert version.strip() == f"featurepush {featurepush.__version__}"
    read = ok(run(bin_dir / "python", "-c", CLIENT_ALONE, running.target, cwd=tmp_path))
    assert read.split() == ["190", "20"]
    missing = run(bin_dir / "featurepush", "serve", "--data-dir", tmp_path / "served", cwd=tmp_path)
    assert missing.returncode == 1
    assert re.search(r"serve needs the Python module '[\w.]+', which is not installed", missing.stderr)

    ok(run(bin_dir / "python", "-m", "pip", "install", "--quiet", f"{wheel}[server]", cwd=tmp_path))
    server = subprocess.Popen(
        [bin_dir / "featurepush", "serve", "--listen", "localhost:0", "--data-dir", tmp_path / "served"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert server.stderr is not None
    reader = threading.Thread(target=read_lines, args=(server.stderr, lines), daemon=True)
    reader.start()
    try:
        seen = []
        port = None
        while port is None:
            seen.append(lines.get(timeout=60))
            found = re.search(r"listening on \S+ \(port (\d+)\)", seen[-1])
            port = int(found.group(1)) if found else None
            assert server.poll() is None, "".join(seen)
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        sources = run(bin_dir / "featurepush", "sources", "--target", f"localhost:{port}", cwd=tmp_path)
        assert sources.returncode == 0, sources.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
        reader.join(timeout=30)
        server.stderr.close()
    assert server.returncode == 0
