#!/usr/bin/env bash
# Tests the generated bindings against the real cdylib and the stories260K fixture:
#   tests/bindings/test_bindings.py   Python (ctypes)
#   tests/bindings/TestBindings.kt    Kotlin on the host JVM (JNA)
# Installs what is missing (idempotent): JNA + a JDK from apt, kotlinc from npm into
# .cache/kotlinc (or uses $KOTLINC, or /opt/kotlinc when present).
# Exits non-zero if either program fails. CARGO_TARGET_DIR is honoured (default: target/).
# The checked-in bindings are tested; scripts/gen-bindings.sh --check verifies that they match
# src/ffi (and the bindings' own API checksums refuse a mismatched library at load).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
target_dir="${CARGO_TARGET_DIR:-target}"
case "$target_dir" in /*) ;; *) target_dir="$root/$target_dir" ;; esac
cache="$root/.cache"
kotlin_version=2.4.20

# --- 1. tools -------------------------------------------------------------------------------
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
jna=/usr/share/java/jna.jar
if [ ! -f "$jna" ] || ! command -v java >/dev/null || ! command -v javac >/dev/null; then
  echo "== installing libjna-java default-jdk-headless (apt)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjna-java default-jdk-headless >/dev/null \
    || { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -qq libjna-java default-jdk-headless >/dev/null; }
fi
if [ -n "${KOTLINC:-}" ]; then
  kotlinc="$KOTLINC"
elif [ -x /opt/kotlinc/node_modules/kotlin-compiler/bin/kotlinc ]; then
  kotlinc=/opt/kotlinc/node_modules/kotlin-compiler/bin/kotlinc
else
  kotlinc="$cache/kotlinc/node_modules/kotlin-compiler/bin/kotlinc"
  if [ ! -x "$kotlinc" ]; then
    echo "== installing kotlin-compiler@$kotlin_version (npm) into .cache/kotlinc"
    npm install --silent --no-audit --no-fund --prefix "$cache/kotlinc" "kotlin-compiler@$kotlin_version" >/dev/null
  fi
fi

# --- 2. library and model -------------------------------------------------------------------
echo "== building the cdylib and the CLI (the test suite's build, test profile)"
bash scripts/build-workspace.sh
lib="$target_dir/debug/libpocketlm.so"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$target_dir/debug/pocketlm" convert tests/fixtures/stories260k/hf -o "$work/stories.plm" --dtype f32 >/dev/null
# The same model with a tool-calling chat template, for the tool-call cases.
mkdir "$work/tools-hf"
cp tests/fixtures/stories260k/hf/{config.json,model.safetensors,tokenizer.json} "$work/tools-hf/"
cp tests/fixtures/stories260k-tools/tokenizer_config.json "$work/tools-hf/"
"$target_dir/debug/pocketlm" convert "$work/tools-hf" -o "$work/tools.plm" --dtype f32 >/dev/null
export RUST_BACKTRACE=0   # the throwing-callback tests print one panic message; keep it short

status=0

# --- 3. Python ------------------------------------------------------------------------------
echo "== Python bindings"
mkdir -p "$work/python"
cp bindings/python/pocketlm.py "$lib" "$work/python/"
python3 tests/bindings/test_bindings.py "$work/python" "$work/stories.plm" "$work/tools.plm" || status=1

# --- 4. Kotlin ------------------------------------------------------------------------------
echo "== Kotlin bindings (JVM + JNA)"
kt_sources=(bindings/kotlin/uniffi/pocketlm/pocketlm.kt tests/bindings/TestBindings.kt)
key="$( (echo "$kotlin_version"; cat "${kt_sources[@]}") | sha256sum | cut -c1-16)"
jar="$cache/kotlin-test/test-$key.jar"
if [ ! -f "$jar" ]; then
  mkdir -p "$cache/kotlin-test"
  rm -f "$cache"/kotlin-test/test-*.jar
  echo "   compiling with kotlinc (about a minute)"
  "$kotlinc" -nowarn -cp "$jna" "${kt_sources[@]}" -include-runtime -d "$jar.tmp.jar"
  mv "$jar.tmp.jar" "$jar"
fi
java -Duniffi.component.pocketlm.libraryOverride="$lib" -cp "$jar:$jna" TestBindingsKt "$work/stories.plm" "$work/tools.plm" \
  || status=1

[ "$status" = 0 ] && echo "== bindings: all passed" || echo "== bindings: FAILED" >&2
exit "$status"
