//! Grouped-query causal attention over a per-layer KV cache.

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::kernels;

/// Keys and values of every layer for positions `0..len`, preallocated for `capacity`.
#[derive(Clone)]
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    kv_dim: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, kv_dim: usize, capacity: usize) -> KvCache {
        KvCache {
            keys: vec![vec![0.0; capacity * kv_dim]; num_layers],
            values: vec![vec![0.0; capacity * kv_dim]; num_layers],
            kv_dim,
            capacity,
            len: 0,
        }
    }

    /// Bytes a cache of this geometry needs (keys and values, all layers); `None` on overflow.
    pub fn required_bytes(num_layers: usize, kv_dim: usize, capacity: usize) -> Option<usize> {
        2usize
            .checked_mul(num_layers)?
            .checked_mul(kv_dim)?
            .checked_mul(capacity)?
            .checked_mul(std::mem::size_of::<f32>())
    }

    /// Like [`KvCache::new`], but reports allocation failure instead of aborting the process.
    pub fn try_new(
        num_layers: usize,
        kv_dim: usize,
        capacity: usize,
    ) -> Result<KvCache, std::collections::TryReserveError> {
        let per_layer = capacity.saturating_mul(kv_dim);
        let zeroed = || -> Result<Vec<f32>, std::collections::TryReserveError> {
            let mut v = Vec::new();
            v.try_reserve_exact(per_layer)?;
            v.resize(per_layer, 0.0);
            Ok(v)
        };
        let mut keys = Vec::new();
        let mut values = Vec::new();
        keys.try_reserve_exact(num_layers)?;
        values.try_reserve_exact(num_layers)?;
        for _ in 0..num_layers {
            keys.push(zeroed()?);
            values.push(zeroed()?);
        }
        Ok(KvCache {
            keys,
            values,
            kv_dim,
            capacity,
            len: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held by the cache (both keys and values, all layers).
    pub fn memory_bytes(&self) -> usize {
        2 * self.keys.len() * self.capacity * self.kv_dim * std::mem::size_of::<f32>()
    }

    /// Forgets positions `new_len..` (e.g. to reuse a shared prompt prefix).
    pub fn truncate(&mut self, new_len: usize) {
        self.len = self.len.min(new_len);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub(crate) fn write(&mut self, layer: usize, start: usize, k: &[f32], v: &[f32]) {
        let range = start * self.kv_dim..start * self.kv_dim + k.len();
        self.keys[layer][range.clone()].copy_from_slice(k);
        self.values[layer][range].copy_from_slice(v);
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// For each new token `t` (at position `start + t`) and head, attends over cached positions
/// `0..=start + t` of `layer`. `q` is `tokens × q_dim` (already rotated); `out` likewise.
pub(crate) fn attend(
    config: &ModelConfig,
    cache: &KvCache,
    layer: usize,
    start: usize,
    q: &[f32],
    out: &mut [f32],
) {
    let hd = config.head_dim;
    let group = config.num_heads / config.num_kv_heads;
    let kv_dim = config.kv_dim();
    let scale = 1.0 / (hd as f32).sqrt();
    let keys = &cache.keys[layer];
    let values = &cache.values[layer];
    let path = kernels::active_path();
    // One task per (token, head): independent rows of the output.
    out.par_chunks_mut(hd)
        .zip(q.par_chunks(hd))
        .enumerate()
        .for_each_init(Vec::new, |scores, (i, (o, qh))| {
            let t = i / config.num_heads;
            let head = i % config.num_heads;
            let kv_off = (head / group) * hd;
            let visible = start + t + 1;
            scores.clear();
            scores.extend((0..visible).map(|p| {
                let kp = &keys[p * kv_dim + kv_off..p * kv_dim + kv_off + hd];
                kernels::dot(path, qh, kp) * scale
            }));
            kernels::softmax(scores);
            o.fill(0.0);
            for (p, &w) in scores.iter().enumerate() {
                let vp = &values[p * kv_dim + kv_off..p * kv_dim + kv_off + hd];
                for (oj, vj) in o.iter_mut().zip(vp) {
                    *oj += w * vj;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;
    use crate::kernels::test_util::random_vec;

    #[test]
    fn attention_matches_naive_gqa() {
        let config = ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 8,
            hidden_size: 16,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 16,
            tie_word_embeddings: true,
            attention_bias: false,
        };
        let (hd, kvd, qd) = (4, 8, 16);
        let mut cache = KvCache::new(1, kvd, 16);
        // 3 cached positions, then 2 new tokens
        let k = random_vec(5 * kvd, 1);
        let v = random_vec(5 * kvd, 2);
        cache.write(0, 0, &k, &v);
        let q = random_vec(2 * qd, 3);
        let mut out = vec![0.0; 2 * qd];
        attend(&config, &cache, 0, 3, &q, &mut out);
        for t in 0..2 {
            for h in 0..4 {
                let kvh = h / 2;
                let qh = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
                let n = 3 + t + 1;
                let mut s: Vec<f32> = (0..n)
                    .map(|p| {
                        (0..hd)
                            .map(|j| qh[j] * k[p * kvd + kvh * hd + j])
                            .sum::<f32>()
                            / 2.0
                    })
                    .collect();
                let m = s.iter().copied().fold(f32::MIN, f32::max);
                let z: f32 = s
                    .iter_mut()
                    .map(|x| {
                        *x = (*x - m).exp();
                        *x
                    })
                    .sum();
                for j in 0..hd {
                    let want: f32 = (0..n).map(|p| s[p] / z * v[p * kvd + kvh * hd + j]).sum();
                    let got = out[t * qd + h * hd + j];
                    assert!((got - want).abs() < 1e-5, "t{t} h{h} j{j}: {got} vs {want}");
                }
            }
        }
    }
}
