#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for a bounded time.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, all targets)
#
# Works on a stable toolchain: libFuzzer's instrumentation flags are nightly-only, so the build
# sets RUSTC_BOOTSTRAP=1 and builds without a sanitizer (-s none; the targets run with
# overflow checks and debug assertions). Seeds come from the `fuzz_seeds` example
# (tiny models in every input format) plus the stories260K fixtures. Any crash fails the
# script; the reproducer is left in fuzz/artifacts/<target>/. Env: FUZZ_RSS_MB (2048),
# FUZZ_TIMEOUT (10 s per input), FUZZ_TARGET_DIR (target dir of the fuzz build, default
# fuzz/target), MAIN_TARGET_DIR (where the seed generator builds, default target/, shared with
# the test suite's test profile).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_EACH=${1:-60}
shift || true
ALL_TARGETS=(plm_reader gguf_reader hf_import tokenizer chat_template session_file)
TARGETS=("${@:-${ALL_TARGETS[@]}}")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=("${ALL_TARGETS[@]}")
RSS_MB=${FUZZ_RSS_MB:-2048}
TIMEOUT=${FUZZ_TIMEOUT:-10}
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$ROOT/fuzz/target}
export PATH="$HOME/.cargo/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

echo "== seeds"
CORPUS=$ROOT/fuzz/corpus
SEEDS=$ROOT/fuzz/seeds
mkdir -p "$CORPUS" "$SEEDS"
# The seed generator comes from the test suite's build (see build-workspace.sh).
CARGO_TARGET_DIR="${MAIN_TARGET_DIR:-$ROOT/target}" bash scripts/build-workspace.sh
"${MAIN_TARGET_DIR:-$ROOT/target}/debug/examples/fuzz_seeds" "$SEEDS"
FIX=$ROOT/tests/fixtures/stories260k
{ cat "$FIX/hf/config.json"; printf '\0'; } > "$SEEDS/hf_import/stories260k-config"
# Regression inputs found earlier are seeds too, so fixed crashes stay fixed.
for t in "${ALL_TARGETS[@]}"; do
    mkdir -p "$CORPUS/$t" "$SEEDS/$t"
    if [ -d "$ROOT/tests/fixtures/regressions/$t" ]; then
        cp "$ROOT/tests/fixtures/regressions/$t"/* "$SEEDS/$t/" 2>/dev/null || true
    fi
done

echo "== build"
start=$(date +%s)
RUSTC_BOOTSTRAP=1 cargo fuzz build -s none --debug-assertions
echo "build: $(( $(date +%s) - start )) s"

status=0
for t in "${TARGETS[@]}"; do
    echo "== fuzz $t for ${SECONDS_EACH}s"
    mkdir -p "$ROOT/fuzz/artifacts/$t"
    log=$ROOT/fuzz/artifacts/$t.log
    if RUSTC_BOOTSTRAP=1 cargo fuzz run -s none --debug-assertions "$t" \
        "$CORPUS/$t" "$SEEDS/$t" -- \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb="$RSS_MB" -malloc_limit_mb="$RSS_MB" \
        -timeout="$TIMEOUT" -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
        grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$log" | tail -n 2 || true
    else
        status=1
        echo "!! $t FAILED; last lines of $log:"
        tail -n 30 "$log"
    fi
done
exit $status
