#!/usr/bin/env bash
# One command: set up .venv and run the whole pipeline on the embedded default data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DVC_NO_ANALYTICS=1
.venv/bin/dvc repro "$@"
.venv/bin/dvc metrics show
