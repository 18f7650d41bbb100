//! Rotary position embeddings of every family: Llama 3 and linear frequency scaling,
//! Phi-3's LongRoPE and partial rotary, Gemma 3's separate base for local layers and
//! SmolLM3's layers without RoPE.

use pocketlm_format::config::{ModelConfig, RopeScaling};
use pocketlm_kernels as kernels;

use super::rope_inv_freq;

/// Rotary frequencies of a model, computed once at load and chosen per layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    /// Global (non-windowed, or every) layers; LongRoPE's short factors.
    global: Vec<f32>,
    /// LongRoPE's long factors, used when the KV cache reaches beyond `long_beyond`.
    long: Option<(Vec<f32>, usize)>,
    /// Windowed layers with a base of their own (Gemma 3).
    local: Option<Vec<f32>>,
    rotary_dim: usize,
    head_dim: usize,
    /// cos/sin multiplier (LongRoPE's attention factor).
    magnitude: f32,
}

/// The rotation one layer applies.
#[derive(Clone, Copy, Debug)]
pub struct LayerRope<'a> {
    inv_freq: &'a [f32],
    rotary_dim: usize,
    head_dim: usize,
    magnitude: f32,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Rope {
        let f = &config.features;
        let rotary_dim = config.rotary_dim();
        let plain = |theta: f32| -> Vec<f32> {
            (0..rotary_dim / 2)
                .map(|i| (theta as f64).powf(-((2 * i) as f64) / rotary_dim as f64) as f32)
                .collect()
        };
        let (global, long, magnitude) = match &f.rope_scaling {
            None if rotary_dim == config.head_dim => (rope_inv_freq(config), None, 1.0),
            None => (plain(config.rope_theta), None, 1.0),
            Some(RopeScaling::Linear { factor }) => (
                plain(config.rope_theta)
                    .into_iter()
                    .map(|x| x / factor)
                    .collect(),
                None,
                1.0,
            ),
            Some(RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            }) => {
                let base = plain(config.rope_theta);
                let divide = |factors: &[f32]| -> Vec<f32> {
                    base.iter().zip(factors).map(|(b, s)| b / s).collect()
                };
                (
                    divide(short_factor),
                    Some((divide(long_factor), *original_max_position_embeddings)),
                    *attention_factor,
                )
            }
        };
        Rope {
            global,
            long,
            local: f.local_rope_theta.map(plain),
            rotary_dim,
            head_dim: config.head_dim,
            magnitude,
        }
    }

    /// The rotation of `layer` when the KV cache holds up to `context` positions; `None`
    /// for a layer without RoPE.
    pub fn for_layer(
        &self,
        config: &ModelConfig,
        layer: usize,
        context: usize,
    ) -> Option<LayerRope<'_>> {
        if !config.layer_has_rope(layer) {
            return None;
        }
        let inv_freq = match (&self.local, &self.long) {
            (Some(local), _) if config.layer_window(layer).is_some() => local,
            // As llama.cpp: the long factors serve a context longer than the original one.
            (_, Some((long, beyond))) if context > *beyond => long,
            _ => &self.global,
        };
        Some(LayerRope {
            inv_freq,
            rotary_dim: self.rotary_dim,
            head_dim: self.head_dim,
            magnitude: self.magnitude,
        })
    }
}

impl LayerRope<'_> {
    /// Rotates every head of `x` (whole heads) for `position`.
    pub fn apply(&self, x: &mut [f32], position: usize) {
        if self.rotary_dim == self.head_dim && self.magnitude == 1.0 {
            kernels::rope_rotate_half(x, position, self.inv_freq);
            return;
        }
        let half = self.rotary_dim / 2;
        let m = self.magnitude;
        let (sin, cos): (Vec<f32>, Vec<f32>) = self
            .inv_freq
            .iter()
            .map(|f| {
                let (s, c) = (position as f32 * f).sin_cos();
                (s * m, c * m)
            })
            .unzip();
        for head in x.chunks_exact_mut(self.head_dim) {
            let (a, b) = head[..self.rotary_dim].split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * cos[i] - x1 * sin[i];
                b[i] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}
