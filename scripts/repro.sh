#!/usr/bin/env bash
# One command: set up .venv and run the whole pipeline on the embedded default data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# dvc.yaml calls `python -m stages.<name>`: that python must be the venv's.
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
dvc repro "$@"
# `dvc metrics show` puts every stage's figures in one row (~1,000 columns): print the
# result that matters most, the collapse order beside its baselines, and point to the rest.
python -c 'import json; from pipeline.orders.report import format_table
r = json.load(open("data/reports/orders.json"))["baselines"].get("val")
print(format_table(r, "val") if r else "no object masks: no baseline table")'
echo "every stage's figures: dvc metrics show data/metrics/<stage>.json, or open data/report.html"
