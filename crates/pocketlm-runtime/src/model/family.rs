//! The numerics newer families add to the shared decoder: per-head and output RMSNorms,
//! GeGLU, soft-capping. Which of them a model uses is data in
//! [`pocketlm_format::config::FamilyFeatures`]; the forward pass in `block.rs` stays one.

use pocketlm_format::config::Activation;
use pocketlm_kernels as kernels;

/// RMSNorm of each `weight.len()`-wide row of `x` (per head for q/k norms), in place.
pub fn rms_norm_rows_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len() as f32;
    for row in x.chunks_exact_mut(weight.len()) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / dim;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        for (v, g) in row.iter_mut().zip(weight) {
            *v = *v * scale * g;
        }
    }
}

/// `gate = act(gate) * up` for the family's activation.
pub fn activation_mul(activation: Activation, gate: &mut [f32], up: &[f32]) {
    match activation {
        Activation::Silu => kernels::silu_mul(gate, up),
        Activation::GeluTanh => gelu_tanh_mul(gate, up),
    }
}

/// GeGLU with the tanh approximation of GELU (PyTorch's `gelu(approximate="tanh")`).
fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        let inner = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
        *g = 0.5 * x * (1.0 + inner.tanh()) * u;
    }
}

/// `cap · tanh(x / cap)` on every value (Gemma 2's final logits).
pub fn softcap_in_place(x: &mut [f32], cap: f32) {
    for v in x.iter_mut() {
        *v = cap * (*v / cap).tanh();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_tanh_matches_reference_points() {
        // torch.nn.functional.gelu(x, approximate="tanh") at -2, 0, 1, 3
        let mut g = [-2.0f32, 0.0, 1.0, 3.0];
        gelu_tanh_mul(&mut g, &[1.0; 4]);
        let want = [-0.045_402_3, 0.0, 0.841_192, 2.996_363_7];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn per_head_norm_normalizes_each_head() {
        let mut x = [3.0f32, 4.0, 0.5, 0.5];
        rms_norm_rows_in_place(&mut x, &[1.0, 2.0], 0.0);
        let r = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / r).abs() < 1e-6 && (x[1] - 8.0 / r).abs() < 1e-6);
        assert!((x[2] - 1.0).abs() < 1e-6 && (x[3] - 2.0).abs() < 1e-6);
    }
}
