#!/usr/bin/env bash
# On the GPU host (no package index): unpack the offline site built by
# shared/tools/offline-gpu-site.sh (parts under .gpusite/p*/; scripts/gpusite-resplit.sh makes
# them smaller where a part and the tree exceed the device tool's 64 MiB), then run what follows
# with it on PYTHONPATH, e.g.  scripts/gpu-host.sh python -m pytest -q tests/gpu
set -euo pipefail
cd "$(dirname "$0")/.."
site=${PDSIDECAR_GPU_SITE:-/tmp/site}
if [ ! -d "$site/vllm" ]; then
  [ -n "$(ls .gpusite/p*/part.* 2>/dev/null)" ] || { echo "gpu-host: no .gpusite/p*/part.* here" >&2; exit 2; }
  mkdir -p "$(dirname "$site")"
  if command -v xz >/dev/null; then
    cat .gpusite/p*/part.* | xz -d | tar -x -C "$(dirname "$site")"
  else
    python3 - "$(dirname "$site")" <<'PY'
import glob, io, lzma, sys, tarfile
data = b"".join(open(p, "rb").read() for p in sorted(glob.glob(".gpusite/p*/part.*")))
tarfile.open(fileobj=io.BytesIO(lzma.decompress(data))).extractall(sys.argv[1])
PY
  fi
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
