"""Fails when the committed stubs under client/featurepush/v1 differ from what the protos generate."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GEN_DIR = ROOT / "client" / "featurepush" / "v1"


def main() -> int:
    """Regenerate into a temporary folder and compare file by file."""
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto" / "featurepush" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                "-I",
                "proto",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                *protos,
            ],
            cwd=ROOT,
            check=True,
        )
        fresh = Path(out) / "featurepush" / "v1"
        stale = [
            p.name
            for p in sorted(fresh.iterdir())
            if not (GEN_DIR / p.name).exists() or not filecmp.cmp(p, GEN_DIR / p.name, shallow=False)
        ]
    if stale:
        print(f"generated stubs are stale: {', '.join(stale)}; run `make generate`", file=sys.stderr)
        return 1
    print(f"generated stubs match {len(protos)} protos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
