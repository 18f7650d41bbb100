//! Where a conversion's tensors go (the file, or only a byte count for the planner), and
//! the running totals the recipe reports.

use super::*;
use pocketlm_format::recipe::TensorNote;

/// What the calibration saw of a matrix's input, and the AWQ scales folded into its columns.
#[derive(Clone, Copy)]
pub(crate) struct Evidence<'a> {
    pub(crate) stats: &'a calib::InputStats,
    pub(crate) scales: Option<&'a [f32]>,
}

/// Where encoded tensors go: the file being written, or only a count of the bytes they
/// would take (the planner measures recipes this way without writing them).
pub(crate) enum Sink {
    File(PlmWriter),
    Count { bytes: u64 },
}

impl Sink {
    pub(crate) fn count(
        &mut self,
        name: &str,
        shape: &[usize],
        encoding: Encoding,
    ) -> Result<(), PlmError> {
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

    pub(crate) fn add_f32(
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

    pub(crate) fn add_tensor(
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
pub(crate) struct Output<'a, 'p> {
    pub(crate) writer: Sink,
    pub(crate) options: &'a ConvertOptions,
    pub(crate) parameters: u64,
    pub(crate) fallbacks: Vec<(String, String)>,
    pub(crate) encodings: std::collections::BTreeMap<String, usize>,
    pub(crate) done: usize,
    pub(crate) total: usize,
    pub(crate) progress: Progress<'p>,
    pub(crate) gptq_loss: f64,
    /// Whether the speed caveat of the masked encodings has been logged.
    pub(crate) masked_noted: bool,
    /// Zeros and total weights of the matrices pruning applied to.
    pub(crate) pruned: u64,
    pub(crate) prunable: u64,
    /// Matrices pruning skipped, with the reason.
    pub(crate) prune_skipped: Vec<(String, String)>,
    /// Pruned matrices stored in a sparse encoding, and those stored dense (with the reason).
    pub(crate) sparse_tensors: usize,
    pub(crate) dense_storage: Vec<(String, String)>,
    /// Factorized matrices and their ranks.
    pub(crate) lowrank_ranks: Vec<(String, usize)>,
    /// Weights of the factorized matrices before and after.
    pub(crate) lowrank_before: u64,
    pub(crate) lowrank_after: u64,
    /// Residual tensors written.
    pub(crate) residuals: usize,
    /// While a block is being recovered: its tensors, held back until recovery has tuned
    /// them (then written in the same order).
    pub(crate) deferred: Option<Vec<recover::BlockTensor>>,
}

impl<'a, 'p> Output<'a, 'p> {
    pub(crate) fn new(
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
            masked_noted: false,
            pruned: 0,
            prunable: 0,
            prune_skipped: Vec::new(),
            sparse_tensors: 0,
            dense_storage: Vec::new(),
            lowrank_ranks: Vec::new(),
            lowrank_before: 0,
            lowrank_after: 0,
            residuals: 0,
            deferred: None,
        }
    }

    /// Bytes counted so far by a [`Sink::Count`] output (0 for a file).
    pub(crate) fn counted_bytes(&self) -> u64 {
        match self.writer {
            Sink::Count { bytes } => bytes,
            Sink::File(_) => 0,
        }
    }

    /// Sends one tensor's bytes to the writer.
    pub(crate) fn emit(&mut self, tensor: &recover::BlockTensor) -> Result<(), ConvertError> {
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

    pub(crate) fn finish_tensor(&mut self, name: &str, encoding: Encoding, len: usize) {
        *self.encodings.entry(encoding.describe()).or_default() += 1;
        // A residual corrects its matrix's weights; it adds bytes, not parameters.
        if !names::is_residual(name) {
            self.parameters += len as u64;
        }
        self.done += 1;
        (self.progress)(self.done, self.total, name);
    }

    pub(crate) fn write_vector(
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
    pub(crate) fn store(&mut self, tensor: recover::BlockTensor) -> Result<Vec<f32>, ConvertError> {
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
    pub(crate) fn sparse_storage(
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
                     x86 and on ARM NEON; turn sparse storage off when such a target needs \
                     speed more than size",
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
    pub(crate) fn write_matrix(
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
    pub(crate) fn write_residual(
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
    pub(crate) fn write_lowrank(
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
pub(crate) fn scaled_hessian(stats: &calib::InputStats, scales: Option<&[f32]>) -> Vec<f64> {
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

/// `(tensor, reason)` pairs as the recipe's notes.
pub(crate) fn notes(pairs: &[(String, String)]) -> Vec<TensorNote> {
    pairs
        .iter()
        .map(|(tensor, reason)| TensorNote {
            tensor: tensor.clone(),
            reason: reason.clone(),
        })
        .collect()
}
