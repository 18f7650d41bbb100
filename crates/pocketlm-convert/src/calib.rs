//! Calibration: runs the model block by block on calibration text and collects what the
//! calibrated methods need about each linear layer's inputs (second moments `XᵀX`, mean
//! magnitudes per channel, a small sample of rows). Memory stays bounded by one block's
//! weights plus the calibration activations (`samples × seq_len × hidden` floats).

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use pocketlm_format::config::ModelConfig;
use pocketlm_runtime::tokenizer::Tokenizer;

use crate::ConvertError;
use crate::import::ImportedModel;
use pocketlm_runtime::model::{
    BlockScratch, BlockWeights, KvCache, LinearInput, Rope, block_forward,
};

/// Calibration text and how to cut it.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// Shared, so per-block copies of the options do not copy the text.
    pub text: std::sync::Arc<str>,
    /// Where the text came from (a path), for the recipe in the file's metadata.
    pub source: String,
    /// Number of sequences.
    pub samples: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
}

impl Calibration {
    pub const DEFAULT_SAMPLES: usize = 64;
    pub const DEFAULT_SEQ_LEN: usize = 256;
}

/// Cuts `tokens` into up to `samples` windows of `seq_len` tokens, spread evenly over the
/// text (so a long file contributes from everywhere, not just its start). Each window starts
/// with `bos` when the model expects it. Fewer windows when the text is short.
pub fn windows(tokens: &[u32], samples: usize, seq_len: usize, bos: Option<u32>) -> Vec<Vec<u32>> {
    let body = seq_len - usize::from(bos.is_some());
    if body == 0 || samples == 0 {
        return Vec::new();
    }
    let available = tokens.len() / body;
    let count = available.min(samples);
    (0..count)
        .map(|i| {
            // Evenly spaced non-overlapping windows: window i starts at slot i·available/count.
            let start = i * available / count * body;
            bos.into_iter()
                .chain(tokens[start..start + body].iter().copied())
                .collect()
        })
        .collect()
}

/// Rows of activations kept per input for the methods that search on real inputs (AWQ).
pub const SAMPLE_ROWS: usize = 256;

/// What one linear-layer input looked like over the calibration set.
#[derive(Clone, Debug)]
pub struct InputStats {
    pub width: usize,
    /// `Σ xxᵀ` over all calibration tokens, `width × width`, row-major.
    pub hessian: Vec<f64>,
    pub tokens: usize,
    /// Mean |x| per channel.
    pub mean_abs: Vec<f32>,
    /// Up to [`SAMPLE_ROWS`] rows of activations, evenly drawn from all tokens.
    pub sample: Vec<f32>,
}

impl InputStats {
    fn new(width: usize) -> InputStats {
        InputStats {
            width,
            hessian: vec![0.0; width * width],
            tokens: 0,
            mean_abs: vec![0.0; width],
            sample: Vec::new(),
        }
    }

    /// The statistics of the `tokens × width` activations `x`.
    pub fn from_activations(x: &[f32], width: usize) -> InputStats {
        let mut stats = InputStats::new(width);
        stats.add(x, 1, 0);
        stats
    }

    /// Statistics known only through their second moments `XᵀX` (`width × width`) over
    /// `tokens` (the input of a low-rank layer's second factor): mean |x| is estimated as the
    /// root mean square, and no rows are sampled.
    pub fn from_second_moments(width: usize, hessian: Vec<f64>, tokens: usize) -> InputStats {
        let n = tokens.max(1) as f64;
        let mean_abs = (0..width)
            .map(|i| (hessian[i * width + i] / n).max(0.0).sqrt() as f32)
            .collect();
        InputStats {
            width,
            hessian,
            tokens,
            mean_abs,
            sample: Vec::new(),
        }
    }

    /// Mean square of each channel (`diag(XᵀX) / tokens`).
    pub fn mean_square(&self) -> Vec<f32> {
        let n = self.tokens.max(1) as f64;
        (0..self.width)
            .map(|i| (self.hessian[i * self.width + i] / n) as f32)
            .collect()
    }

    fn add(&mut self, x: &[f32], sample_stride: usize, first_token: usize) {
        let w = self.width;
        let n = x.len() / w;
        let xm = MatRef::from_row_major_slice(x, n, w);
        let mut gram = Mat::<f32>::zeros(w, w);
        matmul(
            gram.as_mut(),
            Accum::Replace,
            xm.transpose(),
            xm,
            1.0f32,
            Par::rayon(0),
        );
        for i in 0..w {
            for j in 0..w {
                self.hessian[i * w + j] += gram[(i, j)] as f64;
            }
        }
        let total = (self.tokens + n) as f32;
        let keep_old = self.tokens as f32 / total;
        for (c, m) in self.mean_abs.iter_mut().enumerate() {
            let s: f32 = (0..n).map(|t| x[t * w + c].abs()).sum();
            *m = *m * keep_old + s / total;
        }
        for t in 0..n {
            if (first_token + t).is_multiple_of(sample_stride)
                && self.sample.len() < SAMPLE_ROWS * w
            {
                self.sample.extend_from_slice(&x[t * w..(t + 1) * w]);
            }
        }
        self.tokens += n;
    }
}

/// Statistics of the four linear-layer inputs of one block.
#[derive(Clone, Debug)]
pub struct LayerStats {
    pub attention: InputStats,
    pub attention_output: InputStats,
    pub mlp: InputStats,
    pub mlp_down: InputStats,
}

impl LayerStats {
    pub fn input(&self, which: LinearInput) -> &InputStats {
        match which {
            LinearInput::Attention => &self.attention,
            LinearInput::AttentionOutput => &self.attention_output,
            LinearInput::Mlp => &self.mlp,
            LinearInput::MlpDown => &self.mlp_down,
        }
    }

    fn input_mut(&mut self, which: LinearInput) -> &mut InputStats {
        match which {
            LinearInput::Attention => &mut self.attention,
            LinearInput::AttentionOutput => &mut self.attention_output,
            LinearInput::Mlp => &mut self.mlp,
            LinearInput::MlpDown => &mut self.mlp_down,
        }
    }
}

/// The calibration activations (residual stream entering the next block) and the machinery
/// to push them through one block at a time.
pub struct Calibrator {
    config: ModelConfig,
    inv_freq: Rope,
    seq_len: usize,
    /// `sequences × seq_len × hidden`.
    hidden: Vec<f32>,
}

impl Calibrator {
    /// Embeds `windows` (all of length `seq_len`) as rows of `embedding` (`vocab × hidden`).
    pub fn new(config: &ModelConfig, windows: &[Vec<u32>], embedding: &[f32]) -> Calibrator {
        let d = config.hidden_size;
        let seq_len = windows.first().map_or(0, Vec::len);
        let mut hidden = vec![0.0f32; windows.len() * seq_len * d];
        for (row, &token) in hidden.chunks_exact_mut(d).zip(windows.iter().flatten()) {
            row.copy_from_slice(&embedding[token as usize * d..][..d]);
        }
        // As the runtime embeds (Gemma scales its embeddings by √hidden).
        if let Some(scale) = config.features.embedding_scale {
            hidden.iter_mut().for_each(|v| *v *= scale);
        }
        Calibrator {
            config: config.clone(),
            inv_freq: Rope::new(config),
            seq_len,
            hidden,
        }
    }

    /// Starts from given residual-stream activations (`sequences × seq_len × hidden`).
    pub fn from_hidden(config: &ModelConfig, seq_len: usize, hidden: Vec<f32>) -> Calibrator {
        Calibrator {
            config: config.clone(),
            inv_freq: Rope::new(config),
            seq_len,
            hidden,
        }
    }

    /// Runs later blocks with `config`'s shapes (structured pruning narrows a block's MLP);
    /// the residual stream, and so the hidden size, stays.
    pub fn set_config(&mut self, config: &ModelConfig) {
        assert_eq!(config.hidden_size, self.config.hidden_size, "hidden size");
        self.config = config.clone();
    }

    /// The current activations, `tokens × hidden`.
    pub fn hidden(&self) -> &[f32] {
        &self.hidden
    }

    /// The current activations, taken out (no copy).
    pub fn into_hidden(self) -> Vec<f32> {
        self.hidden
    }

    /// Tokens per calibration sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn tokens(&self) -> usize {
        self.hidden.len() / self.config.hidden_size
    }

    fn sequences(&self) -> usize {
        self.tokens() / self.seq_len.max(1)
    }

    /// Runs block `weights` on every sequence and returns the statistics of its linear
    /// layers' inputs; the activations are left unchanged.
    pub fn observe(&self, weights: &BlockWeights<'_>) -> LayerStats {
        let c = &self.config;
        let mut stats = LayerStats {
            attention: InputStats::new(c.hidden_size),
            attention_output: InputStats::new(c.q_dim()),
            mlp: InputStats::new(c.hidden_size),
            mlp_down: InputStats::new(c.intermediate_size),
        };
        let stride = (self.tokens() / SAMPLE_ROWS).max(1);
        let span = self.seq_len * c.hidden_size;
        let mut cache = KvCache::new(1, c.kv_dim(), self.seq_len);
        let mut scratch = BlockScratch::new(c, self.seq_len);
        let mut x = vec![0.0f32; span];
        for s in 0..self.sequences() {
            x.copy_from_slice(&self.hidden[s * span..(s + 1) * span]);
            let first_token = s * self.seq_len;
            let mut observer = |which: LinearInput, a: &[f32]| {
                stats.input_mut(which).add(a, stride, first_token);
            };
            block_forward(
                c,
                &self.inv_freq,
                weights,
                &mut x,
                &mut cache,
                0,
                0,
                &mut scratch,
                Some(&mut observer),
            );
        }
        stats
    }

    /// Replaces the activations with the output of block `weights` (the compressed block, so
    /// later blocks calibrate on what the compressed model will feed them).
    pub fn advance(&mut self, weights: &BlockWeights<'_>) {
        let c = &self.config;
        let span = self.seq_len * c.hidden_size;
        let (inv_freq, seq_len) = (&self.inv_freq, self.seq_len);
        // Sequences are independent; much of a block's forward pass (attention, norms,
        // activations) is serial within one, so they run side by side.
        self.hidden.par_chunks_exact_mut(span.max(1)).for_each_init(
            || {
                (
                    KvCache::new(1, c.kv_dim(), seq_len),
                    BlockScratch::new(c, seq_len),
                )
            },
            |(cache, scratch), x| {
                cache.clear();
                block_forward(c, inv_freq, weights, x, cache, 0, 0, scratch, None);
            },
        );
    }
}

/// Tokenizes the calibration text with the model's own tokenizer and cuts it into windows.
pub(crate) fn calibration_windows(
    model: &ImportedModel,
    c: &Calibration,
) -> Result<Vec<Vec<u32>>, ConvertError> {
    windows_of(model, c, &calibration_tokens(model, c)?, c.samples)
}

/// The calibration text as the model's tokens.
pub(crate) fn calibration_tokens(
    model: &ImportedModel,
    c: &Calibration,
) -> Result<Vec<u32>, ConvertError> {
    let tokenizer = Tokenizer::from_spec(&model.tokenizer)
        .map_err(|e| ConvertError::Calibration(format!("tokenizer: {e}")))?;
    tokenizer
        .encode(&c.text, false)
        .map_err(|e| ConvertError::Calibration(format!("{}: {e}", c.source)))
}

/// `samples` sequences of `c.seq_len` cut from `tokens` (the tokens of `c`'s text).
pub(crate) fn windows_of(
    model: &ImportedModel,
    c: &Calibration,
    tokens: &[u32],
    samples: usize,
) -> Result<Vec<Vec<u32>>, ConvertError> {
    let bos = model
        .tokenizer
        .bos_token_id
        .filter(|_| model.tokenizer.add_bos);
    let windows = windows(tokens, samples, c.seq_len, bos);
    if windows.is_empty() {
        return Err(ConvertError::Calibration(format!(
            "{}: {} tokens, not enough for one sequence of {}",
            c.source,
            tokens.len(),
            c.seq_len
        )));
    }
    if windows.len() < samples {
        log::warn!(
            "calibration: {} has {} tokens, enough for {} of the {} sequences asked for",
            c.source,
            tokens.len(),
            windows.len(),
            samples
        );
    }
    Ok(windows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_spread_and_start_with_bos() {
        let tokens: Vec<u32> = (100..200).collect();
        let w = windows(&tokens, 3, 11, Some(1));
        assert_eq!(w.len(), 3);
        assert!(w.iter().all(|s| s.len() == 11 && s[0] == 1));
        // 10 slots of 10 tokens, 3 windows → slots 0, 3, 6
        assert_eq!(w[0][1], 100);
        assert_eq!(w[1][1], 130);
        assert_eq!(w[2][1], 160);
        // short text: as many as fit
        assert_eq!(windows(&tokens, 50, 20, None).len(), 5);
        assert!(windows(&tokens[..5], 4, 20, None).is_empty());
    }

    #[test]
    fn input_stats_accumulate_second_moments() {
        let mut s = InputStats::new(2);
        s.add(&[1.0, 2.0, -3.0, 0.5], 1, 0);
        s.add(&[2.0, 0.0], 1, 2);
        assert_eq!(s.tokens, 3);
        assert_eq!(s.hessian, vec![14.0, 0.5, 0.5, 4.25]);
        assert!((s.mean_abs[0] - 2.0).abs() < 1e-6 && (s.mean_abs[1] - 2.5 / 3.0).abs() < 1e-6);
        assert_eq!(s.mean_square(), vec![14.0 / 3.0, 4.25 / 3.0]);
        assert_eq!(s.sample.len(), 6);
    }
}
