//! Evaluation: perplexity and KL divergence against a base model with llama.cpp's chunking,
//! so figures are comparable; zero-shot multiple-choice accuracy scored as
//! lm-evaluation-harness does; a one-page model report; and the speed benchmark.

pub mod bench;
pub mod kld;
pub mod report;
pub mod sweep;
pub mod zeroshot;

use std::time::Instant;

use pocketlm_runtime::model::{Logits, Model, ModelError};
use pocketlm_runtime::tokenizer::TokenizerError;

pub use kld::{KldResult, kl_divergence};

/// Why an evaluation could not run (beyond [`ModelError`]s of the forward pass).
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The model and its base cannot be compared token by token.
    #[error("model and base are not comparable: {0}")]
    Incompatible(String),
    /// The text gives no complete chunk.
    #[error(
        "the text has {tokens} tokens, fewer than one chunk of {context} \
         (use a longer text or a smaller context)"
    )]
    TextTooShort { tokens: usize, context: usize },
    /// A malformed record in a data file; `line` counts from 1.
    #[error("{source_name}:{line}: {source}")]
    Data {
        source_name: String,
        line: usize,
        /// Boxed: records hold JSON values, which would make every `EvalError` large.
        #[source]
        source: Box<zeroshot::DataError>,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl From<TokenizerError> for EvalError {
    fn from(e: TokenizerError) -> Self {
        EvalError::Model(e.into())
    }
}

#[derive(Clone, Debug)]
pub struct PerplexityOptions {
    /// Tokens per chunk (llama.cpp `-c`).
    pub context: usize,
    /// Evaluate at most this many chunks (llama.cpp `--chunks`).
    pub max_chunks: Option<usize>,
}

impl Default for PerplexityOptions {
    fn default() -> Self {
        PerplexityOptions {
            context: 512,
            max_chunks: None,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PerplexityResult {
    pub ppl: f64,
    /// Mean negative log-likelihood (nats per token).
    pub nll: f64,
    /// Standard error of the mean NLL.
    pub nll_stderr: f64,
    pub chunks: usize,
    pub context: usize,
    pub tokens_scored: usize,
    pub seconds: f64,
}

/// Perplexity of `model` on `text`, computed as llama.cpp's `llama-perplexity` does: the
/// tokenized text is cut into `context`-token chunks (the first token of each replaced by BOS
/// when the model adds BOS); only the second half of each chunk is scored, so every scored
/// token sees at least `context / 2` tokens of history.
pub fn perplexity(
    model: &Model,
    text: &str,
    options: &PerplexityOptions,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<PerplexityResult, ModelError> {
    let ctx = options.context;
    if ctx < 2 {
        return Err(ModelError::ContextFull {
            needed: 2,
            capacity: ctx,
        });
    }
    let tokenizer = model.tokenizer();
    let spec = model.tokenizer_spec();
    let tokens = tokenizer.encode(text, spec.add_bos)?;
    let available = tokens.len() / ctx;
    let chunks = options.max_chunks.map_or(available, |m| m.min(available));
    let first = ctx / 2;
    let vocab = model.config().vocab_size;
    let started = Instant::now();
    let mut cache = model.new_cache(ctx)?;
    if cache.capacity() < ctx {
        return Err(ModelError::ContextFull {
            needed: ctx,
            capacity: cache.capacity(),
        });
    }
    let (mut sum, mut sum_sq, mut count) = (0.0f64, 0.0f64, 0usize);
    for chunk in 0..chunks {
        let batch = chunk_batch(&tokens, chunk, ctx, spec.add_bos, spec.bos_token_id);
        cache.clear();
        let scored = ctx - 1 - first;
        let logits = model.forward(&batch, &mut cache, Logits::LastN(ctx - first))?;
        for j in 0..scored {
            let row = &logits[j * vocab..(j + 1) * vocab];
            let nll = negative_log_likelihood(row, batch_target(&tokens, chunk, ctx, first + j));
            sum += nll;
            sum_sq += nll * nll;
            count += 1;
        }
        progress(chunk + 1, chunks, (sum / count as f64).exp());
    }
    if count == 0 {
        return Err(ModelError::ContextFull {
            needed: ctx,
            capacity: tokens.len(),
        });
    }
    let mean = sum / count as f64;
    let var = (sum_sq / count as f64 - mean * mean).max(0.0);
    Ok(PerplexityResult {
        ppl: mean.exp(),
        nll: mean,
        nll_stderr: (var / (count.max(2) - 1) as f64).sqrt(),
        chunks,
        context: ctx,
        tokens_scored: count,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Tokens of chunk `chunk`, its first replaced by BOS when the model adds one (llama.cpp).
fn chunk_batch(
    tokens: &[u32],
    chunk: usize,
    ctx: usize,
    add_bos: bool,
    bos: Option<u32>,
) -> Vec<u32> {
    let mut batch = tokens[chunk * ctx..(chunk + 1) * ctx].to_vec();
    if let (true, Some(bos)) = (add_bos, bos) {
        batch[0] = bos;
    }
    batch
}

/// The token that logits at chunk position `pos` predict.
fn batch_target(tokens: &[u32], chunk: usize, ctx: usize, pos: usize) -> u32 {
    tokens[chunk * ctx + pos + 1]
}

/// `-log softmax(logits)[target]`, computed in f64 for a stable sum over large vocabularies.
pub fn negative_log_likelihood(logits: &[f32], target: u32) -> f64 {
    log_sum_exp(logits) - logits[target as usize] as f64
}

/// `log Σ exp(logits)` in f64, shifted by the maximum so no term overflows.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln()
}

/// Linear-interpolated percentile (`q` in 0..=1) of ascending `sorted` values, as numpy's
/// default; 0 for an empty slice.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => {
            let rank = q.clamp(0.0, 1.0) * (n - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// Mean and standard error of the mean (sample standard deviation / sqrt(n)).
pub fn mean_and_stderr(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let ss: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
    (mean, (ss / (n - 1) as f64 / n as f64).sqrt())
}

/// Standard error of a proportion `p` over `n` trials, as lm-evaluation-harness reports it
/// (`sqrt(p (1 - p) / (n - 1))`, the sample standard error of 0/1 outcomes).
pub fn proportion_stderr(p: f64, n: usize) -> f64 {
    if n < 2 {
        0.0
    } else {
        (p * (1.0 - p) / (n - 1) as f64).max(0.0).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_of_uniform_logits_is_log_vocab() {
        let logits = vec![3.0f32; 100];
        assert!((negative_log_likelihood(&logits, 7) - (100f64).ln()).abs() < 1e-9);
        let peaked = [0.0f32, 50.0, 0.0];
        assert!(negative_log_likelihood(&peaked, 1) < 1e-9);
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.5);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 1.0), 4.0);
        assert!((percentile(&v, 0.99) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn standard_errors() {
        let (mean, se) = mean_and_stderr(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(mean, 2.5);
        // sample sd = sqrt(5/3); / sqrt(4)
        assert!((se - (5.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
        // 0/1 outcomes: the two formulas agree.
        let outcomes = [1.0, 0.0, 1.0, 1.0, 0.0];
        let (p, se) = mean_and_stderr(&outcomes);
        assert!((proportion_stderr(p, outcomes.len()) - se).abs() < 1e-12);
    }
}
