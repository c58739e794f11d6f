#!/usr/bin/env bash
# GPU host: run the GPU stages with the offline site (scripts/gpu-host.sh), results under
# $OUT (the device tool brings them back). Stages: env unit engines[=PYTEST_K] models probe launch hops
# mps bench=CONFIGS
#   scripts/gpu-suite.sh env unit engines=llama
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pd-gpu-out}; mkdir -p "$OUT"
scripts/gpu-host.sh true || exit 2
export PYTHONPATH="${PDSIDECAR_GPU_SITE:-/tmp/site}:$PWD" PDSIDECAR_CACHE=${PDSIDECAR_CACHE:-/tmp/pdcache}
export PYTHONFAULTHANDLER=1
# the offline site carries no FlashInfer (vLLM imports it for its top-k/top-p sampler)
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
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
    diag)  # IPC ordering variants, one line each
      timeout 120 python3 tests/gpu/diag_order.py > "$OUT/diag.txt" 2>&1; echo "diag rc=$?"
      grep -v Warning "$OUT/diag.txt" | tail -12 ;;
    engines*)
      k=${stage#engines}; k=${k#=}
      timeout "${ENGINES_TIMEOUT:-420}" python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_pd_engines.py \
        ${k:+-k "$k"} --basetemp="$OUT/pt" > "$OUT/engines.txt" 2>&1
      echo "engines rc=$?"; tail -30 "$OUT/engines.txt"
      for f in $(find "$OUT/pt" -name '*.log' 2>/dev/null); do
        grep -E "PdConnector|Error|error|Traceback|regions" "$f" | head -20 > "$f.grep"; done ;;
    launch)  # a launch-bound synthetic step: alone, with our engine in the process, with a neighbour
      timeout 240 python3 -m bench.launch_probe --json "$OUT/launch.json" > "$OUT/launch.txt" 2>&1
      echo "launch rc=$?"; grep -E "p50|Error|Traceback" "$OUT/launch.txt" | head -12 ;;
    probe)  # decode-step gaps: plain engine vs PdConnector engines, direct and after a KV read
      timeout "${PROBE_TIMEOUT:-420}" python3 -m bench.itl_probe --model "$PDSIDECAR_CACHE/models/llama3-8b-kv" \
        --gpu-util 0.2 --max-model-len 8192 -n "${PROBE_N:-3}" --prompt-len 128 --out-tokens 48 \
        ${PROBE_ARGS:-} --log-dir "$OUT/probe-logs" --json "$OUT/probe.json" > "$OUT/probe.txt" 2>&1
      echo "probe rc=$?"; grep -E "p50|Error|Traceback" "$OUT/probe.txt" | head -20 ;;
    hops)  # where a long prompt's first token loses time: direct vs through the sidecars
      # (HOPS_MODEL: a preset made by the models stage; HOPS_TOKENS: lengths, comma-separated)
      timeout "${HOPS_TIMEOUT:-300}" python3 -m bench.ttft_hops --model "$PDSIDECAR_CACHE/models/${HOPS_MODEL:-llama3-8b-kv}" \
        --gpu-util "${HOPS_GPU_UTIL:-0.2}" --tokens "${HOPS_TOKENS:-8064}" --n "${HOPS_N:-15}" --log-dir "$OUT/hops-logs" \
        --json "$OUT/hops.json" > "$OUT/hops.txt" 2>&1
      echo "hops rc=$?"; grep -v Warning "$OUT/hops.txt" | tail -60
      for f in "$OUT"/hops-logs/*.log; do grep -E "Error|Traceback" "$f" | head -5 > "$f.grep"; done ;;
    models)  # Llama-3-8B's KV shape with little compute, drawn on the GPU (MODEL_PRESETS: other
      # presets too, e.g. "llama3-8b-kv llama3-8b-shape", the latter with the real model's compute)
      for preset in ${MODEL_PRESETS:-llama3-8b-kv}; do
        python3 -m pdsidecar models make --preset "$preset" --device cuda \
          --out "$PDSIDECAR_CACHE/models/$preset" >> "$OUT/models.txt" 2>&1; echo "models $preset rc=$?"
      done ;;
    mps)  # a CUDA MPS control daemon for the later stages (BENCH_SM_SHARE), quit when this script ends;
      # the GPU's compute mode and other settings are left as they are
      export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/pd-mps} CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/pd-mps-log}
      mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
      if nvidia-cuda-mps-control -d; then
        trap 'echo quit | timeout 20 nvidia-cuda-mps-control; sleep 1; cp -r "$CUDA_MPS_LOG_DIRECTORY" "$OUT/mps-log"' EXIT
        echo "mps daemon started ($CUDA_MPS_PIPE_DIRECTORY)"
      else echo "mps daemon did not start"; fi ;;
    bench=*)  # bench=agg,pd-ours,...: a Poisson workload (short requests decoding while
      # long prompts arrive: decode ITL under prefill interference), then a sequential
      # sweep 128..8k tokens (TTFT, KV move). The presets' max_position_embeddings is 8192.
      # The JSON is rewritten after each configuration (a stage timeout keeps what finished);
      # each configuration's load + sweep is cut at BENCH_CONFIG_TIMEOUT s (engine start-up
      # excluded; on the H100 start-up took 88-122 s per configuration, the workload 5.5-6.3 s).
      # BENCH_SIDECAR_ARG: one extra decode-sidecar argument (e.g.
      # --first-token-from-prefill=all), BENCH_TAG: suffix of the output names,
      # BENCH_N=0: the sweep only (BENCH_SWEEP tokens, BENCH_SWEEP_N each), BENCH_SM_SHARE=P,D:
      # the engines as MPS clients, a pair's prefill/decode limited to P/D % of the SMs (stage mps first),
      # BENCH_MODEL: a preset made by the models stage (llama3-8b-kv), BENCH_GPU_UTIL: each engine's share (0.2)
      c=${stage#bench=}; tag=${c//,/_}${BENCH_TAG:+-$BENCH_TAG}
      timeout "${BENCH_TIMEOUT:-500}" python3 -m bench.cli e2e --gpu-util "${BENCH_GPU_UTIL:-0.2}" --configs "$c" \
        ${BENCH_SIDECAR_ARG:+"--sidecar-arg=$BENCH_SIDECAR_ARG"} ${BENCH_SM_SHARE:+--gpu-sm-share "$BENCH_SM_SHARE"} \
        --model "$PDSIDECAR_CACHE/models/${BENCH_MODEL:-llama3-8b-kv}" --max-model-len 8192 \
        --rate "${BENCH_RATE:-4}" --num-requests "${BENCH_N:-24}" --warmup 2 \
        --prompt-len uniform:128-512 --output-len fixed:64 \
        --long-prompt-len uniform:4096-7936 --long-output-len fixed:4 --long-fraction 0.25 \
        --sweep-tokens "${BENCH_SWEEP:-128,1024,2048,8064}" --sweep-n "${BENCH_SWEEP_N:-3}" --json "$OUT/e2e-$tag.json" --no-progress \
        --config-timeout "${BENCH_CONFIG_TIMEOUT:-120}" \
        --log-dir "$OUT/bench-logs-$tag" > "$OUT/bench-$tag.txt" 2>&1
      echo "bench $c rc=$?"; tail -45 "$OUT/bench-$tag.txt"
      for f in "$OUT"/bench-logs-"$tag"/*.log; do grep -E "Error|Traceback" "$f" | head -5 > "$f.grep"; done
      du -sh "$OUT"/bench-logs-"$tag" ;;
    *) echo "unknown stage $stage" >&2 ;;
  esac
done
