//! Hugging Face checkpoint directories: config.json, *.safetensors (f32/f16/bf16),
//! tokenizer.json and tokenizer_config.json (+ generation_config.json when present).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::{ImportError, ImportedModel, SourceTensor, TensorSource, TokenizerSpec};
use pocketlm_format::config::{
    Activation, Architecture, FamilyFeatures, Llama3RopeScaling, ModelConfig, RopeScaling,
};

/// Largest JSON side file we read (config, tokenizer): far above real ones (Llama 3's
/// tokenizer.json is 9 MB), small enough that a hostile directory can't exhaust memory.
const MAX_JSON_BYTES: u64 = 64 << 20;

pub fn open(dir: &Path) -> Result<ImportedModel, ImportError> {
    let config_path = dir.join("config.json");
    let raw_config = read_json(&config_path)?;
    let config = parse_config(&config_path, &language_model_config(&raw_config))?;

    let source = SafetensorsSource::open_for(dir, &config)?;
    let mut config = config;
    if source
        .find(pocketlm_format::config::names::OUTPUT)
        .is_none()
    {
        // Checkpoints that tie the output to the embedding simply omit lm_head.
        config.tie_word_embeddings = true;
    }
    config
        .validate()
        .map_err(|e| ImportError::invalid(&config_path, e.to_string()))?;
    let tokenizer = read_tokenizer(dir, &raw_config)?;
    super::check_required_tensors(dir, &config, &source)?;

    let mut types = BTreeMap::new();
    for t in source.tensors() {
        *types.entry(t.source_type.clone()).or_insert(0u64) += 1;
    }
    let provenance = serde_json::json!({
        "source": "huggingface",
        "path": dir.display().to_string(),
        "model_type": raw_config.get("model_type"),
        "tensor_types": types,
    });
    Ok(ImportedModel {
        config,
        tokenizer,
        source: Box::new(source),
        provenance,
    })
}

/// Reads a JSON side file as text, refusing files over [`MAX_JSON_BYTES`] before reading.
fn read_json_text(path: &Path) -> Result<String, ImportError> {
    let io = |source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_JSON_BYTES {
        return Err(ImportError::invalid(
            path,
            format!("{len} bytes is larger than the {MAX_JSON_BYTES}-byte limit for JSON files"),
        ));
    }
    std::fs::read_to_string(path).map_err(io)
}

fn read_json(path: &Path) -> Result<Value, ImportError> {
    let text = read_json_text(path)?;
    serde_json::from_str(&text)
        .map_err(|e| ImportError::invalid(path, format!("invalid JSON: {e}")))
}

/// Gemma 3's multimodal checkpoints (`gemma3`: Gemma3ForConditionalGeneration, 4B and up)
/// keep their language model's config under `text_config`; pocketlm converts that part.
fn language_model_config(v: &Value) -> std::borrow::Cow<'_, Value> {
    let text = v.get("text_config").and_then(Value::as_object);
    match (v.get("model_type").and_then(Value::as_str), text) {
        (Some("gemma3"), Some(text)) => {
            let mut text = text.clone();
            text.insert("model_type".into(), "gemma3_text".into());
            // transformers' Gemma3TextConfig default, which hub configs leave out.
            text.entry("vocab_size").or_insert(262_208.into());
            std::borrow::Cow::Owned(Value::Object(text))
        }
        _ => std::borrow::Cow::Borrowed(v),
    }
}

/// The checkpoint's `model_type` as a family; Gemma 3's text-only checkpoints say
/// `gemma3_text`.
fn architecture(path: &Path, v: &Value) -> Result<Architecture, ImportError> {
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    Ok(match model_type {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        "gemma2" => Architecture::Gemma2,
        "gemma3_text" => Architecture::Gemma3,
        "mistral" => Architecture::Mistral,
        "smollm3" => Architecture::Smollm3,
        "phi3" => Architecture::Phi3,
        other => {
            let arch = v
                .get("architectures")
                .and_then(|a| a.get(0))
                .and_then(Value::as_str)
                .unwrap_or(other);
            return Err(ImportError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: if arch.is_empty() {
                    "(none)".into()
                } else {
                    arch.into()
                },
            });
        }
    })
}

fn parse_config(path: &Path, v: &Value) -> Result<ModelConfig, ImportError> {
    let architecture = architecture(path, v)?;
    let usize_key = |key: &str| -> Result<usize, ImportError> {
        v.get(key)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| ImportError::invalid(path, format!("missing or non-integer '{key}'")))
    };
    let hidden_size = usize_key("hidden_size")?;
    let num_heads = usize_key("num_attention_heads")?;
    let num_layers = usize_key("num_hidden_layers")?;
    let num_kv_heads = v
        .get("num_key_value_heads")
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .unwrap_or(num_heads);
    let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
        Some(hd) => hd as usize,
        None if num_heads > 0 => hidden_size / num_heads,
        None => 0,
    };
    let f32_key = |key: &str| v.get(key).and_then(Value::as_f64).map(|x| x as f32);
    let max_position_embeddings = v
        .get("max_position_embeddings")
        .and_then(Value::as_u64)
        .unwrap_or(2048) as usize;
    let (rope_theta, global_scaling) = rope_parameters(v, "full_attention");
    let rope_theta = rope_theta.unwrap_or(10000.0);
    let (rope_scaling, scaling) =
        parse_rope_scaling(path, v, global_scaling, max_position_embeddings)?;
    let features = family_features(path, v, architecture, num_layers, head_dim, scaling)?;
    Ok(ModelConfig {
        architecture,
        vocab_size: usize_key("vocab_size")?,
        hidden_size,
        intermediate_size: usize_key("intermediate_size")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: f32_key("rms_norm_eps").unwrap_or(1e-6),
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings: v
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        attention_bias: v
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(architecture == Architecture::Qwen2),
        features,
        incoherence: None,
    })
}

/// RoPE base and scaling object of the layers of `layer_type` (`full_attention` or
/// `sliding_attention`), from transformers 5's `rope_parameters` (one object, or one per
/// layer type) or the older top-level `rope_theta` / `rope_scaling` /
/// `rope_local_base_freq`.
fn rope_parameters<'a>(v: &'a Value, layer_type: &str) -> (Option<f32>, Option<&'a Value>) {
    let theta = |o: &Value| {
        o.get("rope_theta")
            .and_then(Value::as_f64)
            .map(|x| x as f32)
    };
    if let Some(params) = v.get("rope_parameters").filter(|p| p.is_object()) {
        let params = params.get(layer_type).unwrap_or(params);
        return (theta(params), Some(params));
    }
    if layer_type == "sliding_attention"
        && let Some(local) = v.get("rope_local_base_freq").and_then(Value::as_f64)
    {
        return (Some(local as f32), None);
    }
    (theta(v), v.get("rope_scaling").filter(|s| !s.is_null()))
}

/// Which layers are windowed: transformers' `layer_types`, else the family's pattern.
fn sliding_layers(v: &Value, arch: Architecture, num_layers: usize) -> Vec<bool> {
    if let Some(types) = v.get("layer_types").and_then(Value::as_array) {
        return types
            .iter()
            .map(|t| t.as_str() == Some("sliding_attention"))
            .collect();
    }
    let pattern = v
        .get("sliding_window_pattern")
        .or_else(|| v.get("_sliding_window_pattern"))
        .and_then(Value::as_u64)
        .map(|p| p as usize);
    match arch {
        // Every `pattern`-th layer is global (Gemma 3: 5 local, 1 global).
        Architecture::Gemma3 => {
            let p = pattern.unwrap_or(6).max(1);
            (0..num_layers).map(|l| (l + 1) % p != 0).collect()
        }
        // Even layers are local.
        Architecture::Gemma2 => (0..num_layers).map(|l| l % 2 == 0).collect(),
        _ => vec![true; num_layers],
    }
}

fn family_features(
    path: &Path,
    v: &Value,
    arch: Architecture,
    num_layers: usize,
    head_dim: usize,
    rope_scaling: Option<RopeScaling>,
) -> Result<FamilyFeatures, ImportError> {
    let f32_key = |key: &str| v.get(key).and_then(Value::as_f64).map(|x| x as f32);
    let hidden = v.get("hidden_size").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    let window = v
        .get("sliding_window")
        .and_then(Value::as_u64)
        .map(|w| w as usize);
    let mut f = FamilyFeatures {
        rope_scaling,
        ..FamilyFeatures::default()
    };
    match arch {
        Architecture::Llama | Architecture::Qwen2 => {
            if window.is_some()
                && v.get("use_sliding_window").and_then(Value::as_bool) == Some(true)
            {
                log::warn!(
                    "{}: sliding-window attention is not implemented for {}; full attention is used",
                    path.display(),
                    arch.name()
                );
            }
        }
        Architecture::Qwen3 => {
            f.qk_norm = true;
            if window.is_some()
                && v.get("use_sliding_window").and_then(Value::as_bool) == Some(true)
            {
                return Err(ImportError::invalid(
                    path,
                    "qwen3 with use_sliding_window is not supported",
                ));
            }
        }
        Architecture::Gemma2 | Architecture::Gemma3 => {
            f.post_norms = true;
            f.activation = Activation::GeluTanh;
            f.embedding_scale = Some(hidden.sqrt());
            let scalar = f32_key("query_pre_attn_scalar").unwrap_or(head_dim as f32);
            f.attention_scale = Some(1.0 / scalar.sqrt());
            f.attn_logit_softcap = f32_key("attn_logit_softcapping");
            f.final_logit_softcap = f32_key("final_logit_softcapping");
            f.sliding_window = window;
            f.sliding_window_layers = sliding_layers(v, arch, num_layers);
            if arch == Architecture::Gemma3 {
                f.qk_norm = true;
                let (local, local_scaling) = rope_parameters(v, "sliding_attention");
                let local_kind = local_scaling
                    .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
                    .and_then(Value::as_str);
                if !matches!(local_kind, None | Some("default")) {
                    return Err(ImportError::invalid(
                        path,
                        format!(
                            "gemma3 local layers with rope type {local_kind:?} are not supported"
                        ),
                    ));
                }
                f.local_rope_theta = Some(local.unwrap_or(10000.0));
            }
        }
        Architecture::Mistral => {
            f.sliding_window = window;
        }
        Architecture::Smollm3 => {
            // `no_rope_layers[l]` is 1 where layer `l` uses RoPE.
            match v.get("no_rope_layers").and_then(Value::as_array) {
                Some(flags) => {
                    f.no_rope_layers = flags
                        .iter()
                        .enumerate()
                        .filter(|(_, x)| x.as_u64() == Some(0))
                        .map(|(l, _)| l)
                        .collect()
                }
                None => {
                    let every = v
                        .get("no_rope_layer_interval")
                        .and_then(Value::as_u64)
                        .unwrap_or(4)
                        .max(1) as usize;
                    f.no_rope_layers = (0..num_layers).filter(|l| (l + 1) % every == 0).collect();
                }
            }
            if window.is_some()
                && v.get("use_sliding_window").and_then(Value::as_bool) == Some(true)
            {
                return Err(ImportError::invalid(
                    path,
                    "smollm3 with use_sliding_window is not supported",
                ));
            }
        }
        Architecture::Phi3 => {
            let partial = v
                .get("partial_rotary_factor")
                .or_else(|| {
                    v.get("rope_parameters")
                        .and_then(|p| p.get("partial_rotary_factor"))
                })
                .and_then(Value::as_f64)
                .unwrap_or(1.0);
            let rotary = (head_dim as f64 * partial) as usize;
            if rotary != head_dim {
                f.rotary_dim = Some(rotary);
            }
            f.sliding_window = window;
        }
    }
    Ok(f)
}

/// The Llama 3 scaling (kept where older files have it) and every other kind.
fn parse_rope_scaling(
    path: &Path,
    config: &Value,
    v: Option<&Value>,
    max_position_embeddings: usize,
) -> Result<(Option<Llama3RopeScaling>, Option<RopeScaling>), ImportError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok((None, None));
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let num = |k: &str, default: f64| v.get(k).and_then(Value::as_f64).unwrap_or(default);
    match kind {
        "llama3" => Ok((
            Some(Llama3RopeScaling {
                factor: num("factor", 8.0) as f32,
                low_freq_factor: num("low_freq_factor", 1.0) as f32,
                high_freq_factor: num("high_freq_factor", 4.0) as f32,
                original_max_position_embeddings: num("original_max_position_embeddings", 8192.0)
                    as usize,
            }),
            None,
        )),
        "linear" => Ok((
            None,
            Some(RopeScaling::Linear {
                factor: num("factor", 1.0) as f32,
            }),
        )),
        "longrope" | "su" => {
            let factors = |k: &str| -> Result<Vec<f32>, ImportError> {
                v.get(k)
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_f64)
                            .map(|x| x as f32)
                            .collect()
                    })
                    .ok_or_else(|| ImportError::invalid(path, format!("longrope without '{k}'")))
            };
            let original = v
                .get("original_max_position_embeddings")
                .or_else(|| config.get("original_max_position_embeddings"))
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(max_position_embeddings);
            let factor = v
                .get("factor")
                .and_then(Value::as_f64)
                .unwrap_or(max_position_embeddings as f64 / original.max(1) as f64);
            // As the LongRoPE paper suggests when the checkpoint does not say.
            let attention_factor =
                v.get("attention_factor")
                    .and_then(Value::as_f64)
                    .unwrap_or(if factor <= 1.0 {
                        1.0
                    } else {
                        (1.0 + factor.ln() / (original as f64).ln()).sqrt()
                    });
            Ok((
                None,
                Some(RopeScaling::LongRope {
                    short_factor: factors("short_factor")?,
                    long_factor: factors("long_factor")?,
                    original_max_position_embeddings: original,
                    attention_factor: attention_factor as f32,
                }),
            ))
        }
        "default" | "" => Ok((None, None)),
        other => Err(ImportError::invalid(
            path,
            format!(
                "rope_scaling type '{other}' is not supported (supported: llama3, linear, longrope)"
            ),
        )),
    }
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether `tokenizer.json`'s post-processor starts a single sequence with the special token
/// `bos` (a `TemplateProcessing` whose `single` template begins with it, alone or inside a
/// `Sequence` of processors).
fn post_processor_prepends(tokenizer_json: &str, bos: &str) -> bool {
    fn prepends(processor: &Value, bos: &str) -> bool {
        match processor.get("type").and_then(Value::as_str) {
            Some("TemplateProcessing") => {
                processor["single"]
                    .get(0)
                    .and_then(|first| first.get("SpecialToken"))
                    .and_then(|special| special.get("id"))
                    .and_then(Value::as_str)
                    == Some(bos)
            }
            Some("Sequence") => processor["processors"]
                .as_array()
                .is_some_and(|list| list.iter().any(|p| prepends(p, bos))),
            _ => false,
        }
    }
    serde_json::from_str::<Value>(tokenizer_json)
        .is_ok_and(|doc| prepends(&doc["post_processor"], bos))
}

fn read_tokenizer(dir: &Path, config: &Value) -> Result<TokenizerSpec, ImportError> {
    let tok_path = dir.join("tokenizer.json");
    let tokenizer_json = read_json_text(&tok_path)?;
    let tokenizer = pocketlm_runtime::tokenizer::TextTokenizer::from_json(&tokenizer_json)
        .map_err(|e| ImportError::Tokenizer {
            path: tok_path.clone(),
            message: e.to_string(),
        })?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.exists() {
        read_json(&tc_path)?
    } else {
        Value::Null
    };
    let gen_path = dir.join("generation_config.json");
    let generation = if gen_path.exists() {
        read_json(&gen_path)?
    } else {
        Value::Null
    };
    let by_name = |v: Option<&Value>| token_string(v).and_then(|s| tokenizer.token_to_id(&s));

    let bos_token_id =
        by_name(tc.get("bos_token")).or_else(|| ids(config.get("bos_token_id")).first().copied());
    let mut eos_token_ids = Vec::new();
    for id in by_name(tc.get("eos_token"))
        .into_iter()
        .chain(ids(generation.get("eos_token_id")))
        .chain(ids(config.get("eos_token_id")))
    {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    }
    let add_bos = match tc.get("add_bos_token").and_then(Value::as_bool) {
        Some(b) => b,
        // No flag: the tokenizer's own post-processor tells whether BOS is prepended.
        None => bos_token_id
            .and_then(|bos| tokenizer.id_to_token(bos))
            .is_some_and(|bos| post_processor_prepends(&tokenizer_json, bos)),
    };
    let chat_template = match tc.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    };
    Ok(TokenizerSpec {
        tokenizer_json,
        bos_token_id,
        eos_token_ids,
        add_bos,
        chat_template,
    })
}

struct TensorLocation {
    shard: usize,
    dtype: Dtype,
    /// Byte range inside the shard's map.
    start: usize,
    end: usize,
    /// Gemma's norms multiply by `1 + w`: stored here as the plain RMSNorm weight `1 + w`,
    /// so the runtime and the compression passes (AWQ's folding) see one kind of norm.
    add_one: bool,
}

/// All safetensors shards of a directory, mapped; tensors renamed to canonical names.
pub struct SafetensorsSource {
    shards: Vec<(PathBuf, Mmap)>,
    tensors: Vec<SourceTensor>,
    locations: Vec<TensorLocation>,
}

impl SafetensorsSource {
    /// A Llama-layout checkpoint (the tensor names of Llama and Qwen2).
    pub fn open(dir: &Path) -> Result<Self, ImportError> {
        SafetensorsSource::open_with(dir, |hf, _| {
            canonical_name(hf)
                .map(|n| vec![(n, None)])
                .unwrap_or_default()
        })
    }

    /// A checkpoint of `config`'s family: its tensor names, Gemma's `1 + w` norms and
    /// Phi-3's fused projections split into q, k, v and gate, up.
    pub fn open_for(dir: &Path, config: &ModelConfig) -> Result<Self, ImportError> {
        let add_one = matches!(
            config.architecture,
            Architecture::Gemma2 | Architecture::Gemma3
        );
        let mut source =
            SafetensorsSource::open_with(dir, |hf, shape| family_names(config, hf, shape))?;
        if add_one {
            for (t, loc) in source.tensors.iter().zip(&mut source.locations) {
                loc.add_one = t.shape.len() == 1 && t.name.ends_with("norm.weight");
            }
        }
        Ok(source)
    }

    /// Maps each stored tensor to the canonical tensors it holds: `(name, rows)`, `rows`
    /// a range of its rows where one stored matrix holds several.
    fn open_with(
        dir: &Path,
        names: impl Fn(&str, &[usize]) -> Vec<(String, Option<std::ops::Range<usize>>)>,
    ) -> Result<Self, ImportError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| ImportError::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ImportError::invalid(dir, "no *.safetensors files"));
        }
        let mut shards = Vec::new();
        let mut tensors = Vec::new();
        let mut locations = Vec::new();
        for (shard, path) in files.into_iter().enumerate() {
            let file = std::fs::File::open(&path).map_err(|source| ImportError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: read-only private map of a file we just opened; the checkpoint is not
            // modified while converting (a concurrent truncation is outside our contract).
            let map = unsafe { Mmap::map(&file) }.map_err(|source| ImportError::Io {
                path: path.clone(),
                source,
            })?;
            let (header_len, _) = SafeTensors::read_metadata(&map)
                .map_err(|e| ImportError::invalid(&path, format!("safetensors header: {e}")))?;
            // `deserialize` validates every tensor's offsets against the buffer.
            let st = SafeTensors::deserialize(&map)
                .map_err(|e| ImportError::invalid(&path, format!("safetensors: {e}")))?;
            let data_start = 8 + header_len;
            let base = map.as_ptr() as usize;
            let mut entries: Vec<_> = st.tensors();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            for (hf_name, view) in entries {
                let parts = names(&hf_name, view.shape());
                if parts.is_empty() {
                    log::debug!("{}: ignoring tensor {hf_name}", path.display());
                    continue;
                }
                let data = view.data();
                let start = data.as_ptr() as usize - base;
                debug_assert!(start >= data_start);
                let dtype = view.dtype();
                if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                    return Err(ImportError::tensor(
                        &path,
                        &hf_name,
                        format!("dtype {dtype:?} is not supported (f32, f16, bf16)"),
                    ));
                }
                let shape = view.shape().to_vec();
                let row_bytes = data.len() / shape.first().copied().unwrap_or(1).max(1);
                for (name, rows) in parts {
                    let (shape, start, end) = match rows {
                        None => (shape.clone(), start, start + data.len()),
                        Some(r) => {
                            let mut part = shape.clone();
                            part[0] = r.len();
                            (part, start + r.start * row_bytes, start + r.end * row_bytes)
                        }
                    };
                    tensors.push(SourceTensor {
                        name,
                        shape,
                        source_type: format!("{dtype:?}"),
                    });
                    locations.push(TensorLocation {
                        shard,
                        dtype,
                        start,
                        end,
                        add_one: false,
                    });
                }
            }
            shards.push((path, map));
        }
        Ok(SafetensorsSource {
            shards,
            tensors,
            locations,
        })
    }
}

impl TensorSource for SafetensorsSource {
    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    fn load_f32(&self, name: &str) -> Result<Vec<f32>, ImportError> {
        let i = self
            .tensors
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| ImportError::MissingTensor {
                path: self.shards.first().map(|s| s.0.clone()).unwrap_or_default(),
                name: name.to_string(),
            })?;
        let loc = &self.locations[i];
        let bytes = &self.shards[loc.shard].1[loc.start..loc.end];
        // safetensors data is not necessarily aligned for its element type: decode bytes.
        let mut values: Vec<f32> = match loc.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        };
        if loc.add_one {
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        Ok(values)
    }
}

/// Maps Hugging Face Llama/Qwen2 tensor names to pocketlm's canonical (GGUF-style) names.
pub fn canonical_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let short = match suffix {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}"))
}

/// Canonical names of a tensor of `config`'s family (empty: not one the runtime reads).
fn family_names(
    config: &ModelConfig,
    hf: &str,
    shape: &[usize],
) -> Vec<(String, Option<std::ops::Range<usize>>)> {
    let whole = |n: String| vec![(n, None)];
    // A multimodal Gemma 3's language model, under either transformers' layout.
    let language_model = ["language_model.model.", "model.language_model."]
        .iter()
        .find_map(|prefix| hf.strip_prefix(prefix))
        .map(|rest| format!("model.{rest}"))
        .or_else(|| hf.strip_prefix("language_model.").map(str::to_string));
    let hf = language_model.as_deref().unwrap_or(hf);
    let layer_suffix = hf
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(l, suffix)| Some((l.parse::<usize>().ok()?, suffix)));
    let gemma = matches!(
        config.architecture,
        Architecture::Gemma2 | Architecture::Gemma3
    );
    if let Some((l, suffix)) = layer_suffix {
        let name = |short: &str| format!("blk.{l}.{short}");
        match suffix {
            "self_attn.q_norm.weight" => return whole(name("attn_q_norm.weight")),
            "self_attn.k_norm.weight" => return whole(name("attn_k_norm.weight")),
            // Gemma's post_attention_layernorm follows attention; its MLP's own
            // pre-norm is pre_feedforward_layernorm.
            "post_attention_layernorm.weight" if gemma => {
                return whole(name("post_attention_norm.weight"));
            }
            "pre_feedforward_layernorm.weight" => return whole(name("ffn_norm.weight")),
            "post_feedforward_layernorm.weight" => return whole(name("post_ffw_norm.weight")),
            "self_attn.qkv_proj.weight" => {
                let (q, kv) = (config.q_dim(), config.kv_dim());
                if shape.first() != Some(&(q + 2 * kv)) {
                    // Left whole so the shape check names it.
                    return whole(name("attn_qkv.weight"));
                }
                return vec![
                    (name("attn_q.weight"), Some(0..q)),
                    (name("attn_k.weight"), Some(q..q + kv)),
                    (name("attn_v.weight"), Some(q + kv..q + 2 * kv)),
                ];
            }
            "mlp.gate_up_proj.weight" => {
                let f = config.intermediate_size;
                if shape.first() != Some(&(2 * f)) {
                    return whole(name("ffn_gate_up.weight"));
                }
                return vec![
                    (name("ffn_gate.weight"), Some(0..f)),
                    (name("ffn_up.weight"), Some(f..2 * f)),
                ];
            }
            _ => {}
        }
    }
    canonical_name(hf).map(whole).unwrap_or_default()
}

#[cfg(test)]
mod tests;
