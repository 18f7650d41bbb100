#!/usr/bin/env bash
# The runtime's tokenizer against Hugging Face transformers on real vocabularies: llama.cpp
# ships, for each tokenizer it supports, a vocabulary-only GGUF plus test texts (`.inp`) and
# the ids transformers produced for them (`.out`). This fetches them from the llama.cpp source
# in the PyPI sdist of llama-cpp-python (cached under compare/vocab/) and encodes every text
# with each vocabulary the GGUF importer rebuilds (GPT-2, MPT, Falcon, StarCoder, Refact, Command-R,
# Llama 3, Llama 2 SentencePiece, Phi-3, Qwen2, Qwen3.5, DeepSeek LLM and Coder). Not part of CI (a 77 MB download); the suite's tokenizer_parity tests check
# the same code against the `tokenizers` crate on SmolLM2's and stories260K's vocabularies.
#
# usage: bash scripts/check-tokenizer-vocabs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dir=compare/vocab
if ! ls "$dir"/ggml-vocab-*.gguf.out >/dev/null 2>&1; then
  mkdir -p "$dir"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # pip reads the sdist's metadata through its build backend, so the venv gets that first
  # (scikit-build-core, which wants cmake and ninja); nothing is built.
  python3 -m venv "$tmp/venv"
  "$tmp/venv/bin/pip" install --quiet scikit-build-core cmake ninja
  PATH="$tmp/venv/bin:$PATH" "$tmp/venv/bin/pip" download --quiet --no-deps \
    --no-binary :all: --no-build-isolation -d "$tmp" llama-cpp-python==0.3.36
  tar -xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp" --wildcards '*/vendor/llama.cpp/models/ggml-vocab-*'
  mv "$tmp"/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-* "$dir"/
fi
POCKETLM_VOCAB_DIR="$PWD/$dir" cargo test -p pocketlm-convert --test suite \
  llama_cpp_vocabulary_files_match_transformers -- --ignored --nocapture 2>&1 |
  grep -E "texts, |not imported|differ from|test result"
