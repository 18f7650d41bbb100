//! The converter: checkpoint → .plm, one block at a time so memory stays bounded by one
//! block's weights (plus the calibration activations when a method needs them).
//! The compression passes (quantization, pruning, low rank, recovery) are in `passes/`, one
//! file each behind one trait; [`import`] reads the checkpoints (Hugging Face directories,
//! GGUF files).

pub mod awq;
mod block;
pub mod calib;
mod error;
pub mod gptq;
pub mod import;
pub mod lowrank;
mod options;
mod output;
mod passes;
pub mod plan;
mod preset;
pub mod prune;
pub mod quant;
pub mod recover;
pub mod refusal;
pub mod sensitivity;

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::block::LayerTensors;
use crate::import::{ImportError, ImportedModel};
use crate::passes::recover::Recovering;
use crate::passes::{BlockStep, LowRankPlan, Passes};
use pocketlm_format::config::names;
use pocketlm_format::recipe::{CalibrationRecipe, Recipe};
use pocketlm_format::{Encoding, PlmError, PlmWriter};
use pocketlm_runtime::model::expected_tensors;

pub use calib::Calibration;
pub use error::*;
pub use gptq::GptqOptions;
pub use lowrank::{LowRank, LowRankMethod, RankAllocation, RankTarget};
pub use options::*;
pub use output::MASKED_MAX_SHARE;
use output::*;
pub use plan::BlockRecipe;
pub use preset::{Preset, UnknownPreset};
pub use prune::{PruneMethod, Sparsity, SparsitySchedule};
pub use quant::Clipping;
pub use recover::{BlockRecovery, Distillation, RecoverMode, Recovery};
pub use refusal::Refusal;

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
    /// What distillation did (recovery mode `Distill`).
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

/// Converts `model` to a .plm file at `dst`: the passes observe the uncompressed model, then
/// every block is read, calibrated, compressed by the passes and written, one at a time; the
/// recipe records what each pass did.
pub fn convert(
    model: &ImportedModel,
    dst: &Path,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<ConvertReport, ConvertError> {
    options.validate()?;
    let mut passes = Passes::default();
    let config = &model.config;
    if options.recover.is_some() && !config.architecture.is_llama_like() {
        // Recovery trains on a forward pass of its own (candle), written for Llama/Qwen2.
        return Err(ConvertError::RecoveryFamily {
            family: config.architecture.name(),
        });
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
        return Err(Refusal::BlockCount {
            recipes: options.blocks.len(),
            layers: config.num_layers,
        }
        .into());
    }
    // The calibration text is tokenized once: distillation may cut other (more) sequences
    // from it than the quantizer calibrates on.
    let calibration_text = match &options.calibration {
        Some(c) if options.needs_calibration() => Some((c, calib::calibration_tokens(model, c)?)),
        _ => None,
    };
    let calibration = match &calibration_text {
        Some((c, tokens)) => Some(calib::windows_of(model, c, tokens, c.samples)?),
        None => None,
    };
    let distill_windows = match (&options.recover, &calibration_text) {
        (Some(r), Some((c, tokens))) if r.mode.distills() => match r.samples {
            Some(samples) if samples != c.samples => {
                Some(calib::windows_of(model, c, tokens, samples)?)
            }
            _ => None,
        },
        _ => None,
    };
    passes.observe(model, calibration.as_deref(), options, &mut *progress)?;
    // The model as written: with structured pruning, narrower blocks.
    let mut written = passes.structured.written_config(config);
    written.incoherence = passes::incoherence::Incoherence::config(options);
    let block_options: Vec<ConvertOptions> = (0..config.num_layers)
        .map(|l| {
            let mut block = options.for_block(l);
            passes.prune.adjust_block(l, &mut block);
            block
        })
        .collect();
    let mut out = Output::new(
        Sink::File(PlmWriter::create(dst)?),
        options,
        expected.len(),
        progress,
    );

    let embedding = model.source.load_f32(names::TOKEN_EMBD)?;
    let embd_shape = [config.vocab_size, config.hidden_size];
    let mut recovering = Recovering::new(
        options,
        config,
        calibration.as_deref(),
        distill_windows.as_deref(),
        &embedding,
    );
    let runtime_embedding =
        out.write_matrix(names::TOKEN_EMBD, &embd_shape, embedding, None, false)?;
    let mut calibrator = calibration
        .as_ref()
        .map(|windows| calib::Calibrator::new(config, windows, &runtime_embedding));
    if let (Some(r), Some(student)) = (&mut recovering, &calibrator) {
        r.set_student(
            config,
            distill_windows.as_deref(),
            student,
            runtime_embedding,
        );
    }

    for (l, block_options) in block_options.iter().enumerate() {
        let mut layer = LayerTensors::load(model.source.as_ref(), config, l)?;
        if let Some(r) = &mut recovering {
            r.advance_teachers(&layer.block_weights(config));
        }
        let stats = match &calibrator {
            Some(c) => {
                (out.progress)(out.done, out.total, &format!("blk.{l}: calibrating"));
                Some(c.observe(&layer.block_weights(config)))
            }
            None => None,
        };
        out.options = block_options;
        if let Some(r) = &recovering {
            r.before_block(&mut out);
        }
        passes.compress_block(BlockStep {
            layer: &mut layer,
            config: &written,
            stats: stats.map(Cow::Owned),
            calibrator: calibrator.as_mut(),
            out: &mut out,
            scales: None,
            lowrank: LowRankPlan::new(),
        })?;
        if let (Some(r), Some(student)) = (&mut recovering, &calibrator) {
            r.after_block(&mut out, &written, &mut layer, student)?;
        }
        if let Some(c) = &mut calibrator {
            c.advance(&layer.block_weights(&written));
            c.set_config(config);
        }
    }
    out.options = options;
    let distills = recovering.as_ref().is_some_and(Recovering::distills);
    let (recovered, distillation) = match recovering {
        Some(r) => {
            let seq_len = calibrator.as_ref().map_or(0, calib::Calibrator::seq_len);
            r.finish(model, &mut out, &written, seq_len)?
        }
        None => (Vec::new(), None),
    };
    if !distills {
        let norm = model.source.load_f32(names::OUTPUT_NORM)?;
        out.write_vector(names::OUTPUT_NORM, &[config.hidden_size], norm)?;
        if !config.tie_word_embeddings {
            let output = model.source.load_f32(names::OUTPUT)?;
            out.write_matrix(names::OUTPUT, &embd_shape, output, None, false)?;
        }
    }

    passes.recover.blocks.clone_from(&recovered);
    passes.recover.distillation.clone_from(&distillation);
    let mut recipe = Recipe {
        preset: options.preset.map(|p| p.name().into()),
        weights: options.weights.describe(),
        embedding: options.encoding_for(names::TOKEN_EMBD, &[1, 1]).describe(),
        vectors: "f32".into(),
        calibration: options
            .calibration
            .as_ref()
            .filter(|_| options.needs_calibration())
            .map(|c| CalibrationRecipe {
                source: c.source.clone(),
                sequences: calibration.as_ref().map_or(0, Vec::len),
                seq_len: c.seq_len,
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
        ..Recipe::default()
    };
    passes.record(options, &out, &mut recipe);
    let converted_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let metadata = serde_json::json!({
        "format": "pocketlm",
        "config": written,
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
