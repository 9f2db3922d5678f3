#!/usr/bin/env bash
# One command: set up .venv and run the whole pipeline on the embedded default data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# dvc.yaml calls `python -m stages.<name>`: that python must be the venv's.
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
dvc repro "$@"
dvc metrics show
