#!/usr/bin/env bash
# GPU host: run scripts/gpu-suite.sh stages longer than one device call (10 min) in their
# own process session, which outlives the call while the machine stays held; later calls
# wait for it and bring its files back.
#   scripts/gpu-background.sh start STAGE...   # e.g. bench=agg,pd-ours,... (env as for gpu-suite.sh)
#   scripts/gpu-background.sh wait SECONDS     # until done or SECONDS; files into $OUT when done
#   scripts/gpu-background.sh collect          # files into $OUT now (done or not)
set -u
cd "$(dirname "$0")/.."
BG=${PD_BG_DIR:-/tmp/pd-bg}
collect() {
  [ -n "${OUT:-}" ] || { echo "OUT is not set" >&2; return 2; }
  cp "$BG"/suite.txt "$OUT"/ 2>/dev/null
  for f in "$BG"/*.json; do [ -f "$f" ] && cp "$f" "$OUT"/; done
  tar -C "$BG" -cJf "$OUT"/bg.tar.xz . 2>/dev/null
  ls -la "$OUT"
}
case "${1:-}" in
  start)
    shift; mkdir -p "$BG"
    OUT="$BG" setsid nohup scripts/gpu-suite.sh "$@" > "$BG"/suite.txt 2>&1 < /dev/null &
    echo $! > "$BG"/pid; echo "started pid $(cat "$BG"/pid): $*" ;;
  wait)
    end=$(( $(date +%s) + ${2:-500} ))
    while kill -0 "$(cat "$BG"/pid)" 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    if kill -0 "$(cat "$BG"/pid)" 2>/dev/null; then
      echo "still running"; grep -hE "startup|config|Error" "$BG"/bench-*.txt 2>/dev/null | tail -5
    else
      echo "done"; tail -60 "$BG"/suite.txt; collect
    fi ;;
  collect) collect ;;
  *) echo "usage: $0 start STAGE... | wait SECONDS | collect" >&2; exit 2 ;;
esac
