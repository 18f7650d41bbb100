#!/usr/bin/env bash
# Speed on a model larger than the CPU's last-level cache (not run in CI): writes a
# random-weight 1.1B Llama (scripts/make-random-gguf.py, 604 MB as Q4_0), converts it at the same
# 4.5 bits per weight, then measures beside llama.cpp in the same run:
#   - `pocketlm serve` vs `llama-server` at 1, 4 and 8 streams (scripts/bench-server.py),
#   - prefill and decode at each thread count (`pocketlm bench --threads-sweep` vs llama-bench).
#
#   bash scripts/bench-large-model.sh LLAMA_BIN_DIR [THREADS_LIST] [POCKETLM_BIN]
#
# LLAMA_BIN_DIR holds llama-server and llama-bench (see ../shared/README.md for the build);
# THREADS_LIST defaults to 1,2,4,8,16; POCKETLM_BIN to target/release/pocketlm. Files go to
# target/large-model/ (reused when present). The tokenizer comes from SmolLM2's GGUF
# (scripts/fetch-models.sh) or $TOKENIZER_GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
llama=${1:?usage: $0 LLAMA_BIN_DIR [THREADS_LIST] [POCKETLM_BIN]}
threads=${2:-1,2,4,8,16}
bin=${3:-target/release/pocketlm}
tokenizer=${TOKENIZER_GGUF:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
work=target/large-model
mkdir -p "$work"
grep -E "Model name|L3" <(lscpu) || true
[ -f "$work/big.gguf" ] || python3 scripts/make-random-gguf.py --tokenizer-from "$tokenizer" --out "$work/big.gguf"
[ -f "$work/big.plm" ] || "$bin" convert "$work/big.gguf" -o "$work/big.plm" --weights q4 --embedding q4
export PYTHONUNBUFFERED=1
python3 scripts/bench-server.py --model "$work/big.plm" --bin "$bin" --gguf "$work/big.gguf" \
  --llama-server "$llama/llama-server" --streams 1,4,8 --threads 2 --max-tokens 48 --rounds 2 \
  --no-threads-mode --json "$work/server.json"
"$bin" bench "$work/big.plm" -p 64 -n 24 -r 2 --threads-sweep "$threads"
"$llama/llama-bench" -m "$work/big.gguf" -t "$threads" -p 64 -n 24 -r 2
