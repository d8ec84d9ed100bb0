"""Fails when the stubs, descriptor set or .proto copies under client/featurepush differ from proto/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto" / "featurepush" / "v1"
GEN_DIR = ROOT / "client" / "featurepush" / "v1"
DESCRIPTOR_SET = "featurepush.binpb"
# The wheel's copy of the contract, for users who generate stubs in other languages from an install.
PROTO_COPY_DIR = ROOT / "client" / "featurepush" / "proto" / "featurepush" / "v1"


def differing(fresh: Path, committed: Path, names: list[str]) -> list[str]:
    """Those of `names` whose file under `committed` is missing or differs from the one under `fresh`."""
    return [
        name
        for name in names
        if not (committed / name).exists() or not filecmp.cmp(fresh / name, committed / name, shallow=False)
    ]


def main() -> int:
    """Regenerate into a temporary folder and compare file by file."""
    # Sorted, as `make generate` passes them: the descriptor set lists files in the order given.
    protos = sorted(str(p.relative_to(ROOT)) for p in PROTO_DIR.glob("*.proto"))
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
                "--include_imports",
                "--include_source_info",
                f"--descriptor_set_out={Path(out) / 'featurepush' / 'v1' / DESCRIPTOR_SET}",
                *protos,
            ],
            cwd=ROOT,
            check=True,
        )
        fresh = Path(out) / "featurepush" / "v1"
        stale = differing(fresh, GEN_DIR, sorted(p.name for p in fresh.iterdir()))
    proto_names = sorted(Path(p).name for p in protos)
    copies = sorted(p.name for p in PROTO_COPY_DIR.glob("*.proto")) if PROTO_COPY_DIR.is_dir() else []
    stale += [f"proto/{name}" for name in differing(PROTO_DIR, PROTO_COPY_DIR, proto_names)]
    stale += [f"proto/{name} (no longer in proto/)" for name in copies if name not in proto_names]
    if stale:
        print(f"generated files are stale: {', '.join(stale)}; run `make generate`", file=sys.stderr)
        return 1
    print(f"generated stubs, descriptor set and .proto copies match {len(protos)} protos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
