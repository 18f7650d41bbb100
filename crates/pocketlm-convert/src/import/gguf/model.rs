//! A GGUF file's model: hyper-parameters and family features from `{arch}.*` metadata,
//! RoPE scaling, the tokenizer, provenance, and which canonical tensors a fused one holds.

use super::*;

/// llama.cpp stores Llama 3 rope scaling as precomputed per-frequency divisors; the runtime
/// derives them from [`Llama3RopeScaling`], so the tensor is not exposed.
pub(super) const ROPE_FREQS: &str = "rope_freqs.weight";
/// Phi-3's LongRoPE divisors, which llama.cpp stores as tensors.
pub(super) const ROPE_FACTORS_LONG: &str = "rope_factors_long.weight";
pub(super) const ROPE_FACTORS_SHORT: &str = "rope_factors_short.weight";
/// Tensors that configure RoPE rather than being weights.
pub(super) const ROPE_TENSORS: [&str; 3] = [ROPE_FREQS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT];

/// Token types of `tokenizer.ggml.token_type` (llama.cpp's llama_token_type).
pub mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const UNUSED: i64 = 5;
    pub const BYTE: i64 = 6;
}

/// Opens a GGUF checkpoint of a supported architecture as an [`ImportedModel`].
pub fn open(path: &Path) -> Result<ImportedModel, ImportError> {
    import_file(GgufFile::open(path)?)
}

/// Builds an [`ImportedModel`] from an already parsed file.
pub fn import_file(file: GgufFile) -> Result<ImportedModel, ImportError> {
    let config = model_config(&file)?;
    let tokenizer = tokenizer_spec(&file, config.vocab_size)?;
    let provenance = provenance(&file);
    let source = GgufTensorSource::new(Arc::new(file), &config)?;
    Ok(ImportedModel {
        config,
        tokenizer,
        source: Box::new(source),
        provenance,
    })
}

/// Builds the model hyper-parameters from `{arch}.*` metadata and tensor shapes.
pub fn model_config(file: &GgufFile) -> Result<ModelConfig, ImportError> {
    let path = file.path();
    let invalid = |msg: String| ImportError::invalid(path, msg);
    let arch_name = file
        .get_str("general.architecture")?
        .ok_or_else(|| invalid("missing metadata 'general.architecture'".into()))?;
    let architecture = match arch_name {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        "gemma2" => Architecture::Gemma2,
        "gemma3" => Architecture::Gemma3,
        "smollm3" => Architecture::Smollm3,
        "phi3" => Architecture::Phi3,
        other => {
            return Err(ImportError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: other.to_string(),
            });
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");

    let num_layers = file.require_usize(&key("block_count"))?;
    let hidden_size = file.require_usize(&key("embedding_length"))?;
    let intermediate_size = match file.get(&key("feed_forward_length")) {
        // some writers store one value per layer; the runtime needs them all equal
        Some(GgufValue::Array(a)) => {
            let first = a.int_at(0);
            if first.is_none() || (1..a.len()).any(|i| a.int_at(i) != first) {
                return Err(invalid(format!(
                    "{} varies per layer, which is not supported",
                    key("feed_forward_length")
                )));
            }
            first.and_then(|v| usize::try_from(v).ok()).unwrap_or(0)
        }
        _ => file.require_usize(&key("feed_forward_length"))?,
    };
    let num_heads = file.require_usize(&key("attention.head_count"))?;
    let num_kv_heads = file
        .get_usize(&key("attention.head_count_kv"))?
        .unwrap_or(num_heads);
    if num_heads == 0 {
        return Err(invalid(format!("{} is 0", key("attention.head_count"))));
    }
    let head_dim = match file.get_usize(&key("attention.key_length"))? {
        Some(k) => k,
        None => hidden_size / num_heads,
    };
    let rotary_dim = file.get_usize(&key("rope.dimension_count"))?;
    if let Some(rot) = rotary_dim
        && rot != head_dim
        && architecture != Architecture::Phi3
    {
        return Err(invalid(format!(
            "partial rotary embeddings (rope.dimension_count {rot} != head_dim {head_dim}) are not supported for {arch_name}"
        )));
    }
    let rms_norm_eps = file
        .get_f64(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            invalid(format!(
                "missing metadata '{}'",
                key("attention.layer_norm_rms_epsilon")
            ))
        })? as f32;
    let rope_theta = file.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32;
    let max_position_embeddings = file.require_usize(&key("context_length"))?;

    let embd = file
        .tensor_info(names::TOKEN_EMBD)
        .ok_or_else(|| ImportError::MissingTensor {
            path: path.to_path_buf(),
            name: names::TOKEN_EMBD.into(),
        })?;
    if embd.dims.len() != 2 || embd.dims[0] != hidden_size as u64 {
        return Err(ImportError::tensor(
            path,
            names::TOKEN_EMBD,
            format!(
                "shape {:?} does not match embedding_length {hidden_size}",
                embd.shape()
            ),
        ));
    }
    let vocab_size = embd.dims[1] as usize;
    if let Some(v) = file.get_usize(&key("vocab_size"))?
        && v != vocab_size
    {
        log::warn!(
            "{}: {} = {v} but {} has {vocab_size} rows; using the tensor",
            path.display(),
            key("vocab_size"),
            names::TOKEN_EMBD
        );
    }

    let tie_word_embeddings = file.tensor_info(names::OUTPUT).is_none();
    let attention_bias =
        architecture == Architecture::Qwen2 || file.tensor_info(&names::attn_q_bias(0)).is_some();
    let (rope_scaling, features) = if architecture.is_llama_like() {
        let scaling = rope_scaling(file, arch_name, rope_theta, head_dim)?;
        // Mistral GGUFs are written as `llama`; their window is the only difference.
        let features = FamilyFeatures {
            sliding_window: file.get_usize(&key("attention.sliding_window"))?,
            ..FamilyFeatures::default()
        };
        (scaling, features)
    } else {
        let features = family_features(
            file,
            architecture,
            num_layers,
            hidden_size,
            head_dim,
            rotary_dim,
            max_position_embeddings,
        )?;
        (None, features)
    };

    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings,
        attention_bias,
        features,
        incoherence: None,
    };
    config
        .validate()
        .map_err(|e| invalid(format!("model config: {e}")))?;

    // Check the attention projections agree with the head geometry now, so a mismatch is
    // reported once at open rather than as a failed unpermutation later.
    for (name, heads) in [
        (names::attn_q(0), config.num_heads),
        (names::attn_k(0), config.num_kv_heads),
    ] {
        if let Some(t) = file.tensor_info(&name) {
            let want = [
                heads as u64 * config.head_dim as u64,
                config.hidden_size as u64,
            ];
            if t.dims.len() != 2 || t.dims[1] != want[0] {
                return Err(ImportError::tensor(
                    path,
                    &name,
                    format!(
                        "shape {:?}, expected {} rows ({heads} heads × {})",
                        t.shape(),
                        want[0],
                        config.head_dim
                    ),
                ));
            }
        }
    }
    Ok(config)
}

/// What the newer families do differently, from llama.cpp's metadata keys; where llama.cpp
/// hard-codes a value per architecture instead of storing it (Gemma's window pattern and
/// local RoPE base, its attention scale, SmolLM3's RoPE-less layers), the same value.
fn family_features(
    file: &GgufFile,
    arch: Architecture,
    num_layers: usize,
    hidden_size: usize,
    head_dim: usize,
    rotary_dim: Option<usize>,
    max_position_embeddings: usize,
) -> Result<FamilyFeatures, ImportError> {
    let path = file.path();
    let name = arch.name();
    let key = |k: &str| format!("{name}.{k}");
    let f32_key = |k: &str| -> Result<Option<f32>, ImportError> {
        Ok(file.get_f64(&key(k))?.map(|x| x as f32))
    };
    let mut f = FamilyFeatures::default();
    let window = file.get_usize(&key("attention.sliding_window"))?;
    let scaling_type = file.get_str(&key("rope.scaling.type"))?;
    let scaling_factor = file.get_f64(&key("rope.scaling.factor"))?;
    let linear = match (scaling_type, scaling_factor) {
        (Some("linear"), Some(factor)) if factor != 1.0 => Some(RopeScaling::Linear {
            factor: factor as f32,
        }),
        (None | Some("none") | Some("linear"), _) => None,
        (Some(_), Some(1.0)) => None,
        (Some(other), _) if arch != Architecture::Phi3 => {
            return Err(ImportError::invalid(
                path,
                format!("rope scaling type '{other}' is not supported for {name}"),
            ));
        }
        _ => None,
    };
    match arch {
        Architecture::Qwen3 => f.qk_norm = true,
        Architecture::Gemma2 | Architecture::Gemma3 => {
            f.post_norms = true;
            f.activation = Activation::GeluTanh;
            f.embedding_scale = Some((hidden_size as f32).sqrt());
            // llama.cpp: query_pre_attn_scalar is hidden/heads for the 27B models (62 and
            // 46 layers), head_dim otherwise; the converter does not store it.
            let heads = file
                .get_usize(&key("attention.head_count"))?
                .unwrap_or(1)
                .max(1);
            let scalar = match (arch, num_layers) {
                (Architecture::Gemma3, 62) | (Architecture::Gemma2, 46) => hidden_size / heads,
                _ => head_dim,
            };
            f.attention_scale = Some(1.0 / (scalar as f32).sqrt());
            f.attn_logit_softcap = f32_key("attn_logit_softcapping")?;
            f.final_logit_softcap = f32_key("final_logit_softcapping")?;
            f.sliding_window = window;
            let pattern = file
                .get_usize(&key("attention.sliding_window_pattern"))?
                .unwrap_or(if arch == Architecture::Gemma3 { 6 } else { 2 })
                .max(1);
            // The last layer of each `pattern` is global.
            f.sliding_window_layers = (0..num_layers).map(|l| (l + 1) % pattern != 0).collect();
            if arch == Architecture::Gemma3 {
                f.qk_norm = true;
                f.local_rope_theta = Some(f32_key("rope.freq_base_swa")?.unwrap_or(10000.0));
            }
            f.rope_scaling = linear;
        }
        Architecture::Smollm3 => {
            // llama.cpp: every 4th layer has no RoPE (the checkpoints' no_rope_layer_interval).
            f.no_rope_layers = (0..num_layers).filter(|l| (l + 1) % 4 == 0).collect();
        }
        Architecture::Phi3 => {
            if let Some(r) = rotary_dim.filter(|&r| r != head_dim) {
                f.rotary_dim = Some(r);
            }
            f.sliding_window = window;
            let (long, short) = (
                file.tensor_info(ROPE_FACTORS_LONG),
                file.tensor_info(ROPE_FACTORS_SHORT),
            );
            if let (Some(long), Some(short)) = (long, short) {
                let original = file
                    .get_usize(&key("rope.scaling.original_context_length"))?
                    .unwrap_or(max_position_embeddings);
                let factor = max_position_embeddings as f64 / original.max(1) as f64;
                let attention_factor = match f32_key("rope.scaling.attn_factor")? {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt() as f32,
                };
                f.rope_scaling = Some(RopeScaling::LongRope {
                    short_factor: file.dequantize(short)?,
                    long_factor: file.dequantize(long)?,
                    original_max_position_embeddings: original,
                    attention_factor,
                });
            }
        }
        Architecture::Llama | Architecture::Qwen2 | Architecture::Mistral => {}
    }
    Ok(f)
}

/// Llama 3 frequency scaling from `{arch}.rope.scaling.*` metadata or a `rope_freqs` tensor.
fn rope_scaling(
    file: &GgufFile,
    arch: &str,
    rope_theta: f32,
    head_dim: usize,
) -> Result<Option<Llama3RopeScaling>, ImportError> {
    let path = file.path();
    let kind = file.get_str(&format!("{arch}.rope.scaling.type"))?;
    let factor = file.get_f64(&format!("{arch}.rope.scaling.factor"))?;
    let original = file.get_usize(&format!("{arch}.rope.scaling.original_context_length"))?;
    let freqs = file.tensor_info(ROPE_FREQS);
    match kind {
        None | Some("none") => {}
        Some("llama3") => {}
        // A factor of 1 is a no-op whatever the type says.
        Some(_) if factor.is_none_or(|f| f == 1.0) => {}
        Some(other) => {
            return Err(ImportError::invalid(
                path,
                format!("rope scaling type '{other}' is not supported"),
            ));
        }
    }
    if kind != Some("llama3") && freqs.is_none() {
        return Ok(None);
    }

    let stored = match freqs {
        Some(info) => Some(file.dequantize(info)?),
        None => None,
    };
    // llama.cpp's converter writes the factors but not the parameters; the largest divisor
    // is the scaling factor (applied to the lowest frequencies).
    let factor = match (factor, &stored) {
        (Some(f), _) => f as f32,
        (None, Some(v)) => v.iter().copied().fold(1.0f32, f32::max),
        (None, None) => {
            return Err(ImportError::invalid(
                path,
                "llama3 rope scaling without a factor or rope_freqs tensor",
            ));
        }
    };
    let original_max_position_embeddings = original.unwrap_or_else(|| {
        log::warn!(
            "{}: llama3 rope scaling without original_context_length; assuming 8192 (Llama 3.1/3.2)",
            path.display()
        );
        8192
    });
    let scaling = Llama3RopeScaling {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings,
    };
    if let Some(stored) = stored {
        // Verify the assumed parameters reproduce what the converter stored.
        let derived = llama3_rope_divisors(rope_theta, head_dim, &scaling);
        let max_diff = if derived.len() == stored.len() {
            derived
                .iter()
                .zip(&stored)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                .fold(0.0f32, f32::max)
        } else {
            f32::INFINITY
        };
        if max_diff > 1e-3 {
            log::warn!(
                "{}: {ROPE_FREQS} does not match llama3 scaling {scaling:?} (max relative difference {max_diff}); long-context outputs may differ",
                path.display()
            );
        }
    }
    Ok(Some(scaling))
}

/// Per-frequency divisors llama3 scaling applies (what llama.cpp stores as `rope_freqs`).
pub fn llama3_rope_divisors(theta: f32, head_dim: usize, s: &Llama3RopeScaling) -> Vec<f32> {
    let old_ctx = s.original_max_position_embeddings as f64;
    let low_wavelen = old_ctx / f64::from(s.low_freq_factor);
    let high_wavelen = old_ctx / f64::from(s.high_freq_factor);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / f64::from(theta).powf(2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let factor = f64::from(s.factor);
            let div = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_ctx / wavelen - f64::from(s.low_freq_factor))
                    / f64::from(s.high_freq_factor - s.low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            div as f32
        })
        .collect()
}

/// Special tokens, BOS policy and chat template from `tokenizer.*` metadata.
pub fn tokenizer_spec(file: &GgufFile, vocab_size: usize) -> Result<TokenizerSpec, ImportError> {
    let path = file.path();
    let tokenizer_json = crate::import::gguf_tokenizer::tokenizer_json(file)?;
    let tokens = file
        .get_array("tokenizer.ggml.tokens")?
        .and_then(GgufArray::as_strings)
        .unwrap_or(&[]);
    let types = file.get_array("tokenizer.ggml.token_type")?;
    let id = |key: &str| -> Result<Option<u32>, ImportError> {
        match file.get_usize(key)? {
            None => Ok(None),
            Some(v) if v < vocab_size.max(tokens.len()) => Ok(u32::try_from(v).ok()),
            Some(v) => {
                log::warn!(
                    "{}: {key} = {v} is outside the vocabulary; ignoring it",
                    path.display()
                );
                Ok(None)
            }
        }
    };
    let bos_token_id = id("tokenizer.ggml.bos_token_id")?;
    let mut eos_token_ids = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(t) = id(key)?
            && !eos_token_ids.contains(&t)
        {
            eos_token_ids.push(t);
        }
    }
    // Chat models end turns with these; llama.cpp also treats them as end-of-generation.
    for (i, text) in tokens.iter().enumerate() {
        let is_control = types.and_then(|t| t.int_at(i)) == Some(token_type::CONTROL);
        if is_control
            && matches!(text.as_str(), "<|im_end|>" | "<|eot_id|>" | "<|endoftext|>")
            && let Ok(t) = u32::try_from(i)
            && !eos_token_ids.contains(&t)
        {
            eos_token_ids.push(t);
        }
    }
    let model = file.get_str("tokenizer.ggml.model")?.unwrap_or("llama");
    let add_bos = file
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(model == "llama");
    let chat_template = file.get_str("tokenizer.chat_template")?.map(str::to_string);
    Ok(TokenizerSpec {
        tokenizer_json,
        bos_token_id,
        eos_token_ids,
        add_bos,
        chat_template,
    })
}

fn provenance(file: &GgufFile) -> serde_json::Value {
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for t in file.tensor_infos() {
        *types.entry(t.ggml_type.name()).or_default() += 1;
    }
    json!({
        "source": "gguf",
        "path": file.path().display().to_string(),
        "gguf_version": file.version(),
        "general.name": file.get("general.name").and_then(GgufValue::as_str),
        "general.file_type": file.get("general.file_type").and_then(GgufValue::as_u64),
        "tensor_types": types,
    })
}

/// The canonical tensors a fused Phi-3 tensor holds, as row ranges (empty: not fused).
pub(super) fn fused_parts(
    config: &ModelConfig,
    name: &str,
    shape: &[usize],
) -> Vec<(String, std::ops::Range<usize>)> {
    if config.architecture != Architecture::Phi3 {
        return Vec::new();
    }
    let Some((layer, short)) = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(l, s)| Some((l.parse::<usize>().ok()?, s)))
    else {
        return Vec::new();
    };
    let (q, kv, f) = (config.q_dim(), config.kv_dim(), config.intermediate_size);
    match short {
        "attn_qkv.weight" if shape.first() == Some(&(q + 2 * kv)) => vec![
            (names::attn_q(layer), 0..q),
            (names::attn_k(layer), q..q + kv),
            (names::attn_v(layer), q + kv..q + 2 * kv),
        ],
        "ffn_up.weight" if shape.first() == Some(&(2 * f)) => vec![
            (names::ffn_gate(layer), 0..f),
            (names::ffn_up(layer), f..2 * f),
        ],
        _ => Vec::new(),
    }
}
