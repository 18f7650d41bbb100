use super::model::ROPE_FREQS;
use super::*;

/// Writes GGUF images for tests.
struct Builder {
    version: u32,
    kvs: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    alignment: u64,
}

fn gstr(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Builder {
    fn new() -> Self {
        Builder {
            version: 3,
            kvs: Vec::new(),
            n_kv: 0,
            tensors: Vec::new(),
            alignment: DEFAULT_ALIGNMENT,
        }
    }

    /// A key with a raw value of type `ty`.
    fn kv(mut self, key: &str, ty: u32, payload: &[u8]) -> Self {
        gstr(&mut self.kvs, key);
        self.kvs.extend(ty.to_le_bytes());
        self.kvs.extend(payload);
        self.n_kv += 1;
        self
    }

    fn u32(self, key: &str, v: u32) -> Self {
        self.kv(key, 4, &v.to_le_bytes())
    }

    fn f32(self, key: &str, v: f32) -> Self {
        self.kv(key, 6, &v.to_le_bytes())
    }

    fn string(self, key: &str, v: &str) -> Self {
        let mut p = Vec::new();
        gstr(&mut p, v);
        self.kv(key, 8, &p)
    }

    fn strings(self, key: &str, v: &[&str]) -> Self {
        let mut p = 8u32.to_le_bytes().to_vec();
        p.extend((v.len() as u64).to_le_bytes());
        for s in v {
            gstr(&mut p, s);
        }
        self.kv(key, 9, &p)
    }

    fn i32s(self, key: &str, v: &[i32]) -> Self {
        let mut p = 5u32.to_le_bytes().to_vec();
        p.extend((v.len() as u64).to_le_bytes());
        p.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        self.kv(key, 9, &p)
    }

    /// An F32 tensor (ggml dims) filled with 0, 1, 2, ...
    fn tensor(mut self, name: &str, dims: &[u64]) -> Self {
        let n: u64 = dims.iter().product();
        let data = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
        self.tensors.push((name.into(), dims.to_vec(), 0, data));
        self
    }

    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kvs);
        let mut offset = 0u64;
        let mut data = Vec::new();
        for (name, dims, ty, bytes) in &self.tensors {
            gstr(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            data.extend(bytes);
            data.resize(data.len().next_multiple_of(self.alignment as usize), 0);
            offset = data.len() as u64;
        }
        out.resize(out.len().next_multiple_of(self.alignment as usize), 0);
        out.extend(data);
        out
    }
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, ImportError> {
    GgufFile::from_bytes(Path::new("mem.gguf"), bytes)
}

#[test]
fn parses_every_value_type_and_nested_arrays() {
    let mut nested = 9u32.to_le_bytes().to_vec(); // array of arrays
    nested.extend(2u64.to_le_bytes());
    for row in [[1u16, 2], [3, 4]] {
        nested.extend(2u32.to_le_bytes());
        nested.extend(2u64.to_le_bytes());
        nested.extend(row.iter().flat_map(|x| x.to_le_bytes()));
    }
    let b = Builder::new()
        .kv("u8", 0, &[200])
        .kv("i8", 1, &[0xfe])
        .kv("u16", 2, &500u16.to_le_bytes())
        .kv("i16", 3, &(-500i16).to_le_bytes())
        .u32("u32", 70000)
        .kv("i32", 5, &(-7i32).to_le_bytes())
        .f32("f32", 1.5)
        .kv("bool", 7, &[1])
        .string("str", "héllo")
        .kv("u64", 10, &u64::MAX.to_le_bytes())
        .kv("i64", 11, &(-1i64).to_le_bytes())
        .kv("f64", 12, &0.25f64.to_le_bytes())
        .kv("nested", 9, &nested)
        .strings("strs", &["a", "", "c"])
        .tensor("t", &[3, 2]);
    let f = parse(b.build()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.metadata().len(), 14);
    assert_eq!(f.get("u8"), Some(&GgufValue::U8(200)));
    assert_eq!(f.get("i8"), Some(&GgufValue::I8(-2)));
    assert_eq!(f.get("i16").and_then(GgufValue::as_f64), Some(-500.0));
    assert_eq!(f.get("i32").and_then(GgufValue::as_u64), None);
    assert_eq!(f.get_usize("u32").unwrap(), Some(70000));
    assert_eq!(f.get_f64("f32").unwrap(), Some(1.5));
    assert_eq!(f.get_bool("bool").unwrap(), Some(true));
    assert_eq!(f.get_str("str").unwrap(), Some("héllo"));
    assert_eq!(f.get("u64").and_then(GgufValue::as_u64), Some(u64::MAX));
    assert_eq!(f.get("i64"), Some(&GgufValue::I64(-1)));
    assert_eq!(f.get("f64"), Some(&GgufValue::F64(0.25)));
    assert_eq!(
        f.get("nested"),
        Some(&GgufValue::Array(GgufArray::Array(vec![
            GgufArray::U16(vec![1, 2]),
            GgufArray::U16(vec![3, 4])
        ])))
    );
    let strs = f.get_array("strs").unwrap().unwrap();
    assert_eq!(strs.as_strings().unwrap(), ["a", "", "c"]);
    // wrong type is an error naming the key, missing is None
    assert!(f.get_str("u8").unwrap_err().to_string().contains("'u8'"));
    assert_eq!(f.get_str("missing").unwrap(), None);

    let t = f.tensor_info("t").unwrap();
    assert_eq!((t.shape(), t.n_elements, t.n_bytes), (vec![2, 3], 6, 24));
    assert_eq!(f.data_offset() % DEFAULT_ALIGNMENT, 0);
    assert_eq!(f.dequantize(t).unwrap(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
}

#[test]
fn alignment_and_tensor_ranges_are_checked() {
    let mut b = Builder::new()
        .kv("general.alignment", 4, &64u32.to_le_bytes())
        .tensor("a", &[5])
        .tensor("b", &[7]);
    b.alignment = 64;
    let f = parse(b.build()).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.tensor_info("b").unwrap().offset, 64);
    assert_eq!(f.dequantize(f.tensor_info("b").unwrap()).unwrap()[6], 6.0);

    let bad = Builder::new().kv("general.alignment", 4, &24u32.to_le_bytes());
    assert!(
        parse(bad.build())
            .unwrap_err()
            .to_string()
            .contains("general.alignment")
    );

    // data cut short: the error names the tensor and the range
    let bytes = Builder::new()
        .tensor("a", &[4])
        .tensor("blk.3.ffn_up.weight", &[16])
        .build();
    let e = parse(bytes[..bytes.len() - 8].to_vec())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor 'blk.3.ffn_up.weight': data range"),
        "{e}"
    );
    assert!(e.contains("exceeds file size"), "{e}");
}

/// A valid image with one tensor whose info bytes follow the header (offset 24).
fn tensor_image(dims: &[u64], ty: u32) -> Vec<u8> {
    let mut b = Builder::new();
    b.tensors.push(("w".into(), dims.to_vec(), ty, vec![0; 64]));
    b.build()
}

#[test]
fn hostile_headers_are_errors() {
    let expect = |bytes: Vec<u8>, what: &str| {
        let e = parse(bytes).unwrap_err().to_string();
        assert!(e.contains(what), "expected {what:?} in {e:?}");
        assert!(e.starts_with("mem.gguf: "), "{e}");
    };
    let header = |version: u32, tensors: u64, kvs: u64| {
        let mut v = b"GGUF".to_vec();
        v.extend(version.to_le_bytes());
        v.extend(tensors.to_le_bytes());
        v.extend(kvs.to_le_bytes());
        v
    };
    expect(b"GGU".to_vec(), "header");
    expect(b"GGML\x03\0\0\0".to_vec(), "not a GGUF");
    expect(header(1, 0, 0), "version 1");
    expect(header(3u32.swap_bytes(), 0, 0), "big-endian");
    expect(header(99, 0, 0), "version 99");
    expect(header(3, u64::MAX, 0), "tensors");
    expect(header(3, 0, 1 << 40), "metadata entries");
    // key length far beyond the file
    let mut v = header(3, 0, 1);
    v.extend(u64::MAX.to_le_bytes());
    v.extend([0u8; 64]);
    expect(v, "exceeds the limit 65535");
    // string value length beyond the file
    let mut p = (1u64 << 50).to_le_bytes().to_vec();
    p.extend(b"abc");
    expect(Builder::new().kv("k", 8, &p).build(), "string length");
    // array count beyond the file
    let mut p = 6u32.to_le_bytes().to_vec();
    p.extend((1u64 << 40).to_le_bytes());
    expect(Builder::new().kv("k", 9, &p).build(), "array count");
    // arrays nested too deep
    let mut p = Vec::new();
    for _ in 0..6 {
        p.extend(9u32.to_le_bytes());
        p.extend(1u64.to_le_bytes());
    }
    p.extend(0u32.to_le_bytes());
    p.extend(0u64.to_le_bytes());
    expect(Builder::new().kv("k", 9, &p[12..]).build(), "nested");
    expect(
        Builder::new().kv("k", 13, &[0; 8]).build(),
        "unknown value type",
    );
    expect(Builder::new().kv("k", 7, &[2]).build(), "invalid bool");
    expect(
        Builder::new().u32("k", 1).u32("k", 2).build(),
        "duplicate metadata key",
    );
    // tensor infos
    expect(tensor_image(&[1, 1, 1, 1, 1], 0), "dimensions");
    let e = parse(tensor_image(&[1, 1, 1, 1, 1], 0)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "mem.gguf: tensor info #0 (at byte 24): 'w': 5 dimensions (must be 1..=4)"
    );
    assert!(
        matches!(
            &e,
            ImportError::Gguf {
                section: GgufSection::TensorInfo { name: Some(name), .. },
                source: GgufError::Rank { n_dims: 5 },
                ..
            } if name == "w"
        ),
        "{e:?}"
    );
    expect(tensor_image(&[], 0), "dimensions");
    expect(tensor_image(&[1 << 40, 1 << 40], 0), "overflows");
    expect(tensor_image(&[u64::MAX], 0), "too large");
    expect(tensor_image(&[16], 4), "unknown ggml type");
    expect(tensor_image(&[16], 2), "block size");
    expect(tensor_image(&[1 << 62], 0), "overflow");
    expect(tensor_image(&[1 << 40], 0), "exceeds file size");
    let dup = Builder::new().tensor("x", &[1]).tensor("x", &[1]).build();
    expect(dup, "duplicate tensor name");
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = tiny_model("llama").build();
    assert!(import_file(parse_ok(bytes.clone())).is_ok());
    for cut in 0..bytes.len() {
        let f = GgufFile::from_bytes(Path::new("mem.gguf"), bytes[..cut].to_vec());
        assert!(f.is_err(), "truncation at {cut} parsed");
    }
}

fn parse_ok(bytes: Vec<u8>) -> GgufFile {
    GgufFile::from_bytes(Path::new("mem.gguf"), bytes).unwrap()
}

/// A 1-layer model: hidden 8, 2 heads of 4, 1 kv head, ffn 16, a 9-token gpt2 vocab.
fn tiny_model(arch: &str) -> Builder {
    let k = |s: &str| format!("{arch}.{s}");
    let mut b = Builder::new()
        .string("general.architecture", arch)
        .string("general.name", "tiny")
        .u32(&k("block_count"), 1)
        .u32(&k("embedding_length"), 8)
        .u32(&k("feed_forward_length"), 16)
        .u32(&k("attention.head_count"), 2)
        .u32(&k("attention.head_count_kv"), 1)
        .f32(&k("attention.layer_norm_rms_epsilon"), 1e-6)
        .u32(&k("context_length"), 128)
        .string("tokenizer.ggml.model", "gpt2")
        .string("tokenizer.ggml.pre", "qwen2")
        .strings(
            "tokenizer.ggml.tokens",
            &[
                "<|endoftext|>",
                "<|im_end|>",
                "a",
                "b",
                "ab",
                "Ġ",
                "Ġa",
                "1",
                "<tool>",
            ],
        )
        .i32s("tokenizer.ggml.token_type", &[3, 3, 1, 1, 1, 1, 1, 1, 4])
        .strings("tokenizer.ggml.merges", &["a b", "Ġ a"])
        .u32("tokenizer.ggml.eos_token_id", 0)
        .tensor(names::TOKEN_EMBD, &[8, 9])
        .tensor(&names::attn_norm(0), &[8])
        .tensor(&names::attn_q(0), &[8, 8])
        .tensor(&names::attn_k(0), &[8, 4])
        .tensor(&names::attn_v(0), &[8, 4])
        .tensor(&names::attn_output(0), &[8, 8])
        .tensor(&names::ffn_norm(0), &[8])
        .tensor(&names::ffn_gate(0), &[8, 16])
        .tensor(&names::ffn_up(0), &[8, 16])
        .tensor(&names::ffn_down(0), &[16, 8])
        .tensor(names::OUTPUT_NORM, &[8]);
    if arch == "qwen2" {
        b = b
            .tensor(&names::attn_q_bias(0), &[8])
            .tensor(&names::attn_k_bias(0), &[4])
            .tensor(&names::attn_v_bias(0), &[4]);
    }
    b
}

#[test]
fn llama_q_k_are_unpermuted_qwen2_are_not() {
    let m = import_file(parse_ok(tiny_model("llama").build())).unwrap();
    let c = &m.config;
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (2, 1, 4));
    assert!(c.tie_word_embeddings && !c.attention_bias);
    let q = m.source.load_f32(&names::attn_q(0)).unwrap();
    let raw: Vec<f32> = (0..64).map(|i| i as f32).collect();
    assert_eq!(q, unpermute_interleaved_rope_rows(&raw, 2, 4, 8));
    // row 1 of head 0 (HF order) is stored row 2 (the second pair's first element)
    assert_eq!(q[8], 16.0);
    let k = m.source.load_f32(&names::attn_k(0)).unwrap();
    assert_eq!(k, unpermute_interleaved_rope_rows(&raw[..32], 1, 4, 8));
    let v = m.source.load_f32(&names::attn_v(0)).unwrap();
    assert_eq!(v, raw[..32]);
    assert_eq!(m.source.find(&names::ffn_down(0)).unwrap().shape, [8, 16]);

    let m = import_file(parse_ok(tiny_model("qwen2").build())).unwrap();
    assert_eq!(m.config.architecture, Architecture::Qwen2);
    assert!(m.config.attention_bias);
    assert_eq!(m.source.load_f32(&names::attn_q(0)).unwrap(), raw);
    assert_eq!(m.source.load_f32(&names::attn_q_bias(0)).unwrap(), raw[..8]);
}

#[test]
fn tokenizer_spec_from_gpt2_metadata() {
    let m = import_file(parse_ok(tiny_model("qwen2").build())).unwrap();
    let t = &m.tokenizer;
    assert_eq!(t.eos_token_ids, [0, 1]);
    assert_eq!(t.bos_token_id, None);
    assert!(!t.add_bos);
    assert_eq!(m.provenance["tensor_types"]["F32"], 14);
    assert_eq!(m.provenance["general.name"], "tiny");
    let tok = tokenizers::Tokenizer::from_str(&t.tokenizer_json).unwrap();
    let ids = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
    assert_eq!(ids("ab a"), [4, 6]);
    assert_eq!(ids("11"), [7, 7]);
    assert_eq!(ids("a<tool><|im_end|>"), [2, 8, 1]);
    assert_eq!(tok.decode(&[4, 6], false).unwrap(), "ab a");
}

#[test]
fn unsupported_architecture_and_bad_geometry() {
    let e = import_file(parse_ok(tiny_model("gemma").build()))
        .err()
        .unwrap();
    assert!(matches!(e, ImportError::UnsupportedArchitecture { ref arch, .. } if arch == "gemma"));
    // 3 heads do not divide the 8 q rows
    let b = tiny_model("llama").u32("llama.attention.key_length", 3);
    assert!(import_file(parse_ok(b.build())).is_err());
    let b = tiny_model("llama").u32("llama.rope.dimension_count", 2);
    let e = import_file(parse_ok(b.build())).err().unwrap().to_string();
    assert!(e.contains("partial rotary"), "{e}");
}

#[test]
fn llama3_rope_scaling_from_rope_freqs() {
    let want = Llama3RopeScaling {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let freqs = llama3_rope_divisors(500000.0, 4, &want);
    let mut b = tiny_model("llama").f32("llama.rope.freq_base", 500000.0);
    let data = freqs.iter().flat_map(|x| x.to_le_bytes()).collect();
    b.tensors.push((ROPE_FREQS.into(), vec![2], 0, data));
    let m = import_file(parse_ok(b.build())).unwrap();
    let got = m.config.rope_scaling.unwrap();
    assert_eq!(got.original_max_position_embeddings, 8192);
    assert_eq!((got.low_freq_factor, got.high_freq_factor), (1.0, 4.0));
    assert!(m.source.find(ROPE_FREQS).is_none());
    assert!(m.source.load_f32(ROPE_FREQS).is_err());
    // explicit metadata wins over the tensor's maximum
    let b = tiny_model("llama")
        .string("llama.rope.scaling.type", "llama3")
        .f32("llama.rope.scaling.factor", 8.0)
        .u32("llama.rope.scaling.original_context_length", 4096);
    let s = import_file(parse_ok(b.build()))
        .unwrap()
        .config
        .rope_scaling
        .unwrap();
    assert_eq!((s.factor, s.original_max_position_embeddings), (8.0, 4096));
    let b = tiny_model("llama")
        .string("llama.rope.scaling.type", "yarn")
        .f32("llama.rope.scaling.factor", 4.0);
    assert!(import_file(parse_ok(b.build())).is_err());
}
