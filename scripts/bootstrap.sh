#!/usr/bin/env bash
# Create .venv in the repository and install metalstm into it (editable, with the dev tools).
# torch is installed first, pinned to the CPU build that sits on this kind of machine's disk
# (pip finds it through its configured find-links); an unpinned torch would pull a multi-GB CUDA
# build. Elsewhere, install the torch build you want into .venv before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e ".[dev]"
