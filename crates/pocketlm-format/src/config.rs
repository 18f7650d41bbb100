//! Model hyper-parameters shared by importers, the .plm metadata and the runtime.

use serde::{Deserialize, Serialize};

/// Decoder families the runtime implements. They differ only in details the forward pass
/// reads from [`ModelConfig`] (biases, tying, rope scaling), so one code path serves all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3, SmolLM, TinyLlama, and other `LlamaForCausalLM` checkpoints.
    Llama,
    /// Qwen2 / Qwen2.5: Llama layout plus biases on the q/k/v projections.
    Qwen2,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
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
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
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

    /// Number of weights in the model (embedding counted once when tied).
    pub fn parameter_count(&self) -> u64 {
        let d = self.hidden_size as u64;
        let q = self.q_dim() as u64;
        let kv = self.kv_dim() as u64;
        let v = self.vocab_size as u64;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let per_layer = 2 * d + self.block_matrix_weights() + bias;
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
        out.push((names::attn_output(l), vec![d, q]));
        out.push((names::ffn_norm(l), vec![d]));
        out.push((names::ffn_gate(l), vec![f, d]));
        out.push((names::ffn_up(l), vec![f, d]));
        out.push((names::ffn_down(l), vec![d, f]));
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
        }
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
