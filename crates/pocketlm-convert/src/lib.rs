//! The converter: checkpoint → .plm, one block at a time so memory stays bounded by one
//! block's weights (plus the calibration activations when a method needs them).
//! Compression passes (quantization, pruning, low rank) plug in here; [`import`] reads the
//! checkpoints (Hugging Face directories, GGUF files).

pub mod awq;
pub mod calib;
pub mod gptq;
pub mod import;
pub mod lowrank;
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
use pocketlm_runtime::model::{BlockWeights, LinearInput, expected_tensors};
use pocketlm_runtime::tokenizer::Tokenizer;

pub use calib::Calibration;
pub use gptq::GptqOptions;
pub use lowrank::{LowRank, LowRankMethod, RankAllocation, RankTarget};
pub use plan::BlockRecipe;
pub use prune::{PruneMethod, Sparsity, SparsitySchedule};
pub use quant::Clipping;
pub use recover::{BlockRecovery, Distillation, RecoverMode, Recovery};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Format(#[from] PlmError),
    #[error("invalid option: {0}")]
    Options(String),
    #[error("calibration: {0}")]
    Calibration(String),
    #[error("{tensor}: {message}")]
    Method { tensor: String, message: String },
    /// A compression pass (GPTQ/SparseGPT, structured pruning, low rank) failed on a tensor.
    #[error("{tensor}: {source}")]
    Pass {
        tensor: String,
        #[source]
        source: PassError,
    },
    /// Block-wise recovery or distillation failed.
    #[error("calibration: {0}")]
    Recover(#[from] recover::RecoverError),
    #[error(transparent)]
    Model(#[from] pocketlm_runtime::model::ModelError),
}

/// Why a compression pass failed on a tensor (named by [`ConvertError::Pass`]).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Gptq(#[from] gptq::GptqError),
    #[error(transparent)]
    ChannelPruning(#[from] prune::ChannelPruningError),
    #[error(transparent)]
    LowRank(#[from] lowrank::LowRankError),
}

impl ConvertError {
    fn pass(tensor: &str, source: impl Into<PassError>) -> Self {
        ConvertError::Pass {
            tensor: tensor.to_string(),
            source: source.into(),
        }
    }
}

/// How the quantized matrices' values are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Method {
    /// Round to nearest, per group (with `--clip search`, the error-minimising range).
    #[default]
    Rtn,
    /// GPTQ: Hessian-aware rounding with error feedback (needs calibration).
    Gptq,
    /// AWQ: activation-aware channel scaling folded into the preceding op (needs calibration).
    Awq,
    /// AWQ scaling, then GPTQ on the scaled weights.
    AwqGptq,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
            Method::AwqGptq => "awq+gptq",
        }
    }

    pub fn needs_calibration(self) -> bool {
        self != Method::Rtn
    }

    fn uses_awq(self) -> bool {
        matches!(self, Method::Awq | Method::AwqGptq)
    }

    fn uses_gptq(self) -> bool {
        matches!(self, Method::Gptq | Method::AwqGptq)
    }
}

/// A quantization method name that is not one of [`Method`]'s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown method '{name}' (expected rtn, gptq, awq or awq+gptq)")]
pub struct UnknownMethod {
    pub name: String,
}

impl FromStr for Method {
    type Err = UnknownMethod;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rtn" => Ok(Method::Rtn),
            "gptq" => Ok(Method::Gptq),
            "awq" => Ok(Method::Awq),
            "awq+gptq" | "awq-gptq" => Ok(Method::AwqGptq),
            other => Err(UnknownMethod {
                name: other.to_string(),
            }),
        }
    }
}

/// `--keep PATTERN=ENCODING`: tensors matching the pattern take that encoding instead of
/// the default. PATTERN is a layer number (`3`: every matrix of block 3), a range (`0-2`),
/// or a tensor-name pattern with `*` wildcards (`blk.*.ffn_down.weight`, `*attn_v*`).
#[derive(Clone, Debug, PartialEq)]
pub struct KeepRule {
    pub pattern: String,
    pub encoding: Encoding,
}

impl KeepRule {
    pub fn matches(&self, name: &str) -> bool {
        let p = self.pattern.as_str();
        let layer = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        if let Ok(n) = p.parse::<usize>() {
            return layer == Some(n);
        }
        if let Some((a, b)) = p.split_once('-')
            && let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>())
        {
            return layer.is_some_and(|l| (a..=b).contains(&l));
        }
        glob_match(p, name)
    }
}

/// Why a `PATTERN=ENCODING` rule did not parse; `rule` is the rule as given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeepRuleError {
    #[error("'{rule}': expected PATTERN=ENCODING, e.g. 0=q8 or *ffn_down*=q8")]
    Syntax { rule: String },
    #[error("'{rule}': empty pattern")]
    EmptyPattern { rule: String },
    #[error("'{rule}': {source}")]
    Encoding {
        rule: String,
        source: pocketlm_format::EncodingError,
    },
}

impl FromStr for KeepRule {
    type Err = KeepRuleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (pattern, encoding) = s.rsplit_once('=').ok_or_else(|| KeepRuleError::Syntax {
            rule: s.to_string(),
        })?;
        if pattern.trim().is_empty() {
            return Err(KeepRuleError::EmptyPattern {
                rule: s.to_string(),
            });
        }
        Ok(KeepRule {
            pattern: pattern.trim().to_string(),
            encoding: encoding.parse().map_err(|source| KeepRuleError::Encoding {
                rule: s.to_string(),
                source,
            })?,
        })
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Encoding of the transformer blocks' weight matrices.
    pub weights: Encoding,
    /// Encoding of the token embedding (also the output layer when tied). `None`: q8/g32
    /// when `weights` is quantized (as llama.cpp keeps embeddings at higher precision), else
    /// the same as `weights`.
    pub embedding: Option<Encoding>,
    /// Encoding of an untied output layer; `None`: as the embedding.
    pub output: Option<Encoding>,
    /// How block matrices are quantized.
    pub method: Method,
    /// Grid choice; `None`: min/max for RTN, the clipping search for calibrated methods.
    pub clipping: Option<Clipping>,
    pub gptq: GptqOptions,
    /// Required by the calibrated methods.
    pub calibration: Option<Calibration>,
    /// Per-tensor encoding overrides (mixed precision); the last matching rule wins.
    pub keep: Vec<KeepRule>,
    /// Pruning of the block matrices (before or, with SparseGPT, jointly with quantization).
    pub pruning: Option<Pruning>,
    /// How unstructured pruning's sparsity is spread over the blocks (OWL needs calibration).
    pub sparsity_schedule: SparsitySchedule,
    /// Structured pruning: this fraction of every block's MLP channels goes (rows of gate and
    /// up, columns of down, with down compensated on calibration), so every kernel runs a
    /// smaller dense shape. The width is rounded to whole quantization groups.
    pub mlp_channel_pruning: Option<f32>,
    /// Structured pruning of attention: this fraction of every block's key/value heads goes,
    /// each with the query heads that read it (rows of q, k, v; columns of the output
    /// projection, compensated on calibration). Every block keeps at least one.
    pub attention_head_pruning: Option<f32>,
    /// Low-rank factorization of the block matrices (factors then stored in `weights`).
    pub lowrank: Option<LowRank>,
    /// Store pruned matrices in a sparse encoding where one applies (default); `false` keeps
    /// them dense (for comparisons).
    pub sparse_storage: bool,
    /// One recipe per transformer block (what the planner chose); replaces `weights`,
    /// `pruning` and `lowrank` for that block's matrices. Empty: every block follows those.
    pub blocks: Vec<BlockRecipe>,
    /// Block-wise reconstruction after each block is compressed (needs calibration and the
    /// `recover` feature).
    pub recover: Option<Recovery>,
    /// Elastic files: with each quantized block matrix, store what quantizing it lost
    /// (`W − B`) in this encoding, which the runtime's larger profiles add back.
    pub residual: Option<Encoding>,
}

/// `--prune METHOD` with `--sparsity F` or `--nm N:M`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pruning {
    pub method: PruneMethod,
    pub sparsity: Sparsity,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions::with_weights(Encoding::F16)
    }
}

impl ConvertOptions {
    pub fn with_weights(weights: Encoding) -> Self {
        ConvertOptions {
            weights,
            embedding: None,
            output: None,
            method: Method::Rtn,
            clipping: None,
            gptq: GptqOptions::default(),
            calibration: None,
            keep: Vec::new(),
            pruning: None,
            sparsity_schedule: SparsitySchedule::Uniform,
            mlp_channel_pruning: None,
            attention_head_pruning: None,
            lowrank: None,
            sparse_storage: true,
            blocks: Vec::new(),
            recover: None,
            residual: None,
        }
    }

    /// The options block `layer` is compressed with.
    pub fn for_block(&self, layer: usize) -> ConvertOptions {
        match self.blocks.get(layer) {
            Some(recipe) => self.with_recipe(recipe),
            None => self.clone(),
        }
    }

    /// These options with `recipe` for every block.
    pub fn with_recipe(&self, recipe: &BlockRecipe) -> ConvertOptions {
        let mut keep = self.keep.clone();
        keep.extend(recipe.keep_rules());
        ConvertOptions {
            weights: recipe.weights,
            pruning: recipe.pruning,
            lowrank: recipe.lowrank,
            keep,
            blocks: Vec::new(),
            ..self.clone()
        }
    }

    fn embedding_encoding(&self) -> Encoding {
        self.embedding.unwrap_or(if self.weights.is_quantized() {
            Encoding::Q8 { group: 32 }
        } else {
            self.weights
        })
    }

    fn clipping(&self) -> Clipping {
        self.clipping.unwrap_or(if self.method.needs_calibration() {
            Clipping::Search
        } else {
            Clipping::MinMax
        })
    }

    /// The encoding requested for tensor `name` of `shape`.
    pub fn encoding_for(&self, name: &str, shape: &[usize]) -> Encoding {
        if shape.len() == 1 {
            // Norms and biases are tiny and numerically sensitive: always f32.
            return Encoding::F32;
        }
        if let (Some(residual), Some(_)) = (self.residual, name.strip_suffix("#r")) {
            return residual;
        }
        if let Some(rule) = self.keep.iter().rev().find(|r| r.matches(name)) {
            return rule.encoding;
        }
        if name == names::TOKEN_EMBD {
            self.embedding_encoding()
        } else if name == names::OUTPUT {
            self.output.unwrap_or_else(|| self.embedding_encoding())
        } else {
            self.weights
        }
    }

    /// Whether the conversion runs the model on calibration text.
    pub fn needs_calibration(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| self.with_recipe(b).needs_calibration())
            || self.method.needs_calibration()
            || self.pruning.is_some_and(|p| p.method.needs_calibration())
            || self.sparsity_schedule != SparsitySchedule::Uniform
            || self.mlp_channel_pruning.is_some()
            || self.attention_head_pruning.is_some()
            || self.lowrank.is_some_and(|l| l.method.needs_calibration())
            || self.recover.is_some()
    }

    /// Checks a structured pruning option (`flag` with its `fraction`): a fraction in (0, 1),
    /// no planner, and calibration text, on which `chosen_on` happens.
    fn validate_structured(
        &self,
        flag: &str,
        fraction: Option<f32>,
        chosen_on: &str,
    ) -> Result<(), ConvertError> {
        let Some(fraction) = fraction else {
            return Ok(());
        };
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(ConvertError::Options(format!(
                "{flag} {fraction} must be a fraction in (0, 1)"
            )));
        }
        let refusal = if !self.blocks.is_empty() {
            Some("per-block recipes (the planner)".to_string())
        } else if self.calibration.is_none() {
            Some(format!(
                "no calibration text (--calib FILE; scripts/fetch-calib.sh downloads a default \
                 set): {chosen_on} on calibration activations"
            ))
        } else {
            None
        };
        match refusal {
            Some(what) => Err(ConvertError::Options(format!(
                "{flag} does not work with {what}"
            ))),
            None => Ok(()),
        }
    }

    fn validate(&self) -> Result<(), ConvertError> {
        for recipe in &self.blocks {
            let mut block = self.with_recipe(recipe);
            if !recipe.weights.is_quantized() {
                // The quantization method has nothing to do in a float block.
                block.method = Method::Rtn;
            }
            block
                .validate()
                .map_err(|e| ConvertError::Options(format!("block recipe {recipe}: {e}")))?;
        }
        if let Some(r) = &self.recover {
            r.validate()
                .map_err(|e| ConvertError::Options(e.to_string()))?;
            if self.calibration.is_none() {
                return Err(ConvertError::Options(
                    "--recover needs calibration text (--calib FILE; scripts/fetch-calib.sh \
                     downloads a default set)"
                        .into(),
                ));
            }
        }
        let requested = std::iter::once(self.weights)
            .chain(self.embedding)
            .chain(self.output)
            .chain(self.keep.iter().map(|k| k.encoding));
        for e in requested {
            if e.is_masked() {
                let base = e.quant_base().describe();
                return Err(ConvertError::Options(format!(
                    "{} is chosen automatically for {base} matrices pruned without a pattern: \
                     use --weights {base} --prune METHOD --sparsity FRACTION",
                    e.name()
                )));
            }
            if matches!(
                e,
                Encoding::F16Sparse24 | Encoding::Q8Sparse48 { .. } | Encoding::Q4Sparse48 { .. }
            ) {
                let (base, nm) = match e {
                    Encoding::F16Sparse24 => ("f16".to_string(), "2:4"),
                    other => (other.quant_base().describe(), "2:4|4:8"),
                };
                return Err(ConvertError::Options(format!(
                    "{e} is chosen automatically for {base} matrices pruned N:M: use \
                     --weights {base} --prune METHOD --nm {nm}"
                )));
            }
        }
        if let Some(l) = &self.lowrank {
            l.target
                .validate()
                .map_err(|e| ConvertError::Options(e.to_string()))?;
            if l.method.needs_calibration() && self.calibration.is_none() {
                return Err(ConvertError::Options(format!(
                    "--lowrank {} needs calibration text (--calib FILE; scripts/fetch-calib.sh \
                     downloads a default set)",
                    l.method.name()
                )));
            }
            if matches!(l.target, RankTarget::Rank(_)) && l.allocation != RankAllocation::Uniform {
                return Err(ConvertError::Options(
                    "--rank-alloc applies to --ratio; --rank gives every matrix the same rank"
                        .into(),
                ));
            }
            if l.allocation == RankAllocation::Global {
                let refusal = if !self.blocks.is_empty() {
                    Some("per-block recipes (the planner allocates per block)")
                } else if self.mlp_channel_pruning.is_some()
                    || self.attention_head_pruning.is_some()
                {
                    Some(
                        "--prune-channels or --prune-heads (the spectra are measured at the \
                         original widths)",
                    )
                } else {
                    None
                };
                if let Some(refusal) = refusal {
                    return Err(ConvertError::Options(format!(
                        "--rank-alloc global does not combine with {refusal}"
                    )));
                }
            }
            if self.method.uses_awq() {
                return Err(ConvertError::Options(
                    "--lowrank with AWQ is not supported: use rtn or gptq for the factors".into(),
                ));
            }
        }
        self.validate_structured(
            "--prune-heads",
            self.attention_head_pruning,
            "heads are chosen and the output projection is compensated",
        )?;
        self.validate_structured(
            "--prune-channels",
            self.mlp_channel_pruning,
            "channels are chosen and down is compensated",
        )?;
        if let Some(residual) = self.residual {
            let refusal = if !residual.is_quantized() || residual.quant_base() != residual {
                Some(format!(
                    "{} (a residual is stored in q8, q4, q4a or q3)",
                    residual.describe()
                ))
            } else if !self.weights.is_quantized() {
                Some(format!(
                    "--weights {} (only what quantization loses has a residual)",
                    self.weights
                ))
            } else if self.lowrank.is_some() {
                Some("--lowrank (low-rank files are elastic through their rank)".into())
            } else if self.pruning.is_some()
                || self.mlp_channel_pruning.is_some()
                || self.attention_head_pruning.is_some()
            {
                Some("pruning (the residual would fill in what pruning removed)".into())
            } else if !self.blocks.is_empty() {
                Some("per-block recipes (the planner)".into())
            } else if self.recover.is_some() {
                Some("--recover (it tunes what the base stores)".into())
            } else {
                None
            };
            if let Some(what) = refusal {
                return Err(ConvertError::Options(format!(
                    "--residual does not work with {what}"
                )));
            }
        }
        if self.sparsity_schedule != SparsitySchedule::Uniform {
            let schedule = self.sparsity_schedule.describe();
            self.sparsity_schedule
                .validate()
                .map_err(|e| ConvertError::Options(e.to_string()))?;
            match self.pruning {
                Some(Pruning {
                    sparsity: Sparsity::Unstructured(_),
                    ..
                }) => {}
                Some(p) => {
                    return Err(ConvertError::Options(format!(
                        "--sparsity-schedule {schedule} spreads unstructured sparsity; {} is \
                         the same pattern in every block",
                        p.sparsity.describe()
                    )));
                }
                None => {
                    return Err(ConvertError::Options(format!(
                        "--sparsity-schedule {schedule} needs --prune METHOD --sparsity F"
                    )));
                }
            }
            if !self.blocks.is_empty() {
                return Err(ConvertError::Options(format!(
                    "--sparsity-schedule {schedule} does not apply to per-block recipes (the \
                     planner chooses each block's sparsity itself)"
                )));
            }
            if self.calibration.is_none() {
                return Err(ConvertError::Options(format!(
                    "--sparsity-schedule {schedule} measures outliers on calibration text \
                     (--calib FILE; scripts/fetch-calib.sh downloads a default set)"
                )));
            }
        }
        if let Some(p) = &self.pruning {
            p.sparsity
                .validate()
                .map_err(|e| ConvertError::Options(e.to_string()))?;
            if p.method.needs_calibration() && self.calibration.is_none() {
                return Err(ConvertError::Options(format!(
                    "--prune {} needs calibration text (--calib FILE; scripts/fetch-calib.sh \
                     downloads a default set)",
                    p.method.name()
                )));
            }
        }
        if self.method.needs_calibration() {
            if self.calibration.is_none() {
                return Err(ConvertError::Options(format!(
                    "--method {} needs calibration text (--calib FILE; scripts/fetch-calib.sh \
                     downloads a default set)",
                    self.method.name()
                )));
            }
            if !self.weights.is_quantized() {
                return Err(ConvertError::Options(format!(
                    "--method {} quantizes: choose quantized weights (q8, q4, q4a, q3), not {}",
                    self.method.name(),
                    self.weights
                )));
            }
        }
        if let Some(c) = &self.calibration
            && (c.samples == 0 || c.seq_len < 2)
        {
            return Err(ConvertError::Options(format!(
                "calibration needs at least one sequence of 2+ tokens (got {} × {})",
                c.samples, c.seq_len
            )));
        }
        Ok(())
    }
}

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

/// What the calibration saw of a matrix's input, and the AWQ scales folded into its columns.
#[derive(Clone, Copy)]
struct Evidence<'a> {
    stats: &'a calib::InputStats,
    scales: Option<&'a [f32]>,
}

/// Where encoded tensors go: the file being written, or only a count of the bytes they
/// would take (the planner measures recipes this way without writing them).
enum Sink {
    File(PlmWriter),
    Count { bytes: u64 },
}

impl Sink {
    fn count(&mut self, name: &str, shape: &[usize], encoding: Encoding) -> Result<(), PlmError> {
        if let Sink::Count { bytes } = self {
            let len = encoding.byte_len(shape).ok_or_else(|| {
                PlmError::tensor(
                    name,
                    format!("shape {shape:?} cannot be stored in {encoding}"),
                )
            })?;
            *bytes += len.next_multiple_of(pocketlm_format::TENSOR_ALIGNMENT) as u64;
        }
        Ok(())
    }

    fn add_f32(
        &mut self,
        name: &str,
        shape: &[usize],
        values: &[f32],
        encoding: Encoding,
    ) -> Result<(), PlmError> {
        match self {
            Sink::File(w) => w.add_f32(name, shape, values, encoding),
            Sink::Count { .. } => self.count(name, shape, encoding),
        }
    }

    fn add_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        encoding: Encoding,
        data: &[u8],
    ) -> Result<(), PlmError> {
        match self {
            Sink::File(w) => w.add_tensor(name, shape, encoding, data),
            Sink::Count { .. } => self.count(name, shape, encoding),
        }
    }
}

/// Largest share of a dense quantized matrix's bytes that its unstructured sparse storage
/// (q8+mask, q4+mask) may take: above it the matrix stays dense, since expanding the masks
/// costs more than the bytes it saves (measured in BENCHMARKS.md, "Unstructured sparse
/// storage").
pub const MASKED_MAX_SHARE: f64 = 0.8;

/// The writer plus the running totals of a conversion.
struct Output<'a, 'p> {
    writer: Sink,
    options: &'a ConvertOptions,
    parameters: u64,
    fallbacks: Vec<(String, String)>,
    encodings: std::collections::BTreeMap<String, usize>,
    done: usize,
    total: usize,
    progress: Progress<'p>,
    gptq_loss: f64,
    /// Predicted output error of structured MLP pruning, summed over blocks.
    channel_pruning_loss: f64,
    /// Predicted output error of the removed attention heads, summed over blocks.
    head_pruning_loss: f64,
    /// Whether the speed caveat of the masked encodings has been logged.
    masked_noted: bool,
    /// Zeros and total weights of the matrices pruning applied to.
    pruned: u64,
    prunable: u64,
    /// Matrices pruning skipped, with the reason.
    prune_skipped: Vec<(String, String)>,
    /// Pruned matrices stored in a sparse encoding, and those stored dense (with the reason).
    sparse_tensors: usize,
    dense_storage: Vec<(String, String)>,
    /// Factorized matrices and their ranks; block matrices low rank left dense.
    lowrank_ranks: Vec<(String, usize)>,
    lowrank_dense: Vec<String>,
    /// Weights of the factorized matrices before and after.
    lowrank_before: u64,
    lowrank_after: u64,
    /// `--rank-alloc global`: the model-wide ranks, measured before the first block.
    global_ranks: Option<GlobalRanks>,
    /// Residual tensors written.
    residuals: usize,
    /// While a block is being recovered: its tensors, held back until recovery has tuned
    /// them (then written in the same order).
    deferred: Option<Vec<recover::BlockTensor>>,
}

impl<'a, 'p> Output<'a, 'p> {
    fn new(
        writer: Sink,
        options: &'a ConvertOptions,
        total: usize,
        progress: Progress<'p>,
    ) -> Self {
        Output {
            writer,
            options,
            parameters: 0,
            fallbacks: Vec::new(),
            encodings: Default::default(),
            done: 0,
            total,
            progress,
            gptq_loss: 0.0,
            channel_pruning_loss: 0.0,
            head_pruning_loss: 0.0,
            masked_noted: false,
            pruned: 0,
            prunable: 0,
            prune_skipped: Vec::new(),
            sparse_tensors: 0,
            dense_storage: Vec::new(),
            lowrank_ranks: Vec::new(),
            lowrank_dense: Vec::new(),
            lowrank_before: 0,
            lowrank_after: 0,
            global_ranks: None,
            residuals: 0,
            deferred: None,
        }
    }

    /// Bytes counted so far by a [`Sink::Count`] output (0 for a file).
    fn counted_bytes(&self) -> u64 {
        match self.writer {
            Sink::Count { bytes } => bytes,
            Sink::File(_) => 0,
        }
    }

    /// Sends one tensor's bytes to the writer.
    fn emit(&mut self, tensor: &recover::BlockTensor) -> Result<(), ConvertError> {
        let (name, shape, encoding) = (tensor.name.as_str(), &tensor.shape[..], tensor.encoding);
        let method_err = |message: String| ConvertError::Method {
            tensor: name.to_string(),
            message,
        };
        match encoding {
            Encoding::F32 | Encoding::F16 | Encoding::BF16 => {
                self.writer.add_f32(name, shape, &tensor.values, encoding)?
            }
            Encoding::F16Sparse24 => {
                let bytes = pocketlm_kernels::sparse::encode(&tensor.values, shape[0], shape[1])
                    .ok_or_else(|| {
                        method_err("f16+2:4 is only chosen for matrices pruned 2:4".into())
                    })?;
                self.writer.add_tensor(name, shape, encoding, &bytes)?;
            }
            // The remaining encodings are the quantized ones.
            _ => {
                // A masked matrix's code stream is sized for the values as finally stored
                // (recovery may have moved them since the storage was chosen).
                let encoding = if encoding.is_masked() {
                    encoding
                        .quant_base()
                        .masked_storage(&tensor.values, shape[0], shape[1])
                        .ok_or_else(|| {
                            method_err(format!("cannot size {encoding} for {shape:?}"))
                        })?
                } else {
                    encoding
                };
                let grids = tensor
                    .grids
                    .as_deref()
                    .ok_or_else(|| method_err(format!("{encoding} needs quantization grids")))?;
                let bytes = quant::encode(&tensor.values, shape[0], shape[1], encoding, grids)
                    .ok_or_else(|| {
                        method_err(format!("cannot quantize shape {shape:?} to {encoding}"))
                    })?;
                self.writer.add_tensor(name, shape, encoding, &bytes)?;
            }
        }
        Ok(())
    }

    fn finish_tensor(&mut self, name: &str, encoding: Encoding, len: usize) {
        *self.encodings.entry(encoding.describe()).or_default() += 1;
        // A residual corrects its matrix's weights; it adds bytes, not parameters.
        if !names::is_residual(name) {
            self.parameters += len as u64;
        }
        self.done += 1;
        (self.progress)(self.done, self.total, name);
    }

    fn write_vector(
        &mut self,
        name: &str,
        shape: &[usize],
        values: Vec<f32>,
    ) -> Result<Vec<f32>, ConvertError> {
        let tensor = recover::BlockTensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            encoding: Encoding::F32,
            values,
            grids: None,
            masked: false,
        };
        self.store(tensor)
    }

    /// Writes `tensor` (or holds it back while its block is recovered), counts it, and
    /// returns its values as the runtime will read them back.
    fn store(&mut self, tensor: recover::BlockTensor) -> Result<Vec<f32>, ConvertError> {
        let (name, encoding) = (tensor.name.clone(), tensor.encoding);
        let values = match &mut self.deferred {
            Some(deferred) => {
                let values = tensor.readback();
                deferred.push(tensor);
                values
            }
            None => {
                self.emit(&tensor)?;
                // In place: no second copy of a large matrix (the embedding) while writing.
                tensor.into_readback()
            }
        };
        self.finish_tensor(&name, encoding, values.len());
        Ok(values)
    }

    /// The sparse storage of a pruned matrix requested as `encoding`, when one applies:
    /// f16 matrices pruned 2:4 become f16+2:4 (9 instead of 16 bits per weight); q8 and
    /// symmetric q4 matrices keeping at most 4 of every 8 weights (2:4, 4:8) become q8+4:8
    /// and q4+4:8 (5 and 3 instead of 8 and 4 bits per weight, plus scales); q8 and
    /// symmetric q4 matrices pruned without a pattern become q8+mask and q4+mask (a bit per
    /// weight plus the kept codes) when that reads at most [`MASKED_MAX_SHARE`] of the dense
    /// bytes. Every other case stays dense, and the reason is recorded.
    fn sparse_storage(
        &mut self,
        name: &str,
        shape: &[usize],
        values: &[f32],
        encoding: Encoding,
        sparsity: Sparsity,
    ) -> Option<Encoding> {
        let mut dense = |reason: String| {
            log::info!("{name}: stored dense ({encoding}): {reason}");
            self.dense_storage.push((name.to_string(), reason));
            None
        };
        if !self.options.sparse_storage {
            return dense("dense storage requested".into());
        }
        if let Sparsity::Unstructured(_) = sparsity {
            let (rows, cols) = (shape[0], shape[1]);
            let Some(masked) = encoding.masked_storage(values, rows, cols) else {
                return dense(format!(
                    "no unstructured sparse encoding with {encoding} values (q8 and symmetric \
                     q4 have one)"
                ));
            };
            let bytes = |e: Encoding| e.byte_len(shape).unwrap_or(usize::MAX) as f64;
            let share = bytes(masked) / bytes(encoding);
            if share > MASKED_MAX_SHARE {
                return dense(format!(
                    "{} would read {:.0}% of the dense bytes (sparse storage pays from {:.0}% \
                     down)",
                    masked.describe(),
                    100.0 * share,
                    100.0 * MASKED_MAX_SHARE
                ));
            }
            if !self.masked_noted {
                // Once per conversion: the speed depends on the CPU that will run the file.
                log::warn!(
                    "storing unstructured-pruned matrices as {} ({:.0}% of the dense bytes): \
                     decode is faster than dense on AVX-512 VBMI2 CPUs but slower on AVX2-only \
                     x86 and on ARM NEON; pass --dense-storage when such a target needs speed \
                     more than size",
                    masked.name(),
                    100.0 * share
                );
                self.masked_noted = true;
            }
            self.sparse_tensors += 1;
            return Some(masked);
        }
        let Some(sparse) = encoding.sparse_storage() else {
            return dense(format!(
                "no sparse encoding with {encoding} values (f16, q8 and symmetric q4 have one)"
            ));
        };
        // f16+2:4 keeps 2 of every 4 weights, the quantized ones 4 of every 8.
        let (run, kept) = if sparse == Encoding::F16Sparse24 {
            (4, 2)
        } else {
            (8, 4)
        };
        if !shape[1].is_multiple_of(8) {
            return dense(format!(
                "rows of {} columns are not a multiple of 8",
                shape[1]
            ));
        }
        let fits = values
            .chunks_exact(run)
            .all(|r| r.iter().filter(|v| **v != 0.0).count() <= kept);
        if !fits {
            return dense(format!(
                "some runs of {run} keep more than {kept} weights ({} for {sparse})",
                sparsity.describe()
            ));
        }
        self.sparse_tensors += 1;
        Some(sparse)
    }

    /// Encodes and writes one matrix; returns the values the runtime will read back (what
    /// later blocks are calibrated against). `block_matrix`: a transformer block's linear
    /// layer (the ones pruning and the calibrated methods apply to).
    fn write_matrix(
        &mut self,
        name: &str,
        shape: &[usize],
        mut values: Vec<f32>,
        evidence: Option<Evidence<'_>>,
        block_matrix: bool,
    ) -> Result<Vec<f32>, ConvertError> {
        let options = self.options;
        let mut encoding = options.encoding_for(name, shape);
        if let Some(reason) = quant::unsupported_reason(shape, encoding) {
            log::info!("{name}: kept in f16 instead of {encoding}: {reason}");
            self.fallbacks.push((name.to_string(), reason));
            encoding = Encoding::F16;
        }
        let method_err = |message: String| ConvertError::Method {
            tensor: name.to_string(),
            message,
        };
        let (rows, cols) = (shape[0], shape[1]);
        let quantized = encoding.is_quantized();
        let clipping = options.clipping();
        let gptq_options = GptqOptions {
            clipping,
            ..options.gptq.clone()
        };
        // Mean square of each (scaled) input channel: Wanda's norms, the clipping weights.
        let input_energy = evidence.as_ref().map(|e| {
            let mut energy = e.stats.mean_square();
            if let Some(s) = e.scales {
                energy.iter_mut().zip(s).for_each(|(m, s)| *m /= s * s);
            }
            energy
        });

        let pruning = options.pruning.filter(|_| block_matrix);
        let pruning = match pruning.map(|p| (p, p.sparsity.unsupported_reason(cols))) {
            Some((_, Some(reason))) => {
                log::warn!("{name}: not pruned: {reason}");
                self.prune_skipped.push((name.to_string(), reason));
                None
            }
            other => other.map(|(p, _)| p),
        };
        let mask = match pruning {
            Some(Pruning {
                method: PruneMethod::Magnitude,
                sparsity,
            }) => Some(prune::select_mask(
                &prune::scores(&values, cols, None),
                cols,
                sparsity,
            )),
            Some(Pruning {
                method: PruneMethod::Wanda,
                sparsity,
            }) => {
                let energy = input_energy
                    .as_deref()
                    .ok_or_else(|| method_err("wanda needs calibration statistics".into()))?;
                let scores = prune::scores(&values, cols, Some(energy));
                Some(prune::select_mask(&scores, cols, sparsity))
            }
            _ => None,
        };

        // Values (and grids when quantizing) from the method that owns this matrix.
        let mut grids = None;
        let sweep = match (&pruning, &evidence) {
            (
                Some(Pruning {
                    method: PruneMethod::SparseGpt,
                    sparsity,
                }),
                Some(e),
            ) => Some((e, Some(gptq::Prune::Select(*sparsity)))),
            (_, Some(e)) if quantized && options.method.uses_gptq() => {
                Some((e, mask.as_deref().map(gptq::Prune::Fixed)))
            }
            (
                Some(Pruning {
                    method: PruneMethod::SparseGpt,
                    ..
                }),
                None,
            ) => {
                return Err(method_err("sparsegpt needs calibration statistics".into()));
            }
            _ => None,
        };
        if let Some((e, prune)) = sweep {
            // Only the sweep reads the (rescaled) Hessian, so only it pays for the copy.
            let hessian = scaled_hessian(e.stats, e.scales);
            let target = quantized.then_some(encoding);
            let out =
                gptq::sweep_target(&values, rows, cols, &hessian, target, prune, &gptq_options)
                    .map_err(|e| ConvertError::pass(name, e))?;
            log::debug!("{name}: sweep loss {:.4e}", out.loss);
            self.gptq_loss += out.loss;
            values = out.values;
            if quantized {
                grids = Some(out.grids);
            }
        } else if let Some(mask) = &mask {
            values
                .iter_mut()
                .zip(mask)
                .filter(|(_, pruned)| **pruned)
                .for_each(|(v, _)| *v = 0.0);
        }
        if pruning.is_some() {
            self.pruned += values.iter().filter(|v| **v == 0.0).count() as u64;
            self.prunable += values.len() as u64;
        }
        if let Some(p) = pruning
            && let Some(sparse) = self.sparse_storage(name, shape, &values, encoding, p.sparsity)
        {
            encoding = sparse;
        }

        let grids = match encoding {
            e if e.is_quantized() => Some(match grids {
                Some(g) => g,
                // Clipping weighted by the (scaled) activation energy of each column.
                None => {
                    quant::choose_grids(&values, cols, encoding, clipping, input_energy.as_deref())
                }
            }),
            _ => None,
        };
        let tensor = recover::BlockTensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            encoding,
            values,
            grids,
            masked: pruning.is_some(),
        };
        self.store(tensor)
    }

    /// Writes `name`'s residual: `original − stored` (what quantizing it lost), quantized in
    /// the residual encoding by the conversion's method (with GPTQ, against the matrix's
    /// inputs, so the residual's own rounding is compensated like the base's). Skipped for a
    /// matrix that fell back to float storage (nothing was lost) or whose shape the residual
    /// encoding cannot store.
    fn write_residual(
        &mut self,
        name: &str,
        shape: &[usize],
        original: Vec<f32>,
        stored: &[f32],
        evidence: Option<Evidence<'_>>,
    ) -> Result<(), ConvertError> {
        if self.fallbacks.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let residual_name = names::residual(name);
        let encoding = self.options.encoding_for(&residual_name, shape);
        if let Some(reason) = quant::unsupported_reason(shape, encoding) {
            log::info!("{name}: no residual: {reason}");
            return Ok(());
        }
        let residual: Vec<f32> = original.iter().zip(stored).map(|(w, b)| w - b).collect();
        self.total += 1;
        self.residuals += 1;
        self.write_matrix(&residual_name, shape, residual, evidence, false)?;
        Ok(())
    }

    /// Writes matrix `name` (`w`, `rows × cols`) as its rank-`rank` factors `V` then `U`, each
    /// in the encoding the options give its tensor name (and pruned as the options say). With
    /// calibration, `V` is quantized against the matrix's inputs and `U` against `V`'s outputs
    /// (`V·H·Vᵀ`); for SVD-LLM, `U` is first refitted to the stored `V`. Returns `U·V` as the runtime will apply it.
    fn write_lowrank(
        &mut self,
        name: &str,
        w: Vec<f32>,
        decomposition: &lowrank::Decomposition,
        rank: usize,
        evidence: Option<Evidence<'_>>,
    ) -> Result<Vec<f32>, ConvertError> {
        let (rows, cols) = (decomposition.rows, decomposition.cols);
        let method = self.options.lowrank.map(|l| l.method);
        let (v, u) = decomposition.factors(rank);
        self.total += 1;
        let v_name = names::lowrank_v(name);
        // Pruning, when asked for, applies to the factors (each against its own inputs).
        let v = self.write_matrix(&v_name, &[rank, cols], v, evidence, true)?;
        let (u, u_stats) = match evidence {
            Some(e) => {
                let (u, gram) = if method == Some(LowRankMethod::SvdLlm) {
                    lowrank::refit_u(&w, rows, cols, &v, rank, &e.stats.hessian)
                        .map_err(|source| ConvertError::pass(name, source))?
                } else {
                    (u, lowrank::factor_hessian(&v, rank, cols, &e.stats.hessian))
                };
                let stats = calib::InputStats::from_second_moments(rank, gram, e.stats.tokens);
                (u, Some(stats))
            }
            None => (u, None),
        };
        let u_evidence = u_stats.as_ref().map(|stats| Evidence {
            stats,
            scales: None,
        });
        let u = self.write_matrix(&names::lowrank_u(name), &[rows, rank], u, u_evidence, true)?;
        self.lowrank_ranks.push((name.to_string(), rank));
        self.lowrank_before += (rows * cols) as u64;
        self.lowrank_after += (rank * (rows + cols)) as u64;
        Ok(lowrank::multiply(&u, &v, rows, rank, cols))
    }
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
        BlockWeights {
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
