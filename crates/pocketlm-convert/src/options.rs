//! What a conversion is asked to do (`ConvertOptions`), and the checks that refuse
//! combinations the passes cannot honour.

use super::*;
use crate::refusal::{Field, PrunedStorage};

/// How the quantized matrices' values are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Method {
    /// Round to nearest, per group (with [`Clipping::Search`], the error-minimising range).
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

    pub(crate) fn uses_awq(self) -> bool {
        matches!(self, Method::Awq | Method::AwqGptq)
    }

    pub(crate) fn uses_gptq(self) -> bool {
        matches!(self, Method::Gptq | Method::AwqGptq)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
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

/// A `PATTERN=ENCODING` rule: tensors matching the pattern take that encoding instead of
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
pub(crate) fn glob_match(pattern: &str, name: &str) -> bool {
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
    /// Incoherence processing: every block matrix is stored as `W·Rᵀ`, `R` a randomized
    /// block Hadamard transform of its input, which the runtime applies to the activations.
    /// Rotated rows have no outlier channels, so their quantization grids fit better.
    pub rotate: bool,
    /// The preset these options came from, recorded in the recipe.
    pub preset: Option<crate::Preset>,
}

/// A pruning method with its sparsity (a fraction, or an N:M pattern).
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
            rotate: false,
            preset: None,
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

    pub(crate) fn embedding_encoding(&self) -> Encoding {
        self.embedding.unwrap_or(if self.weights.is_quantized() {
            Encoding::Q8 { group: 32 }
        } else {
            self.weights
        })
    }

    pub(crate) fn clipping(&self) -> Clipping {
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

    /// The first non-uniform grid encoding the block matrices may get (`weights` or a keep
    /// rule's), which passes assuming evenly spaced levels or a zero level refuse.
    pub(crate) fn non_uniform_block_encoding(&self) -> Option<Encoding> {
        std::iter::once(self.weights)
            .chain(self.keep.iter().map(|k| k.encoding))
            .find(|e| e.quant_kind().is_some_and(|k| k.info().grid.is_some()))
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

    /// Refuses options the conversion cannot honour: each block recipe's, sparse storage
    /// encodings asked for directly, the passes' own refusals, and empty calibration.
    pub(crate) fn validate(&self) -> Result<(), Refusal> {
        for recipe in &self.blocks {
            let mut block = self.with_recipe(recipe);
            if !recipe.weights.is_quantized() {
                // The quantization method has nothing to do in a float block.
                block.method = Method::Rtn;
            }
            block.validate().map_err(|refusal| Refusal::InBlockRecipe {
                recipe: recipe.to_string(),
                refusal: Box::new(refusal),
            })?;
        }
        let requested = std::iter::once((Field::Weights, self.weights))
            .chain(self.embedding.map(|e| (Field::Embedding, e)))
            .chain(self.output.map(|e| (Field::Output, e)))
            .chain(self.keep.iter().map(|k| (Field::Keep, k.encoding)));
        for (field, encoding) in requested {
            let pruned = if encoding.is_masked() {
                PrunedStorage::Unstructured
            } else if matches!(
                encoding,
                Encoding::F16Sparse24 | Encoding::Q8Sparse48 { .. } | Encoding::Q4Sparse48 { .. }
            ) {
                PrunedStorage::NM
            } else {
                continue;
            };
            let base = match encoding {
                Encoding::F16Sparse24 => Encoding::F16,
                other => other.quant_base(),
            };
            return Err(Refusal::StorageEncoding {
                field,
                encoding,
                base,
                pruned,
            });
        }
        // Each pass's own refusals, and those of passes that do not combine.
        crate::passes::Passes::default().validate(self)?;
        if let Some(c) = &self.calibration
            && (c.samples == 0 || c.seq_len < 2)
        {
            return Err(Refusal::CalibrationTooShort {
                samples: c.samples,
                seq_len: c.seq_len,
            });
        }
        Ok(())
    }
}
