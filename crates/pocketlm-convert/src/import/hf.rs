//! Hugging Face checkpoint directories: config.json, *.safetensors (f32/f16/bf16),
//! tokenizer.json and tokenizer_config.json (+ generation_config.json when present).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::{ImportError, ImportedModel, SourceTensor, TensorSource, TokenizerSpec};
use pocketlm_format::config::{Architecture, Llama3RopeScaling, ModelConfig};

/// Largest JSON side file we read (config, tokenizer): far above real ones (Llama 3's
/// tokenizer.json is 9 MB), small enough that a hostile directory can't exhaust memory.
const MAX_JSON_BYTES: u64 = 64 << 20;

pub fn open(dir: &Path) -> Result<ImportedModel, ImportError> {
    let config_path = dir.join("config.json");
    let raw_config = read_json(&config_path)?;
    let config = parse_config(&config_path, &raw_config)?;

    let source = SafetensorsSource::open(dir)?;
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

fn parse_config(path: &Path, v: &Value) -> Result<ModelConfig, ImportError> {
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let architecture = match model_type {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
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
    };
    let usize_key = |key: &str| -> Result<usize, ImportError> {
        v.get(key)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| ImportError::invalid(path, format!("missing or non-integer '{key}'")))
    };
    let hidden_size = usize_key("hidden_size")?;
    let num_heads = usize_key("num_attention_heads")?;
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
    let f32_key = |key: &str, default: f32| -> f32 {
        v.get(key)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .unwrap_or(default)
    };
    let rope_scaling = parse_rope_scaling(path, v.get("rope_scaling"))?;
    if v.get("sliding_window").and_then(Value::as_u64).is_some()
        && v.get("use_sliding_window").and_then(Value::as_bool) == Some(true)
    {
        log::warn!(
            "{}: sliding-window attention is not implemented; full attention is used",
            path.display()
        );
    }
    Ok(ModelConfig {
        architecture,
        vocab_size: usize_key("vocab_size")?,
        hidden_size,
        intermediate_size: usize_key("intermediate_size")?,
        num_layers: usize_key("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: f32_key("rms_norm_eps", 1e-6),
        rope_theta: f32_key("rope_theta", 10000.0),
        rope_scaling,
        max_position_embeddings: v
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .unwrap_or(2048) as usize,
        tie_word_embeddings: v
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        attention_bias: v
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(architecture == Architecture::Qwen2),
    })
}

fn parse_rope_scaling(
    path: &Path,
    v: Option<&Value>,
) -> Result<Option<Llama3RopeScaling>, ImportError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    match kind {
        "llama3" => {
            let num = |k: &str, default: f64| v.get(k).and_then(Value::as_f64).unwrap_or(default);
            Ok(Some(Llama3RopeScaling {
                factor: num("factor", 8.0) as f32,
                low_freq_factor: num("low_freq_factor", 1.0) as f32,
                high_freq_factor: num("high_freq_factor", 4.0) as f32,
                original_max_position_embeddings: num("original_max_position_embeddings", 8192.0)
                    as usize,
            }))
        }
        "default" | "" => Ok(None),
        other => Err(ImportError::invalid(
            path,
            format!("rope_scaling type '{other}' is not supported (supported: llama3)"),
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

fn read_tokenizer(dir: &Path, config: &Value) -> Result<TokenizerSpec, ImportError> {
    let tok_path = dir.join("tokenizer.json");
    let tokenizer_json = read_json_text(&tok_path)?;
    let tokenizer =
        pocketlm_runtime::tokenizer::parse_tokenizer_json(&tokenizer_json).map_err(|e| {
            ImportError::Tokenizer {
                path: tok_path.clone(),
                message: e.to_string(),
            }
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
        None => bos_token_id.is_some_and(|bos| {
            tokenizer
                .encode("a", true)
                .map(|e| e.get_ids().first() == Some(&bos))
                .unwrap_or(false)
        }),
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
}

/// All safetensors shards of a directory, mapped; tensors renamed to canonical names.
pub struct SafetensorsSource {
    shards: Vec<(PathBuf, Mmap)>,
    tensors: Vec<SourceTensor>,
    locations: Vec<TensorLocation>,
}

impl SafetensorsSource {
    pub fn open(dir: &Path) -> Result<Self, ImportError> {
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
                let Some(name) = canonical_name(&hf_name) else {
                    log::debug!("{}: ignoring tensor {hf_name}", path.display());
                    continue;
                };
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
                tensors.push(SourceTensor {
                    name,
                    shape: view.shape().to_vec(),
                    source_type: format!("{dtype:?}"),
                });
                locations.push(TensorLocation {
                    shard,
                    dtype,
                    start,
                    end: start + data.len(),
                });
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
        Ok(match loc.dtype {
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
        })
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

#[cfg(test)]
mod tests {
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
}
