#!/usr/bin/env bash
# App-runtime benchmark on SmolLM2-135M-Instruct q4: what prefix reuse and saved sessions save.
#
#   bash scripts/bench-chat.sh [THREADS]      (default 1)
#
# 1. A 10-turn chat (user messages of ~120 tokens from the calibration text, replies of up to
#    48 tokens; ~1.5k tokens at turn 10) through `pocketlm chat --stats-json`, with prefix
#    reuse (the default) and with --no-prefix-reuse: time to first token per turn.
# 2. The conversation is saved, then (a) restored and answered once with reuse, (b) answered
#    once with --no-prefix-reuse (re-prefilling the whole conversation): restore time vs
#    re-prefill time.
# Prints Markdown tables (as in BENCHMARKS.md). Greedy decoding, so both runs see the same text.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-1}
bash scripts/fetch-models.sh >/dev/null
bash scripts/fetch-calib.sh >/dev/null
cargo build --release --locked --quiet -p pocketlm
bin="${CARGO_TARGET_DIR:-target}/release/pocketlm"
plm=models/smollm2-q4.plm
"$bin" inspect "$plm" >/dev/null 2>&1 ||
  "$bin" convert models/SmolLM2-135M-Instruct.Q4_1.gguf -o "$plm" --weights q4 2>/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Ten user messages: consecutive 500-character slices of the calibration text, newlines out.
python3 - "$work/turns.txt" <<'EOF'
import sys
text = open("data/calib/default.txt", encoding="utf-8").read().replace("\n", " ")
with open(sys.argv[1], "w") as f:
    for i in range(10):
        chunk = text[20000 + i * 500 : 20000 + (i + 1) * 500]
        f.write("Summarize this in one sentence: " + chunk + "\n")
EOF

chat() { "$bin" -t "$threads" chat "$plm" --temp 0 -n 48 -c 4096 --stats-json --system "You are a helpful assistant." "$@"; }
chat --save-session "$work/chat.session" < "$work/turns.txt" >/dev/null 2> "$work/reuse.jsonl"
chat --no-prefix-reuse < "$work/turns.txt" >/dev/null 2> "$work/fresh.jsonl"
echo "Follow-up question." > "$work/one.txt"
chat --load-session "$work/chat.session" < "$work/one.txt" >/dev/null 2> "$work/restored.jsonl"
chat --load-session "$work/chat.session" --no-prefix-reuse < "$work/one.txt" >/dev/null 2> "$work/reprefill.jsonl"

python3 - "$work" "$threads" <<'EOF'
import json, os, sys
work, threads = sys.argv[1], sys.argv[2]
def load(name):
    return [json.loads(l) for l in open(os.path.join(work, name)) if l.strip()]
reuse, fresh = load("reuse.jsonl"), load("fresh.jsonl")
print(f"threads {threads}\n")
print("| turn | prompt tokens | reused | TTFT with reuse ms | TTFT without ms | speed-up |")
print("|---:|---:|---:|---:|---:|---:|")
for a, b in zip(reuse, fresh):
    print(f"| {a['turn']} | {a['prompt_tokens']} | {a['reused_tokens']} | {a['ttft_ms']:.1f} | {b['ttft_ms']:.1f} | {b['ttft_ms'] / a['ttft_ms']:.1f}x |")
restored, reprefill = load("restored.jsonl"), load("reprefill.jsonl")
event, turn = restored[0], restored[1]
prefill = reprefill[1]
size = os.path.getsize(os.path.join(work, "chat.session"))
print()
print("| saved session | tokens | file MB | restore ms | next turn TTFT after restore ms | re-prefill TTFT ms | restore + TTFT vs re-prefill |")
print("|---|---:|---:|---:|---:|---:|---:|")
total = event["restore_ms"] + turn["ttft_ms"]
print(f"| 10-turn chat | {event['tokens']} | {size / 1e6:.1f} | {event['restore_ms']:.1f} | {turn['ttft_ms']:.1f} | {prefill['ttft_ms']:.1f} | {prefill['ttft_ms'] / total:.1f}x |")
EOF
