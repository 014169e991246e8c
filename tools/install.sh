#!/usr/bin/env bash
# Install morphir and its test dependencies into the current Python environment.
# torch is pinned to 2.13.0 when absent: that version has a CPU build on this project's machines,
# while a looser requirement on a fresh environment pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[test]"
