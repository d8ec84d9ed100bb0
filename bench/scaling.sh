#!/usr/bin/env bash
# Process scaling on a bigger machine from a plain checkout: `bash bench/scaling.sh` after `make install`,
# or with wheels carried in .whl/ (installed to /tmp/site) where no package index can be reached.
# SCALING_PROCESSES (default: the cores) and SCALING_CLIENTS (default: as many as processes) take lists;
# SCALING_FULL_BENCH=N then runs the whole bench with N client processes, into bench/results.json.
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
  for c in ${SCALING_CLIENTS:-$n}; do
    echo "== serve --processes $n, $c client processes"
    BENCH_ONLY=processes BENCH_PROCESSES=$n BENCH_CLIENTS=$c "$PY" -m bench
  done
done
if [ -n "${SCALING_FULL_BENCH:-}" ]; then
  echo "== make bench, $SCALING_FULL_BENCH client processes"
  BENCH_CLIENTS=$SCALING_FULL_BENCH "$PY" -m bench
fi
