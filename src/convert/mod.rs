//! The converter: checkpoint → .plm, one tensor at a time so memory stays bounded by the
//! largest tensor. Compression passes (quantization, pruning, low rank) plug in here.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

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
    /// Encoding of weight matrices (embedding and output included).
    pub dtype: Encoding,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            dtype: Encoding::F16,
        }
    }
}

/// What a conversion produced, for the CLI summary and tests.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub tensors: usize,
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
    for (i, (name, shape)) in expected.iter().enumerate() {
        let values = model.source.load_f32(name)?;
        // Norms and biases are tiny and numerically sensitive: always f32.
        let encoding = if shape.len() == 1 {
            Encoding::F32
        } else {
            options.dtype
        };
        writer.add_f32(name, shape, &values, encoding)?;
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
        "recipe": { "weights": options.dtype.name(), "vectors": "f32" },
        "provenance": {
            "source": model.provenance,
            "converter": format!("pocketlm {}", env!("CARGO_PKG_VERSION")),
            "converted_at_unix": converted_at,
        },
    });
    let file_bytes = writer.finish(&metadata)?;
    Ok(ConvertReport {
        tensors: expected.len(),
        parameters,
        file_bytes,
    })
}
