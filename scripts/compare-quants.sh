#!/usr/bin/env bash
# The compression frontier of SmolLM2-135M-Instruct: pocketlm's presets against llama.cpp's
# quant types made with llama-quantize from the same base (an f32 GGUF of the published Q4_1
# weights) with an importance matrix from llama-imatrix on the same calibration text.
# Perplexity on WikiText-2 (ctx 512) and KL divergence from the base, each engine with its own
# evaluator (llama-perplexity also quantizes activations, so it reads slightly higher than
# pocketlm's on the same weights). Writes compare/{compare.md,sweep.svg,sweep.json}.
# Heavy (GPTQ conversions, eleven quantizations): about half an hour on 2 cores.
#
#   LLAMA_BIN=/path/to/llama.cpp/build/bin  bash scripts/compare-quants.sh [CHUNKS]  (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
chunks="${1:-20}"
kld_chunks=10
: "${LLAMA_BIN:?set LLAMA_BIN to a llama.cpp build/bin with llama-quantize, llama-imatrix, llama-perplexity}"
bash scripts/fetch-models.sh
bash scripts/fetch-calib.sh
cargo build --release --locked --quiet -p pocketlm
bin="${CARGO_TARGET_DIR:-target}/release/pocketlm"
src=models/SmolLM2-135M-Instruct.Q4_1.gguf
calib=data/calib/default.txt
text=../shared/data/wikitext-2-raw/wiki.test.raw
[ -s "$text" ] || { echo "compare-quants: $text not found (see ../shared/README.md)" >&2; exit 1; }
out=compare
mkdir -p "$out"
threads=$(nproc)

# The base, as llama.cpp sees it and as pocketlm sees it.
[ -s "$out/f32.gguf" ] || "$LLAMA_BIN/llama-quantize" --allow-requantize "$src" "$out/f32.gguf" F32 >/dev/null 2>&1
[ -s "$out/f16.plm" ] || "$bin" convert "$src" -o "$out/f16.plm" --weights f16
# Importance matrix from the calibration text pocketlm's calibrated presets use (64 × 256 tokens).
[ -s "$out/imatrix.dat" ] || "$LLAMA_BIN/llama-imatrix" -m "$out/f32.gguf" -f "$calib" -o "$out/imatrix.dat" \
  -c 256 --chunks 64 -t "$threads" >"$out/imatrix.log" 2>&1
# llama.cpp's base logits for its KL divergence.
[ -s "$out/base.kld" ] || "$LLAMA_BIN/llama-perplexity" -m "$out/f32.gguf" -f "$text" -c 512 \
  --chunks "$kld_chunks" -t "$threads" --kl-divergence-base "$out/base.kld" >/dev/null 2>&1

params=$("$bin" inspect "$out/f16.plm" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["parameters"])')
{
  echo "| engine | type | file MB | bits/weight (file) | ppl ($chunks chunks) | KLD ($kld_chunks chunks) |"
  echo "|---|---|---:|---:|---:|---:|"
} >"$out/compare.md"
refs=()
for t in Q8_0 Q6_K Q5_K_M Q4_K_M Q4_0 IQ4_NL IQ4_XS Q3_K_M Q3_K_S IQ3_XXS Q2_K; do
  gguf="$out/llama-$t.gguf"
  [ -s "$gguf" ] || "$LLAMA_BIN/llama-quantize" --imatrix "$out/imatrix.dat" "$out/f32.gguf" "$gguf" "$t" \
    >"$out/quantize-$t.log" 2>&1
  ppl=$("$LLAMA_BIN/llama-perplexity" -m "$gguf" -f "$text" -c 512 --chunks "$chunks" -t "$threads" 2>&1 |
    sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p')
  kld=$("$LLAMA_BIN/llama-perplexity" -m "$gguf" -f "$text" -c 512 --chunks "$kld_chunks" -t "$threads" \
    --kl-divergence-base "$out/base.kld" --kl-divergence 2>&1 | sed -n 's/^Mean *KLD: *\([0-9.]*\).*/\1/p')
  bytes=$(stat -c %s "$gguf")
  printf '| llama.cpp | %s | %.1f | %.2f | %s | %s |\n' "$t" "$(echo "$bytes/1000000" | bc -l)" \
    "$(echo "$bytes*8/$params" | bc -l)" "$ppl" "$kld" >>"$out/compare.md"
  refs+=(--reference "llama.cpp $t=$bytes:$ppl")
done
# q3 ends with distillation: about an hour on 2 cores (the others take minutes).
for p in q8 q4 q3; do
  plm="$out/preset-$p.plm"
  [ -s "$plm" ] || "$bin" convert "$src" -o "$plm" --preset "$p" --calib "$calib"
  ppl=$("$bin" eval ppl "$plm" --text "$text" --ctx 512 --chunks "$chunks" --json |
    python3 -c 'import json,sys; print("%.4f" % json.load(sys.stdin)["ppl"])')
  kld=$("$bin" eval kld "$plm" --base "$out/f16.plm" --text "$text" --ctx 512 --chunks "$kld_chunks" --json |
    python3 -c 'import json,sys; print("%.5f" % json.load(sys.stdin)["kld"])')
  bytes=$(stat -c %s "$plm")
  printf '| pocketlm | --preset %s | %.1f | %.2f | %s | %s |\n' "$p" "$(echo "$bytes/1000000" | bc -l)" \
    "$(echo "$bytes*8/$params" | bc -l)" "$ppl" "$kld" >>"$out/compare.md"
done
cat "$out/compare.md"
"$bin" eval sweep "$out"/preset-*.plm --text "$text" --ctx 512 --chunks "$chunks" "${refs[@]}" \
  --svg "$out/sweep.svg" --json "$out/sweep.json" >"$out/sweep.md"
cat "$out/sweep.md"
