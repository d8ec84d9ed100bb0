#!/usr/bin/env bash
# Process scaling on a bigger machine from a plain checkout: `bash bench/scaling.sh` after `make install`,
# or with wheels carried in .whl/ (installed to /tmp/site) where no package index can be reached.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  PY=${PY_BASE:-python3}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/client:$PWD/server:$PWD
fi
"$PY" -c 'import os, sys, pyarrow, grpc; print(f"python {sys.version.split()[0]}, pyarrow {pyarrow.__version__}, grpcio {grpc.__version__}, {os.cpu_count()} cores")'
for n in ${SCALING_PROCESSES:-$(nproc)}; do
  echo "== serve --processes $n, $n client processes"
  BENCH_ONLY=processes BENCH_PROCESSES=$n BENCH_CLIENTS=$n "$PY" -m bench
done
