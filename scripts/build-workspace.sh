#!/usr/bin/env bash
# Builds every crate and target of the workspace in the `test` profile: the same build (same
# profile, same features) that `cargo test --workspace --all-targets` makes, so after the test
# suite it is a no-op. Scripts that need the CLI, the cdylib, uniffi-bindgen or an example
# call this instead of `cargo build -p X`: each package selection resolves its own features
# and rebuilt much of the dependency tree (measured cold on 2 cores: 226 s for `-p pocketlm`,
# 146 s and 141 s for the ffi builds, 283 s for the fuzz seed example, all after the tests).
# Outputs land in target/debug/ (the test profile's directory).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --locked --workspace --all-targets --profile test
