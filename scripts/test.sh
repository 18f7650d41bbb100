#!/usr/bin/env bash
# The test suite: fetches the real test model (skipped with a message when offline), then runs
# every unit, integration and doc test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-models.sh
cargo test --locked --workspace --all-targets
