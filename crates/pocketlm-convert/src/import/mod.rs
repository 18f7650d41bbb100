//! Readers for the checkpoints users convert from: Hugging Face directories and GGUF files.
//!
//! Every importer produces an [`ImportedModel`]: a validated [`ModelConfig`], the tokenizer
//! (as `tokenizers` JSON), and a [`TensorSource`] that dequantizes one tensor at a time so the
//! converter's memory stays bounded by the largest tensor, not the model.

pub mod hf;

use std::path::{Path, PathBuf};

pub use pocketlm_format::TokenizerSpec;
use pocketlm_format::config::ModelConfig;

pub mod ggml_quants;
pub mod gguf;
pub mod gguf_tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "{path}: unsupported architecture '{arch}' (supported: {})",
        pocketlm_format::Architecture::supported_list()
    )]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{path}: missing tensor '{name}'")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor '{name}': {message}")]
    Tensor {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A GGUF file's header, metadata or tensor descriptors could not be read.
    #[error("{path}: {section}: {source}")]
    Gguf {
        path: PathBuf,
        section: gguf::GgufSection,
        #[source]
        source: gguf::GgufError,
    },
    /// A tensor's stored data could not be dequantized.
    #[error("{path}: tensor '{name}': {source}")]
    Dequantize {
        path: PathBuf,
        name: String,
        #[source]
        source: ggml_quants::GgmlError,
    },
}

impl ImportError {
    pub fn invalid(path: &Path, message: impl Into<String>) -> Self {
        ImportError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    pub fn tensor(path: &Path, name: &str, message: impl Into<String>) -> Self {
        ImportError::Tensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            message: message.into(),
        }
    }
}

/// A tensor as the converter sees it: canonical name (see [`pocketlm_format::config::names`]),
/// row-major shape with the outermost dimension first, and its original storage type.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// e.g. "F32", "BF16", "Q4_1": what the checkpoint stored, for provenance and logs.
    pub source_type: String,
}

/// Tensors of a checkpoint, materialized one at a time as f32.
pub trait TensorSource: Send + Sync {
    /// All tensors under their canonical names, in checkpoint order.
    fn tensors(&self) -> &[SourceTensor];

    /// Dequantizes/converts one tensor to f32, row-major, in canonical layout.
    fn load_f32(&self, name: &str) -> Result<Vec<f32>, ImportError>;

    fn find(&self, name: &str) -> Option<&SourceTensor> {
        self.tensors().iter().find(|t| t.name == name)
    }
}

pub struct ImportedModel {
    pub config: ModelConfig,
    pub tokenizer: TokenizerSpec,
    pub source: Box<dyn TensorSource>,
    /// Where the weights came from (`hf:<dir>`, `gguf:<file>`) and the source's own type mix.
    pub provenance: serde_json::Value,
}

/// Reorders q/k projection rows from llama.cpp's interleaved rotary layout (pairs 2i, 2i+1)
/// to the Hugging Face "rotate half" layout (pairs i, i + head_dim/2), per head.
pub fn unpermute_interleaved_rope_rows(
    weights: &[f32],
    num_heads: usize,
    head_dim: usize,
    cols: usize,
) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0f32; weights.len()];
    for h in 0..num_heads {
        for j in 0..half {
            for s in 0..2 {
                let src = h * head_dim + 2 * j + s;
                let dst = h * head_dim + s * half + j;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&weights[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Opens a Hugging Face directory (config.json + *.safetensors) or a `.gguf` file.
pub fn open(path: &Path) -> Result<ImportedModel, ImportError> {
    if path.is_dir() {
        hf::open(path)
    } else if path.extension().and_then(|e| e.to_str()) == Some("gguf") || gguf::has_magic(path) {
        gguf::open(path)
    } else if !path.exists() {
        Err(ImportError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        })
    } else {
        Err(ImportError::invalid(
            path,
            "not a Hugging Face model directory (config.json + *.safetensors) nor a GGUF file",
        ))
    }
}

/// Checks that every tensor the runtime needs for `config` is present with the right shape.
pub fn check_required_tensors(
    path: &Path,
    config: &ModelConfig,
    source: &dyn TensorSource,
) -> Result<(), ImportError> {
    for (name, shape) in pocketlm_format::config::expected_tensors(config) {
        match source.find(&name) {
            None => {
                return Err(ImportError::MissingTensor {
                    path: path.to_path_buf(),
                    name,
                });
            }
            Some(t) if t.shape != shape => {
                return Err(ImportError::tensor(
                    path,
                    &name,
                    format!("shape {:?}, expected {:?} from the config", t.shape, shape),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_moves_interleaved_pairs_to_halves() {
        // one head, head_dim 4, one column: interleaved rows [a0, b0, a1, b1] -> [a0, a1, b0, b1]
        let w = [10.0, 20.0, 11.0, 21.0];
        assert_eq!(
            unpermute_interleaved_rope_rows(&w, 1, 4, 1),
            vec![10.0, 11.0, 20.0, 21.0]
        );
        // bias vectors are the cols == 1 case; two heads stay separate
        let w2 = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        assert_eq!(
            unpermute_interleaved_rope_rows(&w2, 2, 4, 1),
            vec![1.0, 3.0, 2.0, 4.0, 5.0, 7.0, 6.0, 8.0]
        );
    }
}
