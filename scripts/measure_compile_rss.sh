#!/usr/bin/env bash
# Peak resident memory of `llmc compile` against the checkpoint's size.
#
# Usage: scripts/measure_compile_rss.sh [MODEL_DIR] [OUT.llmc] [extra llmc compile args...]
#   MODEL_DIR defaults to /tmp/llmc-1b (make it with scripts/gen_1b_checkpoint.py), OUT to
#   /tmp/llmc-1b.llmc. The binary is $LLMC, else target/release/llmc, else target/debug/llmc.
# Peak RSS is the kernel's high-water mark (VmHWM, which /usr/bin/time -v reports as "Maximum
# resident set size"): mapped checkpoint pages count while they are resident, the page cache of
# the artifact being written does not. The issue's goal is a peak of at most 1.2x the checkpoint.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model=${1:-/tmp/llmc-1b}
out=${2:-/tmp/llmc-1b.llmc}
shift $(( $# > 2 ? 2 : $# ))
llmc=${LLMC:-}
if [ -z "$llmc" ]; then
  if [ -x "$root/target/release/llmc" ]; then llmc="$root/target/release/llmc"; else llmc="$root/target/debug/llmc"; fi
fi
[ -x "$llmc" ] || { echo "no llmc binary at $llmc: run cargo build" >&2; exit 1; }
[ -d "$model" ] || { echo "no model at $model: run scripts/gen_1b_checkpoint.py $model" >&2; exit 1; }
ckpt=$(find "$model" -maxdepth 1 -name '*.safetensors' -printf '%s\n' | awk '{s+=$1} END {printf "%.0f", s}')
log=$(mktemp)
trap 'rm -f "$log"' EXIT
/usr/bin/time -v "$llmc" compile "$model" -o "$out" "$@" 2>"$log" >/dev/null || { cat "$log" >&2; exit 1; }
rss_kib=$(awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$log")
wall=$(awk -F'): ' '/Elapsed \(wall clock\)/ {print $2}' "$log")
art=$(stat -c %s "$out")
grep -E '^compiled' "$log" || true
awk -v r="$rss_kib" -v c="$ckpt" -v a="$art" -v w="$wall" -v b="$llmc" 'BEGIN {
  printf "binary:          %s\n", b
  printf "checkpoint:      %.3f GiB (%.0f bytes)\n", c / 2^30, c
  printf "artifact:        %.3f GiB (%.0f bytes)\n", a / 2^30, a
  printf "peak RSS:        %.3f GiB (%.0f KiB) = %.2fx the checkpoint\n", r * 1024 / 2^30, r, r * 1024 / c
  printf "wall time:       %s\n", w
}'
