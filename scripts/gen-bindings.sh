#!/usr/bin/env bash
# Regenerates the Kotlin, Swift and Python bindings of the mobile API (src/ffi) into
# bindings/{kotlin,swift,python}/ with uniffi, from a debug build of the cdylib.
#
#   scripts/gen-bindings.sh           regenerate the checked-in files
#   scripts/gen-bindings.sh --check   regenerate into a temporary directory and fail (exit 1)
#                                     if the checked-in files differ (CI)
#
# CARGO_TARGET_DIR is honoured (default: target/).
set -euo pipefail
cd "$(dirname "$0")/.."

check=0
case "${1:-}" in
  "") ;;
  --check) check=1 ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

target_dir="${CARGO_TARGET_DIR:-target}"
case "$(uname -s)" in
  Darwin) lib="$target_dir/debug/libpocketlm.dylib" ;;
  *) lib="$target_dir/debug/libpocketlm.so" ;;
esac

# The cdylib and uniffi-bindgen, from the test suite's build (see build-workspace.sh).
bash scripts/build-workspace.sh

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$target_dir/debug/uniffi-bindgen" generate "$lib" \
  --language kotlin --language swift --language python \
  --no-format --out-dir "$tmp/raw" >/dev/null

# uniffi writes kotlin/<package path>/pocketlm.kt and the rest flat; sort by language.
out="$tmp/bindings"
mkdir -p "$out/kotlin" "$out/swift" "$out/python"
mv "$tmp/raw/uniffi" "$out/kotlin/"   # package uniffi.pocketlm
mv "$tmp/raw/pocketlm.swift" "$tmp/raw/pocketlmFFI.h" "$tmp/raw/pocketlmFFI.modulemap" "$out/swift/"
mv "$tmp/raw/pocketlm.py" "$out/python/"

if [ "$check" = 1 ]; then
  if diff -ru bindings "$out"; then
    echo "bindings are up to date"
  else
    echo "error: bindings/ is out of date with src/ffi; run scripts/gen-bindings.sh and commit" >&2
    exit 1
  fi
else
  rm -rf bindings
  cp -r "$out" bindings
  echo "wrote bindings/ (kotlin, swift, python)"
fi
