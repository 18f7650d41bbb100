#!/usr/bin/env bash
# Checks the library apps link (pocketlm-ffi, `mobile` profile) on the aarch64 cross build,
# and with --x86 on x86-64 too: what it links (none of the converter's, evaluator's or CLI's
# crates), its stripped size, and 16 KB LOAD-segment alignment on aarch64 (Android 15+ 16 KB
# pages). Needs the aarch64 toolchain that scripts/test-arm.sh installs (run that first).
# CI checks aarch64 only: each target is a whole fat-LTO build, and aarch64 is what ships.
#
#   bash scripts/check-mobile-lib.sh [--x86]
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"
# Guards against the converter, the CLI or Hugging Face `tokenizers` creeping back in (they
# added ~3 and ~1.3 MiB); the measured sizes are in BENCHMARKS.md ("Library size"): 4.9 MiB
# on x86-64 and 4.2 MiB on aarch64 with constrained output (llguidance, ~1.8 MiB).
budget_bytes=$((5632 * 1024))
status=0

forbidden='^(clap|indicatif|plotters|candle-core|faer|env_logger|criterion|safetensors|tokenizers|pocketlm-convert|pocketlm-eval|pocketlm-server|tokio|axum|hyper) '
if cargo tree --locked -p pocketlm-ffi -e normal --prefix none | sort -u | grep -E "$forbidden"; then
  echo "error: pocketlm-ffi links the crates above" >&2
  status=1
fi

report() {  # library, label
  local stripped size
  stripped="$(mktemp)"
  strip -o "$stripped" "$1" 2>/dev/null || aarch64-linux-gnu-strip -o "$stripped" "$1"
  size=$(stat -c %s "$stripped")
  awk -v s="$size" -v l="$2" 'BEGIN { printf "%s: %d bytes stripped (%.2f MiB)\n", l, s, s / 1048576 }'
  if [ "$size" -gt "$budget_bytes" ]; then
    echo "error: $2 is over the $budget_bytes-byte budget" >&2
    status=1
  fi
  rm -f "$stripped"
}

if [ "${1:-}" = --x86 ]; then
  cargo build --quiet --locked --profile mobile -p pocketlm-ffi
  report "$target_dir/mobile/libpocketlm.so" "x86_64 libpocketlm.so"
fi

arm=aarch64-unknown-linux-gnu
cargo +debian build --quiet --locked --profile mobile -p pocketlm-ffi --target "$arm"
lib="$target_dir/$arm/mobile/libpocketlm.so"
report "$lib" "aarch64 libpocketlm.so"
# Every LOAD segment's alignment (last column of `readelf -lW`) must be at least 16 KB.
aligns=$(readelf -lW "$lib" | awk '$1 == "LOAD" {print $NF}')
echo "aarch64 LOAD alignments: $(echo $aligns)"
for a in $aligns; do
  if [ $((a)) -lt 16384 ]; then
    echo "error: a LOAD segment of $lib is aligned to $a, not 16 KB" >&2
    status=1
  fi
done
[ "$status" = 0 ] && echo "mobile library: ok"
exit "$status"
