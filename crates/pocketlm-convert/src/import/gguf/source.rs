//! The tensors of a GGUF file as a [`TensorSource`]: dequantized, fused tensors split, rotary rows
//! un-interleaved.

use super::model::{ROPE_TENSORS, fused_parts};
use super::*;

/// Tensors of a GGUF file under their (already canonical) GGUF names, in HF layout.
pub struct GgufTensorSource {
    file: Arc<GgufFile>,
    tensors: Vec<SourceTensor>,
    /// Canonical tensors stored as rows of a fused one (Phi-3's `attn_qkv`, and `ffn_up`
    /// holding gate and up): the stored name and the rows.
    parts: HashMap<String, (String, std::ops::Range<usize>)>,
    /// Tensors whose rows llama.cpp interleaved for rotary embeddings, with their head count.
    interleaved: HashMap<String, usize>,
    head_dim: usize,
}

impl GgufTensorSource {
    pub fn new(file: Arc<GgufFile>, config: &ModelConfig) -> Result<Self, ImportError> {
        let mut tensors = Vec::new();
        let mut parts = HashMap::new();
        for t in file.tensor_infos() {
            if ROPE_TENSORS.contains(&t.name.as_str()) {
                continue;
            }
            let shape = t.shape();
            let split = fused_parts(config, &t.name, &shape);
            if split.is_empty() {
                tensors.push(SourceTensor {
                    name: t.name.clone(),
                    shape: shape.clone(),
                    source_type: t.ggml_type.name(),
                });
            }
            for (name, rows) in split {
                let mut part = shape.clone();
                part[0] = rows.len();
                tensors.push(SourceTensor {
                    name: name.clone(),
                    shape: part,
                    source_type: t.ggml_type.name(),
                });
                parts.insert(name, (t.name.clone(), rows));
            }
        }
        let mut interleaved = HashMap::new();
        // llama.cpp's converter permutes q/k (weights and biases) only for `llama` and the
        // families it converts as Llama (SmolLM3); the others keep the HF rotate-half order.
        if matches!(
            config.architecture,
            Architecture::Llama | Architecture::Mistral | Architecture::Smollm3
        ) {
            for l in 0..config.num_layers {
                interleaved.insert(names::attn_q(l), config.num_heads);
                interleaved.insert(names::attn_k(l), config.num_kv_heads);
                interleaved.insert(names::attn_q_bias(l), config.num_heads);
                interleaved.insert(names::attn_k_bias(l), config.num_kv_heads);
            }
        }
        Ok(GgufTensorSource {
            file,
            tensors,
            parts,
            interleaved,
            head_dim: config.head_dim,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

impl TensorSource for GgufTensorSource {
    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    fn load_f32(&self, name: &str) -> Result<Vec<f32>, ImportError> {
        let path = self.file.path();
        if let Some((stored, rows)) = self.parts.get(name) {
            let info = self
                .file
                .tensor_info(stored)
                .ok_or_else(|| ImportError::MissingTensor {
                    path: path.to_path_buf(),
                    name: stored.clone(),
                })?;
            let cols = info.dims.first().copied().unwrap_or(1) as usize;
            let data = self.file.dequantize(info)?;
            return data
                .get(rows.start * cols..rows.end * cols)
                .map(<[f32]>::to_vec)
                .ok_or_else(|| ImportError::tensor(path, stored, "shorter than its shape says"));
        }
        let info = self
            .file
            .tensor_info(name)
            .filter(|t| !ROPE_TENSORS.contains(&t.name.as_str()))
            .ok_or_else(|| ImportError::MissingTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
            })?;
        let data = self.file.dequantize(info)?;
        let Some(&heads) = self.interleaved.get(name) else {
            return Ok(data);
        };
        let rows = info.shape()[0];
        let cols = if info.dims.len() == 1 {
            1
        } else {
            info.dims[0] as usize
        };
        let rows_expected = heads * self.head_dim;
        if info.dims.len() > 2
            || rows != rows_expected
            || rows.checked_mul(cols) != Some(data.len())
        {
            return Err(ImportError::tensor(
                path,
                name,
                format!(
                    "shape {:?} does not match {heads} heads × head_dim {}",
                    info.shape(),
                    self.head_dim
                ),
            ));
        }
        Ok(unpermute_interleaved_rope_rows(
            &data,
            heads,
            self.head_dim,
            cols,
        ))
    }
}
