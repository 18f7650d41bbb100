//! Sensitivity scan for mixed precision: quantizes one block at a time (everything else kept
//! at the base encoding) and measures the perplexity each costs, so the most sensitive blocks
//! can be kept at higher precision with `keep` rules.

use std::path::PathBuf;

use super::{ConvertError, ConvertOptions, KeepRule, convert};
use crate::import::ImportedModel;
use crate::refusal::Refusal;
use pocketlm_eval::{PerplexityOptions, perplexity};
use pocketlm_format::Encoding;
use pocketlm_runtime::model::{Model, ModelOptions};

#[derive(Clone, Debug)]
pub struct SensitivityOptions {
    /// The encoding whose cost is measured, block by block.
    pub encoding: Encoding,
    /// Encoding of everything else (the reference model).
    pub base: Encoding,
    pub text: String,
    pub perplexity: PerplexityOptions,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerSensitivity {
    pub layer: usize,
    pub ppl: f64,
    /// `ppl − base ppl`: what quantizing this block alone costs.
    pub ppl_increase: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct SensitivityReport {
    pub encoding: String,
    pub base_ppl: f64,
    /// Most sensitive first.
    pub layers: Vec<LayerSensitivity>,
}

/// Runs the scan: one conversion and one perplexity run per block, plus the base. Files go
/// to the system temp directory and are removed as soon as they are measured.
pub fn scan(
    model: &ImportedModel,
    options: &SensitivityOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SensitivityReport, ConvertError> {
    if !options.encoding.is_quantized() {
        return Err(Refusal::SensitivityEncoding {
            encoding: options.encoding,
        }
        .into());
    }
    let layers = model.config.num_layers;
    let measure = |keep: Vec<KeepRule>, tag: &str| -> Result<f64, ConvertError> {
        let path = TempFile(std::env::temp_dir().join(format!(
            "pocketlm-sensitivity-{}-{tag}.plm",
            std::process::id()
        )));
        let opts = ConvertOptions {
            keep,
            ..ConvertOptions::with_weights(options.base)
        };
        convert(model, &path.0, &opts, &mut |_, _, _| {})?;
        let m = Model::open_with(&path.0, ModelOptions::default())?;
        Ok(perplexity(&m, &options.text, &options.perplexity, |_, _, _| {})?.ppl)
    };
    let base_ppl = measure(Vec::new(), "base")?;
    progress(1, layers + 1);
    let mut out = Vec::with_capacity(layers);
    for layer in 0..layers {
        let rule = KeepRule {
            pattern: layer.to_string(),
            encoding: options.encoding,
        };
        let ppl = measure(vec![rule], &layer.to_string())?;
        log::info!(
            "sensitivity: block {layer}: ppl {ppl:.4} (+{:.4})",
            ppl - base_ppl
        );
        out.push(LayerSensitivity {
            layer,
            ppl,
            ppl_increase: ppl - base_ppl,
        });
        progress(layer + 2, layers + 1);
    }
    out.sort_by(|a, b| b.ppl_increase.total_cmp(&a.ppl_increase));
    Ok(SensitivityReport {
        encoding: options.encoding.describe(),
        base_ppl,
        layers: out,
    })
}

/// Removes the file when dropped (also on error paths).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
