#!/usr/bin/env python3
"""Load test for `pocketlm serve` (not run in CI).

Starts the server (release build) on a free loopback port, then runs N concurrent streaming
clients for a duration. Each client loops: mostly full streaming chat requests; some
disconnect after a few chunks; some send bad requests (malformed JSON, an oversized body, a
wrong field). Reports status counts, 5xx other than 503 (target 0), p50/p99 time to first
token of completed streams, aggregate generated tokens/s, and the server's RSS (max, after
warm-up and at the end: it should not grow).

    python3 scripts/load-test-server.py [--model models/smollm2-q4.plm] [--clients 4]
        [--duration 60] [--parallel 4] [--threads 2] [--max-tokens 64] [--seed 1]

Uses only the standard library (raw HTTP over http.client, one thread per client).
"""

import argparse
import http.client
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="models/smollm2-q4.plm")
parser.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "pocketlm"))
parser.add_argument("--clients", type=int, default=4)
parser.add_argument("--duration", type=float, default=60)
parser.add_argument("--parallel", type=int, default=4)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--ctx", type=int, default=1024)
parser.add_argument("--max-tokens", type=int, default=64)
parser.add_argument("--disconnect-rate", type=float, default=0.1)
parser.add_argument("--bad-rate", type=float, default=0.1)
parser.add_argument("--seed", type=int, default=1)
args = parser.parse_args()

TOPICS = ["a red fox", "the moon", "a small robot", "rain in the city", "an old map",
          "a lighthouse", "bread", "a chess game", "winter", "a lost key"]

server = subprocess.Popen(
    [args.bin, "-t", str(args.threads), "serve", args.model, "--port", "0",
     "--parallel", str(args.parallel), "--ctx", str(args.ctx), "--queue", str(4 * args.clients)],
    stderr=subprocess.PIPE, text=True,
)
line = server.stderr.readline()
match = re.search(r"listening on http://([0-9.]+):(\d+)", line)
if not match:
    print("server did not start:", line, server.stderr.read(), file=sys.stderr)
    sys.exit(1)
host, port = match.group(1), int(match.group(2))
threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
print(f"server pid {server.pid} on {host}:{port}: {line.strip()}")

lock = threading.Lock()
statuses = {}
ttfts = []
tokens_generated = [0]
errors = []
rss_samples = []


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for row in f:
            if row.startswith("VmRSS:"):
                return int(row.split()[1])
    return 0


def count(status):
    with lock:
        statuses[status] = statuses.get(status, 0) + 1


def request(rng):
    kind = rng.random()
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        if kind < args.bad_rate:
            bad = rng.choice([
                b'{"messages": [',
                b" " * (2 << 20),
                json.dumps({"messages": "not a list"}).encode(),
                json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**7}).encode(),
            ])
            try:
                conn.request("POST", "/v1/chat/completions", body=bad, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                count(response.status)
            except (ConnectionError, http.client.HTTPException):
                # The server may answer 413 and close before the whole body is sent.
                count("bad-request-connection-closed")
            return
        disconnect = kind < args.bad_rate + args.disconnect_rate
        body = {
            "messages": [{"role": "user", "content": f"Write a short story about {rng.choice(TOPICS)}."}],
            "max_tokens": args.max_tokens, "temperature": 0.7, "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = time.monotonic()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        count(response.status)
        if response.status != 200:
            response.read()
            return
        first = None
        pieces = 0
        usage = None
        stop_after = rng.randint(1, 8) if disconnect else None
        while True:
            raw = response.readline()
            if not raw:
                break
            raw = raw.strip()
            if not raw.startswith(b"data: "):
                continue
            data = raw[6:]
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    if first is None:
                        first = time.monotonic() - started
                    pieces += 1
            if stop_after is not None and pieces >= stop_after:
                conn.close()  # disconnect mid-stream
                with lock:
                    tokens_generated[0] += pieces
                return
        with lock:
            if first is not None:
                ttfts.append(first)
            tokens_generated[0] += usage["completion_tokens"] if usage else pieces
    except Exception as e:  # noqa: BLE001 - counted and reported
        with lock:
            errors.append(f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def client(index, deadline):
    rng = random.Random(args.seed * 1000 + index)
    while time.monotonic() < deadline:
        request(rng)


start = time.monotonic()
deadline = start + args.duration
threads = [threading.Thread(target=client, args=(i, deadline)) for i in range(args.clients)]
for t in threads:
    t.start()
warm_rss = None
while any(t.is_alive() for t in threads):
    time.sleep(1)
    rss = rss_kib(server.pid)
    rss_samples.append(rss)
    if warm_rss is None and time.monotonic() - start > min(10, args.duration / 4):
        warm_rss = rss
for t in threads:
    t.join()
elapsed = time.monotonic() - start

conn = http.client.HTTPConnection(host, port, timeout=10)
conn.request("GET", "/health")
health = conn.getresponse()
health_body = health.read()
server.terminate()
server.wait(timeout=30)

five_xx = {s: n for s, n in statuses.items() if isinstance(s, int) and s >= 500 and s != 503}
ttfts.sort()
p = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] * 1e3 if ttfts else float("nan")  # noqa: E731
report = {
    "clients": args.clients, "parallel": args.parallel, "threads": args.threads,
    "duration_s": round(elapsed, 1), "max_tokens": args.max_tokens,
    "statuses": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
    "5xx_other_than_503": sum(five_xx.values()),
    "client_errors": len(errors),
    "completed_streams": len(ttfts),
    "ttft_p50_ms": round(p(0.5), 1), "ttft_p99_ms": round(p(0.99), 1),
    "aggregate_tokens_per_s": round(tokens_generated[0] / elapsed, 1),
    "rss_max_mib": round(max(rss_samples, default=0) / 1024, 1),
    "rss_after_warmup_mib": round((warm_rss or 0) / 1024, 1),
    "rss_end_mib": round((rss_samples[-1] if rss_samples else 0) / 1024, 1),
    "healthy_after": health.status == 200,
    "server_exit_code": server.returncode,
}
print(json.dumps(report, indent=2))
if errors:
    print("client errors (first 5):", *errors[:5], sep="\n  ")
sys.exit(1 if five_xx or health.status != 200 else 0)
