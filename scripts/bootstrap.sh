#!/usr/bin/env bash
# Create .venv in the repository and install metalstm into it (editable, with the dev tools).
# torch is installed first, pinned to the CPU build that sits on this kind of machine's disk
# (pip finds it through its configured find-links); an unpinned torch would pull a multi-GB CUDA
# build. Elsewhere, install the torch build you want into .venv before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] || [ ! -x .venv/bin/pip ]; then
  # Missing, or left half-made by an interrupted first run (python but no pip): start afresh.
  "$PYTHON" -m venv --clear .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e ".[dev]"
