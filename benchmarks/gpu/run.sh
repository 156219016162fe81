#!/usr/bin/env bash
# The GPU validation + benchmark run in one command (see run.py for the steps and the files):
#   benchmarks/gpu/run.sh OUT [--dry-run] [--budget SECONDS]
# OUT may also come from the environment ($OUT). PYTHON picks the interpreter (default python3).
# Exits 0 once the report is written, whatever the steps did: read OUT/summary.md.
set -u
cd "$(dirname "$0")/../.." || exit 2
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -u benchmarks/gpu/run.py "$@"
