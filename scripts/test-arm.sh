#!/usr/bin/env bash
# Cross-builds the library and model tests for aarch64-unknown-linux-gnu and runs them under
# QEMU with several CPU models, so every ARM kernel path executes: cortex-a72 (NEON only),
# cortex-a76 (NEON + dotprod) and max (dotprod, i8mm, SVE). Installs what it needs (Debian).
set -euo pipefail
cd "$(dirname "$0")/.."

need_install=0
command -v qemu-aarch64 >/dev/null || need_install=1
command -v aarch64-linux-gnu-gcc >/dev/null || need_install=1
[ -d /usr/lib/rustlib/aarch64-unknown-linux-gnu ] || need_install=1
if [ "$need_install" = 1 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo dpkg --add-architecture arm64
  $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends rustc-web cargo-web libstd-rust-web-dev:arm64 \
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null
fi
# Debian's rustc ships the arm64 std that rustup cannot download here.
rustup toolchain list | grep -q '^debian' || rustup toolchain link debian /usr

target=aarch64-unknown-linux-gnu
# Every library's unit tests (the converter's without candle, the runtime's without
# llguidance) and the end-to-end model test, built once: one package selection (another would
# resolve other features and rebuild), then the test executables run under qemu directly.
libs=(-p pocketlm-format -p pocketlm-kernels -p pocketlm-runtime -p pocketlm-eval -p pocketlm-convert)
executables=$(cargo +debian test --locked --no-default-features --target "$target" "${libs[@]}" \
  --lib --test stories260k --no-run --message-format=json \
  | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])')
run_tests() {  # cpu, executables...
  local cpu=$1 exe
  for exe in "${@:2}"; do
    # Fixture paths are built from CARGO_MANIFEST_DIR at compile time: any cwd works.
    QEMU_CPU=$cpu qemu-aarch64 "$exe" -q
  done
}
# `max` (dotprod, i8mm, SVE) runs everything. The other CPU models differ only in which
# kernel paths dispatch picks, so they run the kernels' tests and the end-to-end model.
echo "== aarch64 tests under qemu -cpu max (every library)"
# shellcheck disable=SC2086
run_tests max $executables
for cpu in cortex-a72 cortex-a76; do
  echo "== aarch64 kernels and the model under qemu -cpu $cpu"
  # shellcheck disable=SC2086
  run_tests "$cpu" $(printf '%s\n' $executables | grep -E '/(pocketlm_kernels|stories260k)-')
done
# Which dispatch paths each CPU model exercised.
kernels=$(printf '%s\n' $executables | grep '/pocketlm_kernels-')
for cpu in cortex-a72 cortex-a76 max; do
  QEMU_CPU=$cpu qemu-aarch64 "$kernels" every_supported_path_matches_scalar --nocapture 2>&1 \
    | grep "testing kernel paths" | sed "s/^/$cpu: /"
done
