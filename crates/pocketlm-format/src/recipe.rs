//! The recipe a `.plm` file records under `metadata.recipe`: how the converter made it. The
//! converter writes it, `inspect` and the evaluation report read it. Every field has a default
//! so files written before a field existed still read; absent passes are `null`, as the
//! converter has always written them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a file was converted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Recipe {
    /// The named preset (`q8`, `q4`, `q3`) the options came from, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Encoding of the block matrices, e.g. `q4/g64`.
    pub weights: String,
    /// Encoding of the token embedding (and tied output).
    pub embedding: String,
    /// Encoding of norms and biases.
    pub vectors: String,
    /// Quantization method (`rtn`, `gptq`, `awq`, `awq+gptq`), `none` for float files.
    pub method: String,
    /// Range of the quantization grid: `minmax` or `search`.
    pub clipping: String,
    pub gptq: Option<GptqRecipe>,
    pub calibration: Option<CalibrationRecipe>,
    pub prune: Option<PruneRecipe>,
    pub residual: Option<ResidualRecipe>,
    pub prune_heads: Option<HeadPruningRecipe>,
    pub prune_channels: Option<ChannelPruningRecipe>,
    pub lowrank: Option<LowRankRecipe>,
    pub recover: Option<RecoverRecipe>,
    /// Incoherence processing of the block matrices' inputs, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incoherence: Option<IncoherenceRecipe>,
    /// Per-block recipes of the planner (`q4~v=q8`, ...), when it chose them.
    pub blocks: Option<Vec<String>>,
    /// `PATTERN=ENCODING` overrides.
    pub keep: Vec<String>,
    /// How many tensors each encoding stores.
    pub tensor_encodings: BTreeMap<String, usize>,
    /// Tensors stored in another encoding than asked, and why.
    pub fallbacks: Vec<TensorNote>,
}

/// Incoherence processing: which transform rotated the block matrices' inputs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IncoherenceRecipe {
    /// `block-hadamard`: random signs, then a Walsh–Hadamard transform per block of the
    /// largest power of two dividing the width.
    pub transform: String,
    pub seed: u64,
}

/// A tensor and why something happened to it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TensorNote {
    pub tensor: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GptqRecipe {
    pub damp: f64,
    pub block: usize,
    pub act_order: bool,
    /// Summed reconstruction loss over the quantized matrices.
    pub loss: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CalibrationRecipe {
    /// Where the text came from (a path or a name).
    pub source: String,
    pub sequences: usize,
    pub seq_len: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PruneRecipe {
    pub method: String,
    pub sparsity: String,
    pub schedule: String,
    /// OWL: each block's sparsity.
    pub block_sparsity: Option<Vec<f32>>,
    /// OWL: each block's share of outlier activations.
    pub block_outlier_ratio: Option<Vec<f64>>,
    /// Share of the prunable weights set to zero.
    pub achieved: f64,
    pub skipped: Vec<TensorNote>,
    pub sparse_tensors: usize,
    pub dense_storage: Vec<TensorNote>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResidualRecipe {
    pub encoding: String,
    pub tensors: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HeadPruningRecipe {
    pub fraction: f32,
    pub kv_heads_before: usize,
    pub kv_heads_after: usize,
    pub heads_before: usize,
    pub heads_after: usize,
    pub loss: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChannelPruningRecipe {
    pub fraction: f32,
    pub intermediate_size_before: usize,
    pub intermediate_size_after: usize,
    pub loss: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LowRankRecipe {
    pub method: String,
    pub target: String,
    pub allocation: String,
    /// Rank kept per factorized matrix.
    pub ranks: BTreeMap<String, usize>,
    /// Matrices left dense (factorizing them would not save anything).
    pub dense: Vec<String>,
    pub weights_before: u64,
    pub weights_after: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecoverRecipe {
    pub mode: String,
    pub steps: usize,
    pub batch: usize,
    pub learning_rate: f32,
    pub codes: bool,
    pub samples: Option<usize>,
    /// Block-wise: each block's reconstruction error before and after, and whether the
    /// tuned values were kept.
    pub loss_before: Vec<f64>,
    pub loss_after: Vec<f64>,
    pub kept: Vec<bool>,
    pub kd: Option<DistillationRecipe>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DistillationRecipe {
    pub kl_before: f64,
    pub kl_after: f64,
    pub train_kl_before: f64,
    pub train_kl_after: f64,
    pub held_out_sequences: usize,
    pub train_scored_sequences: usize,
    pub kept: bool,
    pub best_step: usize,
    pub parameters: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipe_round_trips_and_old_files_read_with_defaults() {
        let recipe = Recipe {
            weights: "q4/g64".into(),
            embedding: "q8/g32".into(),
            vectors: "f32".into(),
            method: "gptq".into(),
            clipping: "search".into(),
            gptq: Some(GptqRecipe {
                damp: 0.01,
                block: 128,
                act_order: true,
                loss: 1.5,
            }),
            keep: vec!["0=q8".into()],
            tensor_encodings: BTreeMap::from([("q4/g64".into(), 210), ("f32".into(), 61)]),
            ..Recipe::default()
        };
        let json = serde_json::to_value(&recipe).unwrap();
        // Absent passes are written as null, as the converter always wrote them.
        assert!(json["prune"].is_null() && json["recover"].is_null());
        assert_eq!(json["gptq"]["block"], 128);
        assert_eq!(serde_json::from_value::<Recipe>(json).unwrap(), recipe);
        // A file from before most passes existed: only the first fields.
        let old: Recipe =
            serde_json::from_str(r#"{"weights": "q8/g32", "method": "rtn"}"#).unwrap();
        assert_eq!((old.weights.as_str(), old.gptq), ("q8/g32", None));
        assert!(old.keep.is_empty());
    }
}
