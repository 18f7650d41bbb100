//! KL divergence of a (compressed) model's next-token distributions from a base model's, as
//! llama.cpp's `llama-perplexity --kl-divergence` reports it: same chunking as
//! [`perplexity`](super::perplexity), per scored position `KL(p_base || p_model)`, whether
//! the two argmax tokens agree, and both perplexities over the same tokens.

use std::time::Instant;

use rayon::prelude::*;

use super::{
    EvalError, PerplexityOptions, batch_target, chunk_batch, log_sum_exp, mean_and_stderr,
    percentile, proportion_stderr,
};
use pocketlm_runtime::model::{Logits, Model};
use pocketlm_runtime::sampler::argmax;

#[derive(Clone, Debug, serde::Serialize)]
pub struct KldResult {
    /// Mean `KL(p_base || p_model)` over scored positions, in nats.
    pub kld: f64,
    /// Standard error of the mean KLD.
    pub kld_stderr: f64,
    pub kld_median: f64,
    pub kld_p99: f64,
    pub kld_max: f64,
    /// Fraction of positions where the model's most likely token is the base's.
    pub top1_agreement: f64,
    pub top1_agreement_stderr: f64,
    /// Perplexity of the model (the one being evaluated).
    pub ppl: f64,
    /// Perplexity of the base over the same tokens.
    pub ppl_base: f64,
    /// `ppl / ppl_base`.
    pub ppl_ratio: f64,
    /// `ppl - ppl_base`.
    pub ppl_delta: f64,
    /// `ln(ppl / ppl_base)`: the mean per-token NLL difference (model - base).
    pub ln_ppl_ratio: f64,
    /// Standard error of `ln_ppl_ratio` (paired over positions).
    pub ln_ppl_ratio_stderr: f64,
    pub chunks: usize,
    pub context: usize,
    pub tokens_scored: usize,
    pub seconds: f64,
}

/// What one scored position contributes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenComparison {
    /// `KL(p_base || p_model)` in nats (clamped at 0 against rounding).
    pub kld: f64,
    /// `-log p_model(target)`.
    pub nll: f64,
    /// `-log p_base(target)`.
    pub nll_base: f64,
    /// Whether both logit rows have the same argmax.
    pub same_top1: bool,
}

/// Compares one position's logits: `KL(p_base || p_model) = Σ p_base (log p_base - log p_model)`
/// with both log-softmaxes computed in f64 from their maximum-shifted log-sum-exp.
pub fn compare_logits(base: &[f32], model: &[f32], target: u32) -> TokenComparison {
    debug_assert_eq!(base.len(), model.len());
    let lse_base = log_sum_exp(base);
    let lse_model = log_sum_exp(model);
    let kld: f64 = base
        .iter()
        .zip(model)
        .map(|(&b, &m)| {
            let log_pb = b as f64 - lse_base;
            let log_pm = m as f64 - lse_model;
            log_pb.exp() * (log_pb - log_pm)
        })
        .sum();
    let t = target as usize;
    TokenComparison {
        kld: kld.max(0.0),
        nll: lse_model - model[t] as f64,
        nll_base: lse_base - base[t] as f64,
        same_top1: argmax(base) == argmax(model),
    }
}

/// KL divergence of `model` from `base` on `text`, chunked as [`perplexity`](super::perplexity)
/// (llama.cpp style: `context`-token chunks, the first token replaced by BOS when the model
/// adds one, only the second half of each chunk scored). `progress(done, total, mean_kld)`
/// is called after each chunk.
///
/// Fails with [`EvalError::Incompatible`] when the vocabularies differ in size or the two
/// tokenizers turn `text` into different token ids.
pub fn kl_divergence(
    model: &Model,
    base: &Model,
    text: &str,
    options: &PerplexityOptions,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<KldResult, EvalError> {
    let ctx = options.context;
    if ctx < 2 {
        return Err(EvalError::Invalid(format!(
            "context must be at least 2 tokens, got {ctx}"
        )));
    }
    let vocab = model.config().vocab_size;
    if base.config().vocab_size != vocab {
        return Err(EvalError::Incompatible(format!(
            "vocabulary sizes differ: model {vocab}, base {}",
            base.config().vocab_size
        )));
    }
    let spec = model.tokenizer_spec();
    let tokens = model.tokenizer().encode(text, spec.add_bos)?;
    let base_spec = base.tokenizer_spec();
    let base_tokens = base.tokenizer().encode(text, base_spec.add_bos)?;
    if tokens != base_tokens || spec.bos_token_id != base_spec.bos_token_id {
        let at = tokens
            .iter()
            .zip(&base_tokens)
            .position(|(a, b)| a != b)
            .unwrap_or(tokens.len().min(base_tokens.len()));
        return Err(EvalError::Incompatible(format!(
            "the tokenizers differ: the text is {} tokens for the model and {} for the base, \
             first difference at token {at} (BOS {:?} vs {:?})",
            tokens.len(),
            base_tokens.len(),
            spec.bos_token_id,
            base_spec.bos_token_id
        )));
    }
    let available = tokens.len() / ctx;
    if available == 0 {
        return Err(EvalError::TextTooShort {
            tokens: tokens.len(),
            context: ctx,
        });
    }
    let chunks = options.max_chunks.map_or(available, |m| m.min(available));
    let first = ctx / 2;
    let scored = ctx - 1 - first;
    let started = Instant::now();
    let mut cache = model.new_cache(ctx)?;
    let mut base_cache = base.new_cache(ctx)?;
    let capacity = cache.capacity().min(base_cache.capacity());
    if capacity < ctx {
        return Err(pocketlm_runtime::model::ModelError::ContextFull {
            needed: ctx,
            capacity,
        }
        .into());
    }
    let mut stats = Vec::with_capacity(chunks * scored);
    let mut kld_sum = 0.0;
    for chunk in 0..chunks {
        let batch = chunk_batch(&tokens, chunk, ctx, spec.add_bos, spec.bos_token_id);
        cache.clear();
        base_cache.clear();
        let base_logits = base.forward(&batch, &mut base_cache, Logits::LastN(ctx - first))?;
        let logits = model.forward(&batch, &mut cache, Logits::LastN(ctx - first))?;
        let rows: Vec<TokenComparison> = (0..scored)
            .into_par_iter()
            .map(|j| {
                let range = j * vocab..(j + 1) * vocab;
                let target = batch_target(&tokens, chunk, ctx, first + j);
                compare_logits(&base_logits[range.clone()], &logits[range], target)
            })
            .collect();
        kld_sum += rows.iter().map(|r| r.kld).sum::<f64>();
        stats.extend(rows);
        progress(chunk + 1, chunks, kld_sum / stats.len() as f64);
    }
    Ok(summarize(
        &stats,
        chunks,
        ctx,
        started.elapsed().as_secs_f64(),
    ))
}

/// Aggregates per-position comparisons into a [`KldResult`].
pub fn summarize(
    stats: &[TokenComparison],
    chunks: usize,
    context: usize,
    seconds: f64,
) -> KldResult {
    let n = stats.len();
    let mut klds: Vec<f64> = stats.iter().map(|s| s.kld).collect();
    let (kld, kld_stderr) = mean_and_stderr(&klds);
    klds.sort_by(f64::total_cmp);
    let diffs: Vec<f64> = stats.iter().map(|s| s.nll - s.nll_base).collect();
    let (ln_ppl_ratio, ln_ppl_ratio_stderr) = mean_and_stderr(&diffs);
    let mean = |f: fn(&TokenComparison) -> f64| stats.iter().map(f).sum::<f64>() / n.max(1) as f64;
    let ppl = mean(|s| s.nll).exp();
    let ppl_base = mean(|s| s.nll_base).exp();
    let top1 = mean(|s| if s.same_top1 { 1.0 } else { 0.0 });
    KldResult {
        kld,
        kld_stderr,
        kld_median: percentile(&klds, 0.5),
        kld_p99: percentile(&klds, 0.99),
        kld_max: klds.last().copied().unwrap_or(0.0),
        top1_agreement: top1,
        top1_agreement_stderr: proportion_stderr(top1, n),
        ppl,
        ppl_base,
        ppl_ratio: ppl / ppl_base,
        ppl_delta: ppl - ppl_base,
        ln_ppl_ratio,
        ln_ppl_ratio_stderr,
        chunks,
        context,
        tokens_scored: n,
        seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_logits_have_zero_divergence() {
        let row = [1.0f32, -2.0, 3.5, 0.25];
        let c = compare_logits(&row, &row, 2);
        assert_eq!(c.kld, 0.0);
        assert!(c.same_top1);
        assert_eq!(c.nll, c.nll_base);
    }

    #[test]
    fn divergence_matches_the_closed_form() {
        // p = softmax(ln[0.5, 0.25, 0.25]), q = softmax(ln[0.25, 0.5, 0.25])
        let p = [0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln()];
        let q = [0.25f32.ln(), 0.5f32.ln(), 0.25f32.ln()];
        let c = compare_logits(&p, &q, 0);
        let expected = 0.5 * (2.0f64).ln() + 0.25 * (0.5f64).ln();
        assert!((c.kld - expected).abs() < 1e-6, "{} vs {expected}", c.kld);
        assert!(!c.same_top1);
        assert!((c.nll - 4.0f64.ln()).abs() < 1e-6);
        assert!((c.nll_base - 2.0f64.ln()).abs() < 1e-6);
        // Shifting logits changes nothing; huge logits do not overflow.
        let shifted: Vec<f32> = q.iter().map(|x| x + 1000.0).collect();
        let c2 = compare_logits(&p, &shifted, 0);
        assert!((c2.kld - expected).abs() < 1e-4);
    }

    #[test]
    fn summary_statistics() {
        let stats: Vec<TokenComparison> = (0..4)
            .map(|i| TokenComparison {
                kld: i as f64,
                nll: 2.0,
                nll_base: 1.0,
                same_top1: i % 2 == 0,
            })
            .collect();
        let r = summarize(&stats, 1, 8, 0.0);
        assert_eq!(r.kld, 1.5);
        assert_eq!(r.kld_median, 1.5);
        assert_eq!(r.kld_max, 3.0);
        assert_eq!(r.top1_agreement, 0.5);
        assert!((r.ppl_ratio - 1f64.exp()).abs() < 1e-12);
        assert!((r.ln_ppl_ratio - 1.0).abs() < 1e-12);
        assert_eq!(r.ln_ppl_ratio_stderr, 0.0);
        assert_eq!(r.tokens_scored, 4);
    }
}
