#!/usr/bin/env bash
# One command: set up .venv with the test extras and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
export DVC_NO_ANALYTICS=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -n 2 "$@"
