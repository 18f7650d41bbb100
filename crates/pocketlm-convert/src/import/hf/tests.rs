use super::*;

#[test]
fn canonical_names() {
    assert_eq!(
        canonical_name("model.layers.12.mlp.down_proj.weight").as_deref(),
        Some("blk.12.ffn_down.weight")
    );
    assert_eq!(
        canonical_name("model.layers.0.self_attn.k_proj.bias").as_deref(),
        Some("blk.0.attn_k.bias")
    );
    assert_eq!(canonical_name("model.layers.x.mlp.down_proj.weight"), None);
    assert_eq!(canonical_name("model.rotary_emb.inv_freq"), None);
}

/// Hub checkpoints predate transformers 5's `rope_parameters`: Gemma 3 1B's config.json.
#[test]
fn gemma3_1b_legacy_config() {
    let c = parse_config(
        Path::new("config.json"),
        &serde_json::json!({
            "architectures": ["Gemma3ForCausalLM"], "attn_logit_softcapping": null,
            "final_logit_softcapping": null, "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
            "intermediate_size": 6912, "max_position_embeddings": 32768,
            "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
            "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
            "rope_local_base_freq": 10000, "rope_scaling": null, "rope_theta": 1000000,
            "sliding_window": 512, "sliding_window_pattern": 6, "vocab_size": 262144
        }),
    )
    .unwrap();
    c.validate().unwrap();
    let f = &c.features;
    assert_eq!(c.architecture, Architecture::Gemma3);
    assert_eq!((c.rope_theta, f.local_rope_theta), (1e6, Some(1e4)));
    assert_eq!(f.attention_scale, Some(1.0 / 16.0));
    assert_eq!(f.embedding_scale, Some(1152f32.sqrt()));
    assert!(f.qk_norm && f.post_norms && f.activation == Activation::GeluTanh);
    assert_eq!(c.layer_window(0), Some(512));
    assert_eq!(c.layer_window(5), None);
    assert_eq!((0..26).filter(|&l| c.layer_window(l).is_none()).count(), 4);
    assert_eq!(f.rope_scaling, None);
}

#[test]
fn gemma3_multimodal_checkpoints_convert_their_language_model() {
    let c = parse_config(
        Path::new("config.json"),
        &language_model_config(&serde_json::json!({
            "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
            "vision_config": {"hidden_size": 1152},
            "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                "model_type": "gemma3_text", "num_attention_heads": 8, "num_hidden_layers": 34,
                "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                "sliding_window": 1024, "rope_theta": 1000000.0,
                "rope_local_base_freq": 10000.0}
        })),
    )
    .unwrap();
    c.validate().unwrap();
    assert_eq!(
        (c.architecture, c.vocab_size),
        (Architecture::Gemma3, 262_208)
    );
    assert_eq!(
        c.features.rope_scaling,
        Some(RopeScaling::Linear { factor: 8.0 })
    );
    let config = c;
    let names = |hf: &str| family_names(&config, hf, &[2560]);
    for hf in [
        "language_model.model.layers.3.self_attn.q_norm.weight",
        "model.language_model.layers.3.self_attn.q_norm.weight",
    ] {
        assert_eq!(
            names(hf),
            vec![("blk.3.attn_q_norm.weight".to_string(), None)]
        );
    }
    assert!(names("vision_tower.vision_model.embeddings.patch_embedding.weight").is_empty());
}

/// Phi-4-mini: partial rotary 0.75 and LongRoPE under the legacy `rope_scaling` key.
#[test]
fn phi4_mini_legacy_longrope_config() {
    let c = parse_config(
        Path::new("config.json"),
        &serde_json::json!({
            "model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 24,
            "num_key_value_heads": 8, "num_hidden_layers": 32, "intermediate_size": 8192,
            "vocab_size": 200064, "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
            "rope_theta": 10000.0, "tie_word_embeddings": true,
            "rope_scaling": {"type": "longrope", "short_factor": vec![1.0; 48],
                             "long_factor": vec![2.0; 48]}
        }),
    )
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.rotary_dim(), 96);
    let Some(RopeScaling::LongRope {
        original_max_position_embeddings,
        attention_factor,
        ..
    }) = c.features.rope_scaling
    else {
        panic!("no longrope: {:?}", c.features.rope_scaling)
    };
    assert_eq!(original_max_position_embeddings, 4096);
    // sqrt(1 + ln(32) / ln(4096)), as the LongRoPE paper and transformers.
    assert!(
        (attention_factor - 1.190_238_1).abs() < 1e-5,
        "{attention_factor}"
    );
}

#[test]
fn config_rejects_unknown_architecture_and_parses_llama3_scaling() {
    let p = Path::new("config.json");
    let err = parse_config(p, &serde_json::json!({"model_type": "gpt2"})).unwrap_err();
    assert!(
        err.to_string().contains("unsupported architecture 'gpt2'"),
        "{err}"
    );
    let err = parse_config(p, &serde_json::json!({"model_type": "llama"})).unwrap_err();
    assert!(err.to_string().contains("hidden_size"), "{err}");
    let c = parse_config(
        p,
        &serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "num_attention_heads": 8,
            "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        }),
    )
    .unwrap();
    assert_eq!(c.num_kv_heads, 8);
    assert_eq!(c.head_dim, 8);
    assert_eq!(c.rope_scaling.unwrap().factor, 32.0);
    let err = parse_config(
        p,
        &serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "num_attention_heads": 8,
            "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100,
            "rope_scaling": {"type": "yarn"}
        }),
    )
    .unwrap_err();
    assert!(err.to_string().contains("yarn"), "{err}");
}
