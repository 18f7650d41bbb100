//! Evaluation: perplexity with llama.cpp's chunking, so figures are comparable, and the
//! speed benchmark.

pub mod bench;

use std::time::Instant;

use crate::model::{Logits, Model, ModelError};

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
        let mut batch = tokens[chunk * ctx..(chunk + 1) * ctx].to_vec();
        if let (true, Some(bos)) = (spec.add_bos, spec.bos_token_id) {
            batch[0] = bos;
        }
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

/// The token that logits at chunk position `pos` predict.
fn batch_target(tokens: &[u32], chunk: usize, ctx: usize, pos: usize) -> u32 {
    tokens[chunk * ctx + pos + 1]
}

/// `-log softmax(logits)[target]`, computed in f64 for a stable sum over large vocabularies.
pub fn negative_log_likelihood(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum: f64 = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln();
    max + log_sum - logits[target as usize] as f64
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
}
