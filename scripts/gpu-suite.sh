#!/usr/bin/env bash
# GPU host: run the GPU stages with the offline site (scripts/gpu-host.sh), results under
# $OUT (the device tool brings them back). Stages: env unit engines[=PYTEST_K] bench
#   scripts/gpu-suite.sh env unit engines=llama
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pd-gpu-out}; mkdir -p "$OUT"
scripts/gpu-host.sh true || exit 2
export PYTHONPATH="${PDSIDECAR_GPU_SITE:-/tmp/site}:$PWD" PDSIDECAR_CACHE=${PDSIDECAR_CACHE:-/tmp/pdcache}
export PYTHONFAULTHANDLER=1
py() { python3 "$@"; }
for stage in "$@"; do
  case "$stage" in
    env)
      { nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
        py -c "import torch, vllm, nixl, grpc; print('torch', torch.__version__, 'vllm', vllm.__version__, 'grpc', grpc.__version__)"
      } > "$OUT/env.txt" 2>&1; tail -5 "$OUT/env.txt" ;;
    unit)
      timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_transfer_gpu.py \
        tests/test_transfer_ipc_handles.py tests/test_vllm_compat.py > "$OUT/unit.txt" 2>&1
      echo "unit rc=$?"; tail -15 "$OUT/unit.txt" ;;
    engines*)
      k=${stage#engines}; k=${k#=}
      timeout "${ENGINES_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider -x tests/gpu/test_pd_engines.py \
        ${k:+-k "$k"} --basetemp="$OUT/pt" > "$OUT/engines.txt" 2>&1
      echo "engines rc=$?"; tail -30 "$OUT/engines.txt"
      for f in $(find "$OUT/pt" -name '*.log' 2>/dev/null); do
        grep -E "PdConnector|Error|error|Traceback|regions" "$f" | head -20 > "$f.grep"; done ;;
    *) echo "unknown stage $stage" >&2 ;;
  esac
done
