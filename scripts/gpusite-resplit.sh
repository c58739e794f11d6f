#!/usr/bin/env bash
# Re-split the offline GPU site's parts (.gpusite/p*/part.*, from
# shared/tools/offline-gpu-site.sh) into smaller ones, in place: the device tool carries at
# most 64 MiB per call (working tree included), so a 60 MB part stops fitting once the tree
# grows past ~4 MB. Same stream, same order: scripts/gpu-host.sh unpacks either.
#   scripts/gpusite-resplit.sh [BYTES]   (default 44000000: four parts of the ~175 MB site)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-44000000}
parts=$(ls .gpusite/p*/part.* 2>/dev/null | sort -t/ -k2,2V) || true
[ -n "$parts" ] || { echo "gpusite-resplit: no .gpusite/p*/part.* here" >&2; exit 2; }
tmp=$(mktemp -d .gpusite.new.XXXX)
trap 'rm -rf "$tmp"' EXIT
cat $parts | split -b "$size" -d -a 1 - "$tmp/part."
n=$(ls "$tmp"/part.* | wc -l)
[ "$n" -le 10 ] || { echo "gpusite-resplit: $n parts; choose a larger size (at most 10 parts)" >&2; exit 2; }
cmp <(cat $parts) <(cat "$tmp"/part.*) >/dev/null
rm -rf .gpusite/p*
for f in "$tmp"/part.*; do i=${f##*.}; mkdir -p ".gpusite/p$i"; mv "$f" ".gpusite/p$i/part.$i"; done
ls -l .gpusite/p*/part.*
