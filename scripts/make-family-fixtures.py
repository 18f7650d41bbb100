#!/usr/bin/env python3
"""Builds the tiny model-family fixtures under tests/fixtures/families/<family>/.

Run by hand (never in CI) when a fixture needs remaking; the outputs are committed:

    python3 -m venv /tmp/oracle
    /tmp/oracle/bin/pip install -q torch==2.15.0 transformers==5.25.0 gguf
    /tmp/oracle/bin/python scripts/make-family-fixtures.py [family ...]

For each family it makes a random-weight model from the family's real transformers config
class (few layers, tiny widths, but the family's head layout with GQA, a sliding window
shorter than the test sequence, and its RoPE scaling), and writes:

- `config.json`, `model.safetensors` (f16), `tokenizer.json`: the Hugging Face form;
- `model.gguf`: the same weights with llama.cpp's architecture name, metadata keys and
  tensor names (q/k rows permuted and Gemma norms stored as 1 + w where llama.cpp's
  converter does so), written with PyPI `gguf`, llama.cpp's own writer;
- `reference.json`: the prompt token ids, transformers' 32-token greedy continuation (full
  recomputation each step, no cache), and `logits.f32`: little-endian f32 logits of the
  prompt at every position (`prompt_len x vocab_size`), computed in f32 from the
  f16-rounded weights the files hold.

The Rust tests in crates/pocketlm-convert/tests/suite/families.rs convert both forms and compare.

`--bench-model DIR` instead writes a larger random Gemma 3 (not committed) for the
ring-buffer benchmark in BENCHMARKS.md: hidden 640, 6 layers (5 local with window 512),
4 heads of 256, 1 KV head, MLP 2048, context 32768.
"""

import json
import math
import os
import sys

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import gguf
import transformers as tf

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "families")
PROMPT_LEN = 16
GREEDY = 32
HIDDEN, FFN, HEADS, HEAD_DIM = 64, 128, 4, 16
WINDOW = 8  # shorter than the 48 positions a test runs


def byte_level_tokenizer():
    """A byte-level BPE with a few merges; the model vocabulary is its size."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=272,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<bos>", "<eos>"],
        show_progress=False,
    )
    text = ["the quick brown fox jumps over the lazy dog " * 20, "a tiny model of each family " * 20]
    tok.train_from_iterator(text, trainer)
    return tok


def randomize(model, gemma_norms):
    """Weights large enough that logits are far from uniform (clear greedy choices)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                # Norms: around 1 (Gemma stores w of 1 + w: around 0).
                base = 0.0 if gemma_norms else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    # Round to f16 so the f16 files hold exactly the weights the reference used.
    for p in model.parameters():
        p.data = p.data.half().float()


FAMILIES = {
    "qwen3": dict(
        cls=("Qwen3Config", "Qwen3ForCausalLM"),
        kw=dict(num_hidden_layers=2, num_key_value_heads=2, head_dim=HEAD_DIM, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        arch="qwen3",
    ),
    "gemma3": dict(
        cls=("Gemma3TextConfig", "Gemma3ForCausalLM"),
        # 6 layers: llama.cpp hard-codes Gemma 3's pattern (5 local, then 1 global).
        kw=dict(num_hidden_layers=6, intermediate_size=64, num_key_value_heads=1, head_dim=HEAD_DIM,
                sliding_window=WINDOW,
                query_pre_attn_scalar=HEAD_DIM,
                rope_parameters={
                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                }),
        arch="gemma3",
    ),
    "gemma2": dict(
        cls=("Gemma2Config", "Gemma2ForCausalLM"),
        # Soft caps low enough that they bend these random models' scores and logits.
        kw=dict(num_hidden_layers=4, num_key_value_heads=2, head_dim=HEAD_DIM, sliding_window=WINDOW,
                query_pre_attn_scalar=HEAD_DIM, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
        arch="gemma2",
    ),
    "mistral": dict(
        cls=("MistralConfig", "MistralForCausalLM"),
        kw=dict(num_hidden_layers=2, num_key_value_heads=2, head_dim=HEAD_DIM, sliding_window=WINDOW,
                tie_word_embeddings=False),
        arch="llama",  # llama.cpp converts Mistral as llama, window in llama.attention.sliding_window
    ),
    "smollm3": dict(
        cls=("SmolLM3Config", "SmolLM3ForCausalLM"),
        kw=dict(num_hidden_layers=4, num_key_value_heads=2, no_rope_layer_interval=4, tie_word_embeddings=True),
        arch="smollm3",
    ),
    "llama32": dict(
        cls=("LlamaConfig", "LlamaForCausalLM"),
        kw=dict(num_hidden_layers=2, num_key_value_heads=2, head_dim=HEAD_DIM, tie_word_embeddings=True,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}),
        arch="llama",
    ),
    "phi3": dict(
        cls=("Phi3Config", "Phi3ForCausalLM"),
        kw=dict(num_hidden_layers=2, num_key_value_heads=2, partial_rotary_factor=0.75,
                max_position_embeddings=256, original_max_position_embeddings=64,
                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                 "short_factor": [1.0 + 0.15 * i for i in range(6)],
                                 "long_factor": [2.0 + 0.5 * i for i in range(6)],
                                 "original_max_position_embeddings": 64},
                tie_word_embeddings=False),
        arch="phi3",
    ),
}


def llama_permute(w, heads):
    """HF rotate-half rows to llama.cpp's interleaved pairs (what its converter stores)."""
    rows = w.shape[0]
    hd = rows // heads
    rest = w.shape[1:]
    return w.reshape(heads, 2, hd // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def write_gguf(path, family, spec, cfg, model, tok):
    arch = spec["arch"]
    w = gguf.GGUFWriter(path, arch)
    k = lambda s: f"{arch}.{s}"
    L, V = cfg.num_hidden_layers, cfg.vocab_size
    w.add_uint32(k("block_count"), L)
    w.add_uint32(k("context_length"), cfg.max_position_embeddings)
    w.add_uint32(k("embedding_length"), cfg.hidden_size)
    w.add_uint32(k("feed_forward_length"), cfg.intermediate_size)
    w.add_uint32(k("attention.head_count"), cfg.num_attention_heads)
    w.add_uint32(k("attention.head_count_kv"), cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_uint32(k("attention.key_length"), head_dim)
    w.add_uint32(k("attention.value_length"), head_dim)
    w.add_float32(k("attention.layer_norm_rms_epsilon"), cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    full = rope.get("full_attention", rope)
    w.add_float32(k("rope.freq_base"), full["rope_theta"])
    if getattr(cfg, "sliding_window", None) and family in ("gemma2", "gemma3", "mistral"):
        w.add_uint32(k("attention.sliding_window"), cfg.sliding_window)
    if family == "gemma3" and full.get("rope_type") == "linear":
        w.add_string(k("rope.scaling.type"), "linear")
        w.add_float32(k("rope.scaling.factor"), full["factor"])
    if family == "gemma2":
        w.add_float32(k("attn_logit_softcapping"), cfg.attn_logit_softcapping)
        w.add_float32(k("final_logit_softcapping"), cfg.final_logit_softcapping)
    if family == "phi3":
        rot = int(head_dim * cfg.partial_rotary_factor)
        w.add_uint32(k("rope.dimension_count"), rot)
        orig = rope["original_max_position_embeddings"]
        w.add_uint32(k("rope.scaling.original_context_length"), orig)
        factor = cfg.max_position_embeddings / orig
        w.add_float32(k("rope.scaling.attn_factor"), math.sqrt(1 + math.log(factor) / math.log(orig)))

    # Tokenizer: gpt2-style byte-level BPE.
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    tokens += [f"[PAD{i}]" for i in range(len(tokens), V)]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [3 if t.startswith("<") or t.startswith("[PAD") else 1 for t in tokens])
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_array("tokenizer.ggml.merges", [" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)

    sd = {n: p.detach().numpy() for n, p in model.state_dict().items()}
    gemma = family.startswith("gemma")
    permute = arch in ("llama", "smollm3")

    def put(name, arr):
        arr = np.ascontiguousarray(arr)
        if arr.ndim == 1:
            w.add_tensor(name, arr.astype(np.float32))
        else:
            w.add_tensor(name, arr.astype(np.float16))

    def norm(a):
        return a + 1.0 if gemma else a

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", norm(sd["model.norm.weight"]))
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    if full.get("rope_type") == "llama3":
        # llama.cpp's converter stores Llama 3 scaling as per-frequency divisors.
        base, dim = full["rope_theta"], head_dim
        lo, hi, fac = full["low_freq_factor"], full["high_freq_factor"], full["factor"]
        old = full["original_max_position_embeddings"]
        divisors = []
        for i in range(0, dim, 2):
            wavelen = 2 * math.pi * base ** (i / dim)
            if wavelen < old / hi:
                divisors.append(1.0)
            elif wavelen > old / lo:
                divisors.append(fac)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                divisors.append(1.0 / ((1 - smooth) / fac + smooth))
        put("rope_freqs.weight", np.array(divisors, dtype=np.float32))
    if family == "phi3":
        put("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        put("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    for l in range(L):
        p = f"model.layers.{l}."
        b = f"blk.{l}."
        put(b + "attn_norm.weight", norm(sd[p + "input_layernorm.weight"]))
        if family == "phi3":
            put(b + "attn_qkv.weight", sd[p + "self_attn.qkv_proj.weight"])
            put(b + "ffn_up.weight", sd[p + "mlp.gate_up_proj.weight"])
        else:
            q, kk = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
            if permute:
                q, kk = llama_permute(q, cfg.num_attention_heads), llama_permute(kk, cfg.num_key_value_heads)
            put(b + "attn_q.weight", q)
            put(b + "attn_k.weight", kk)
            put(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
            put(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
            put(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        if p + "self_attn.q_norm.weight" in sd:
            put(b + "attn_q_norm.weight", norm(sd[p + "self_attn.q_norm.weight"]))
            put(b + "attn_k_norm.weight", norm(sd[p + "self_attn.k_norm.weight"]))
        if gemma:
            put(b + "post_attention_norm.weight", norm(sd[p + "post_attention_layernorm.weight"]))
            put(b + "ffn_norm.weight", norm(sd[p + "pre_feedforward_layernorm.weight"]))
            put(b + "post_ffw_norm.weight", norm(sd[p + "post_feedforward_layernorm.weight"]))
        else:
            put(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make(family):
    spec = FAMILIES[family]
    out = os.path.join(ROOT, family)
    os.makedirs(out, exist_ok=True)
    tok = byte_level_tokenizer()
    vocab = tok.get_vocab_size()
    cfg_cls, model_cls = (getattr(tf, n) for n in spec["cls"])
    kw = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS,
              max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(spec["kw"])
    cfg = cfg_cls(**kw)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    randomize(model, family.startswith("gemma"))

    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, vocab, (PROMPT_LEN,), generator=g).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float().numpy()
        seq = list(prompt)
        margins = []
        for _ in range(GREEDY):
            last = model(torch.tensor([seq])).logits[0, -1].float()
            top = torch.topk(last, 2).values
            margins.append(float(top[0] - top[1]))
            seq.append(int(last.argmax()))
    print(f"{family}: smallest greedy margin {min(margins):.4f}, logit range "
          f"{logits.min():.2f}..{logits.max():.2f}")

    model.to(torch.float16).save_pretrained(out)
    model.float()
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": False}, f)
    for extra in ("generation_config.json",):
        p = os.path.join(out, extra)
        if os.path.exists(p):
            os.remove(p)
    logits.astype("<f4").tofile(os.path.join(out, "logits.f32"))
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({"family": family, "transformers": tf.__version__, "prompt": prompt,
                   "greedy": seq[PROMPT_LEN:], "vocab_size": vocab,
                   "smallest_greedy_margin": min(margins)}, f, indent=1)
    write_gguf(os.path.join(out, "model.gguf"), family, spec, cfg, model, tok)


def bench_model(out):
    cfg = tf.Gemma3TextConfig(vocab_size=byte_level_tokenizer().get_vocab_size(), hidden_size=640,
                              intermediate_size=2048, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=256, sliding_window=512,
                              max_position_embeddings=32768, query_pre_attn_scalar=256,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    tf.Gemma3ForCausalLM(cfg).to(torch.float16).save_pretrained(out)
    byte_level_tokenizer().save(os.path.join(out, "tokenizer.json"))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bench-model"]:
        bench_model(sys.argv[2])
    else:
        for fam in sys.argv[1:] or FAMILIES:
            make(fam)
