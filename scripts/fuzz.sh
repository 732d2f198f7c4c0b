#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer), each for FUZZ_SECONDS (default 60),
# from its committed seeds (fuzz/seeds/<target>) plus the corpus it grows (fuzz/corpus/<target>,
# not committed). Installs the pinned cargo-fuzz first when it is missing.
#   scripts/fuzz.sh [TARGET...]   default: every target (fuzz/README.md lists them)
# cargo-fuzz passes unstable compiler flags (the sanitizer, fuzzing cfgs): RUSTC_BOOTSTRAP=1
# lets the stable toolchain take them. Builds are release with debug assertions and overflow
# checks, under AddressSanitizer, into fuzz/target; `checkpoint` links libtorch, so it builds
# without a sanitizer into fuzz/target/checkpoint (its first build takes several minutes).
# A crash or a broken assertion stops with a non-zero exit: libFuzzer saves the input under
# fuzz/artifacts/<target>/ and prints the command that reproduces it.
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
ALL_TARGETS=(ring_wire config_toml corpus_tar corpus_folder auth_metadata checkpoint)
seconds="${FUZZ_SECONDS:-60}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION (once)"
  cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
export RUSTC_BOOTSTRAP=1

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  targets=("${ALL_TARGETS[@]}")
fi
mkdir -p fuzz/logs
for target in "${targets[@]}"; do
  case "$target" in
    checkpoint) build=(--features checkpoint --sanitizer none --target-dir fuzz/target/checkpoint) ;;
    ring_wire | config_toml | corpus_tar | corpus_folder | auth_metadata) build=() ;;
    *) echo "fuzz: no target $target (targets: ${ALL_TARGETS[*]})" >&2; exit 2 ;;
  esac
  mkdir -p "fuzz/corpus/$target"
  log="fuzz/logs/$target.log"
  echo "fuzz: $target for $seconds s (log: $log)"
  if ! cargo fuzz run "${build[@]}" "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
      -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz: $target FAILED; the input is under fuzz/artifacts/$target/ (full log: $log)" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  echo "fuzz: $target ok: ${runs:-?} inputs in $seconds s, no crash"
done
