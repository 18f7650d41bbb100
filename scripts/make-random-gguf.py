#!/usr/bin/env python3
"""Writes a Llama-architecture GGUF with random Q4_0 weights, for speed measurements on a
model larger than the CPU's last-level cache when no such checkpoint can be downloaded
(not run in CI). Its text is noise; its shapes, bytes per token and arithmetic are those of
a real model of the same size, so decode and prefill speed are the real thing for both
llama.cpp (which loads it as is) and pocketlm (`pocketlm convert` from it).

    python3 scripts/make-random-gguf.py --tokenizer-from models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out big.gguf [--hidden 2048 --layers 22 --ffn 5632 --heads 32 --kv-heads 4] [--seed 0]
    python3 scripts/make-random-gguf.py --tokenizer-from SRC.gguf --vocab-only --out vocab.gguf

The tokenizer (every `tokenizer.*` key) is copied from `--tokenizer-from`; `--vocab-only`
writes those keys alone (a few MB, to carry a tokenizer without its model). The default
shape is TinyLlama-1.1B's with SmolLM2's 49152-token vocabulary: 1.07 B parameters, 600 MB
as Q4_0. Standard library only.
"""

import argparse
import random
import struct

GGUF_MAGIC = b"GGUF"
ALIGNMENT = 32
F32, Q4_0 = 0, 2
# GGUF metadata value types.
U8, I8, U16, I16, U32, I32, F32_V, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
FIXED_SIZE = {U8: 1, I8: 1, U16: 2, I16: 2, U32: 4, I32: 4, F32_V: 4, BOOL: 1, U64: 8, I64: 8, F64: 8}


def read_kvs(path):
    """Every metadata key of a GGUF file with its value's raw bytes (type included)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != GGUF_MAGIC:
        raise SystemExit(f"{path}: not a GGUF file")
    (version,) = struct.unpack_from("<I", data, 4)
    if version < 2:
        raise SystemExit(f"{path}: GGUF version {version} is too old")
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    pos = 24

    def skip_value(t, pos):
        if t in FIXED_SIZE:
            return pos + FIXED_SIZE[t]
        if t == STRING:
            (n,) = struct.unpack_from("<Q", data, pos)
            return pos + 8 + n
        if t == ARRAY:
            (item, n) = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if item in FIXED_SIZE:
                return pos + n * FIXED_SIZE[item]
            for _ in range(n):
                pos = skip_value(item, pos)
            return pos
        raise SystemExit(f"{path}: unknown metadata type {t}")

    kvs = []
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        (t,) = struct.unpack_from("<I", data, pos)
        end = skip_value(t, pos + 4)
        kvs.append((key, data[pos:end]))
        pos = end
    return kvs


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, t, value):
    fmt = {U32: "<I", F32_V: "<f"}[t]
    return gguf_string(key) + struct.pack("<I", t) + struct.pack(fmt, value)


def kv_string(key, value):
    return gguf_string(key) + struct.pack("<I", STRING) + gguf_string(value)


def q4_0_tensor(rng, rows, cols):
    """`rows` rows of `cols` weights as Q4_0 blocks (f16 scale, 16 bytes of nibbles), the
    scale chosen so a product with a unit-variance input has roughly unit variance."""
    assert cols % 32 == 0
    blocks = rows * cols // 32
    # Uniform nibbles have a standard deviation of ~4.6 around the zero point 8.
    scale = struct.pack("<e", 1.0 / (4.6 * cols**0.5))
    out = bytearray(blocks * 18)
    out[0::18] = scale[:1] * blocks
    out[1::18] = scale[1:] * blocks
    nibbles = rng.randbytes(blocks * 16)
    for j in range(16):
        out[2 + j :: 18] = nibbles[j::16]
    return bytes(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer-from", required=True, help="GGUF whose tokenizer.* keys are copied")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-only", action="store_true")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    tokenizer = [(k, v) for k, v in read_kvs(a.tokenizer_from) if k.startswith("tokenizer.")]
    tokens = next((v for k, v in tokenizer if k == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise SystemExit(f"{a.tokenizer_from}: no tokenizer.ggml.tokens")
    (_, vocab) = struct.unpack_from("<IQ", tokens, 4)

    h, hd = a.hidden, a.hidden // a.heads
    kvs = [kv_string("general.architecture", "llama")]
    tensors = []  # (name, ggml dims (ne0 first), type, bytes)
    if not a.vocab_only:
        kvs += [
            kv_string("general.name", f"random-llama-{a.layers}x{h}"),
            kv("general.file_type", U32, 2),  # mostly Q4_0
            kv("llama.vocab_size", U32, vocab),
            kv("llama.context_length", U32, a.ctx),
            kv("llama.embedding_length", U32, h),
            kv("llama.block_count", U32, a.layers),
            kv("llama.feed_forward_length", U32, a.ffn),
            kv("llama.attention.head_count", U32, a.heads),
            kv("llama.attention.head_count_kv", U32, a.kv_heads),
            kv("llama.rope.dimension_count", U32, hd),
            kv("llama.rope.freq_base", F32_V, 10000.0),
            kv("llama.attention.layer_norm_rms_epsilon", F32_V, 1e-5),
        ]
        rng = random.Random(a.seed)
        ones = struct.pack("<f", 1.0) * h
        # The embedding's rows are read one at a time; its scale only sets the input's size.
        tensors.append(("token_embd.weight", [h, vocab], Q4_0, q4_0_tensor(rng, vocab, h)))
        tensors.append(("output_norm.weight", [h], F32, ones))
        for i in range(a.layers):
            b = f"blk.{i}."
            kv_dim = a.kv_heads * hd
            tensors += [
                (b + "attn_norm.weight", [h], F32, ones),
                (b + "attn_q.weight", [h, h], Q4_0, q4_0_tensor(rng, h, h)),
                (b + "attn_k.weight", [h, kv_dim], Q4_0, q4_0_tensor(rng, kv_dim, h)),
                (b + "attn_v.weight", [h, kv_dim], Q4_0, q4_0_tensor(rng, kv_dim, h)),
                (b + "attn_output.weight", [h, h], Q4_0, q4_0_tensor(rng, h, h)),
                (b + "ffn_norm.weight", [h], F32, ones),
                (b + "ffn_gate.weight", [h, a.ffn], Q4_0, q4_0_tensor(rng, a.ffn, h)),
                (b + "ffn_up.weight", [h, a.ffn], Q4_0, q4_0_tensor(rng, a.ffn, h)),
                (b + "ffn_down.weight", [a.ffn, h], Q4_0, q4_0_tensor(rng, h, a.ffn)),
            ]
    kvs += [gguf_string(k) + v for k, v in tokenizer]

    pad = lambda n: (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT
    infos, offset = [], 0
    for name, dims, t, data in tensors:
        infos.append(gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", t, offset))
        offset += len(data) + pad(len(data))
    with open(a.out, "wb") as f:
        head = GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(infos)
        f.write(head + b"\0" * pad(len(head)))
        for _, _, _, data in tensors:
            f.write(data + b"\0" * pad(len(data)))
    params = sum(len(d) for _, _, t, d in tensors if t == Q4_0) // 18 * 32
    print(f"{a.out}: {len(tensors)} tensors, {params / 1e9:.2f} B quantized parameters, vocab {vocab}")


if __name__ == "__main__":
    main()
