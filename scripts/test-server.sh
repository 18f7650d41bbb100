#!/usr/bin/env bash
# `pocketlm serve` with the official `openai` Python client (PyPI): starts the server on a
# free loopback port with the stories260K fixture (with a tool-calling template) and runs tests/server/test_openai_client.py.
# Installs openai into .cache/server-venv (idempotent). If pip truly cannot install it
# (offline), says so loudly and exits 0 so the rest of CI runs; the Rust tests in
# crates/pocketlm-server/tests cover the same requests over raw HTTP.
# CARGO_TARGET_DIR is honoured (default: target/).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
target_dir="${CARGO_TARGET_DIR:-target}"
case "$target_dir" in /*) ;; *) target_dir="$root/$target_dir" ;; esac
openai_version="openai>=1.40,<3"

venv="$root/.cache/server-venv"
if ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
  echo "== installing $openai_version (pip) into .cache/server-venv"
  rm -rf "$venv"
  if ! { python3 -m venv "$venv" && "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$openai_version"; }; then
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    echo "!! test-server: could not install the openai Python client; the OpenAI-client     !!" >&2
    echo "!! server tests were SKIPPED (the Rust server tests still ran in scripts/test.sh)  !!" >&2
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    exit 0
  fi
fi

echo "== building the CLI (the test suite's build, test profile)"
bash scripts/build-workspace.sh
bin="$target_dir/debug/pocketlm"
work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
# stories260K with a tool-calling chat template, so tools and tool calls can be tested.
mkdir "$work/hf"
cp tests/fixtures/stories260k/hf/{config.json,model.safetensors,tokenizer.json} "$work/hf/"
cp tests/fixtures/stories260k-tools/tokenizer_config.json "$work/hf/"
"$bin" convert "$work/hf" -o "$work/stories.plm" --dtype f32 >/dev/null

max_body=65536
"$bin" -t 2 serve "$work/stories.plm" --port 0 --parallel 2 --ctx 1024 --max-body-bytes "$max_body" \
  2> "$work/server.log" &
server_pid=$!
address=""
for _ in $(seq 1 100); do
  address=$(sed -n 's|.*listening on \(http://[0-9.:]*\).*|\1|p' "$work/server.log")
  [ -n "$address" ] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$address" ]; then
  echo "test-server: the server did not start:" >&2
  cat "$work/server.log" >&2
  exit 1
fi
echo "== openai client against $address"
status=0
"$venv/bin/python" tests/server/test_openai_client.py "$address" stories "$max_body" || status=1

# SIGTERM: the server stops cleanly.
kill -TERM "$server_pid"
if ! wait "$server_pid"; then
  echo "test-server: the server did not exit cleanly on SIGTERM:" >&2
  status=1
fi
server_pid=""
grep -q "pocketlm serve: stopped" "$work/server.log" || { echo "test-server: no clean stop in the log" >&2; cat "$work/server.log" >&2; status=1; }
[ "$status" = 0 ] && echo "== server (openai client): all passed" || { echo "== server (openai client): FAILED" >&2; cat "$work/server.log" >&2; }
exit "$status"
