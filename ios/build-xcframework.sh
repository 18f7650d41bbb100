#!/usr/bin/env bash
# Builds ios/pocketlmFFI.xcframework (static libpocketlm.a for iOS devices and for the
# simulator, arm64 + x86_64 lipo'd together, plus the C header and module map), which
# ios/Package.swift wraps together with the generated Swift bindings.
# Run on a Mac with Xcode and Rust:  bash ios/build-xcframework.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
build="$root/ios/build"
out="$root/ios/pocketlmFFI.xcframework"

rustup target add aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios
export IPHONEOS_DEPLOYMENT_TARGET=15.0
# The `mobile` profile (Cargo.toml): no debug info, size-optimized outside the kernels and the
# decoder, unwinding kept so the FFI's guards turn panics into errors.
for t in aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios; do
  cargo build --profile mobile --locked -p pocketlm-ffi --target "$t"
done

rm -rf "$build" "$out"
mkdir -p "$build/device" "$build/simulator"
cp "$target_dir/aarch64-apple-ios/mobile/libpocketlm.a" "$build/device/"
lipo -create \
  "$target_dir/aarch64-apple-ios-sim/mobile/libpocketlm.a" \
  "$target_dir/x86_64-apple-ios/mobile/libpocketlm.a" \
  -output "$build/simulator/libpocketlm.a"

# Swift bindings, header and module map: regenerate bindings/swift from the current source
# (Sources/PocketLM/pocketlm.swift links to bindings/swift/pocketlm.swift).
bash scripts/gen-bindings.sh
# Headers go in a subdirectory named after the module, so that this XCFramework's
# module.modulemap cannot collide with another one's in the app's include directory.
headers="$build/headers/pocketlmFFI"
mkdir -p "$headers"
cp bindings/swift/pocketlmFFI.h "$headers/"
cp bindings/swift/pocketlmFFI.modulemap "$headers/module.modulemap"

xcodebuild -create-xcframework \
  -library "$build/device/libpocketlm.a" -headers "$build/headers" \
  -library "$build/simulator/libpocketlm.a" -headers "$build/headers" \
  -output "$out"
echo "wrote $out"
