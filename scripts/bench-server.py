#!/usr/bin/env python3
"""Server throughput benchmark (not run in CI): aggregate generated tokens/s and p50 time to
first token at several numbers of concurrent streams, for `pocketlm serve` (continuous
batching, and with --no-batching a thread per slot) and, when given, llama.cpp's
`llama-server` on the same machine in the same run.

    python3 scripts/bench-server.py --model models/smollm2-q4.plm \\
        [--gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --llama-server PATH/llama-server] \\
        [--streams 1,4,8] [--threads 2] [--max-tokens 128] [--rounds 3] [--json OUT]

Each configuration gets a fresh server with as many slots as streams (`--parallel N`,
llama-server `-np N`), one warm-up request, then N clients that each send `--rounds`
streaming `/v1/completions` requests back to back (distinct prompts, `ignore_eos`, greedy,
`max_tokens` tokens each). Throughput is all streamed tokens over the wall time of the
measured rounds; TTFT is from sending a request to its first token. Standard library only.
"""

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="models/smollm2-q4.plm")
parser.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "pocketlm"))
parser.add_argument("--gguf", help="the peer's model file for llama-server")
parser.add_argument("--llama-server", help="path to llama.cpp's llama-server")
parser.add_argument("--streams", default="1,4,8")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--max-tokens", type=int, default=128)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--ctx", type=int, default=512, help="context per slot")
parser.add_argument("--no-threads-mode", action="store_true", help="skip pocketlm --no-batching")
parser.add_argument("--json", help="also write the results here")
args = parser.parse_args()

PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to",
    "The history of the city begins in the year",
    "Here is a short recipe for tomato soup. First,",
    "In the morning the old fisherman walked down to the harbour and",
    "The three most important ideas in physics are",
    "Dear friend, I am writing to tell you about",
    "The robot looked at the garden and decided to",
    "A good night's sleep matters because",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


def stream_completion(port, prompt, max_tokens):
    """Returns (tokens streamed, seconds to first token)."""
    body = json.dumps({
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "ignore_eos": True,
    })
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    tokens, first = 0, None
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for choice in chunk.get("choices", []):
            if choice.get("text"):
                tokens += 1
                if first is None:
                    first = time.perf_counter() - sent
    conn.close()
    return tokens, first if first is not None else float("nan")


def measure(name, command, streams):
    port = free_port()
    command = [c.replace("{port}", str(port)) for c in command]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, proc)
        stream_completion(port, "Warm up", 8)
        results, errors = [], []

        def client(i):
            try:
                for r in range(args.rounds):
                    prompt = PROMPTS[(i + r * streams) % len(PROMPTS)] + f" ({i}.{r})"
                    results.append(stream_completion(port, prompt, args.max_tokens))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if errors:
        raise RuntimeError(f"{name}: {errors[0]}")
    tokens = sum(t for t, _ in results)
    ttfts = [f for _, f in results if f == f]
    return {
        "server": name, "streams": streams, "threads": args.threads, "tokens": tokens,
        "seconds": round(wall, 3), "tokens_per_second": round(tokens / wall, 1),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1e3, 1) if ttfts else None,
    }


rows = []
for streams in [int(s) for s in args.streams.split(",")]:
    ctx = str(args.ctx)
    pocket = [args.bin, "-t", str(args.threads), "serve", args.model, "--port", "{port}",
              "--parallel", str(streams), "--ctx", ctx]
    configs = [("pocketlm (batched)", pocket)]
    if not args.no_threads_mode:
        configs.append(("pocketlm (thread per slot)", pocket + ["--no-batching"]))
    if args.llama_server and args.gguf:
        configs.append(("llama-server", [args.llama_server, "-m", args.gguf, "--port", "{port}",
                                         "-t", str(args.threads), "-tb", str(args.threads),
                                         "-np", str(streams), "-c", str(args.ctx * streams),
                                         "--no-warmup"]))
    for name, command in configs:
        row = measure(name, command, streams)
        rows.append(row)
        print(f"{row['server']:28} streams {streams:2}: {row['tokens_per_second']:8.1f} tok/s aggregate, "
              f"p50 TTFT {row['ttft_p50_ms']} ms ({row['tokens']} tokens in {row['seconds']} s)", flush=True)

if args.json:
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)
