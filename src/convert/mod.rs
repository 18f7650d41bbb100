//! The converter: checkpoint → .plm, one tensor at a time so memory stays bounded by the
//! largest tensor. Compression passes (quantization, pruning, low rank) plug in here.

pub mod quant;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::names;
use crate::format::{Encoding, PlmError, PlmWriter};
use crate::import::{self, ImportError, ImportedModel};
use crate::model::expected_tensors;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Format(#[from] PlmError),
    #[error("invalid option: {0}")]
    Options(String),
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
        }
    }

    fn embedding_encoding(&self) -> Encoding {
        self.embedding.unwrap_or(if self.weights.is_quantized() {
            Encoding::Q8 { group: 32 }
        } else {
            self.weights
        })
    }

    /// The encoding requested for tensor `name` of `shape`.
    pub fn encoding_for(&self, name: &str, shape: &[usize]) -> Encoding {
        if shape.len() == 1 {
            // Norms and biases are tiny and numerically sensitive: always f32.
            Encoding::F32
        } else if name == names::TOKEN_EMBD {
            self.embedding_encoding()
        } else if name == names::OUTPUT {
            self.output.unwrap_or_else(|| self.embedding_encoding())
        } else {
            self.weights
        }
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
    let expected = expected_tensors(&model.config);
    for t in model.source.tensors() {
        if !expected.iter().any(|(name, _)| *name == t.name) {
            log::warn!(
                "tensor {} is not used by the runtime; not converted",
                t.name
            );
        }
    }
    let mut writer = PlmWriter::create(dst)?;
    let mut parameters = 0u64;
    let mut fallbacks = Vec::new();
    let mut encodings = std::collections::BTreeMap::<String, usize>::new();
    for (i, (name, shape)) in expected.iter().enumerate() {
        let values = model.source.load_f32(name)?;
        let mut encoding = options.encoding_for(name, shape);
        if let Some(reason) = quant::unsupported_reason(shape, encoding) {
            log::info!("{name}: kept in f16 instead of {encoding}: {reason}");
            fallbacks.push((name.clone(), reason));
            encoding = Encoding::F16;
        }
        if encoding.is_quantized() {
            let bytes = quant::quantize_rtn(&values, shape, encoding).ok_or_else(|| {
                ConvertError::Options(format!(
                    "{name}: cannot quantize shape {shape:?} to {encoding}"
                ))
            })?;
            writer.add_tensor(name, shape, encoding, &bytes)?;
        } else {
            writer.add_f32(name, shape, &values, encoding)?;
        }
        *encodings.entry(encoding.describe()).or_default() += 1;
        parameters += values.len() as u64;
        progress(i + 1, expected.len(), name);
    }
    let converted_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let metadata = serde_json::json!({
        "format": "pocketlm",
        "config": model.config,
        "tokenizer": model.tokenizer,
        "recipe": {
            "weights": options.weights.describe(),
            "embedding": options.encoding_for(names::TOKEN_EMBD, &[1, 1]).describe(),
            "vectors": "f32",
            "method": if options.weights.is_quantized() { "rtn" } else { "none" },
            "tensor_encodings": encodings,
            "fallbacks": fallbacks.iter().map(|(n, r)| serde_json::json!({"tensor": n, "reason": r})).collect::<Vec<_>>(),
        },
        "provenance": {
            "source": model.provenance,
            "converter": format!("pocketlm {}", env!("CARGO_PKG_VERSION")),
            "converted_at_unix": converted_at,
        },
    });
    let file_bytes = writer.finish(&metadata)?;
    Ok(ConvertReport {
        tensors: expected.len(),
        fallbacks,
        parameters,
        file_bytes,
    })
}
