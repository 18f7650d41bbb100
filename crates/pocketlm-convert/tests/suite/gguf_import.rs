//! GGUF importer against real files: the stories260K fixture (with its Hugging Face twin)
//! and, when present, SmolLM2-135M-Instruct Q4_1.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use pocketlm_convert::import::ImportedModel;
use pocketlm_convert::import::gguf::{self, GgufFile};
use pocketlm_format::config::{Architecture, names};
use tokenizers::Tokenizer;

fn stories_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../.."),
        "/tests/fixtures/stories260k"
    ));
    if dir.join("stories260K-f32.v3.gguf").exists() {
        Some(dir)
    } else {
        eprintln!(
            "skipping: stories260K fixture not found at {}",
            dir.display()
        );
        None
    }
}

fn smollm2_path() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("POCKETLM_SMOLLM2_GGUF") {
        candidates.push(PathBuf::from(p));
    }
    let name = "SmolLM2-135M-Instruct.Q4_1.gguf";
    candidates.push(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .join("models")
            .join(name),
    );
    candidates.push(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .join("../main/models")
            .join(name),
    );
    let found = candidates.iter().find(|p| p.exists()).cloned();
    if found.is_none() {
        eprintln!(
            "skipping: SmolLM2 GGUF not found (set POCKETLM_SMOLLM2_GGUF or put {name} in models/); looked at {candidates:?}"
        );
    }
    found
}

fn open(path: &Path) -> ImportedModel {
    match gguf::open(path) {
        Ok(m) => m,
        Err(e) => panic!("import failed: {e}"),
    }
}

#[test]
fn stories260k_config_and_tensors_match_hf() {
    let Some(dir) = stories_dir() else { return };
    let gguf_path = dir.join("stories260K-f32.v3.gguf");
    assert!(gguf::has_magic(&gguf_path));
    assert!(!gguf::has_magic(&dir.join("hf/model.safetensors")));
    let model = open(&gguf_path);
    let c = &model.config;
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (
            c.hidden_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.vocab_size,
            c.head_dim
        ),
        (64, 5, 8, 4, 512, 8)
    );
    assert_eq!(c.intermediate_size, 172);
    assert_eq!(c.max_position_embeddings, 512);
    assert!(c.tie_word_embeddings);
    assert!(!c.attention_bias);
    assert_eq!(c.rope_theta, 10000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert_eq!(c.rope_scaling, None);

    let tok = &model.tokenizer;
    assert_eq!(tok.bos_token_id, Some(1));
    assert_eq!(tok.eos_token_ids, vec![2]);
    assert!(tok.add_bos);
    assert_eq!(model.provenance["source"], "gguf");
    assert_eq!(model.provenance["tensor_types"]["F32"], 47);
    assert_eq!(model.provenance["general.name"], "tinyllamas-stories-260k");

    let st_bytes = std::fs::read(dir.join("hf/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let mut hf_names: HashMap<String, String> = HashMap::new();
    hf_names.insert("model.embed_tokens.weight".into(), names::TOKEN_EMBD.into());
    hf_names.insert("model.norm.weight".into(), names::OUTPUT_NORM.into());
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        for (hf, ours) in [
            ("self_attn.q_proj.weight", names::attn_q(l)),
            ("self_attn.k_proj.weight", names::attn_k(l)),
            ("self_attn.v_proj.weight", names::attn_v(l)),
            ("self_attn.o_proj.weight", names::attn_output(l)),
            ("mlp.gate_proj.weight", names::ffn_gate(l)),
            ("mlp.up_proj.weight", names::ffn_up(l)),
            ("mlp.down_proj.weight", names::ffn_down(l)),
            ("input_layernorm.weight", names::attn_norm(l)),
            ("post_attention_layernorm.weight", names::ffn_norm(l)),
        ] {
            hf_names.insert(format!("{p}.{hf}"), ours);
        }
    }
    let mut checked = 0;
    for (hf_name, view) in st.tensors() {
        let Some(ours) = hf_names.get(&hf_name) else {
            assert_eq!(hf_name, "lm_head.weight", "unexpected HF tensor");
            continue;
        };
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        let want: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let info = model
            .source
            .find(ours)
            .unwrap_or_else(|| panic!("missing {ours}"));
        assert_eq!(info.shape, view.shape(), "{ours} shape");
        assert_eq!(info.source_type, "F32");
        let got = model.source.load_f32(ours).unwrap();
        assert_eq!(got, want, "{ours} differs from {hf_name}");
        checked += 1;
    }
    assert_eq!(checked, 2 + 9 * c.num_layers);
    assert_eq!(model.source.tensors().len(), checked);

    // Without the unpermutation q/k would not match: guard the test's own premise.
    let file = GgufFile::open(&gguf_path).unwrap();
    let raw_q = file
        .dequantize(file.tensor_info(&names::attn_q(0)).unwrap())
        .unwrap();
    assert_ne!(raw_q, model.source.load_f32(&names::attn_q(0)).unwrap());
    assert!(model.source.load_f32("no.such.tensor").is_err());
}

fn encode(t: &Tokenizer, s: &str) -> Vec<u32> {
    t.encode(s, false).unwrap().get_ids().to_vec()
}

#[test]
fn stories260k_tokenizer_matches_hf() {
    let Some(dir) = stories_dir() else { return };
    let model = open(&dir.join("stories260K-f32.v3.gguf"));
    let ours = Tokenizer::from_str(&model.tokenizer.tokenizer_json).unwrap();
    let hf = Tokenizer::from_file(dir.join("hf/tokenizer.json")).unwrap();
    let texts = [
        "Once upon a time",
        "Lily's mom said, \"Let's go!\"",
        "One day, she saw a big, red ball.\nShe wanted to play with it.\n\n  Indented  twice ",
        "café ☃ naïve — 你好",
        "x",
        " leading space",
        "",
        "<s> and </s> inside text",
    ];
    for text in texts {
        let want = encode(&hf, text);
        let got = encode(&ours, text);
        assert_eq!(got, want, "encoding {text:?}");
        assert_eq!(
            ours.decode(&got, true).unwrap(),
            hf.decode(&want, true).unwrap(),
            "decoding {text:?}"
        );
    }
    assert_eq!(
        ours.decode(&encode(&ours, "Once upon a time"), true)
            .unwrap(),
        "Once upon a time"
    );
    assert_eq!(
        ours.decode(&encode(&ours, "café ☃"), true).unwrap(),
        "café ☃"
    );
    assert_eq!(ours.token_to_id("<s>"), Some(1));
    assert_eq!(ours.token_to_id("<0x0A>"), Some(13));
}

#[test]
fn smollm2_q4_1_imports_and_tokenizes() {
    let Some(path) = smollm2_path() else { return };
    let model = open(&path);
    let c = &model.config;
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.vocab_size,
            c.head_dim
        ),
        (30, 576, 9, 3, 49152, 64)
    );
    assert_eq!(c.intermediate_size, 1536);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(model.provenance["tensor_types"]["Q4_1"], 210);
    assert_eq!(model.provenance["tensor_types"]["Q8_0"], 1);

    let tok = &model.tokenizer;
    assert_eq!(tok.bos_token_id, Some(1));
    assert!(tok.eos_token_ids.contains(&2), "{:?}", tok.eos_token_ids);
    assert!(
        tok.eos_token_ids.contains(&0),
        "<|endoftext|> is control: {:?}",
        tok.eos_token_ids
    );
    assert!(!tok.add_bos);
    assert!(
        tok.chat_template
            .as_deref()
            .unwrap_or("")
            .contains("<|im_start|>")
    );

    // Every quantized type present dequantizes; values finite and weight-sized.
    let mut seen = HashMap::new();
    for name in [
        names::TOKEN_EMBD.to_string(),
        names::attn_q(0),
        names::attn_k(0),
        names::ffn_down(29),
        names::attn_norm(3),
        names::OUTPUT_NORM.to_string(),
    ] {
        let info = model.source.find(&name).unwrap().clone();
        let w = model.source.load_f32(&name).unwrap();
        assert_eq!(w.len(), info.shape.iter().product::<usize>());
        assert!(w.iter().all(|x| x.is_finite()), "{name}");
        let max = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let mean_abs = w.iter().map(|x| x.abs() as f64).sum::<f64>() / w.len() as f64;
        assert!(
            max < 100.0 && mean_abs > 1e-4 && mean_abs < 10.0,
            "{name}: max {max} mean|x| {mean_abs}"
        );
        seen.insert(info.source_type.clone(), name);
    }
    assert!(seen.contains_key("Q4_1") && seen.contains_key("Q8_0") && seen.contains_key("F32"));
    assert_eq!(
        model.source.find(names::TOKEN_EMBD).unwrap().shape,
        vec![49152, 576]
    );
    assert_eq!(
        model.source.find(&names::ffn_down(0)).unwrap().shape,
        vec![576, 1536]
    );

    let t = Tokenizer::from_str(&tok.tokenizer_json).unwrap();
    assert_eq!(encode(&t, "Hello, world!"), vec![19556, 28, 905, 17]);
    let hello = encode(&t, "Hello world");
    assert!(hello.len() <= 3, "{hello:?}");
    let digits = t.encode("12345", false).unwrap();
    assert_eq!(digits.get_tokens(), ["1", "2", "3", "4", "5"]);
    let paragraph = "The quick brown fox jumps over the lazy dog 1234567 times.\n\
        \tfn main() { println!(\"{}\", 2 + 2); } // code\n\
        Unicode: café, naïve, 日本語, emoji 🎉, math ∑x² — done.  Double  spaces\n\n";
    let ids = encode(&t, paragraph);
    assert_eq!(t.decode(&ids, false).unwrap(), paragraph);
    let im = encode(&t, "<|im_start|>user\nHi<|im_end|>");
    assert_eq!(im.first(), Some(&1));
    assert_eq!(im.last(), Some(&2));
}

/// Writes `bytes` to a temp file and imports it; every corruption must be an `Err`.
fn import_bytes(bytes: &[u8]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.gguf");
    std::fs::write(&p, bytes).unwrap();
    gguf::open(&p).map(drop).map_err(|e| e.to_string())
}

#[test]
fn corrupt_files_are_errors() {
    let Some(dir) = stories_dir() else { return };
    let good = std::fs::read(dir.join("stories260K-f32.v3.gguf")).unwrap();
    assert!(import_bytes(&good).is_ok());

    for cut in [
        0,
        3,
        4,
        10,
        23,
        24,
        40,
        100,
        1000,
        14000,
        14176,
        500_000,
        good.len() - 1,
    ] {
        let e = import_bytes(&good[..cut])
            .err()
            .unwrap_or_else(|| panic!("cut at {cut} accepted"));
        assert!(e.contains("x.gguf"), "error should name the file: {e}");
    }

    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(import_bytes(&bad).unwrap_err().contains("not a GGUF"));

    // tensor count (offset 8) and kv count (offset 16)
    let mut bad = good.clone();
    bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(import_bytes(&bad).unwrap_err().contains("tensors"));
    let mut bad = good.clone();
    bad[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(import_bytes(&bad).unwrap_err().contains("metadata"));

    // first key's length
    let mut bad = good.clone();
    bad[24..32].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    assert!(import_bytes(&bad).unwrap_err().contains("length"));

    // data past the end: keep the header, drop the last tensor's bytes
    let e = import_bytes(&good[..good.len() - 4]).unwrap_err();
    assert!(e.contains("exceeds file size"), "{e}");

    // flip every byte of the header region one at a time: never panic
    let header_end = 14176;
    for i in (0..header_end).step_by(7) {
        let mut bad = good.clone();
        bad[i] ^= 0xff;
        let _ = import_bytes(&bad);
    }
}
