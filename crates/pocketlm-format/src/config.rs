//! Model hyper-parameters shared by importers, the .plm metadata and the runtime.

use serde::{Deserialize, Serialize};

/// Decoder families the runtime implements. They differ only in details the forward pass
/// reads from [`ModelConfig`] (biases, tying, rope scaling, [`FamilyFeatures`]), so one code
/// path serves all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3, SmolLM, TinyLlama, and other `LlamaForCausalLM` checkpoints.
    Llama,
    /// Qwen2 / Qwen2.5: Llama layout plus biases on the q/k/v projections.
    Qwen2,
    /// Qwen3 (dense): per-head RMSNorm of queries and keys before RoPE, no q/k/v bias.
    Qwen3,
    /// Gemma 2: (1 + w) norms, norms after attention and MLP, GeGLU, alternating
    /// sliding-window layers, attention-logit and final-logit soft-capping.
    Gemma2,
    /// Gemma 3 text: Gemma 2's layout with q/k norms instead of attention soft-capping, and
    /// local (sliding-window) layers with a RoPE base of their own.
    Gemma3,
    /// Mistral / Ministral: Llama layout with sliding-window attention.
    Mistral,
    /// SmolLM3: Llama layout where some layers skip RoPE.
    Smollm3,
    /// Phi-3 / Phi-3.5-mini / Phi-4-mini: fused projections (split at import), partial
    /// rotary embeddings and LongRoPE.
    Phi3,
}

impl Architecture {
    /// Every family, in the order error messages list them.
    pub const ALL: [Architecture; 8] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Gemma2,
        Architecture::Gemma3,
        Architecture::Mistral,
        Architecture::Smollm3,
        Architecture::Phi3,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gemma2 => "gemma2",
            Architecture::Gemma3 => "gemma3",
            Architecture::Mistral => "mistral",
            Architecture::Smollm3 => "smollm3",
            Architecture::Phi3 => "phi3",
        }
    }

    /// `llama, qwen2, ...`: what importers say they support.
    pub fn supported_list() -> String {
        Architecture::ALL.map(Architecture::name).join(", ")
    }

    /// Whether the forward pass is exactly the Llama/Qwen2 one (no [`FamilyFeatures`]);
    /// compression passes with a forward pass of their own accept only these.
    pub fn is_llama_like(self) -> bool {
        matches!(self, Architecture::Llama | Architecture::Qwen2)
    }
}

/// The MLP's gate activation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SwiGLU: `silu(gate) * up` (Llama, Qwen, Mistral, Phi-3).
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluTanh,
}

/// RoPE frequency scalings besides Llama 3's ([`ModelConfig::rope_scaling`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Positions divided by `factor` (Gemma 3's global layers).
    Linear { factor: f32 },
    /// Phi-3's LongRoPE: per-frequency divisors, `short` up to the original context and
    /// `long` beyond it, and cos/sin multiplied by `attention_factor`.
    LongRope {
        short_factor: Vec<f32>,
        long_factor: Vec<f32>,
        original_max_position_embeddings: usize,
        attention_factor: f32,
    },
}

/// What sets the newer families apart from Llama, as data the shared decoder reads. Every
/// field defaults to "as Llama", so files written before these families existed still load.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FamilyFeatures {
    /// Per-head RMSNorm (`attn_q_norm`, `attn_k_norm`, `head_dim` wide) of queries and keys
    /// before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// RMSNorms of the attention and MLP outputs before the residual add (`post_attention_norm`,
    /// `post_ffw_norm`; Gemma 2/3).
    pub post_norms: bool,
    pub activation: Activation,
    /// Embedding rows are multiplied by this (Gemma: √hidden); the tied output is not.
    pub embedding_scale: Option<f32>,
    /// Attention scores are multiplied by this instead of `1/√head_dim` (Gemma's
    /// `query_pre_attn_scalar^-0.5`).
    pub attention_scale: Option<f32>,
    /// Scores become `cap · tanh(score / cap)` before the softmax (Gemma 2).
    pub attn_logit_softcap: Option<f32>,
    /// Logits become `cap · tanh(logit / cap)` (Gemma 2).
    pub final_logit_softcap: Option<f32>,
    /// Positions a windowed layer attends to, the current one included.
    pub sliding_window: Option<usize>,
    /// Per layer, whether it is windowed; empty means every layer is when `sliding_window` is
    /// set (Mistral).
    pub sliding_window_layers: Vec<bool>,
    /// RoPE base of the windowed layers when it differs from `rope_theta` (Gemma 3); those
    /// layers then use no frequency scaling either.
    pub local_rope_theta: Option<f32>,
    /// Layers that apply no rotary embedding at all (SmolLM3).
    pub no_rope_layers: Vec<usize>,
    /// Rotated dimensions per head when not all of them are (Phi-3 partial rotary).
    pub rotary_dim: Option<usize>,
    /// Linear or LongRoPE scaling of the global layers.
    pub rope_scaling: Option<RopeScaling>,
}

/// Llama 3.x "llama3" rope frequency scaling (`rope_scaling` in HF config.json).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// Everything the forward pass needs to know about the shapes and numerics of a model.
///
/// Weights always use the Hugging Face layout: q/k projection rows are ordered for
/// "rotate half" (NeoX-style) rotary embeddings. Importers of GGUF llama files undo
/// llama.cpp's interleaving permutation so one runtime path serves every source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    #[serde(default)]
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Everything newer families do differently (all "as Llama" by default).
    #[serde(default)]
    pub features: FamilyFeatures,
    /// The block matrices were stored rotated: the runtime rotates their inputs the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoherence: Option<Incoherence>,
}

/// Incoherence processing: every block matrix `W` is stored as `W·Rᵀ`, with `R` the
/// randomized block Hadamard transform of its input's width
/// (`pocketlm_kernels::hadamard::BlockHadamard`), and the runtime multiplies it by `R·x`.
/// The embedding and the output layer are not rotated. Files with it set the header's
/// [`crate::ROTATED_INPUTS`] flag, so readers that predate it refuse them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoherence {
    /// Seed of the transforms' random signs.
    pub seed: u64,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The attention window of `layer`, if it is a sliding-window layer.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        let f = &self.features;
        let window = f.sliding_window?;
        match f.sliding_window_layers.get(layer) {
            Some(false) => None,
            Some(true) => Some(window),
            None if f.sliding_window_layers.is_empty() => Some(window),
            None => None,
        }
    }

    /// Whether `layer` applies rotary embeddings.
    pub fn layer_has_rope(&self, layer: usize) -> bool {
        !self.features.no_rope_layers.contains(&layer)
    }

    /// Dimensions of each head that rotate.
    pub fn rotary_dim(&self) -> usize {
        self.features.rotary_dim.unwrap_or(self.head_dim)
    }

    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in nonzero {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        // Caps far above any model this runtime targets; they keep shape products from
        // overflowing and bound allocations made from untrusted metadata.
        let caps = [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("num_layers", self.num_layers, 1 << 10),
            ("num_heads", self.num_heads, 1 << 10),
            ("head_dim", self.head_dim, 1 << 12),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 24,
            ),
        ];
        for (name, value, cap) in caps {
            if value > cap {
                return Err(ConfigError::TooLarge { name, value, cap });
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(ConfigError::HeadGroups {
                heads: self.num_heads,
                kv_heads: self.num_kv_heads,
            });
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ConfigError::OddHeadDim(self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(ConfigError::Number {
                name: "rms_norm_eps",
                requirement: "a finite non-negative number",
            });
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(ConfigError::Number {
                name: "rope_theta",
                requirement: "a finite positive number",
            });
        }
        self.validate_features()?;
        if let Some(r) = &self.rope_scaling {
            let positive = |x: f32| x.is_finite() && x > 0.0;
            if !(positive(r.factor) && positive(r.low_freq_factor) && positive(r.high_freq_factor))
            {
                return Err(ConfigError::RopeScaling(format!(
                    "factors must be finite and positive, got {r:?}"
                )));
            }
            if r.high_freq_factor <= r.low_freq_factor {
                return Err(ConfigError::RopeScaling(format!(
                    "high_freq_factor ({}) must exceed low_freq_factor ({})",
                    r.high_freq_factor, r.low_freq_factor
                )));
            }
            if r.original_max_position_embeddings == 0 {
                return Err(ConfigError::RopeScaling(
                    "original_max_position_embeddings must be positive".into(),
                ));
            }
        }
        Ok(())
    }

    fn validate_features(&self) -> Result<(), ConfigError> {
        let f = &self.features;
        let feature = |message: String| Err(ConfigError::Feature(message));
        let positive = |x: f32| x.is_finite() && x > 0.0;
        for (name, value) in [
            ("embedding_scale", f.embedding_scale),
            ("attention_scale", f.attention_scale),
            ("attn_logit_softcap", f.attn_logit_softcap),
            ("final_logit_softcap", f.final_logit_softcap),
            ("local_rope_theta", f.local_rope_theta),
        ] {
            if let Some(v) = value
                && !positive(v)
            {
                return feature(format!("{name} must be finite and positive, got {v}"));
            }
        }
        if f.sliding_window == Some(0) {
            return feature("sliding_window must be positive".into());
        }
        if !f.sliding_window_layers.is_empty() && f.sliding_window_layers.len() != self.num_layers {
            return feature(format!(
                "sliding_window_layers lists {} layers, the model has {}",
                f.sliding_window_layers.len(),
                self.num_layers
            ));
        }
        if let Some(&l) = f.no_rope_layers.iter().find(|&&l| l >= self.num_layers) {
            return feature(format!(
                "no_rope_layers names layer {l} of {}",
                self.num_layers
            ));
        }
        if let Some(r) = f.rotary_dim
            && (r == 0 || r > self.head_dim || !r.is_multiple_of(2))
        {
            return feature(format!(
                "rotary_dim {r} must be even and within head_dim {}",
                self.head_dim
            ));
        }
        match &f.rope_scaling {
            Some(RopeScaling::Linear { factor }) if !positive(*factor) => {
                return feature(format!("linear rope factor must be positive, got {factor}"));
            }
            Some(RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            }) => {
                let half = self.rotary_dim() / 2;
                if short_factor.len() != half || long_factor.len() != half {
                    return feature(format!(
                        "longrope factors have {} and {} entries, rotary_dim / 2 is {half}",
                        short_factor.len(),
                        long_factor.len()
                    ));
                }
                if !short_factor.iter().chain(long_factor).all(|&x| positive(x))
                    || !positive(*attention_factor)
                    || *original_max_position_embeddings == 0
                {
                    return feature("longrope factors must be finite and positive".into());
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Number of weights in the model (embedding counted once when tied).
    pub fn parameter_count(&self) -> u64 {
        let d = self.hidden_size as u64;
        let q = self.q_dim() as u64;
        let kv = self.kv_dim() as u64;
        let v = self.vocab_size as u64;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let hd = self.head_dim as u64;
        let qk_norm = if self.features.qk_norm { 2 * hd } else { 0 };
        let post_norms = if self.features.post_norms { 2 * d } else { 0 };
        let per_layer = 2 * d + self.block_matrix_weights() + bias + qk_norm + post_norms;
        let output = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + self.num_layers as u64 * per_layer + d + output
    }

    /// Weights of one block's dense linear layers: q, k, v, o, gate, up and down.
    pub fn block_matrix_weights(&self) -> u64 {
        let d = self.hidden_size as u64;
        let q = self.q_dim() as u64;
        let kv = self.kv_dim() as u64;
        let f = self.intermediate_size as u64;
        d * q + 2 * d * kv + q * d + 3 * d * f
    }

    /// Multiply-accumulate count ×2 per token for the weight matrices, plus attention at
    /// context position `context_len` (scores and weighted sum over cached keys/values).
    pub fn flops_per_token(&self, context_len: usize) -> u64 {
        let d = self.hidden_size as u64;
        let q = self.q_dim() as u64;
        let v = self.vocab_size as u64;
        let attention = 2 * q * context_len as u64;
        2 * (self.num_layers as u64 * (self.block_matrix_weights() + attention) + v * d)
    }
}

/// Tensor names inside a .plm file (the same names GGUF uses for Llama-family models).
pub mod names {
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    pub const OUTPUT_NORM: &str = "output_norm.weight";
    pub const OUTPUT: &str = "output.weight";

    pub fn attn_norm(layer: usize) -> String {
        format!("blk.{layer}.attn_norm.weight")
    }
    pub fn attn_q(layer: usize) -> String {
        format!("blk.{layer}.attn_q.weight")
    }
    pub fn attn_k(layer: usize) -> String {
        format!("blk.{layer}.attn_k.weight")
    }
    pub fn attn_v(layer: usize) -> String {
        format!("blk.{layer}.attn_v.weight")
    }
    pub fn attn_q_norm(layer: usize) -> String {
        format!("blk.{layer}.attn_q_norm.weight")
    }
    pub fn attn_k_norm(layer: usize) -> String {
        format!("blk.{layer}.attn_k_norm.weight")
    }
    pub fn post_attention_norm(layer: usize) -> String {
        format!("blk.{layer}.post_attention_norm.weight")
    }
    pub fn post_ffw_norm(layer: usize) -> String {
        format!("blk.{layer}.post_ffw_norm.weight")
    }
    pub fn attn_q_bias(layer: usize) -> String {
        format!("blk.{layer}.attn_q.bias")
    }
    pub fn attn_k_bias(layer: usize) -> String {
        format!("blk.{layer}.attn_k.bias")
    }
    pub fn attn_v_bias(layer: usize) -> String {
        format!("blk.{layer}.attn_v.bias")
    }
    pub fn attn_output(layer: usize) -> String {
        format!("blk.{layer}.attn_output.weight")
    }
    pub fn ffn_norm(layer: usize) -> String {
        format!("blk.{layer}.ffn_norm.weight")
    }
    pub fn ffn_gate(layer: usize) -> String {
        format!("blk.{layer}.ffn_gate.weight")
    }
    pub fn ffn_up(layer: usize) -> String {
        format!("blk.{layer}.ffn_up.weight")
    }
    pub fn ffn_down(layer: usize) -> String {
        format!("blk.{layer}.ffn_down.weight")
    }
    /// The first factor of a low-rank matrix `W ≈ U·V`: `V`, `rank × cols`.
    pub fn lowrank_v(matrix: &str) -> String {
        format!("{matrix}#v")
    }
    /// The second factor of a low-rank matrix: `U`, `rows × rank`.
    pub fn lowrank_u(matrix: &str) -> String {
        format!("{matrix}#u")
    }
    /// The stored residual of a quantized matrix (same shape): what quantizing it lost,
    /// quantized again. Elastic files read it at their larger operating points.
    pub fn residual(matrix: &str) -> String {
        format!("{matrix}#r")
    }
    /// Whether `name` is a stored residual: it corrects a matrix's weights, so parameter
    /// counts leave it out (its bytes still count).
    pub fn is_residual(name: &str) -> bool {
        name.ends_with("#r")
    }
}

/// A model configuration the runtime cannot run, and which field says so.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} must be positive")]
    Zero(&'static str),
    #[error("{name} = {value} exceeds the supported maximum {cap}")]
    TooLarge {
        name: &'static str,
        value: usize,
        cap: usize,
    },
    #[error("num_heads ({heads}) is not a multiple of num_kv_heads ({kv_heads})")]
    HeadGroups { heads: usize, kv_heads: usize },
    #[error("head_dim ({0}) must be even for rotary embeddings")]
    OddHeadDim(usize),
    #[error("{name} must be {requirement}")]
    Number {
        name: &'static str,
        requirement: &'static str,
    },
    #[error("rope_scaling {0}")]
    RopeScaling(String),
    #[error("family features: {0}")]
    Feature(String),
}

/// Every tensor the forward pass reads for `config`, with its row-major shape.
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let d = config.hidden_size;
    let (q, kv, f) = (config.q_dim(), config.kv_dim(), config.intermediate_size);
    let mut out = vec![(names::TOKEN_EMBD.to_string(), vec![config.vocab_size, d])];
    for l in 0..config.num_layers {
        out.push((names::attn_norm(l), vec![d]));
        out.push((names::attn_q(l), vec![q, d]));
        out.push((names::attn_k(l), vec![kv, d]));
        out.push((names::attn_v(l), vec![kv, d]));
        if config.attention_bias {
            out.push((names::attn_q_bias(l), vec![q]));
            out.push((names::attn_k_bias(l), vec![kv]));
            out.push((names::attn_v_bias(l), vec![kv]));
        }
        if config.features.qk_norm {
            out.push((names::attn_q_norm(l), vec![config.head_dim]));
            out.push((names::attn_k_norm(l), vec![config.head_dim]));
        }
        out.push((names::attn_output(l), vec![d, q]));
        if config.features.post_norms {
            out.push((names::post_attention_norm(l), vec![d]));
        }
        out.push((names::ffn_norm(l), vec![d]));
        out.push((names::ffn_gate(l), vec![f, d]));
        out.push((names::ffn_up(l), vec![f, d]));
        out.push((names::ffn_down(l), vec![d, f]));
        if config.features.post_norms {
            out.push((names::post_ffw_norm(l), vec![d]));
        }
    }
    out.push((names::OUTPUT_NORM.to_string(), vec![d]));
    if !config.tie_word_embeddings {
        out.push((names::OUTPUT.to_string(), vec![config.vocab_size, d]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn stories260k() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 172,
            num_layers: 5,
            num_heads: 8,
            num_kv_heads: 4,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 512,
            tie_word_embeddings: true,
            attention_bias: false,
            features: FamilyFeatures::default(),
            incoherence: None,
        }
    }

    /// Files written before the families existed have no `features`: they read as Llama.
    #[test]
    fn configs_without_family_features_still_load() {
        let mut json = serde_json::to_value(stories260k()).unwrap();
        json.as_object_mut().unwrap().remove("features");
        let c: ModelConfig = serde_json::from_value(json).unwrap();
        assert_eq!(c, stories260k());
        assert_eq!(c.layer_window(0), None);
        assert!(c.layer_has_rope(4));
    }

    #[test]
    fn parameter_count_matches_tensor_sizes() {
        let c = stories260k();
        // 512*64 embedding + 5 layers * (2*64 norms + 64*64 q + 2*64*32 kv + 64*64 o + 3*64*172 mlp) + 64
        let expected = 512 * 64 + 5 * (128 + 4096 + 4096 + 4096 + 3 * 64 * 172) + 64;
        assert_eq!(c.parameter_count(), expected as u64);
    }

    #[test]
    fn validate_rejects_bad_head_grouping() {
        let mut c = stories260k();
        assert!(c.validate().is_ok());
        c.num_kv_heads = 3;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("num_kv_heads")
        );
        c.num_kv_heads = 4;
        c.hidden_size = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("hidden_size")
        );
    }
}
