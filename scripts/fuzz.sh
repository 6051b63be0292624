#!/usr/bin/env bash
# Fuzz truesize's hostile-input parsers with cargo-fuzz (libFuzzer + AddressSanitizer).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS (default 600) is each target's -max_total_time; TARGETs default to all of
# toml_config, hf_config, safetensors_header, gguf_header. Targets run one after another; PARALLEL=1 runs them
# all at once (one process each). NICE (default 10) lowers their priority on a shared machine.
# Each run prints its executions, exec/s, corpus size and findings; crash/timeout/oom inputs land
# in fuzz/artifacts/<target>/ (copy one to fuzz/regressions/<target>/ once fixed:
# tests/hostile_input.rs replays that folder). Logs: fuzz/logs/<target>.log.
#
# Needs `cargo install cargo-fuzz`. cargo-fuzz passes nightly-only flags (-Zsanitizer); on a
# stable toolchain RUSTC_BOOTSTRAP=1 (set below unless already set) allows them.
set -euo pipefail

cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-600}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(toml_config hf_config safetensors_header gguf_header)
export RUSTC_BOOTSTRAP=${RUSTC_BOOTSTRAP:-1}
NICE=${NICE:-10}

command -v cargo-fuzz >/dev/null || { echo "error: cargo-fuzz not found: cargo install cargo-fuzz" >&2; exit 2; }

echo "building ${TARGETS[*]}" >&2
for t in "${TARGETS[@]}"; do
  nice -n "$NICE" cargo fuzz build "$t" >&2
done
# Run the built binaries directly: `cargo fuzz run` would rebuild whenever src/ changed.
BIN="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release"

run_one() {
  local t=$1
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t" fuzz/logs
  # Corpus first (new inputs are written there), then the committed seeds (read only).
  # -timeout: no input may take 10 s (a hang); -rss_limit_mb: no input may make truesize
  # allocate gigabytes (libFuzzer reports it as an OOM, and -malloc_limit_mb follows it).
  nice -n "$NICE" "$BIN/$t" "fuzz/corpus/$t" "fuzz/seeds/$t" \
    -artifact_prefix="fuzz/artifacts/$t/" -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 >"fuzz/logs/$t.log" 2>&1 || true
}

report() {
  local t=$1 log="fuzz/logs/$1.log"
  local execs rate corpus findings
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  findings=$(find "fuzz/artifacts/$t" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
  printf '%-20s %6ss  executions %-12s exec/s %-8s corpus %-6s findings %s\n' \
    "$t" "$SECONDS_PER_TARGET" "${execs:-?}" "${rate:-?}" "$corpus" "$findings"
  if grep -q -E 'ERROR: (libFuzzer|AddressSanitizer)|panicked at|==ERROR' "$log"; then
    grep -m3 -E 'panicked at|ERROR:|Test unit written to' "$log" | sed 's/^/    /'
  fi
}

if [ "${PARALLEL:-0}" = 1 ]; then
  for t in "${TARGETS[@]}"; do run_one "$t" & done
  wait
else
  for t in "${TARGETS[@]}"; do run_one "$t"; done
fi
for t in "${TARGETS[@]}"; do report "$t"; done
