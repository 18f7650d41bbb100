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
# llguidance) and the end-to-end model test. One package selection for every command, so
# the cross build is made once: another selection resolves other features and rebuilds.
libs=(-p pocketlm-format -p pocketlm-kernels -p pocketlm-runtime -p pocketlm-eval -p pocketlm-convert)
arm_test() { cargo +debian test --locked --no-default-features --target "$target" "${libs[@]}" --lib --test stories260k "$@"; }
for cpu in cortex-a72 cortex-a76 max; do
  echo "== aarch64 tests under qemu -cpu $cpu"
  QEMU_CPU=$cpu arm_test
  # Shows which dispatch paths this CPU model exercised.
  QEMU_CPU=$cpu arm_test -- every_supported_path_matches_scalar --nocapture 2>&1 | grep "testing kernel paths"
done
