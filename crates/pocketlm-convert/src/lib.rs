//! The converter: checkpoint → .plm, one block at a time so memory stays bounded by one
//! block's weights (plus the calibration activations when a method needs them).
//! Compression passes (quantization, pruning, low rank) plug in here; [`import`] reads the
//! checkpoints (Hugging Face directories, GGUF files).

pub mod awq;
pub mod calib;
mod error;
pub mod gptq;
pub mod import;
pub mod lowrank;
mod options;
mod output;
pub mod plan;
pub mod prune;
pub mod quant;
pub mod recover;
pub mod sensitivity;

use std::path::Path;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::import::{ImportError, ImportedModel, TensorSource};
use pocketlm_format::config::{ModelConfig, names};
use pocketlm_format::recipe::{
    CalibrationRecipe, ChannelPruningRecipe, DistillationRecipe, GptqRecipe, HeadPruningRecipe,
    LowRankRecipe, PruneRecipe, Recipe, RecoverRecipe, ResidualRecipe, TensorNote,
};
use pocketlm_format::{Encoding, PlmError, PlmWriter};
use pocketlm_kernels::{Linear, MatRef, WeightData};
use pocketlm_runtime::model::{BlockWeights, FamilyNorms, LinearInput, expected_tensors};
use pocketlm_runtime::tokenizer::Tokenizer;

pub use calib::Calibration;
pub use error::*;
pub use gptq::GptqOptions;
pub use lowrank::{LowRank, LowRankMethod, RankAllocation, RankTarget};
pub use options::*;
pub use output::MASKED_MAX_SHARE;
use output::*;
pub use plan::BlockRecipe;
pub use prune::{PruneMethod, Sparsity, SparsitySchedule};
pub use quant::Clipping;
pub use recover::{BlockRecovery, Distillation, RecoverMode, Recovery};

/// What a conversion produced, for the CLI summary and tests.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub tensors: usize,
    /// Tensors stored in f16 instead of the requested encoding, with the reason.
    pub fallbacks: Vec<(String, String)>,
    pub parameters: u64,
    pub file_bytes: u64,
    /// Per block, what block-wise recovery did (empty without it).
    pub recovery: Vec<BlockRecovery>,
    /// What distillation did (`--recover kd`).
    pub distillation: Option<Distillation>,
}

/// Progress callback: (tensors done, tensors total, name of the tensor just written).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, &str);

pub fn convert_path(
    src: &Path,
    dst: &Path,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<ConvertReport, ConvertError> {
    let imported = import::open(src)?;
    convert(&imported, dst, options, progress)
}

pub fn convert(
    model: &ImportedModel,
    dst: &Path,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<ConvertReport, ConvertError> {
    options.validate()?;
    let config = &model.config;
    if options.recover.is_some() && !config.architecture.is_llama_like() {
        // Recovery trains on a forward pass of its own (candle), written for Llama/Qwen2.
        return Err(ConvertError::Options(format!(
            "recovery (--recover) supports llama and qwen2 only, not {}: its training forward \
             pass has none of the {} differences (norms, attention, RoPE)",
            config.architecture.name(),
            config.architecture.name()
        )));
    }
    let expected = expected_tensors(config);
    for t in model.source.tensors() {
        if !expected.iter().any(|(name, _)| *name == t.name) {
            log::warn!(
                "tensor {} is not used by the runtime; not converted",
                t.name
            );
        }
    }
    if !options.blocks.is_empty() && options.blocks.len() != config.num_layers {
        return Err(ConvertError::Options(format!(
            "{} block recipes given for a model of {} blocks",
            options.blocks.len(),
            config.num_layers
        )));
    }
    // The calibration text is tokenized once: distillation may cut other (more) sequences
    // from it than the quantizer calibrates on.
    let calibration_text = match &options.calibration {
        Some(c) if options.needs_calibration() => Some((c, calibration_tokens(model, c)?)),
        _ => None,
    };
    let calibration = match &calibration_text {
        Some((c, tokens)) => Some(windows_of(model, c, tokens, c.samples)?),
        None => None,
    };
    let distill_windows = match (&options.recover, &calibration_text) {
        (Some(r), Some((c, tokens))) if r.mode.distills() => match r.samples {
            Some(samples) if samples != c.samples => Some(windows_of(model, c, tokens, samples)?),
            _ => None,
        },
        _ => None,
    };
    let schedule = match (options.sparsity_schedule, options.pruning, &calibration) {
        (
            SparsitySchedule::Owl { spread, threshold },
            Some(Pruning {
                sparsity: Sparsity::Unstructured(target),
                ..
            }),
            Some(windows),
        ) => {
            let outlier_ratios = block_outlier_ratios(model, windows, threshold, progress)?;
            let sparsities = prune::owl_sparsities(&outlier_ratios, target, spread);
            log::info!(
                "OWL block sparsities: {}",
                sparsities
                    .iter()
                    .map(|s| format!("{:.1}%", s * 100.0))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            Some((outlier_ratios, sparsities))
        }
        _ => None,
    };
    let block_options: Vec<ConvertOptions> = (0..config.num_layers)
        .map(|l| {
            let mut block = options.for_block(l);
            if let (Some((_, sparsities)), Some(p)) = (&schedule, &mut block.pruning) {
                p.sparsity = Sparsity::Unstructured(sparsities[l]);
            }
            block
        })
        .collect();
    // The model as written: with structured pruning, a narrower MLP.
    let mut pruned_config = config.clone();
    if let Some(fraction) = options.attention_head_pruning {
        let kv_heads = pruned_kv_heads(config.num_kv_heads, fraction);
        pruned_config.num_heads = config.num_heads / config.num_kv_heads * kv_heads;
        pruned_config.num_kv_heads = kv_heads;
        log::info!(
            "attention heads: {} of {} key/value heads ({} of {} query heads) kept in every block",
            kv_heads,
            config.num_kv_heads,
            pruned_config.num_heads,
            config.num_heads
        );
    }
    if let Some(fraction) = options.mlp_channel_pruning {
        pruned_config.intermediate_size =
            pruned_mlp_width(config.intermediate_size, fraction, options.weights);
        log::info!(
            "MLP channels: {} of {} kept in every block",
            pruned_config.intermediate_size,
            config.intermediate_size
        );
    }
    let global_ranks = match &options.lowrank {
        Some(lr) if lr.allocation == RankAllocation::Global => Some(global_lowrank_ranks(
            model,
            calibration.as_deref(),
            lr,
            options,
            progress,
        )?),
        _ => None,
    };
    let mut out = Output::new(
        Sink::File(PlmWriter::create(dst)?),
        options,
        expected.len(),
        progress,
    );
    out.global_ranks = global_ranks;

    let embedding = model.source.load_f32(names::TOKEN_EMBD)?;
    let embd_shape = [config.vocab_size, config.hidden_size];
    // Recovery's teacher: the original model's activations, from the original embedding.
    // Block-wise recovery needs them on the calibration sequences; distillation on its own.
    let blockwise = options.recover.is_some_and(|r| r.mode.blockwise());
    let teacher_windows = match &distill_windows {
        Some(windows) if !blockwise => Some(windows),
        _ => calibration.as_ref(),
    };
    let mut teacher = match (&options.recover, teacher_windows) {
        (Some(_), Some(windows)) => Some(calib::Calibrator::new(config, windows, &embedding)),
        _ => None,
    };
    let mut distill_teacher = distill_windows
        .as_ref()
        .filter(|_| blockwise)
        .map(|windows| calib::Calibrator::new(config, windows, &embedding));
    let runtime_embedding =
        out.write_matrix(names::TOKEN_EMBD, &embd_shape, embedding, None, false)?;
    let mut calibrator = calibration
        .as_ref()
        .map(|windows| calib::Calibrator::new(config, windows, &runtime_embedding));
    // Distillation tunes the whole model at once: it starts from the embedded calibration
    // text, and every block's tensors are held back until it is done.
    let distilling = options.recover.is_some_and(|r| r.mode.distills());
    let student_inputs = match (&distill_windows, &calibrator) {
        (Some(windows), _) => {
            calib::Calibrator::new(config, windows, &runtime_embedding).into_hidden()
        }
        (None, Some(c)) if distilling => c.hidden().to_vec(),
        _ => Vec::new(),
    };
    let mut held_blocks: Vec<Vec<recover::BlockTensor>> = Vec::new();
    // The student's output layer, when tied.
    let student_embedding = (distilling && config.tie_word_embeddings).then_some(runtime_embedding);

    let mut recovered = Vec::new();
    for (l, block_options) in block_options.iter().enumerate() {
        let mut layer = LayerTensors::load(model.source.as_ref(), config, l)?;
        for teacher in teacher.iter_mut().chain(&mut distill_teacher) {
            teacher.advance(&layer.block_weights(config));
        }
        let mut stats = match &calibrator {
            Some(c) => {
                (out.progress)(out.done, out.total, &format!("blk.{l}: calibrating"));
                Some(c.observe(&layer.block_weights(config)))
            }
            None => None,
        };
        if let (Some(c), Some(observed)) = (&mut calibrator, &stats)
            && (pruned_config.intermediate_size != config.intermediate_size
                || pruned_config.num_kv_heads != config.num_kv_heads)
        {
            if pruned_config.num_kv_heads != config.num_kv_heads {
                (out.progress)(out.done, out.total, &format!("blk.{l}: pruning heads"));
                let loss = layer.prune_attention_heads(
                    config,
                    &observed.attention_output,
                    pruned_config.num_kv_heads,
                    options.gptq.damp,
                )?;
                out.head_pruning_loss += loss;
            }
            if pruned_config.intermediate_size != config.intermediate_size {
                (out.progress)(out.done, out.total, &format!("blk.{l}: pruning channels"));
                let loss = layer.prune_mlp_channels(
                    config,
                    &observed.mlp_down,
                    pruned_config.intermediate_size,
                    options.gptq.damp,
                )?;
                out.channel_pruning_loss += loss;
            }
            // What the narrower block's matrices see; the calibrator keeps the narrower
            // shapes through `advance` and takes the original ones back for the next block.
            c.set_config(&pruned_config);
            stats = Some(c.observe(&layer.block_weights(&pruned_config)));
        }
        let config = &pruned_config;
        out.options = block_options;
        match (&teacher, &calibrator, options.recover) {
            (Some(teacher), Some(student), Some(recovery)) => {
                out.deferred = Some(Vec::new());
                compress_block(&mut out, config, &mut layer, stats.as_ref())?;
                let mut tensors = out.deferred.take().unwrap_or_default();
                if recovery.mode.blockwise() {
                    let report = recover_block(
                        &mut out,
                        config,
                        l,
                        &mut tensors,
                        student,
                        teacher,
                        &recovery,
                    )?;
                    recovered.push(report);
                    layer.set_readback(&tensors);
                }
                if distilling {
                    held_blocks.push(tensors);
                } else {
                    for t in &tensors {
                        out.emit(t)?;
                    }
                }
            }
            _ => compress_block(&mut out, config, &mut layer, stats.as_ref())?,
        }
        if let Some(c) = &mut calibrator {
            c.advance(&layer.block_weights(config));
            c.set_config(&model.config);
        }
    }
    out.options = options;
    let norm = model.source.load_f32(names::OUTPUT_NORM)?;
    let mut distillation = None;
    match (options.recover, teacher, calibrator) {
        (Some(recovery), Some(teacher), Some(calibrator)) if distilling => {
            out.deferred = Some(Vec::new());
            out.write_vector(names::OUTPUT_NORM, &[config.hidden_size], norm.clone())?;
            let original_head = if config.tie_word_embeddings {
                model.source.load_f32(names::TOKEN_EMBD)?
            } else {
                model.source.load_f32(names::OUTPUT)?
            };
            let student_head = match student_embedding {
                Some(embedding) => embedding,
                None => out.write_matrix(
                    names::OUTPUT,
                    &embd_shape,
                    original_head.clone(),
                    None,
                    false,
                )?,
            };
            let mut tail = out.deferred.take().unwrap_or_default();
            let report = distill_model(
                &mut out,
                &pruned_config,
                DistillInputs {
                    blocks: &mut held_blocks,
                    output_norm: &mut tail[0],
                    student_head: &student_head,
                    student_inputs: &student_inputs,
                    seq_len: calibrator.seq_len(),
                    teacher_hidden: distill_teacher.as_ref().unwrap_or(&teacher).hidden(),
                    teacher_norm: &norm,
                    teacher_head: &original_head,
                },
                &recovery,
            )?;
            distillation = Some(report);
            for t in held_blocks.iter().flatten().chain(&tail) {
                out.emit(t)?;
            }
        }
        _ => {
            out.write_vector(names::OUTPUT_NORM, &[config.hidden_size], norm)?;
            if !config.tie_word_embeddings {
                let output = model.source.load_f32(names::OUTPUT)?;
                out.write_matrix(names::OUTPUT, &embd_shape, output, None, false)?;
            }
        }
    }

    let converted_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let notes = |pairs: &[(String, String)]| -> Vec<TensorNote> {
        pairs
            .iter()
            .map(|(tensor, reason)| TensorNote {
                tensor: tensor.clone(),
                reason: reason.clone(),
            })
            .collect()
    };
    let recipe = Recipe {
        weights: options.weights.describe(),
        embedding: options.encoding_for(names::TOKEN_EMBD, &[1, 1]).describe(),
        vectors: "f32".into(),
        method: if options.weights.is_quantized() {
            options.method.name()
        } else {
            "none"
        }
        .into(),
        clipping: match options.clipping() {
            Clipping::MinMax => "minmax",
            Clipping::Search => "search",
        }
        .into(),
        gptq: options.method.uses_gptq().then_some(GptqRecipe {
            damp: options.gptq.damp,
            block: options.gptq.block,
            act_order: options.gptq.act_order,
            loss: out.gptq_loss,
        }),
        calibration: options
            .calibration
            .as_ref()
            .filter(|_| options.needs_calibration())
            .map(|c| CalibrationRecipe {
                source: c.source.clone(),
                sequences: calibration.as_ref().map_or(0, Vec::len),
                seq_len: c.seq_len,
            }),
        prune: options.pruning.map(|p| PruneRecipe {
            method: p.method.name().into(),
            sparsity: p.sparsity.describe(),
            schedule: options.sparsity_schedule.describe(),
            block_sparsity: schedule.as_ref().map(|(_, s)| s.clone()),
            block_outlier_ratio: schedule.as_ref().map(|(r, _)| r.clone()),
            achieved: if out.prunable > 0 {
                out.pruned as f64 / out.prunable as f64
            } else {
                0.0
            },
            skipped: notes(&out.prune_skipped),
            sparse_tensors: out.sparse_tensors,
            dense_storage: notes(&out.dense_storage),
        }),
        residual: options.residual.map(|e| ResidualRecipe {
            encoding: e.to_string(),
            tensors: out.residuals,
        }),
        prune_heads: options
            .attention_head_pruning
            .map(|fraction| HeadPruningRecipe {
                fraction,
                kv_heads_before: config.num_kv_heads,
                kv_heads_after: pruned_config.num_kv_heads,
                heads_before: config.num_heads,
                heads_after: pruned_config.num_heads,
                loss: out.head_pruning_loss,
            }),
        prune_channels: options
            .mlp_channel_pruning
            .map(|fraction| ChannelPruningRecipe {
                fraction,
                intermediate_size_before: config.intermediate_size,
                intermediate_size_after: pruned_config.intermediate_size,
                loss: out.channel_pruning_loss,
            }),
        lowrank: options.lowrank.map(|lr| LowRankRecipe {
            method: lr.method.name().into(),
            target: lr.target.describe(),
            allocation: lr.allocation.name().into(),
            ranks: out.lowrank_ranks.iter().cloned().collect(),
            dense: out.lowrank_dense.clone(),
            weights_before: out.lowrank_before,
            weights_after: out.lowrank_after,
        }),
        recover: options.recover.map(|r| RecoverRecipe {
            mode: r.mode.name().into(),
            steps: r.steps,
            batch: r.batch,
            learning_rate: r.learning_rate,
            codes: r.codes,
            samples: r.samples,
            loss_before: recovered.iter().map(|b| b.loss_before).collect(),
            loss_after: recovered.iter().map(|b| b.loss_after).collect(),
            kept: recovered.iter().map(|b| b.kept).collect(),
            kd: distillation.map(|k| DistillationRecipe {
                kl_before: k.kl_before,
                kl_after: k.kl_after,
                train_kl_before: k.train_kl_before,
                train_kl_after: k.train_kl_after,
                held_out_sequences: k.held_out,
                train_scored_sequences: k.train_scored,
                kept: k.kept,
                best_step: k.best_step,
                parameters: k.parameters,
            }),
        }),
        blocks: (!options.blocks.is_empty())
            .then(|| options.blocks.iter().map(ToString::to_string).collect()),
        keep: options
            .keep
            .iter()
            .map(|k| format!("{}={}", k.pattern, k.encoding.describe()))
            .collect(),
        tensor_encodings: out.encodings.clone(),
        fallbacks: notes(&out.fallbacks),
    };
    let metadata = serde_json::json!({
        "format": "pocketlm",
        "config": pruned_config,
        "tokenizer": model.tokenizer,
        "recipe": recipe,
        "provenance": {
            "source": model.provenance,
            "converter": format!("pocketlm {}", env!("CARGO_PKG_VERSION")),
            "converted_at_unix": converted_at,
        },
    });
    let file_bytes = match out.writer {
        Sink::File(writer) => writer.finish(&metadata)?,
        Sink::Count { bytes } => bytes,
    };
    let (parameters, fallbacks) = (out.parameters, out.fallbacks);
    Ok(ConvertReport {
        tensors: out.done,
        fallbacks,
        parameters,
        file_bytes,
        recovery: recovered,
        distillation,
    })
}

/// OWL's outlier ratio of every block: the fraction of its block matrices' Wanda scores
/// above `threshold` × their mean, on the uncompressed model's calibration activations. Memory
/// stays at one block's weights and one matrix's scores.
fn block_outlier_ratios(
    model: &ImportedModel,
    windows: &[Vec<u32>],
    threshold: f32,
    progress: Progress<'_>,
) -> Result<Vec<f64>, ConvertError> {
    let config = &model.config;
    let mut calibrator = {
        let embedding = model.source.load_f32(names::TOKEN_EMBD)?;
        calib::Calibrator::new(config, windows, &embedding)
    };
    let layers = config.num_layers;
    let mut ratios = Vec::with_capacity(layers);
    for l in 0..layers {
        let layer = LayerTensors::load(model.source.as_ref(), config, l)?;
        let weights = layer.block_weights(config);
        let stats = calibrator.observe(&weights);
        let matrices: Vec<(&[f32], usize, Vec<f32>)> = layer
            .tensors
            .iter()
            .filter_map(|(name, shape, values)| {
                let input = LayerTensors::input_of(name, l)?;
                Some((
                    values.as_slice(),
                    shape[1],
                    stats.input(input).mean_square(),
                ))
            })
            .collect();
        // Two passes over the scores (the mean, then the outliers) rather than holding a
        // whole block's scores.
        let (mut sum, mut count) = (0.0f64, 0u64);
        for (values, cols, energy) in &matrices {
            let scores = prune::scores(values, *cols, Some(energy));
            sum += scores.iter().map(|&s| s as f64).sum::<f64>();
            count += scores.len() as u64;
        }
        let mean = sum / count.max(1) as f64;
        let outliers: u64 = matrices
            .iter()
            .map(|(values, cols, energy)| {
                prune::count_outliers(&prune::scores(values, *cols, Some(energy)), mean, threshold)
            })
            .sum();
        ratios.push(outliers as f64 / count.max(1) as f64);
        calibrator.advance(&weights);
        progress(l + 1, layers, &format!("outliers: blk.{l}"));
    }
    Ok(ratios)
}

/// Rank of every factorized block matrix by name (`None`: kept dense).
type GlobalRanks = std::collections::HashMap<String, Option<usize>>;

/// `--rank-alloc global`: decomposes every block matrix of the uncompressed model (on its
/// own calibration activations for the activation-aware methods) and shares one parameter
/// budget over all of them by singular-value energy weighted by the block's influence on the
/// residual stream. Memory stays at one block's weights and the spectra (one vector per
/// matrix).
fn global_lowrank_ranks(
    model: &ImportedModel,
    windows: Option<&[Vec<u32>]>,
    lr: &LowRank,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<GlobalRanks, ConvertError> {
    let config = &model.config;
    let mut calibrator = match windows {
        Some(windows) => {
            let embedding = model.source.load_f32(names::TOKEN_EMBD)?;
            Some(calib::Calibrator::new(config, windows, &embedding))
        }
        None => None,
    };
    let layers = config.num_layers;
    let mut names = Vec::new();
    let mut spectra = Vec::new();
    let mut step = 8;
    for l in 0..layers {
        let layer = LayerTensors::load(model.source.as_ref(), config, l)?;
        let weights = layer.block_weights(config);
        let stats = calibrator.as_ref().map(|c| c.observe(&weights));
        let (decompositions, block_step) = layer.decompose_matrices(lr, stats.as_ref(), options)?;
        step = step.max(block_step);
        // Block influence (1 − cos(h_in, h_out)): a block that barely turns the residual
        // stream matters less, so its matrices' energy shares count for less. Without
        // calibration (plain SVD) every block counts alike.
        let influence = match &mut calibrator {
            Some(c) => {
                let before = c.hidden().to_vec();
                c.advance(&weights);
                lowrank::block_influence(&before, c.hidden(), config.hidden_size)
            }
            None => 1.0,
        };
        log::info!("blk.{l}: block influence {influence:.4}");
        for (name, d) in decompositions {
            let values = d.energy_shares().iter().map(|e| e * influence).collect();
            spectra.push((d.rows, d.cols, values));
            names.push(name);
        }
        progress(l + 1, layers, &format!("spectra: blk.{l}"));
    }
    let ranks = lowrank::allocate(&spectra, lr.target, RankAllocation::Global, step);
    Ok(names.into_iter().zip(ranks).collect())
}

/// Compresses block `layer` as `out.options` say (AWQ scaling, low rank, pruning,
/// quantization), sends its tensors to `out.writer`, and leaves in `layer` the values the
/// runtime will read back (what later blocks are calibrated on).
fn compress_block(
    out: &mut Output<'_, '_>,
    config: &ModelConfig,
    layer: &mut LayerTensors,
    stats: Option<&calib::LayerStats>,
) -> Result<(), ConvertError> {
    let scales = match stats {
        Some(stats) if out.options.method.uses_awq() => {
            (out.progress)(
                out.done,
                out.total,
                &format!("blk.{}: awq scale search", layer.layer),
            );
            Some(layer.apply_awq(config, stats, out.options))
        }
        _ => None,
    };
    let mut plan = match &out.options.lowrank {
        Some(lr) => {
            (out.progress)(
                out.done,
                out.total,
                &format!("blk.{}: factorizing", layer.layer),
            );
            let (plan, dense) =
                layer.plan_lowrank(lr, stats, out.options, out.global_ranks.as_ref())?;
            out.lowrank_dense.extend(dense);
            plan
        }
        None => Default::default(),
    };
    for i in 0..layer.tensors.len() {
        let (name, shape) = (layer.tensors[i].0.clone(), layer.tensors[i].1.clone());
        let values = std::mem::take(&mut layer.tensors[i].2);
        let values = if shape.len() == 1 {
            out.write_vector(&name, &shape, values)?
        } else {
            let input = LayerTensors::input_of(&name, layer.layer);
            let evidence = match (stats, input) {
                (Some(stats), Some(input)) => Some(Evidence {
                    stats: stats.input(input),
                    scales: scales
                        .as_ref()
                        .and_then(|s| s.get(&input))
                        .map(Vec::as_slice),
                }),
                _ => None,
            };
            match plan.remove(&name) {
                Some((decomposition, rank)) => {
                    out.write_lowrank(&name, values, &decomposition, rank, evidence)?
                }
                None => {
                    let original = out.options.residual.map(|_| values.clone());
                    let stored = out.write_matrix(&name, &shape, values, evidence, true)?;
                    if let Some(original) = original {
                        out.write_residual(&name, &shape, original, &stored, evidence)?;
                    }
                    stored
                }
            }
        };
        layer.tensors[i].2 = values;
    }
    Ok(())
}

/// Block-wise reconstruction of block `layer` (its tensors held back in `tensors`): the
/// student runs on `student`'s activations, the target is `teacher`'s (already advanced
/// through the original block).
#[cfg(feature = "recover")]
fn recover_block(
    out: &mut Output<'_, '_>,
    config: &ModelConfig,
    layer: usize,
    tensors: &mut [recover::BlockTensor],
    student: &calib::Calibrator,
    teacher: &calib::Calibrator,
    recovery: &Recovery,
) -> Result<BlockRecovery, ConvertError> {
    let (done, total) = (out.done, out.total);
    let progress = &mut out.progress;
    let report = recover::recover_block(
        config,
        layer,
        tensors,
        recover::Activations {
            inputs: student.hidden(),
            targets: teacher.hidden(),
            seq_len: student.seq_len(),
        },
        recovery,
        &mut |step, loss| {
            progress(
                done,
                total,
                &format!(
                    "blk.{layer}: recovering {step}/{} loss {loss:.3e}",
                    recovery.steps
                ),
            )
        },
    )?;
    log::info!(
        "blk.{layer}: recovery {:.4e} -> {:.4e} ({}; {} parameters)",
        report.loss_before,
        report.loss_after,
        recovery_outcome(report.kept),
        report.parameters
    );
    Ok(report)
}

#[cfg(not(feature = "recover"))]
fn recover_block(
    _: &mut Output<'_, '_>,
    _: &ModelConfig,
    _: usize,
    _: &mut [recover::BlockTensor],
    _: &calib::Calibrator,
    _: &calib::Calibrator,
    recovery: &Recovery,
) -> Result<BlockRecovery, ConvertError> {
    Err(ConvertError::Options(
        recovery
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default(),
    ))
}

/// How the log says whether recovery's tuned values were kept.
#[cfg(feature = "recover")]
fn recovery_outcome(kept: bool) -> &'static str {
    if kept {
        "kept"
    } else {
        "not better, left as compressed"
    }
}

/// What distillation works on: the student's held-back tensors and inputs, and the
/// teacher's final activations and output layer.
#[cfg_attr(not(feature = "recover"), allow(dead_code))]
struct DistillInputs<'a> {
    blocks: &'a mut [Vec<recover::BlockTensor>],
    output_norm: &'a mut recover::BlockTensor,
    student_head: &'a [f32],
    student_inputs: &'a [f32],
    seq_len: usize,
    teacher_hidden: &'a [f32],
    teacher_norm: &'a [f32],
    teacher_head: &'a [f32],
}

/// Logit distillation of the whole compressed model (`--recover kd`).
#[cfg(feature = "recover")]
fn distill_model(
    out: &mut Output<'_, '_>,
    config: &ModelConfig,
    inputs: DistillInputs<'_>,
    recovery: &Recovery,
) -> Result<Distillation, ConvertError> {
    use recover::distill;
    let (done, total) = (out.done, out.total);
    let progress = &mut out.progress;
    progress(done, total, "kd: teacher logits");
    let teacher = distill::TeacherLogits::from_hidden(
        config,
        inputs.teacher_hidden,
        inputs.teacher_norm,
        inputs.teacher_head,
        distill::TOP_K,
    );
    let report = distill::distill(
        config,
        distill::Student {
            blocks: inputs.blocks,
            output_norm: inputs.output_norm,
            head: inputs.student_head,
            inputs: inputs.student_inputs,
            seq_len: inputs.seq_len,
        },
        &teacher,
        recovery,
        &mut |step, loss| {
            if step % 8 == 0 || step == recovery.steps {
                log::info!("kd: step {step}/{} KL {loss:.4}", recovery.steps);
            }
            progress(
                done,
                total,
                &format!("kd: step {step}/{} KL {loss:.4}", recovery.steps),
            )
        },
    )?;
    log::info!(
        "kd: held-out KL {:.4} -> {:.4} (step {}), training KL {:.4} -> {:.4} ({}; {} parameters)",
        report.kl_before,
        report.kl_after,
        report.best_step,
        report.train_kl_before,
        report.train_kl_after,
        recovery_outcome(report.kept),
        report.parameters
    );
    Ok(report)
}

#[cfg(not(feature = "recover"))]
fn distill_model(
    _: &mut Output<'_, '_>,
    _: &ModelConfig,
    _: DistillInputs<'_>,
    recovery: &Recovery,
) -> Result<Distillation, ConvertError> {
    Err(ConvertError::Options(
        recovery
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default(),
    ))
}

/// Tokenizes the calibration text with the model's own tokenizer and cuts it into windows.
fn calibration_windows(
    model: &ImportedModel,
    c: &Calibration,
) -> Result<Vec<Vec<u32>>, ConvertError> {
    windows_of(model, c, &calibration_tokens(model, c)?, c.samples)
}

/// The calibration text as the model's tokens.
fn calibration_tokens(model: &ImportedModel, c: &Calibration) -> Result<Vec<u32>, ConvertError> {
    let tokenizer = Tokenizer::from_spec(&model.tokenizer)
        .map_err(|e| ConvertError::Calibration(format!("tokenizer: {e}")))?;
    tokenizer
        .encode(&c.text, false)
        .map_err(|e| ConvertError::Calibration(format!("{}: {e}", c.source)))
}

/// `samples` sequences of `c.seq_len` cut from `tokens` (the tokens of `c`'s text).
fn windows_of(
    model: &ImportedModel,
    c: &Calibration,
    tokens: &[u32],
    samples: usize,
) -> Result<Vec<Vec<u32>>, ConvertError> {
    let bos = model
        .tokenizer
        .bos_token_id
        .filter(|_| model.tokenizer.add_bos);
    let windows = calib::windows(tokens, samples, c.seq_len, bos);
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

/// `XᵀX` of the inputs after AWQ divided channel `j` by `s[j]`: `S⁻¹ H S⁻¹`.
fn scaled_hessian(stats: &calib::InputStats, scales: Option<&[f32]>) -> Vec<f64> {
    let Some(s) = scales else {
        return stats.hessian.clone();
    };
    let n = stats.width;
    let mut h = stats.hessian.clone();
    for i in 0..n {
        for j in 0..n {
            h[i * n + j] /= s[i] as f64 * s[j] as f64;
        }
    }
    h
}

/// Matrices of one block to factorize: decomposition and rank, by tensor name.
type LowRankPlan = std::collections::HashMap<String, (lowrank::Decomposition, usize)>;

/// An input shared by some matrices `(name, rows)`, and the tensors that produce it.
type AwqGroup = (LinearInput, Vec<(String, usize)>, Vec<String>);

/// The MLP width left after removing `fraction` of `width` channels: whole quantization
/// groups (at least 32 channels, the kernels' unit), at least one group, at most `width`.
fn pruned_mlp_width(width: usize, fraction: f32, weights: Encoding) -> usize {
    let unit = weights.group().map_or(32, |g| (g as usize).max(32));
    let kept = (width as f64 * (1.0 - fraction as f64) / unit as f64).round() as usize * unit;
    kept.clamp(unit.min(width), width)
}

/// Key/value heads left after removing `fraction` of `heads`: at least one.
fn pruned_kv_heads(heads: usize, fraction: f32) -> usize {
    ((heads as f64 * (1.0 - fraction as f64)).round() as usize).clamp(1, heads)
}

/// Hidden size, q width, kv width and MLP width: the shapes of a block's matrices.
fn block_dims(config: &ModelConfig) -> (usize, usize, usize, usize) {
    (
        config.hidden_size,
        config.q_dim(),
        config.kv_dim(),
        config.intermediate_size,
    )
}

/// One block's tensors in f32, in the order the file stores them.
#[derive(Clone)]
struct LayerTensors {
    layer: usize,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl LayerTensors {
    fn load(
        source: &dyn TensorSource,
        config: &ModelConfig,
        layer: usize,
    ) -> Result<LayerTensors, ConvertError> {
        let prefix = format!("blk.{layer}.");
        let tensors = expected_tensors(config)
            .into_iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .map(|(name, shape)| {
                let values = source.load_f32(&name)?;
                Ok((name, shape, values))
            })
            .collect::<Result<Vec<_>, ConvertError>>()?;
        Ok(LayerTensors { layer, tensors })
    }

    /// Puts in place the values the runtime will read back from `tensors` (this block's,
    /// as written); a factorized matrix becomes the product of its factors.
    fn set_readback(&mut self, tensors: &[recover::BlockTensor]) {
        let readback: std::collections::HashMap<&str, (&recover::BlockTensor, Vec<f32>)> = tensors
            .iter()
            .map(|t| (t.name.as_str(), (t, t.readback())))
            .collect();
        for (name, _, values) in &mut self.tensors {
            if let Some((_, v)) = readback.get(name.as_str()) {
                values.clone_from(v);
            } else if let (Some((vt, v)), Some((ut, u))) = (
                readback.get(names::lowrank_v(name).as_str()),
                readback.get(names::lowrank_u(name).as_str()),
            ) {
                let (rank, cols, rows) = (vt.shape[0], vt.shape[1], ut.shape[0]);
                *values = lowrank::multiply(u, v, rows, rank, cols);
            }
        }
    }

    fn get(&self, name: &str) -> &[f32] {
        self.tensors
            .iter()
            .find(|t| t.0 == name)
            .map_or(&[][..], |t| &t.2[..])
    }

    fn get_mut(&mut self, name: &str) -> &mut Vec<f32> {
        let i = self
            .tensors
            .iter()
            .position(|t| t.0 == name)
            .expect("tensor of this block");
        &mut self.tensors[i].2
    }

    /// Structured pruning of the MLP: keeps `width` of its channels (chosen and compensated
    /// on `down`'s inputs, see [`prune::prune_input_channels`]); gate and up lose the rows of
    /// the removed channels. Returns the predicted output error.
    fn prune_mlp_channels(
        &mut self,
        config: &ModelConfig,
        down_input: &calib::InputStats,
        width: usize,
        damp: f64,
    ) -> Result<f64, ConvertError> {
        let (d, f) = (config.hidden_size, config.intermediate_size);
        let l = self.layer;
        let down_name = names::ffn_down(l);
        let pruned = prune::prune_input_channels(
            self.get(&down_name),
            d,
            f,
            &down_input.hessian,
            width,
            damp,
        )
        .map_err(|e| ConvertError::pass(&down_name, e))?;
        let prune::ChannelPruning {
            kept,
            mut weights,
            loss,
        } = pruned;
        for (name, shape, values) in &mut self.tensors {
            if *name == down_name {
                *values = std::mem::take(&mut weights);
                shape[1] = width;
            } else if *name == names::ffn_gate(l) || *name == names::ffn_up(l) {
                *values = kept
                    .iter()
                    .flat_map(|&c| values[c * d..(c + 1) * d].iter().copied())
                    .collect();
                shape[0] = width;
            }
        }
        Ok(loss)
    }

    /// Structured pruning of attention: keeps `kv_heads` of the block's key/value heads, each
    /// with the query heads that read it (chosen and compensated on the output projection's
    /// inputs, see [`prune::prune_input_groups`]); q, k and v (and their biases) lose the rows
    /// of the removed heads. Returns the predicted output error.
    fn prune_attention_heads(
        &mut self,
        config: &ModelConfig,
        o_input: &calib::InputStats,
        kv_heads: usize,
        damp: f64,
    ) -> Result<f64, ConvertError> {
        let (d, hd) = (config.hidden_size, config.head_dim);
        let group = config.num_heads / config.num_kv_heads * hd;
        let l = self.layer;
        let o_name = names::attn_output(l);
        let pruned = prune::prune_input_groups(
            self.get(&o_name),
            d,
            config.q_dim(),
            &o_input.hessian,
            group,
            kv_heads,
            damp,
        )
        .map_err(|e| ConvertError::pass(&o_name, e))?;
        let prune::ChannelPruning {
            kept,
            mut weights,
            loss,
        } = pruned;
        // Kept key/value heads: each kept group of query columns is one of them.
        let kept_kv: Vec<usize> = kept.iter().step_by(group).map(|&c| c / group).collect();
        let kv_rows: Vec<usize> = kept_kv.iter().flat_map(|&h| h * hd..(h + 1) * hd).collect();
        let keep_rows = |values: &[f32], rows: &[usize], width: usize| -> Vec<f32> {
            rows.iter()
                .flat_map(|&r| values[r * width..(r + 1) * width].iter().copied())
                .collect()
        };
        for (name, shape, values) in &mut self.tensors {
            if *name == o_name {
                *values = std::mem::take(&mut weights);
                shape[1] = kept.len();
            } else if *name == names::attn_q(l) {
                *values = keep_rows(values, &kept, d);
                shape[0] = kept.len();
            } else if *name == names::attn_k(l) || *name == names::attn_v(l) {
                *values = keep_rows(values, &kv_rows, d);
                shape[0] = kv_rows.len();
            } else if *name == names::attn_q_bias(l) {
                *values = keep_rows(values, &kept, 1);
                shape[0] = kept.len();
            } else if *name == names::attn_k_bias(l) || *name == names::attn_v_bias(l) {
                *values = keep_rows(values, &kv_rows, 1);
                shape[0] = kv_rows.len();
            }
        }
        Ok(loss)
    }

    /// Which linear-layer input the matrix `name` of block `layer` reads.
    fn input_of(name: &str, layer: usize) -> Option<LinearInput> {
        if name == names::attn_q(layer)
            || name == names::attn_k(layer)
            || name == names::attn_v(layer)
        {
            Some(LinearInput::Attention)
        } else if name == names::attn_output(layer) {
            Some(LinearInput::AttentionOutput)
        } else if name == names::ffn_gate(layer) || name == names::ffn_up(layer) {
            Some(LinearInput::Mlp)
        } else if name == names::ffn_down(layer) {
            Some(LinearInput::MlpDown)
        } else {
            None
        }
    }

    fn block_weights(&self, config: &ModelConfig) -> BlockWeights<'_> {
        let l = self.layer;
        let (d, qd, kvd, f) = block_dims(config);
        let mat = |name: String, rows: usize, cols: usize| {
            Linear::Dense(
                MatRef::new(WeightData::F32(self.get(&name)), rows, cols)
                    .expect("shapes checked at import"),
            )
        };
        let vector = |present: bool, name: String| present.then(|| self.get(&name));
        let (qk, post) = (config.features.qk_norm, config.features.post_norms);
        BlockWeights {
            layer: l,
            attn_norm: self.get(&names::attn_norm(l)),
            q: mat(names::attn_q(l), qd, d),
            k: mat(names::attn_k(l), kvd, d),
            v: mat(names::attn_v(l), kvd, d),
            biases: config.attention_bias.then(|| {
                [
                    self.get(&names::attn_q_bias(l)),
                    self.get(&names::attn_k_bias(l)),
                    self.get(&names::attn_v_bias(l)),
                ]
            }),
            o: mat(names::attn_output(l), d, qd),
            ffn_norm: self.get(&names::ffn_norm(l)),
            gate: mat(names::ffn_gate(l), f, d),
            up: mat(names::ffn_up(l), f, d),
            down: mat(names::ffn_down(l), d, f),
            norms: FamilyNorms {
                q_norm: vector(qk, names::attn_q_norm(l)),
                k_norm: vector(qk, names::attn_k_norm(l)),
                post_attention_norm: vector(post, names::post_attention_norm(l)),
                post_ffw_norm: vector(post, names::post_ffw_norm(l)),
            },
        }
    }

    /// Decomposes the block's matrices for `lr`. Returns each matrix's name and
    /// decomposition, and the rank step: ranks are multiples of the factors' quantization
    /// group (U's rows split into whole groups); float factors only round to a few lanes.
    fn decompose_matrices(
        &self,
        lr: &LowRank,
        stats: Option<&calib::LayerStats>,
        options: &ConvertOptions,
    ) -> Result<(Vec<(String, lowrank::Decomposition)>, usize), ConvertError> {
        let mut decompositions = Vec::new();
        let mut step = 8;
        for (name, shape, values) in &self.tensors {
            let Some(input) = LayerTensors::input_of(name, self.layer) else {
                continue;
            };
            let (rows, cols) = (shape[0], shape[1]);
            let input_stats = stats.map(|s| s.input(input));
            let d = lowrank::decompose(values, rows, cols, lr.method, input_stats)
                .map_err(|e| ConvertError::pass(name, e))?;
            let u_encoding = options.encoding_for(&names::lowrank_u(name), shape);
            if let Some(group) = u_encoding.group() {
                step = step.max(group as usize);
            }
            decompositions.push((name.clone(), d));
        }
        Ok((decompositions, step))
    }

    /// Decomposes the block's matrices for `lr` and allocates their ranks, or takes them
    /// from `global` (the model-wide allocation, by matrix name). Returns the matrices to
    /// factorize (decomposition and rank) and the names of those kept dense.
    fn plan_lowrank(
        &self,
        lr: &LowRank,
        stats: Option<&calib::LayerStats>,
        options: &ConvertOptions,
        global: Option<&GlobalRanks>,
    ) -> Result<(LowRankPlan, Vec<String>), ConvertError> {
        let (decompositions, step) = self.decompose_matrices(lr, stats, options)?;
        let ranks: Vec<Option<usize>> = match global {
            Some(global) => decompositions
                .iter()
                .map(|(name, d)| {
                    let rank = global.get(name).copied().flatten()?;
                    // The spectrum measured on these (compressed-model) inputs may be
                    // shorter than the one the allocation saw.
                    let rank = rank.min(d.sigma.len());
                    lowrank::pays_off(d.rows, d.cols, rank).then_some(rank)
                })
                .collect(),
            None => {
                let shapes: Vec<_> = decompositions
                    .iter()
                    .map(|(_, d)| (d.rows, d.cols, d.energy_shares()))
                    .collect();
                lowrank::allocate(&shapes, lr.target, lr.allocation, step)
            }
        };
        let mut plan = LowRankPlan::new();
        let mut dense = Vec::new();
        for ((name, d), rank) in decompositions.into_iter().zip(ranks) {
            match rank {
                Some(rank) => {
                    log::debug!("{name}: rank {rank} of {}", d.sigma.len());
                    plan.insert(name, (d, rank));
                }
                None => {
                    log::info!("{name}: kept dense (the factorized form would not be smaller)");
                    dense.push(name);
                }
            }
        }
        Ok((plan, dense))
    }

    /// Searches AWQ scales for each input whose producer can absorb them, and folds them in:
    /// RMSNorm weights for the attention and MLP inputs, the rows of `up` for `down`'s input,
    /// and the rows of `v` for `o`'s input when heads are not grouped (with GQA a `v` row
    /// feeds several heads' outputs, so that scaling cannot be folded).
    fn apply_awq(
        &mut self,
        config: &ModelConfig,
        stats: &calib::LayerStats,
        options: &ConvertOptions,
    ) -> std::collections::HashMap<LinearInput, Vec<f32>> {
        let l = self.layer;
        let (d, qd, kvd, f) = block_dims(config);
        let mut groups: Vec<AwqGroup> = vec![
            (
                LinearInput::Attention,
                vec![
                    (names::attn_q(l), qd),
                    (names::attn_k(l), kvd),
                    (names::attn_v(l), kvd),
                ],
                vec![names::attn_norm(l)],
            ),
            (
                LinearInput::Mlp,
                vec![(names::ffn_gate(l), f), (names::ffn_up(l), f)],
                vec![names::ffn_norm(l)],
            ),
            (
                LinearInput::MlpDown,
                vec![(names::ffn_down(l), d)],
                vec![names::ffn_up(l)],
            ),
        ];
        if qd == kvd {
            let mut producers = vec![names::attn_v(l)];
            if config.attention_bias {
                producers.push(names::attn_v_bias(l));
            }
            groups.push((
                LinearInput::AttentionOutput,
                vec![(names::attn_output(l), d)],
                producers,
            ));
        }
        let mut chosen = std::collections::HashMap::new();
        for (input, consumers, producers) in groups {
            // The encodings of the consumers may differ (--keep); search with the first.
            let encoding = options.encoding_for(&consumers[0].0, &[1, 1]);
            if !encoding.is_quantized() {
                continue;
            }
            let matrices: Vec<(&[f32], usize)> = consumers
                .iter()
                .map(|(n, rows)| (self.get(n), *rows))
                .collect();
            let s = awq::search_scales(stats.input(input), &matrices, encoding);
            if s.iter().all(|&v| v == 1.0) {
                continue;
            }
            for (name, _) in &consumers {
                awq::scale_columns(self.get_mut(name), &s);
            }
            for name in &producers {
                awq::divide_rows(self.get_mut(name), &s);
            }
            chosen.insert(input, s);
        }
        chosen
    }
}
