#!/usr/bin/env bash
# Fuzzing with cargo-fuzz (libFuzzer): each target in fuzz/fuzz_targets, from its seed corpus in
# fuzz/corpus/<target>. See docs/fuzzing.md.
#
#   hack/fuzz.sh --smoke            every target for SMOKE_SECONDS (default 10); fails on any crash.
#                                   What CI runs; the committed corpus is only read.
#   hack/fuzz.sh --full [SECONDS]   every target for SECONDS (default 3600), one after another;
#                                   the grown corpus and a log per target go to fuzz/target/full/.
#   hack/fuzz.sh --build            build the targets only.
#
# FUZZ_TARGETS="diff approval" picks targets (e.g. to run two --full at once on two cores).
# Needs the nightly toolchain (libFuzzer's instrumentation); installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

read -r -a targets <<<"${FUZZ_TARGETS:-review_bytes review_structured approval diff cel_string}"
mode=${1:---smoke}

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo +nightly install --locked cargo-fuzz

# One optimised build with debug assertions (integer overflow panics) shared by every target.
# No sanitizer: the crate forbids unsafe code, so AddressSanitizer would cost build time and
# executions for little; panics, overflows, stack overflows, timeouts and memory past the RSS
# limit are all still caught. 16 codegen units (cargo-fuzz's default is 1) parallelise the
# large dependencies' codegen, for a cheaper CI build at some cost in executions per second.
build=(--release --debug-assertions --sanitizer none --codegen-units 16)
cargo +nightly fuzz build "${build[@]}"

# Runs target $1 for $2 seconds, new corpus entries into $3, log to $4.
run() {
  local target=$1 seconds=$2 out=$3 log=$4
  mkdir -p "$out" "fuzz/corpus/$target"
  echo "==> $target: ${seconds}s" >&2
  # -timeout: one input taking this long is a finding (the API server gives up after 10 s).
  # -rss_limit_mb: far above what any review within the 7 MiB body limit should take.
  # timeout(1): without a sanitizer runtime, libFuzzer's timeout handler can deadlock in malloc
  # while writing the reproducer; a hung run must fail, not hang CI.
  if ! timeout --kill-after=10 $((seconds + 120)) \
    cargo +nightly fuzz run "${build[@]}" "$target" "$out" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "FAILED: $target (reproducer in fuzz/artifacts/$target/, full log $log)" >&2
    return 1
  fi
  local runs speed
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
  echo "    $target: $runs executions, $speed exec/s, no crash" >&2
}

case "$mode" in
  --build) ;;
  --smoke)
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    for target in "${targets[@]}"; do
      run "$target" "${SMOKE_SECONDS:-10}" "$scratch/$target" "$scratch/$target.log"
    done
    ;;
  --full)
    seconds=${2:-3600}
    for target in "${targets[@]}"; do
      run "$target" "$seconds" "fuzz/target/full/corpus/$target" "fuzz/target/full/$target.log"
    done
    ;;
  *)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac
