#!/usr/bin/env bash
# Size vs perplexity sweep of SmolLM2-135M-Instruct: converts a grid of recipes (uniform
# grids with RTN and GPTQ, and the planner at several budgets), measures every file with
# `pocketlm eval sweep`, and adds llama.cpp's quant types measured with its own
# llama-perplexity in the same run when LLAMA_BIN points at its build/bin. Writes
# sweep/{sweep.md,sweep.json,sweep.svg}. Heavy: about an hour on 2 cores (each GPTQ or
# planner conversion takes minutes); files already converted are reused.
#
#   LLAMA_BIN=/path/to/llama.cpp/build/bin  bash scripts/sweep.sh [CHUNKS]   (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
chunks="${1:-20}"
bash scripts/fetch-models.sh
bash scripts/fetch-calib.sh
cargo build --release --locked --quiet -p pocketlm
bin="${CARGO_TARGET_DIR:-target}/release/pocketlm"
src=models/SmolLM2-135M-Instruct.Q4_1.gguf
text=../shared/data/wikitext-2-raw/wiki.test.raw
[ -s "$text" ] || { echo "sweep: $text not found (see ../shared/README.md)" >&2; exit 1; }
out=sweep
mkdir -p "$out"

convert() { # NAME ARGS...
  local name=$1; shift
  [ -s "$out/$name.plm" ] || "$bin" convert "$src" -o "$out/$name.plm" "$@"
}
convert f16 --weights f16
convert q8-rtn --weights q8
convert q4-rtn --weights q4
convert q4-gptq --weights q4 --method gptq
convert q4g128-gptq --weights q4/g128 --method gptq
convert q3-gptq --weights q3/g64 --method gptq
convert q3g128-gptq --weights q3/g128 --method gptq
for budget in 75MB 85MB 95MB 105MB; do
  convert "plan-$budget" --method gptq --budget "$budget" --plan-json "$out/plan-$budget.json"
done

refs=()
if [ -n "${LLAMA_BIN:-}" ]; then
  for t in Q8_0 Q4_K_M Q4_0; do
    gguf="models/smollm2-$t.gguf"
    [ -s "$gguf" ] || "$LLAMA_BIN/llama-quantize" --allow-requantize "$src" "$gguf" "$t" >/dev/null 2>&1
    ppl=$("$LLAMA_BIN/llama-perplexity" -m "$gguf" -f "$text" -c 512 --chunks "$chunks" 2>&1 |
      sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p')
    refs+=(--reference "llama.cpp $t=$(stat -c %s "$gguf"):$ppl")
  done
fi
"$bin" eval sweep "$out"/*.plm --text "$text" --ctx 512 --chunks "$chunks" "${refs[@]}" \
  --svg "$out/sweep.svg" --json "$out/sweep.json" | tee "$out/sweep.md"
