#!/usr/bin/env bash
# Creates .venv and installs the project. torch goes in first and pinned: any other torch
# request would pull several GB of CUDA wheels (see README, "Install").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION" >&2
  $PIP install "torch==$TORCH_VERSION" 2> >(grep -v "is ignored: it is neither" >&2)
fi
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null > .venv/torch-constraint.txt
echo "[setup] installing the project (editable) with extras: ${EXTRAS:-}" >&2
$PIP install -c .venv/torch-constraint.txt -e ".${EXTRAS:+[$EXTRAS]}" 2> >(grep -v "is ignored: it is neither" >&2)
# DVC needs a git repository with a commit for `dvc exp run`; a tarball checkout gets one.
# (`.git` is a file in a git worktree: ask git, not the file system, or a worktree's
# uncommitted changes would be committed as a "snapshot".)
if ! git rev-parse --git-dir >/dev/null 2>&1; then
  git init -q && git add -A && git -c user.name=cop -c user.email=cop@localhost commit -qm "initial snapshot"
fi
