#!/usr/bin/env bash
# Builds libpocketlm.so for arm64-v8a and x86_64 into pocketlm/src/main/jniLibs with cargo-ndk.
# Needs: the Android NDK (ANDROID_NDK_HOME, or ANDROID_HOME/ndk/<version>), cargo-ndk
# (cargo install cargo-ndk), and the Rust targets
# (rustup target add aarch64-linux-android x86_64-linux-android).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo ndk -t arm64-v8a -t x86_64 --platform 24 -o android/pocketlm/src/main/jniLibs \
  build --profile mobile --locked -p pocketlm-ffi
ls -l android/pocketlm/src/main/jniLibs/*/libpocketlm.so
