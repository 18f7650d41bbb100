//! The compression planner (a file-size, bits-per-weight or speed [`Budget`]). For every block and
//! every candidate recipe it measures what the recipe stores and what it costs: the KL
//! divergence of the final logits from the uncompressed model's, on calibration text, with
//! only that block compressed. Then it picks one recipe per block so that the summed cost is
//! least within the budget (a multiple-choice knapsack, solved by dynamic programming over
//! bytes), converts with that plan, and measures the real file's KL on the same text.
//!
//! Summing per-block costs assumes their effects add up, which holds for small
//! perturbations; the verification says how far the whole file is from the prediction.

use std::path::Path;

mod block_recipe;

pub use block_recipe::{BlockRecipe, DEFAULT_CANDIDATES, MATRICES, RecipeError, parse_candidates};

use rayon::prelude::*;

use super::calib::{Calibration, Calibrator};
use super::{ConvertError, ConvertOptions, ConvertReport, Output, Progress, Sink};
use crate::block::LayerTensors;
use crate::calib::calibration_windows;
use crate::import::ImportedModel;
use crate::passes::{BlockStep, Passes};
use crate::refusal::{Calibrated, Refusal};
use pocketlm_eval::log_sum_exp;
use pocketlm_format::config::{ModelConfig, names};
use pocketlm_kernels::{self as kernels, MatRef, WeightData};
use pocketlm_runtime::model::{Logits, Model};

/// How large the file may be.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// The whole file, metadata included.
    FileBytes(u64),
    /// Tensor bytes × 8 over the original model's parameter count (as `inspect` reports).
    BitsPerWeight(f64),
    /// Decode speed (tokens per second). Decode reads every weight once per token and is
    /// bound by memory bandwidth (pocketlm's kernels reach 77–102% of it, BENCHMARKS.md), so
    /// the tensors may take at most `bandwidth / tokens_per_s` bytes.
    TokensPerSecond {
        tokens_per_s: f64,
        /// Read bandwidth of the device the file is for, bytes per second.
        bandwidth: f64,
    },
}

impl Budget {
    pub fn describe(self) -> String {
        match self {
            Budget::FileBytes(b) => format!("{:.2} MB file", b as f64 / 1e6),
            Budget::BitsPerWeight(b) => format!("{b} bits per weight"),
            Budget::TokensPerSecond {
                tokens_per_s,
                bandwidth,
            } => format!(
                "{tokens_per_s} tokens/s at {:.1} GB/s ({:.2} MB read per token)",
                bandwidth / 1e9,
                bandwidth / tokens_per_s / 1e6
            ),
        }
    }

    /// Decode tokens/s the bandwidth model predicts for `tensor_bytes` read per token
    /// (`None` unless this is a speed budget).
    pub fn predicted_tokens_per_s(self, tensor_bytes: u64) -> Option<f64> {
        match self {
            Budget::TokensPerSecond { bandwidth, .. } => {
                Some(bandwidth / tensor_bytes.max(1) as f64)
            }
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub budget: Budget,
    pub candidates: Vec<BlockRecipe>,
    /// Windows of the calibration text the costs are measured on (fewer than the
    /// quantizers use: each candidate of each block runs the rest of the model on them).
    pub samples: usize,
    pub seq_len: usize,
}

impl PlanOptions {
    pub const DEFAULT_SAMPLES: usize = 8;
    pub const DEFAULT_SEQ_LEN: usize = 128;
}

/// What each candidate stores and costs, block by block.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Sensitivities {
    pub candidates: Vec<String>,
    /// `bytes[block][candidate]`: the block's tensors (norms included), aligned as stored.
    pub bytes: Vec<Vec<u64>>,
    /// `kl[block][candidate]`: mean KL divergence (nats per token) of the final logits from
    /// the uncompressed model's with only this block compressed.
    pub kl: Vec<Vec<f64>>,
    /// Per candidate: the most matrices of one block it could not encode as asked (kept in
    /// f16, e.g. a group size that does not divide the rows), counted in its bytes and cost.
    #[serde(default)]
    pub fallbacks: Vec<usize>,
    /// Tensor bytes outside the blocks (embedding, output layer, final norm).
    pub fixed_bytes: u64,
    /// KL of the embedding and output layer in their encodings, blocks uncompressed.
    pub fixed_kl: f64,
    /// An estimate of the file's metadata (config, tokenizer, recipe, tensor table).
    pub metadata_bytes: u64,
    /// Parameters of the uncompressed model.
    pub parameters: u64,
    /// Calibration tokens the costs were measured on.
    pub tokens: usize,
}

/// The uncompressed model's log-probabilities on the planner's windows, kept to verify the
/// converted file.
pub struct Reference {
    windows: Vec<Vec<u32>>,
    /// `tokens × vocab`.
    log_probs: Vec<f32>,
    vocab: usize,
}

impl Reference {
    /// Mean KL divergence of `model` (the converted file) from the reference, in nats/token.
    pub fn kl_of(&self, model: &Model) -> Result<f64, ConvertError> {
        let mut total = 0.0;
        let mut tokens = 0usize;
        let mut rows = self.log_probs.chunks_exact(self.vocab);
        for window in &self.windows {
            let mut cache = model
                .new_cache(window.len())
                .map_err(|e| ConvertError::Calibration(format!("verification: {e}")))?;
            let logits = model
                .forward(window, &mut cache, Logits::All)
                .map_err(|e| ConvertError::Calibration(format!("verification: {e}")))?;
            for row in logits.chunks_exact(self.vocab) {
                let base = rows.next().ok_or_else(|| {
                    ConvertError::Calibration("verification: reference is shorter".into())
                })?;
                total += kl_from_log_probs(base, row);
                tokens += 1;
            }
        }
        Ok(total / tokens.max(1) as f64)
    }
}

/// The final RMSNorm and output layer: hidden states to logits.
struct Head<'a> {
    norm: &'a [f32],
    eps: f32,
    output: MatRef<'a>,
    hidden: usize,
    vocab: usize,
    /// Gemma 2's final-logit soft-cap, as the runtime applies it.
    softcap: Option<f32>,
}

/// Tokens turned into logits at once (bounds the `tokens × vocab` scratch).
const HEAD_CHUNK: usize = 64;

impl<'a> Head<'a> {
    fn new(config: &ModelConfig, norm: &'a [f32], output: &'a [f32]) -> Result<Self, ConvertError> {
        let (vocab, hidden) = (config.vocab_size, config.hidden_size);
        let output = MatRef::new(WeightData::F32(output), vocab, hidden)
            .ok_or(ConvertError::OutputLayer { vocab, hidden })?;
        Ok(Head {
            norm,
            softcap: config.features.final_logit_softcap,
            eps: config.rms_norm_eps,
            output,
            hidden,
            vocab,
        })
    }

    /// Calls `each(first_token, logits)` for chunks of the `tokens × hidden` states.
    fn for_each_chunk(&self, hidden: &[f32], mut each: impl FnMut(usize, &[f32])) {
        let mut normed = vec![0.0f32; HEAD_CHUNK * self.hidden];
        let mut logits = vec![0.0f32; HEAD_CHUNK * self.vocab];
        for (i, rows) in hidden.chunks(HEAD_CHUNK * self.hidden).enumerate() {
            let n = rows.len() / self.hidden;
            let normed = &mut normed[..rows.len()];
            kernels::rms_norm(rows, self.norm, self.eps, normed);
            let logits = &mut logits[..n * self.vocab];
            kernels::matmul(normed, n, self.output, logits);
            if let Some(cap) = self.softcap {
                logits.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
            }
            each(i * HEAD_CHUNK, logits);
        }
    }

    fn log_probs(&self, hidden: &[f32]) -> Vec<f32> {
        let tokens = hidden.len() / self.hidden;
        let mut out = vec![0.0f32; tokens * self.vocab];
        self.for_each_chunk(hidden, |first, logits| {
            out[first * self.vocab..][..logits.len()]
                .par_chunks_mut(self.vocab)
                .zip(logits.par_chunks(self.vocab))
                .for_each(|(dst, row)| {
                    let lse = log_sum_exp(row);
                    dst.iter_mut()
                        .zip(row)
                        .for_each(|(d, &l)| *d = (l as f64 - lse) as f32);
                });
        });
        out
    }

    /// Mean KL divergence from `base` log-probabilities of the logits of `hidden`.
    fn mean_kl(&self, hidden: &[f32], base: &[f32]) -> f64 {
        let tokens = hidden.len() / self.hidden;
        let mut total = 0.0;
        self.for_each_chunk(hidden, |first, logits| {
            total += logits
                .par_chunks(self.vocab)
                .zip(base[first * self.vocab..].par_chunks(self.vocab))
                .map(|(row, base)| kl_from_log_probs(base, row))
                .sum::<f64>();
        });
        total / tokens.max(1) as f64
    }
}

/// `KL(p_base ‖ p_model)` of one position, from the base's log-probabilities and the model's
/// logits.
fn kl_from_log_probs(base: &[f32], logits: &[f32]) -> f64 {
    let lse = log_sum_exp(logits);
    let kl: f64 = base
        .iter()
        .zip(logits)
        .map(|(&lb, &l)| {
            let lb = lb as f64;
            lb.exp() * (lb - (l as f64 - lse))
        })
        .sum();
    kl.max(0.0)
}

/// Measures every candidate on every block, or takes `known` costs from an earlier run of
/// the same candidates (then only the reference for the verification is computed).
/// `progress(done, total, what)`.
pub fn measure(
    model: &ImportedModel,
    options: &ConvertOptions,
    plan: &PlanOptions,
    known: Option<Sensitivities>,
    progress: Progress<'_>,
) -> Result<(Sensitivities, Reference), ConvertError> {
    let config = &model.config;
    if let Some(known) = &known {
        let candidates: Vec<String> = plan.candidates.iter().map(ToString::to_string).collect();
        if known.candidates != candidates || known.kl.len() != config.num_layers {
            return Err(Refusal::SavedCosts {
                saved_blocks: known.kl.len(),
                saved_candidates: known.candidates.join(","),
                blocks: config.num_layers,
                candidates: candidates.join(","),
            }
            .into());
        }
    }
    let calibration = options
        .calibration
        .as_ref()
        .ok_or(Refusal::NeedsCalibration {
            by: Calibrated::Planner,
        })?;
    if plan.candidates.is_empty() {
        return Err(Refusal::NoCandidates.into());
    }
    let per_candidate: Vec<ConvertOptions> = plan
        .candidates
        .iter()
        .map(|c| options.with_recipe(c))
        .collect();
    // Validating the options with the candidates as block recipes validates each candidate.
    let mut check = options.clone();
    check.blocks = plan.candidates.clone();
    check.validate()?;

    let windows = calibration_windows(
        model,
        &Calibration {
            samples: plan.samples,
            seq_len: plan.seq_len,
            ..calibration.clone()
        },
    )?;
    let seq_len = windows[0].len();
    let (d, layers, vocab) = (config.hidden_size, config.num_layers, config.vocab_size);
    let total = if known.is_some() {
        layers
    } else {
        2 * layers + layers * plan.candidates.len()
    };
    let mut done = 0;
    let mut step = |what: String, progress: &mut dyn FnMut(usize, usize, &str)| {
        done += 1;
        progress(done, total, &what);
    };

    let embedding = model.source.load_f32(names::TOKEN_EMBD)?;
    let untied_output = if config.tie_word_embeddings {
        None
    } else {
        Some(model.source.load_f32(names::OUTPUT)?)
    };
    let norm = model.source.load_f32(names::OUTPUT_NORM)?;
    let embedded = |windows: &[Vec<u32>], table: &[f32]| Calibrator::new(config, windows, table);
    let base_head = Head::new(
        config,
        &norm,
        untied_output.as_deref().unwrap_or(&embedding),
    )?;

    // The uncompressed model: every block's input (unless the costs are known), and the
    // reference log-probabilities.
    let mut inputs = Vec::with_capacity(layers);
    let mut state = embedded(&windows, &embedding);
    for l in 0..layers {
        let layer = LayerTensors::load(model.source.as_ref(), config, l)?;
        if known.is_none() {
            inputs.push(state.hidden().to_vec());
        }
        state.advance(&layer.block_weights(config));
        step(format!("reference: blk.{l}"), progress);
    }
    let reference_log_probs = base_head.log_probs(state.hidden());
    drop(state);
    if let Some(known) = known {
        let reference = Reference {
            windows,
            log_probs: reference_log_probs,
            vocab,
        };
        return Ok((known, reference));
    }

    // Everything outside the blocks, in the encodings the options give it.
    let mut quiet = |_: usize, _: usize, _: &str| {};
    let mut fixed = Output::new(Sink::Count { bytes: 0 }, options, 0, &mut quiet);
    let shape = [vocab, d];
    let stored_embedding =
        fixed.write_matrix(names::TOKEN_EMBD, &shape, embedding.clone(), None, false)?;
    let stored_output = match &untied_output {
        Some(o) => Some(fixed.write_matrix(names::OUTPUT, &shape, o.clone(), None, false)?),
        None => None,
    };
    fixed.write_vector(names::OUTPUT_NORM, &[d], norm.clone())?;
    let fixed_bytes = fixed.counted_bytes();
    drop(fixed);
    let mut state = embedded(&windows, &stored_embedding);
    for l in 0..layers {
        let layer = LayerTensors::load(model.source.as_ref(), config, l)?;
        state.advance(&layer.block_weights(config));
        step(format!("embedding cost: blk.{l}"), progress);
    }
    let fixed_kl = Head::new(
        config,
        &norm,
        stored_output.as_deref().unwrap_or(&stored_embedding),
    )?
    .mean_kl(state.hidden(), &reference_log_probs);
    drop((state, stored_embedding, stored_output));

    // The calibrated methods see what they will see in the conversion: its calibration
    // windows (not the planner's, which would make their cost an in-sample estimate),
    // entering each block from the uncompressed blocks before it.
    let needs_stats = per_candidate.iter().any(ConvertOptions::needs_calibration);
    let mut calibrator = match needs_stats {
        true => Some(embedded(
            &calibration_windows(model, calibration)?,
            &embedding,
        )),
        false => None,
    };

    // Each block with each candidate, the rest uncompressed.
    let mut bytes = vec![vec![0u64; plan.candidates.len()]; layers];
    let mut kl = vec![vec![0f64; plan.candidates.len()]; layers];
    let mut fallbacks = vec![0usize; plan.candidates.len()];
    for b in 0..layers {
        let input = std::mem::take(&mut inputs[b]);
        let layer = LayerTensors::load(model.source.as_ref(), config, b)?;
        let stats = calibrator
            .as_ref()
            .map(|c| c.observe(&layer.block_weights(config)));
        // Candidates run side by side: the block forward is mostly serial per sequence.
        let measured = per_candidate
            .par_iter()
            .map(
                |candidate_options| -> Result<(u64, usize, Calibrator), ConvertError> {
                    let mut compressed = layer.clone();
                    let mut quiet = |_: usize, _: usize, _: &str| {};
                    let mut out =
                        Output::new(Sink::Count { bytes: 0 }, candidate_options, 0, &mut quiet);
                    Passes::default().compress_block(BlockStep::new(
                        &mut out,
                        config,
                        &mut compressed,
                        stats.as_ref(),
                    ))?;
                    let mut state = Calibrator::from_hidden(config, seq_len, input.clone());
                    state.advance(&compressed.block_weights(config));
                    Ok((out.counted_bytes(), out.fallbacks.len(), state))
                },
            )
            .collect::<Result<Vec<_>, ConvertError>>()?;
        let mut states = Vec::with_capacity(measured.len());
        for (c, (size, fallback, state)) in measured.into_iter().enumerate() {
            bytes[b][c] = size;
            fallbacks[c] = fallbacks[c].max(fallback);
            states.push(state);
        }
        if let Some(c) = &mut calibrator {
            c.advance(&layer.block_weights(config));
        }
        for l in b + 1..layers {
            let later = LayerTensors::load(model.source.as_ref(), config, l)?;
            let weights = later.block_weights(config);
            states
                .par_iter_mut()
                .for_each(|state| state.advance(&weights));
        }
        for (c, state) in states.iter().enumerate() {
            kl[b][c] = base_head.mean_kl(state.hidden(), &reference_log_probs);
            log::info!(
                "plan: blk.{b} {}: {} bytes, KL {:.5}",
                plan.candidates[c],
                bytes[b][c],
                kl[b][c]
            );
            step(format!("blk.{b}: {}", plan.candidates[c]), progress);
        }
    }

    let tokens = windows.iter().map(Vec::len).sum();
    let sensitivities = Sensitivities {
        candidates: plan.candidates.iter().map(ToString::to_string).collect(),
        bytes,
        kl,
        fallbacks,
        fixed_bytes,
        fixed_kl,
        metadata_bytes: metadata_estimate(model),
        parameters: config.parameter_count(),
        tokens,
    };
    let reference = Reference {
        windows,
        log_probs: reference_log_probs,
        vocab,
    };
    Ok((sensitivities, reference))
}

/// Metadata stores the config and tokenizer as JSON, the recipe, and a table row per tensor.
fn metadata_estimate(model: &ImportedModel) -> u64 {
    let json_len = |v: serde_json::Result<Vec<u8>>| v.map_or(0, |v| v.len() as u64);
    let tensors = pocketlm_format::config::expected_tensors(&model.config).len() as u64;
    json_len(serde_json::to_vec(&model.config))
        + json_len(serde_json::to_vec(&model.tokenizer))
        + 64 * 1024
        + tensors * 256
}

/// One recipe per block, chosen.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    pub budget: String,
    /// Bytes the blocks may take.
    pub block_capacity: u64,
    /// Candidate index per block.
    pub choice: Vec<usize>,
    pub recipes: Vec<String>,
    /// Block bytes of the choice, plus the fixed tensors and the metadata estimate.
    pub predicted_file_bytes: u64,
    /// Tensor bytes × 8 over the uncompressed model's parameters.
    pub predicted_bits_per_weight: f64,
    /// Sum of the chosen blocks' costs plus the embedding's.
    pub predicted_kl: f64,
    /// For a speed budget: bandwidth over the tensor bytes read per token.
    pub predicted_tokens_per_s: Option<f64>,
}

/// Chooses the recipes for `budget`.
pub fn choose_plan(s: &Sensitivities, budget: Budget) -> Result<Plan, ConvertError> {
    let fixed = s.fixed_bytes;
    let capacity = match budget {
        Budget::FileBytes(b) => b.checked_sub(fixed + s.metadata_bytes),
        Budget::BitsPerWeight(bpw) => ((bpw * s.parameters as f64 / 8.0) as u64).checked_sub(fixed),
        Budget::TokensPerSecond {
            tokens_per_s,
            bandwidth,
        } => ((bandwidth / tokens_per_s) as u64).checked_sub(fixed),
    };
    let smallest: u64 = s
        .bytes
        .iter()
        .map(|b| b.iter().min().copied().unwrap_or(0))
        .sum();
    let too_small = || {
        let needed = smallest + fixed + s.metadata_bytes;
        ConvertError::from(Refusal::BudgetTooSmall {
            budget: budget.describe(),
            needed_bytes: needed,
            bits_per_weight: 8.0 * (smallest + fixed) as f64 / s.parameters as f64,
        })
    };
    let capacity = capacity.ok_or_else(too_small)?;
    let choice = choose(&s.bytes, &s.kl, capacity).ok_or_else(too_small)?;
    let block_bytes: u64 = choice.iter().enumerate().map(|(b, &c)| s.bytes[b][c]).sum();
    let block_kl: f64 = choice.iter().enumerate().map(|(b, &c)| s.kl[b][c]).sum();
    Ok(Plan {
        budget: budget.describe(),
        block_capacity: capacity,
        recipes: choice.iter().map(|&c| s.candidates[c].clone()).collect(),
        choice,
        predicted_file_bytes: block_bytes + fixed + s.metadata_bytes,
        predicted_bits_per_weight: 8.0 * (block_bytes + fixed) as f64 / s.parameters.max(1) as f64,
        predicted_kl: block_kl + s.fixed_kl,
        predicted_tokens_per_s: budget.predicted_tokens_per_s(block_bytes + fixed),
    })
}

/// Budget resolution of the knapsack: sizes are counted in units of capacity / STEPS bytes,
/// rounded up, so a choice never exceeds the capacity and loses at most `blocks` units.
const STEPS: u64 = 20_000;

/// Picks one item per group (`bytes[g][i]`, `cost[g][i]`) minimising the summed cost with the
/// summed bytes within `capacity`. `None` when even the smallest items do not fit.
pub fn choose(bytes: &[Vec<u64>], cost: &[Vec<f64>], capacity: u64) -> Option<Vec<usize>> {
    let unit = capacity.div_ceil(STEPS).max(1);
    let slots = (capacity / unit) as usize;
    let units = |b: u64| b.div_ceil(unit) as usize;
    // best[w]: least cost of the groups so far within w units.
    let mut best = vec![0.0f64; slots + 1];
    let mut picks: Vec<Vec<u16>> = Vec::with_capacity(bytes.len());
    for (sizes, costs) in bytes.iter().zip(cost) {
        let mut next = vec![f64::INFINITY; slots + 1];
        let mut pick = vec![u16::MAX; slots + 1];
        for (i, (&size, &c)) in sizes.iter().zip(costs).enumerate() {
            let u = units(size);
            for w in u..=slots {
                let total = best[w - u] + c;
                if total < next[w] {
                    next[w] = total;
                    pick[w] = i as u16;
                }
            }
        }
        best = next;
        picks.push(pick);
    }
    if !best[slots].is_finite() {
        return None;
    }
    let mut w = slots;
    let mut choice = vec![0; bytes.len()];
    for g in (0..bytes.len()).rev() {
        let i = picks[g][w] as usize;
        choice[g] = i;
        w -= units(bytes[g][i]);
    }
    Some(choice)
}

/// What a planned conversion did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PlanReport {
    pub sensitivities: Sensitivities,
    pub plan: Plan,
    pub file_bytes: u64,
    /// KL of the converted file from the uncompressed model on the planner's windows.
    pub measured_kl: f64,
    /// For a speed budget: decode tokens/s of the converted file on this machine
    /// (`pocketlm bench`'s decode, 32 tokens).
    pub measured_tokens_per_s: Option<f64>,
}

/// Measures (unless `known` costs are given), plans, converts with the plan and verifies the
/// file.
pub fn convert_with_plan(
    model: &ImportedModel,
    dst: &Path,
    options: &ConvertOptions,
    plan_options: &PlanOptions,
    known: Option<Sensitivities>,
    progress: Progress<'_>,
) -> Result<(PlanReport, ConvertReport), ConvertError> {
    let (sensitivities, reference) = measure(model, options, plan_options, known, progress)?;
    let plan = choose_plan(&sensitivities, plan_options.budget)?;
    let mut planned = options.clone();
    planned.blocks = plan
        .choice
        .iter()
        .map(|&c| plan_options.candidates[c])
        .collect();
    let report = super::convert(model, dst, &planned, progress)?;
    let converted = Model::open(dst)?;
    let measured_kl = reference.kl_of(&converted)?;
    let measured_tokens_per_s = match plan_options.budget {
        Budget::TokensPerSecond { .. } => {
            let options = pocketlm_eval::bench::BenchOptions {
                prompt_tokens: 16,
                generated_tokens: 32,
                repetitions: 3,
            };
            Some(pocketlm_eval::bench::bench(&converted, &options)?.decode_tokens_per_s)
        }
        _ => None,
    };
    Ok((
        PlanReport {
            sensitivities,
            plan,
            file_bytes: report.file_bytes,
            measured_kl,
            measured_tokens_per_s,
        },
        report,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute_force(bytes: &[Vec<u64>], cost: &[Vec<f64>], capacity: u64) -> Option<f64> {
        let mut best: Option<f64> = None;
        let mut index = vec![0usize; bytes.len()];
        loop {
            let size: u64 = index.iter().enumerate().map(|(g, &i)| bytes[g][i]).sum();
            if size <= capacity {
                let c: f64 = index.iter().enumerate().map(|(g, &i)| cost[g][i]).sum();
                best = Some(best.map_or(c, |b: f64| b.min(c)));
            }
            let mut g = 0;
            loop {
                if g == bytes.len() {
                    return best;
                }
                index[g] += 1;
                if index[g] < bytes[g].len() {
                    break;
                }
                index[g] = 0;
                g += 1;
            }
        }
    }

    #[test]
    fn knapsack_matches_brute_force() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for trial in 0..200 {
            let groups = 1 + (next() % 5) as usize;
            let items = 1 + (next() % 4) as usize;
            let bytes: Vec<Vec<u64>> = (0..groups)
                .map(|_| (0..items).map(|_| 1 + next() % 50).collect())
                .collect();
            let cost: Vec<Vec<f64>> = (0..groups)
                .map(|_| (0..items).map(|_| (next() % 1000) as f64 / 100.0).collect())
                .collect();
            let capacity = next() % (60 * groups as u64);
            let got = choose(&bytes, &cost, capacity);
            let want = brute_force(&bytes, &cost, capacity);
            match (got, want) {
                (None, None) => {}
                (Some(choice), Some(want)) => {
                    let size: u64 = choice.iter().enumerate().map(|(g, &i)| bytes[g][i]).sum();
                    let c: f64 = choice.iter().enumerate().map(|(g, &i)| cost[g][i]).sum();
                    assert!(size <= capacity, "trial {trial}: {size} > {capacity}");
                    assert!(
                        (c - want).abs() < 1e-9,
                        "trial {trial}: cost {c}, optimum {want}"
                    );
                }
                (got, want) => panic!("trial {trial}: {got:?} vs optimum {want:?}"),
            }
        }
    }

    #[test]
    fn large_budgets_stay_within_capacity() {
        // Sizes far above STEPS: rounding up must keep the sum within capacity (and costs at
        // most one unit, capacity / STEPS, per group: 24_040_000 leaves room for that).
        let bytes = vec![vec![3_000_001, 1_500_003, 800_007]; 30];
        let cost = vec![vec![0.001, 0.01, 0.1]; 30];
        for capacity in [24_040_000, 40_000_000, 60_000_000, 90_000_030] {
            let choice = choose(&bytes, &cost, capacity).unwrap();
            let size: u64 = choice.iter().map(|&i| bytes[0][i]).sum();
            assert!(size <= capacity);
            // Within one item's step of the best use of the budget: no 800k→1.5M upgrade fits.
            assert!(capacity - size < 3_000_001 - 800_007, "{capacity}: {size}");
        }
        assert!(choose(&bytes, &cost, 24_000_000).is_none());
    }

    #[test]
    fn kl_of_identical_distributions_is_zero_and_positive_otherwise() {
        let logits = [1.0f32, 2.0, -0.5, 0.25];
        let lse = log_sum_exp(&logits);
        let base: Vec<f32> = logits.iter().map(|&l| (l as f64 - lse) as f32).collect();
        assert!(kl_from_log_probs(&base, &logits) < 1e-6);
        let shifted = [1.0f32 + 7.0, 2.0 + 7.0, -0.5 + 7.0, 0.25 + 7.0];
        assert!(kl_from_log_probs(&base, &shifted) < 1e-6);
        let other = [2.0f32, 1.0, -0.5, 0.25];
        assert!(kl_from_log_probs(&base, &other) > 0.1);
    }
}
