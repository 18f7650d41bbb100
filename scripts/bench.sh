#!/usr/bin/env bash
# Side-by-side speed benchmark of pocketlm and llama.cpp on SmolLM2-135M-Instruct, in one run
# so both see the same machine state. Prints a Markdown table (as in BENCHMARKS.md).
#
#   LLAMA_BENCH=/path/to/llama-bench  bash scripts/bench.sh [THREADS...]   (default: 1 2)
#
# llama-bench is optional (its rows are skipped without it); build it from the llama.cpp
# source tree as ../shared/README.md describes. GGUF comparison files are made with its
# llama-quantize (--allow-requantize) next to it when present.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=("$@"); [ ${#threads[@]} -gt 0 ] || threads=(1 2)
bash scripts/fetch-models.sh
cargo build --release --locked --quiet -p pocketlm
bin="${CARGO_TARGET_DIR:-target}/release/pocketlm"
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
for w in f16 q8 q4 q4a; do
  # Converted again when missing or unreadable (a file from an older format version).
  "$bin" inspect "models/smollm2-$w.plm" >/dev/null 2>&1 ||
    "$bin" convert "$gguf" -o "models/smollm2-$w.plm" --weights "$w" 2>/dev/null
done
llama_bench="${LLAMA_BENCH:-}"
quantize="$(dirname "${llama_bench:-/nonexistent}")/llama-quantize"
if [ -n "$llama_bench" ] && [ -x "$quantize" ]; then
  for t in Q8_0 Q4_0; do
    [ -s "models/smollm2-$t.gguf" ] || "$quantize" --allow-requantize "$gguf" "models/smollm2-$t.gguf" "$t" >/dev/null 2>&1
  done
fi

echo "| engine | weights | bits/weight | file MB | threads | pp128 tok/s | tg64 tok/s | TTFT ms | decode/bandwidth bound |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
for t in "${threads[@]}"; do
  for w in f16 q8 q4 q4a; do
    plm="models/smollm2-$w.plm"
    bpw=$("$bin" inspect "$plm" --json | python3 -c 'import json,sys; print("%.2f" % json.load(sys.stdin)["bits_per_weight"])')
    "$bin" bench "$plm" -t "$t" -r 3 --json | python3 -c '
import json, os, sys
r = json.load(sys.stdin)
w, t, bpw, size = sys.argv[1:5]
pp, tg, ttft = r["prefill_tokens_per_s"], r["decode_tokens_per_s"], r["ttft_ms"]
eff, bound = 100 * r["bandwidth_efficiency"], r["bandwidth_bound_tokens_per_s"]
print("| pocketlm | %s | %s | %.1f | %s | %.1f | %.1f | %.0f | %.0f%% of %.0f |" % (w, bpw, int(size) / 1e6, t, pp, tg, ttft, eff, bound))
' "$w" "$t" "$bpw" "$(stat -c %s "$plm")"
  done
  if [ -n "$llama_bench" ]; then
    for g in "$gguf" models/smollm2-Q8_0.gguf models/smollm2-Q4_0.gguf; do
      [ -s "$g" ] || continue
      "$llama_bench" -m "$g" -t "$t" -p 128 -n 64 -r 3 -o json 2>/dev/null | python3 -c '
import json, os, sys
rows = json.load(sys.stdin)
g, t = sys.argv[1:3]
pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
size = os.path.getsize(g)
kind = rows[0]["model_type"].split()[-1]
bpw = 8 * rows[0]["model_size"] / rows[0]["model_n_params"]
print("| llama.cpp | %s | %.2f | %.1f | %s | %.1f | %.1f | | |" % (kind, bpw, size / 1e6, t, pp, tg))
' "$g" "$t"
    done
  fi
done
