#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for SECONDS each (default 600), one after another, one job
# each; prints libFuzzer's closing line per target and leaves crashing inputs in
# fuzz/artifacts/<target>/. Stable Rust works through RUSTC_BOOTSTRAP=1 (cargo-fuzz passes nightly
# -Z flags). Usage: scripts/fuzz.sh [SECONDS] [TARGET...]; logs go to fuzz/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(checkpoint ir_text artifact)
mkdir -p logs
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  start=$(date +%s)
  set +e
  cargo fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"logs/$t.log" 2>&1
  rc=$?
  set -e
  end=$(date +%s)
  echo "$t: exit $rc after $((end - start)) s: $(grep -E '^Done [0-9]+ runs' "logs/$t.log" || echo 'no Done line (crash? see the log)')"
  grep -E 'stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY|Test unit written' "logs/$t.log" || true
done
