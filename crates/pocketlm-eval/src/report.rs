//! One-page model report (`pocketlm eval report`): size and compression from the file's
//! tensor table, compute per token, the conversion recipe, and optionally quality
//! (perplexity, KL divergence against a base) and speed.

use std::fmt::Write as _;

use serde_json::Value;

use super::bench::{BenchOptions, BenchResult, bench};
use super::{EvalError, KldResult, PerplexityOptions, PerplexityResult, kl_divergence, perplexity};
use pocketlm_format::config::names;
use pocketlm_runtime::model::Model;

/// Size and compute figures of one model file.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelSummary {
    pub path: String,
    pub architecture: &'static str,
    /// Elements of every tensor the model uses, from the file's tensor table.
    pub parameters: u64,
    pub file_bytes: u64,
    /// Data bytes of those tensors (no padding, metadata or table).
    pub tensor_bytes: u64,
    /// `8 * tensor_bytes / parameters`.
    pub bits_per_weight: f64,
    /// Elements of the transformer blocks' 2-D matrices (no embedding, output or vectors).
    pub matrix_parameters: u64,
    pub matrix_bytes: u64,
    /// `8 * matrix_bytes / matrix_parameters`.
    pub matrix_bits_per_weight: f64,
    /// `16 / bits_per_weight`: size relative to storing every weight in f16.
    pub compression_vs_f16: f64,
    /// Context length the attention term of `flops_per_token` averages over (`context / 2`).
    pub flops_context: usize,
    /// See [`Model::flops_per_token`].
    pub flops_per_token: u64,
    /// The file metadata's `recipe` object (how it was converted).
    pub recipe: Option<Value>,
}

/// Sizes from the tensor table of `model`'s file and FLOPs at `context`.
pub fn summarize(model: &Model, context: usize) -> ModelSummary {
    let file = model.file();
    let config = model.config();
    let (mut parameters, mut tensor_bytes) = (0u64, 0u64);
    let (mut matrix_parameters, mut matrix_bytes) = (0u64, 0u64);
    for entry in model.used_tensors() {
        let elements = if names::is_residual(&entry.name) {
            0
        } else {
            entry.shape.iter().map(|&d| d as u64).product::<u64>()
        };
        parameters += elements;
        tensor_bytes += entry.length;
        if entry.shape.len() == 2 && entry.name != names::TOKEN_EMBD && entry.name != names::OUTPUT
        {
            matrix_parameters += elements;
            matrix_bytes += entry.length;
        }
    }
    let bpw = |bytes: u64, params: u64| {
        if params == 0 {
            0.0
        } else {
            8.0 * bytes as f64 / params as f64
        }
    };
    let bits_per_weight = bpw(tensor_bytes, parameters);
    ModelSummary {
        path: file.path().display().to_string(),
        architecture: config.architecture.name(),
        parameters,
        file_bytes: file.file_size(),
        tensor_bytes,
        bits_per_weight,
        matrix_parameters,
        matrix_bytes,
        matrix_bits_per_weight: bpw(matrix_bytes, matrix_parameters),
        compression_vs_f16: if bits_per_weight > 0.0 {
            16.0 / bits_per_weight
        } else {
            0.0
        },
        flops_context: context / 2,
        flops_per_token: model.flops_per_token(context / 2),
        recipe: file.metadata().get("recipe").cloned(),
    }
}

/// The model compared with its base file.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BaseComparison {
    pub path: String,
    pub file_bytes: u64,
    pub bits_per_weight: f64,
    /// `base file bytes / model file bytes`.
    pub compression_vs_base: f64,
}

#[derive(Clone, Debug, Default)]
pub struct ReportOptions {
    /// Chunking of the perplexity / KL divergence run, and the context of the FLOPs figure.
    pub perplexity: PerplexityOptions,
    /// Run the speed benchmark with these options.
    pub bench: Option<BenchOptions>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub model: ModelSummary,
    pub base: Option<BaseComparison>,
    /// Perplexity of the model on the text (with `text`).
    pub ppl: Option<f64>,
    /// Perplexity of the base over the same tokens (with `text` and `base`).
    pub ppl_base: Option<f64>,
    /// Mean KL(base || model) (with `text` and `base`).
    pub kld: Option<f64>,
    pub top1_agreement: Option<f64>,
    pub perplexity: Option<PerplexityResult>,
    pub kl_divergence: Option<KldResult>,
    pub bench: Option<BenchResult>,
}

/// Builds the report. With `text`: perplexity, or with `base` the KL divergence run (which
/// yields both perplexities). `progress(stage, done, total)` reports chunks of the quality run.
pub fn build_report(
    model: &Model,
    base: Option<&Model>,
    text: Option<&str>,
    options: &ReportOptions,
    mut progress: impl FnMut(&'static str, usize, usize),
) -> Result<Report, EvalError> {
    let summary = summarize(model, options.perplexity.context);
    let base_cmp = base.map(|b| {
        let s = summarize(b, options.perplexity.context);
        BaseComparison {
            compression_vs_base: s.file_bytes as f64 / summary.file_bytes.max(1) as f64,
            path: s.path,
            file_bytes: s.file_bytes,
            bits_per_weight: s.bits_per_weight,
        }
    });
    let mut report = Report {
        model: summary,
        base: base_cmp,
        ppl: None,
        ppl_base: None,
        kld: None,
        top1_agreement: None,
        perplexity: None,
        kl_divergence: None,
        bench: None,
    };
    match (text, base) {
        (Some(text), Some(base)) => {
            let r = kl_divergence(model, base, text, &options.perplexity, |d, t, _| {
                progress("kld", d, t)
            })?;
            report.ppl = Some(r.ppl);
            report.ppl_base = Some(r.ppl_base);
            report.kld = Some(r.kld);
            report.top1_agreement = Some(r.top1_agreement);
            report.kl_divergence = Some(r);
        }
        (Some(text), None) => {
            let r = perplexity(model, text, &options.perplexity, |d, t, _| {
                progress("ppl", d, t)
            })?;
            report.ppl = Some(r.ppl);
            report.perplexity = Some(r);
        }
        (None, _) => {}
    }
    if let Some(bench_options) = &options.bench {
        report.bench = Some(bench(model, bench_options)?);
    }
    Ok(report)
}

impl Report {
    /// The report as an aligned two-column table.
    pub fn render_table(&self) -> String {
        let m = &self.model;
        let mut rows: Vec<(String, String)> = vec![
            ("model".into(), m.path.clone()),
            ("architecture".into(), m.architecture.into()),
            (
                "parameters".into(),
                format!("{} ({:.2} M)", m.parameters, m.parameters as f64 / 1e6),
            ),
            (
                "file size".into(),
                format!(
                    "{} bytes ({:.2} MB)",
                    m.file_bytes,
                    m.file_bytes as f64 / 1e6
                ),
            ),
            (
                "bits per weight".into(),
                format!(
                    "{:.3} (all tensors), {:.3} (block matrices)",
                    m.bits_per_weight, m.matrix_bits_per_weight
                ),
            ),
            (
                "compression vs f16".into(),
                format!("{:.2}x", m.compression_vs_f16),
            ),
        ];
        if let Some(b) = &self.base {
            rows.push((
                "compression vs base".into(),
                format!(
                    "{:.2}x ({}: {:.2} MB, {:.3} bits/weight)",
                    b.compression_vs_base,
                    b.path,
                    b.file_bytes as f64 / 1e6,
                    b.bits_per_weight
                ),
            ));
        }
        rows.push((
            "FLOPs per token".into(),
            format!(
                "{:.3} G (attention at context {})",
                m.flops_per_token as f64 / 1e9,
                m.flops_context
            ),
        ));
        rows.push((
            "recipe".into(),
            m.recipe
                .as_ref()
                .map_or("(none)".to_string(), |r| r.to_string()),
        ));
        if let Some(p) = &self.perplexity {
            rows.push((
                "perplexity".into(),
                format!(
                    "{:.4} ± {:.4} ({} chunks of {}, {} tokens)",
                    p.ppl,
                    p.ppl * p.nll_stderr,
                    p.chunks,
                    p.context,
                    p.tokens_scored
                ),
            ));
        }
        if let Some(k) = &self.kl_divergence {
            rows.push((
                "perplexity".into(),
                format!(
                    "{:.4} (base {:.4}, ratio {:.4}, delta {:+.4}; {} chunks of {}, {} tokens)",
                    k.ppl,
                    k.ppl_base,
                    k.ppl_ratio,
                    k.ppl_delta,
                    k.chunks,
                    k.context,
                    k.tokens_scored
                ),
            ));
            rows.push((
                "KL divergence".into(),
                format!(
                    "{:.6} ± {:.6} (median {:.6}, p99 {:.6}, max {:.6})",
                    k.kld, k.kld_stderr, k.kld_median, k.kld_p99, k.kld_max
                ),
            ));
            rows.push((
                "top-1 agreement".into(),
                format!(
                    "{:.2}% ± {:.2}%",
                    k.top1_agreement * 100.0,
                    k.top1_agreement_stderr * 100.0
                ),
            ));
        }
        if let Some(b) = &self.bench {
            rows.push((
                "prefill".into(),
                format!(
                    "{:.1} tok/s (pp{}, {} threads, {} kernels)",
                    b.prefill_tokens_per_s, b.prompt_tokens, b.threads, b.kernel_path
                ),
            ));
            rows.push((
                "decode".into(),
                format!(
                    "{:.1} tok/s (tg{})",
                    b.decode_tokens_per_s, b.generated_tokens
                ),
            ));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "{k:<width$}  {v}");
        }
        out
    }
}
