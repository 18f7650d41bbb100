//! Recovery after compression: block-wise reconstruction (`--recover blockwise`) and logit
//! distillation of the whole model (`--recover kd`, in [`distill`]).
//!
//! Block-wise: after a block is compressed, what it keeps is tuned so that its output on the
//! calibration activations matches the uncompressed block's: the quantization grids (a scale
//! factor per group, and the minimum of asymmetric grids), the latent weights the codes are
//! rounded from (straight-through estimation for the rounding), the surviving weights of
//! pruned matrices (the pruning mask stays fixed), low-rank factors, norms and biases. The
//! student block runs on the compressed model's activations, the teacher (the original block)
//! on the original model's, so a block also learns to correct the error the blocks before it
//! left. Gradients come from candle's autodiff, behind the `recover` cargo feature so the
//! mobile library does not carry it. Memory stays bounded by one block and the calibration
//! activations.

use std::str::FromStr;

use half::{bf16, f16};

use super::quant::{self, Grid};
use pocketlm_format::Encoding;

#[cfg(feature = "recover")]
pub mod distill;

/// Why the recovery options are not valid (see [`Recovery::validate`]).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RecoveryOptionError {
    #[error(
        "this pocketlm was built without recovery; rebuild it with the `recover` cargo feature"
    )]
    Unavailable,
    #[error(
        "recovery steps and batch size must be at least 1, got {steps} steps of {batch} sequences"
    )]
    ZeroSteps { steps: usize, batch: usize },
    #[error("the recovery learning rate factor must be a positive number, got {learning_rate}")]
    LearningRate { learning_rate: f32 },
    #[error(
        "--recover-samples applies to distillation (--recover kd or blockwise+kd); block-wise \
         recovery uses --calib-samples"
    )]
    SamplesWithoutDistillation,
    #[error("distillation needs at least 2 recovery samples (one is held out), got {samples}")]
    TooFewSamples { samples: usize },
    #[error(
        "--recover-codes applies to distillation (--recover kd or blockwise+kd); block-wise \
         recovery always moves the codes"
    )]
    CodesWithoutDistillation,
    #[error("unknown recovery '{name}' (expected blockwise, kd or blockwise+kd)")]
    UnknownMode { name: String },
}

/// The autodiff backend's error: candle's, or uninhabited in a build without the `recover`
/// feature (which cannot recover).
#[cfg(feature = "recover")]
pub type BackendError = candle_core::Error;
/// The autodiff backend's error: candle's, or uninhabited in a build without the `recover`
/// feature (which cannot recover).
#[cfg(not(feature = "recover"))]
pub type BackendError = std::convert::Infallible;

/// Why block-wise recovery or distillation failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("recovery: block {layer} has no tensor {name}")]
    MissingTensor { layer: usize, name: String },
    /// Block-wise activations that do not make whole sequences of `seq_len × hidden`.
    #[error(
        "recovery: {inputs} inputs and {targets} targets for sequences of {seq_len} × {hidden}"
    )]
    Activations {
        inputs: usize,
        targets: usize,
        seq_len: usize,
        hidden: usize,
    },
    #[error("distillation: {positions} teacher positions for {sequences} sequences of {seq_len}")]
    TeacherPositions {
        positions: usize,
        sequences: usize,
        seq_len: usize,
    },
    #[error("distillation: {blocks} blocks for a model of {layers}")]
    BlockCount { blocks: usize, layers: usize },
    #[error("recovery: {0}")]
    Backend(#[from] BackendError),
}

/// `--recover MODE` and its settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Recovery {
    pub mode: RecoverMode,
    /// Optimizer steps: per block for block-wise, in all for distillation.
    pub steps: usize,
    /// Calibration sequences per step.
    pub batch: usize,
    /// Multiplier of the base learning rates (see [`BASE_RATES`]).
    pub learning_rate: f32,
    /// Distillation also moves the codes: it trains the latent weights they are rounded
    /// from (straight-through rounding), as block-wise does, not only the grids.
    pub codes: bool,
    /// Calibration sequences distillation trains on; `None`: the calibration's own. More
    /// than the quantizer needs, because whole-model distillation overfits a few sequences
    /// it sees many times.
    pub samples: Option<usize>,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            mode: RecoverMode::Blockwise,
            steps: 64,
            batch: 4,
            learning_rate: 1.0,
            codes: false,
            samples: None,
        }
    }
}

impl Recovery {
    /// Whether this build can recover (the `recover` feature).
    pub const AVAILABLE: bool = cfg!(feature = "recover");

    pub fn validate(&self) -> Result<(), RecoveryOptionError> {
        if !Self::AVAILABLE {
            return Err(RecoveryOptionError::Unavailable);
        }
        if self.steps == 0 || self.batch == 0 {
            return Err(RecoveryOptionError::ZeroSteps {
                steps: self.steps,
                batch: self.batch,
            });
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(RecoveryOptionError::LearningRate {
                learning_rate: self.learning_rate,
            });
        }
        if let Some(samples) = self.samples {
            if !self.mode.distills() {
                return Err(RecoveryOptionError::SamplesWithoutDistillation);
            }
            if samples < 2 {
                return Err(RecoveryOptionError::TooFewSamples { samples });
            }
        }
        if self.codes && !self.mode.distills() {
            return Err(RecoveryOptionError::CodesWithoutDistillation);
        }
        Ok(())
    }
}

/// The recovery modes `--recover` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoverMode {
    /// Each block's output matched to the original block's, as the converter goes.
    Blockwise,
    /// The whole compressed model's next-token distribution matched to the original's
    /// (KL divergence), tuning grid scales, norms and low-rank factors.
    Distill,
    /// Block-wise, then distillation.
    BlockwiseDistill,
}

impl RecoverMode {
    pub fn name(self) -> &'static str {
        match self {
            RecoverMode::Blockwise => "blockwise",
            RecoverMode::Distill => "kd",
            RecoverMode::BlockwiseDistill => "blockwise+kd",
        }
    }

    pub fn blockwise(self) -> bool {
        matches!(self, RecoverMode::Blockwise | RecoverMode::BlockwiseDistill)
    }

    pub fn distills(self) -> bool {
        matches!(self, RecoverMode::Distill | RecoverMode::BlockwiseDistill)
    }
}

impl FromStr for RecoverMode {
    type Err = RecoveryOptionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "blockwise" | "block" => Ok(RecoverMode::Blockwise),
            "kd" | "distill" => Ok(RecoverMode::Distill),
            "blockwise+kd" | "kd+blockwise" => Ok(RecoverMode::BlockwiseDistill),
            other => Err(RecoveryOptionError::UnknownMode {
                name: other.to_string(),
            }),
        }
    }
}

/// Adam step sizes, in the units each parameter is expressed in: latent weights of quantized
/// matrices in steps of their group's grid, grid scale factors and minimum shifts relative to
/// the initial scale, float weights and vectors relative to their tensor's RMS.
pub const BASE_RATES: Rates = Rates {
    latent: 2e-2,
    grid: 2e-3,
    float: 1e-2,
    vector: 2e-3,
};

#[derive(Clone, Copy, Debug)]
pub struct Rates {
    pub latent: f64,
    pub grid: f64,
    pub float: f64,
    pub vector: f64,
}

impl Rates {
    /// Every step size times `factor` (`--recover-lr`).
    pub fn scaled(self, factor: f32) -> Rates {
        let f = factor as f64;
        Rates {
            latent: self.latent * f,
            grid: self.grid * f,
            float: self.float * f,
            vector: self.vector * f,
        }
    }
}

/// One tensor of a block as compressed: what is written to the file (values encoded in
/// `encoding` on `grids`), held back while the block is recovered.
#[derive(Clone, Debug)]
pub struct BlockTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub encoding: Encoding,
    /// Quantized encodings: the values the codes are rounded from (on the grids after GPTQ,
    /// not necessarily after recovery). Others: the values themselves.
    pub values: Vec<f32>,
    /// One grid per group of each row, for the quantized encodings.
    pub grids: Option<Vec<Grid>>,
    /// Pruned: its zeros stay zero.
    pub masked: bool,
}

impl BlockTensor {
    /// The values as the runtime will read them back.
    pub fn readback(&self) -> Vec<f32> {
        let mut values = self.values.clone();
        self.round_as_stored(&mut values);
        values
    }

    /// [`BlockTensor::readback`] without a copy of the values.
    pub fn into_readback(mut self) -> Vec<f32> {
        let mut values = std::mem::take(&mut self.values);
        self.round_as_stored(&mut values);
        values
    }

    /// Rounds `values` (this tensor's) as its encoding stores them.
    fn round_as_stored(&self, values: &mut [f32]) {
        match (self.encoding, &self.grids) {
            (Encoding::F32, _) => {}
            (Encoding::F16 | Encoding::F16Sparse24, _) => values
                .iter_mut()
                .for_each(|v| *v = f16::from_f32(*v).to_f32()),
            (Encoding::BF16, _) => values
                .iter_mut()
                .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
            (_, Some(grids)) => quant::fake_quantize(values, self.shape[1], self.encoding, grids),
            (_, None) => {}
        }
    }
}

/// The activations a block is recovered on, both `sequences × seq_len × hidden`: `inputs`
/// entering the compressed block (the compressed model's), `targets` leaving the original
/// block (run on the original model's).
#[derive(Clone, Copy)]
pub struct Activations<'a> {
    pub inputs: &'a [f32],
    pub targets: &'a [f32],
    pub seq_len: usize,
}

/// What recovery did to one block: the relative output error (mean square error over the
/// mean square of the teacher's output) before and after, and whether the tuned values were
/// kept (they are not when they do not lower the error).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockRecovery {
    pub loss_before: f64,
    pub loss_after: f64,
    pub kept: bool,
    pub parameters: usize,
}

/// What distillation did: the KL divergence (to the teacher's top-k summary, mean per
/// position) on the held-out sequences before and after, on `train_scored` of the
/// training sequences before and after, and whether the tuned values were kept. The
/// held-out KL is checked as training goes; the values kept are those of the check where it
/// was least (`best_step`), so "after" is that check's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Distillation {
    pub kl_before: f64,
    pub kl_after: f64,
    pub train_kl_before: f64,
    pub train_kl_after: f64,
    pub held_out: usize,
    pub train_scored: usize,
    pub kept: bool,
    /// The optimizer step whose values were kept (0 when none were).
    pub best_step: usize,
    pub parameters: usize,
}

#[cfg(feature = "recover")]
pub use train::recover_block;

#[cfg(feature = "recover")]
mod train {
    use candle_core::{D, DType, Device, Tensor, Var, backprop::GradStore};

    use super::{
        Activations, BASE_RATES, BlockRecovery, BlockTensor, Grid, Rates, RecoverError, Recovery,
    };
    use pocketlm_format::config::{ModelConfig, names};

    type Result<T> = std::result::Result<T, RecoverError>;

    /// How one tensor's runtime values come from its trainable parameters.
    pub(super) enum Param {
        /// `w = s0 · (r · clamp(round((z − dm) / r), lo, hi) + dm) + m0`, per group: `z` the
        /// latent weights in grid steps, `r` the scale factor, `dm` the minimum shift.
        Quantized {
            z: Var,
            r: Var,
            dm: Option<Var>,
            s0: Tensor,
            m0: Option<Tensor>,
            /// 1 where the weight is kept, and the latent value of a pruned weight (its zero).
            mask: Option<(Tensor, Tensor)>,
            levels: (f32, f32),
            shape: (usize, usize),
        },
        /// `w = z · rho` (times the mask).
        Float {
            z: Var,
            rho: f32,
            mask: Option<Tensor>,
        },
    }

    /// The latent weights with pruned positions held at the latent value of zero.
    fn latent(z: &Var, mask: &Option<(Tensor, Tensor)>) -> candle_core::Result<Tensor> {
        match mask {
            Some((keep, zero)) => (z.as_tensor() * keep)? + zero,
            None => Ok(z.as_tensor().clone()),
        }
    }

    /// `x` rounded in the forward pass, the identity in the backward pass.
    fn round_ste(x: &Tensor) -> candle_core::Result<Tensor> {
        x + (x.round()? - x)?.detach()
    }

    pub(super) fn rms(values: &[f32]) -> f32 {
        let ms = values.iter().map(|v| v * v).sum::<f32>() / values.len().max(1) as f32;
        if ms > 0.0 { ms.sqrt() } else { 1.0 }
    }

    impl Param {
        pub(super) fn new(t: &BlockTensor, dev: &Device) -> candle_core::Result<Param> {
            let mask_values: Option<Vec<f32>> = t
                .masked
                .then(|| t.values.iter().map(|&v| (v != 0.0) as u8 as f32).collect());
            match &t.grids {
                Some(grids) => {
                    let (rows, cols) = (t.shape[0], t.shape[1]);
                    let groups = grids.len() / rows;
                    let group = cols / groups;
                    // A group of zeros has a zero scale; any tiny one keeps it (nearly) zero.
                    let s0: Vec<f32> = grids
                        .iter()
                        .map(|g| if g.scale != 0.0 { g.scale } else { 1e-6 })
                        .collect();
                    let asymmetric = grids[0].levels().0 == 0.0;
                    let m0: Vec<f32> = grids.iter().map(|g| g.min).collect();
                    let z: Vec<f32> = t
                        .values
                        .chunks(group)
                        .zip(s0.iter().zip(&m0))
                        .flat_map(|(vals, (&s, &m))| vals.iter().map(move |&v| (v - m) / s))
                        .collect();
                    let zero: Vec<f32> = z
                        .chunks(group)
                        .zip(s0.iter().zip(&m0))
                        .flat_map(|(vals, (&s, &m))| vals.iter().map(move |_| -m / s))
                        .collect();
                    let shape3 = (rows, groups, group);
                    let mask = match mask_values {
                        Some(m) => {
                            let keep = Tensor::from_vec(m, shape3, dev)?;
                            let zero = Tensor::from_vec(zero, shape3, dev)?;
                            let zero = ((1.0 - &keep)? * zero)?;
                            Some((keep, zero))
                        }
                        None => None,
                    };
                    Ok(Param::Quantized {
                        z: Var::from_tensor(&Tensor::from_vec(z, shape3, dev)?)?,
                        r: Var::ones((rows, groups, 1), DType::F32, dev)?,
                        dm: if asymmetric {
                            Some(Var::zeros((rows, groups, 1), DType::F32, dev)?)
                        } else {
                            None
                        },
                        s0: Tensor::from_vec(s0, (rows, groups, 1), dev)?,
                        m0: if asymmetric {
                            Some(Tensor::from_vec(m0, (rows, groups, 1), dev)?)
                        } else {
                            None
                        },
                        mask,
                        levels: grids[0].levels(),
                        shape: (rows, cols),
                    })
                }
                None => {
                    let rho = rms(&t.values);
                    let z: Vec<f32> = t.values.iter().map(|v| v / rho).collect();
                    Ok(Param::Float {
                        z: Var::from_tensor(&Tensor::from_vec(z, t.shape.clone(), dev)?)?,
                        rho,
                        mask: match mask_values {
                            Some(m) => Some(Tensor::from_vec(m, t.shape.clone(), dev)?),
                            None => None,
                        },
                    })
                }
            }
        }

        /// The values the runtime would read, as a differentiable function of the parameters.
        pub(super) fn weights(&self) -> candle_core::Result<Tensor> {
            match self {
                Param::Quantized {
                    z,
                    r,
                    dm,
                    s0,
                    m0,
                    mask,
                    levels,
                    shape,
                } => {
                    let mut z = latent(z, mask)?;
                    let r = r.as_tensor();
                    if let Some(dm) = dm {
                        z = z.broadcast_sub(dm.as_tensor())?;
                    }
                    let q = round_ste(&z.broadcast_div(r)?)?.clamp(levels.0, levels.1)?;
                    let mut w = q.broadcast_mul(r)?;
                    if let Some(dm) = dm {
                        w = w.broadcast_add(dm.as_tensor())?;
                    }
                    w = w.broadcast_mul(s0)?;
                    if let Some(m0) = m0 {
                        w = w.broadcast_add(m0)?;
                    }
                    w.reshape(*shape)
                }
                Param::Float { z, rho, mask } => {
                    let w = (z.as_tensor() * *rho as f64)?;
                    match mask {
                        Some(m) => w * m,
                        None => Ok(w),
                    }
                }
            }
        }

        /// The variables with their Adam step sizes.
        pub(super) fn variables(&self, rates: &Rates, vector: bool) -> Vec<(Var, f64)> {
            match self {
                Param::Quantized { z, r, dm, .. } => {
                    let mut v = vec![(z.clone(), rates.latent), (r.clone(), rates.grid)];
                    if let Some(dm) = dm {
                        v.push((dm.clone(), rates.grid));
                    }
                    v
                }
                Param::Float { z, .. } => {
                    vec![(z.clone(), if vector { rates.vector } else { rates.float })]
                }
            }
        }

        /// Writes the tuned parameters back into `t` (values and grids as stored).
        pub(super) fn store(&self, t: &mut BlockTensor) -> candle_core::Result<()> {
            match self {
                Param::Quantized {
                    z,
                    r,
                    dm,
                    s0,
                    m0,
                    mask,
                    ..
                } => {
                    let z = latent(z, mask)?;
                    let s0 = s0.flatten_all()?.to_vec1::<f32>()?;
                    let r = r.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                    let dm = match dm {
                        Some(dm) => dm.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                        None => vec![0.0; s0.len()],
                    };
                    let m0 = match m0 {
                        Some(m0) => m0.flatten_all()?.to_vec1::<f32>()?,
                        None => vec![0.0; s0.len()],
                    };
                    let z = z.flatten_all()?.to_vec1::<f32>()?;
                    let group = z.len() / s0.len();
                    let grids = t.grids.as_mut().expect("quantized tensor has grids");
                    for (g, grid) in grids.iter_mut().enumerate() {
                        let (scale, min) = (s0[g] * r[g], m0[g] + s0[g] * dm[g]);
                        *grid = Grid::from_parts(t.encoding, scale, min);
                        for (i, v) in t.values[g * group..(g + 1) * group].iter_mut().enumerate() {
                            // The latent value in the units the encoder rounds.
                            *v = s0[g] * z[g * group + i] + m0[g];
                        }
                    }
                    if t.masked {
                        // Pruned weights stay exactly zero, as the mask had them.
                        let kept = mask
                            .as_ref()
                            .map(|(k, _)| k.flatten_all()?.to_vec1::<f32>());
                        if let Some(kept) = kept.transpose()? {
                            t.values
                                .iter_mut()
                                .zip(kept)
                                .filter(|(_, k)| *k == 0.0)
                                .for_each(|(v, _)| *v = 0.0);
                        }
                    }
                }
                Param::Float { .. } => {
                    t.values = self.weights()?.flatten_all()?.to_vec1::<f32>()?;
                }
            }
            Ok(())
        }
    }

    /// A linear layer of the block: one matrix, or low-rank factors `V` then `U`.
    enum Linear {
        Full(usize),
        Factored { v: usize, u: usize },
    }

    /// Where each of the block's tensors sits among the recovered tensors.
    pub(super) struct Layout {
        attn_norm: usize,
        ffn_norm: usize,
        biases: Option<[usize; 3]>,
        q: Linear,
        k: Linear,
        v: Linear,
        o: Linear,
        gate: Linear,
        up: Linear,
        down: Linear,
    }

    impl Layout {
        pub(super) fn new(
            config: &ModelConfig,
            layer: usize,
            tensors: &[BlockTensor],
        ) -> Result<Layout> {
            let find = |name: String| -> Result<usize> {
                tensors
                    .iter()
                    .position(|t| t.name == name)
                    .ok_or(RecoverError::MissingTensor { layer, name })
            };
            let linear = |name: String| -> Result<Linear> {
                if let Ok(i) = find(name.clone()) {
                    return Ok(Linear::Full(i));
                }
                Ok(Linear::Factored {
                    v: find(names::lowrank_v(&name))?,
                    u: find(names::lowrank_u(&name))?,
                })
            };
            let l = layer;
            Ok(Layout {
                attn_norm: find(names::attn_norm(l))?,
                ffn_norm: find(names::ffn_norm(l))?,
                biases: if config.attention_bias {
                    Some([
                        find(names::attn_q_bias(l))?,
                        find(names::attn_k_bias(l))?,
                        find(names::attn_v_bias(l))?,
                    ])
                } else {
                    None
                },
                q: linear(names::attn_q(l))?,
                k: linear(names::attn_k(l))?,
                v: linear(names::attn_v(l))?,
                o: linear(names::attn_output(l))?,
                gate: linear(names::ffn_gate(l))?,
                up: linear(names::ffn_up(l))?,
                down: linear(names::ffn_down(l))?,
            })
        }
    }

    /// The block's forward pass in candle, on `x` (`sequences × seq_len × hidden`), with the
    /// weights `w` (one per recovered tensor) — the same computation as the runtime's.
    pub(super) struct Forward<'a> {
        config: &'a ModelConfig,
        layout: &'a Layout,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
    }

    impl Forward<'_> {
        fn linear(&self, x: &Tensor, lin: &Linear, w: &[Tensor]) -> candle_core::Result<Tensor> {
            match lin {
                Linear::Full(i) => x.matmul(&w[*i].t()?),
                Linear::Factored { v, u } => x.matmul(&w[*v].t()?)?.matmul(&w[*u].t()?),
            }
        }

        pub(super) fn rms_norm(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
            let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
            let inv = (ms + self.config.rms_norm_eps as f64)?.sqrt()?.recip()?;
            x.broadcast_mul(&inv)?.broadcast_mul(g)
        }

        /// `x` is `[seqs, heads, len, head_dim]`; rotate-half RoPE from position 0.
        fn rope(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            let half = self.config.head_dim / 2;
            let a = x.narrow(D::Minus1, 0, half)?;
            let b = x.narrow(D::Minus1, half, half)?;
            let ra = (a.broadcast_mul(&self.cos)? - b.broadcast_mul(&self.sin)?)?;
            let rb = (a.broadcast_mul(&self.sin)? + b.broadcast_mul(&self.cos)?)?;
            Tensor::cat(&[ra, rb], D::Minus1)
        }

        pub(super) fn run(&self, x: &Tensor, w: &[Tensor]) -> candle_core::Result<Tensor> {
            let c = self.config;
            let (seqs, len, d) = x.dims3()?;
            let (heads, kv_heads, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
            let lay = self.layout;
            let x2 = x.reshape((seqs * len, d))?;
            let h = self.rms_norm(&x2, &w[lay.attn_norm])?;
            let mut q = self.linear(&h, &lay.q, w)?;
            let mut k = self.linear(&h, &lay.k, w)?;
            let mut v = self.linear(&h, &lay.v, w)?;
            if let Some([bq, bk, bv]) = lay.biases {
                q = q.broadcast_add(&w[bq])?;
                k = k.broadcast_add(&w[bk])?;
                v = v.broadcast_add(&w[bv])?;
            }
            let split = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
                t.reshape((seqs, len, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = self.rope(&split(q, heads)?)?;
            let mut k = self.rope(&split(k, kv_heads)?)?;
            let mut v = split(v, kv_heads)?;
            if heads != kv_heads {
                let g = heads / kv_heads;
                let expand = |t: Tensor| -> candle_core::Result<Tensor> {
                    t.unsqueeze(2)?
                        .broadcast_as((seqs, kv_heads, g, len, hd))?
                        .contiguous()?
                        .reshape((seqs, heads, len, hd))
                };
                k = expand(k)?;
                v = expand(v)?;
            }
            let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
            let scores = scores.broadcast_add(&self.mask)?;
            let max = scores.max_keepdim(D::Minus1)?.detach();
            let e = scores.broadcast_sub(&max)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let attn = p
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((seqs * len, heads * hd))?;
            let x2 = (x2 + self.linear(&attn, &lay.o, w)?)?;
            let h = self.rms_norm(&x2, &w[lay.ffn_norm])?;
            let gate = self.linear(&h, &lay.gate, w)?.silu()?;
            let up = self.linear(&h, &lay.up, w)?;
            let mlp = self.linear(&(gate * up)?, &lay.down, w)?;
            (x2 + mlp)?.reshape((seqs, len, d))
        }
    }

    /// Adam over a set of variables, each with its own step size.
    pub(super) struct Adam {
        vars: Vec<(Var, f64)>,
        moments: Vec<(Tensor, Tensor)>,
        t: i32,
    }

    impl Adam {
        const BETA1: f64 = 0.9;
        const BETA2: f64 = 0.999;
        const EPS: f64 = 1e-12;

        pub(super) fn new(vars: Vec<(Var, f64)>) -> candle_core::Result<Adam> {
            let moments = vars
                .iter()
                .map(|(v, _)| Ok((v.zeros_like()?, v.zeros_like()?)))
                .collect::<candle_core::Result<_>>()?;
            Ok(Adam {
                vars,
                moments,
                t: 0,
            })
        }

        pub(super) fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
            self.step_scaled(1.0, |var| grads.get(var).cloned())
        }

        /// A step with the gradient of each variable from `grad_of` (`None`: not updated) and
        /// every step size times `factor` (a learning-rate schedule).
        pub(super) fn step_scaled(
            &mut self,
            factor: f64,
            grad_of: impl Fn(&Tensor) -> Option<Tensor>,
        ) -> candle_core::Result<()> {
            self.t += 1;
            let c1 = 1.0 - Self::BETA1.powi(self.t);
            let c2 = 1.0 - Self::BETA2.powi(self.t);
            for ((var, lr), (m, v)) in self.vars.iter().zip(self.moments.iter_mut()) {
                let Some(g) = grad_of(var.as_tensor()) else {
                    continue;
                };
                // Gradients are built from the forward pass's tensors and would keep every
                // step's graph alive through the moments.
                let g = g.detach();
                let g = &g;
                *m = ((&*m * Self::BETA1)? + (g * (1.0 - Self::BETA1))?)?.detach();
                *v = ((&*v * Self::BETA2)? + (g.sqr()? * (1.0 - Self::BETA2))?)?.detach();
                let denom = ((&*v / c2)?.sqrt()? + Self::EPS)?;
                let update = ((&*m / c1)? / denom)?;
                var.set(&(var.as_tensor() - (update * (*lr * factor))?)?)?;
            }
            Ok(())
        }
    }

    /// Tunes block `layer`'s compressed tensors so that, run on `data.inputs`, its output
    /// matches `data.targets`. The tensors are updated in place when that lowers the error.
    /// `progress(step, loss)` follows the optimisation.
    pub fn recover_block(
        config: &ModelConfig,
        layer: usize,
        tensors: &mut [BlockTensor],
        data: Activations<'_>,
        options: &Recovery,
        progress: &mut dyn FnMut(usize, f64),
    ) -> Result<BlockRecovery> {
        let Activations {
            inputs,
            targets,
            seq_len,
        } = data;
        let dev = Device::Cpu;
        let d = config.hidden_size;
        let sequences = inputs.len() / (seq_len * d).max(1);
        if sequences == 0 || targets.len() != inputs.len() {
            return Err(RecoverError::Activations {
                inputs: inputs.len(),
                targets: targets.len(),
                seq_len,
                hidden: d,
            });
        }
        let layout = Layout::new(config, layer, tensors)?;
        let is_vector = |t: &BlockTensor| t.shape.len() == 1;
        let params = tensors
            .iter()
            .map(|t| Param::new(t, &dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let rates = BASE_RATES.scaled(options.learning_rate);
        let vars: Vec<(Var, f64)> = params
            .iter()
            .zip(tensors.iter())
            .flat_map(|(p, t)| p.variables(&rates, is_vector(t)))
            .collect();
        let parameters = vars.iter().map(|(v, _)| v.elem_count()).sum();

        let forward = build_forward(config, &layout, seq_len, &dev)?;
        let span = seq_len * d;
        let batch = options.batch.min(sequences);
        let target_energy = targets
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            / targets.len() as f64;
        let target_energy = if target_energy > 0.0 {
            target_energy
        } else {
            1.0
        };
        let slice = |data: &[f32], first: usize, n: usize| -> candle_core::Result<Tensor> {
            Tensor::from_slice(
                &data[first * span..(first + n) * span],
                (n, seq_len, d),
                &dev,
            )
        };
        let loss_of = |first: usize, n: usize, w: &[Tensor]| -> candle_core::Result<Tensor> {
            let out = forward.run(&slice(inputs, first, n)?, w)?;
            let diff = (out - slice(targets, first, n)?)?;
            diff.sqr()?.mean_all()? / target_energy
        };
        let full_loss = |params: &[Param]| -> candle_core::Result<f64> {
            let w = params
                .iter()
                .map(Param::weights)
                .collect::<candle_core::Result<Vec<_>>>()?;
            let w: Vec<Tensor> = w.iter().map(Tensor::detach).collect();
            let mut total = 0.0;
            let mut first = 0;
            while first < sequences {
                let n = batch.min(sequences - first);
                total += loss_of(first, n, &w)?.to_scalar::<f32>()? as f64 * n as f64;
                first += n;
            }
            Ok(total / sequences as f64)
        };

        let loss_before = full_loss(&params)?;
        let mut adam = Adam::new(vars)?;
        let batches = sequences.div_ceil(batch);
        for step in 0..options.steps {
            let first = (step % batches) * batch;
            let n = batch.min(sequences - first);
            let w = params
                .iter()
                .map(Param::weights)
                .collect::<candle_core::Result<Vec<_>>>()?;
            let loss = loss_of(first, n, &w)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                log::warn!(
                    "blk.{layer}: recovery diverged at step {step}; keeping the block as compressed"
                );
                break;
            }
            let grads = loss.backward()?;
            adam.step(&grads)?;
            progress(step + 1, value);
        }
        let loss_after = full_loss(&params)?;
        let kept = loss_after.is_finite() && loss_after < loss_before;
        if kept {
            for (p, t) in params.iter().zip(tensors.iter_mut()) {
                p.store(t)?;
            }
        }
        Ok(BlockRecovery {
            loss_before,
            loss_after,
            kept,
            parameters,
        })
    }

    pub(super) fn build_forward<'a>(
        config: &'a ModelConfig,
        layout: &'a Layout,
        seq_len: usize,
        dev: &Device,
    ) -> candle_core::Result<Forward<'a>> {
        let inv_freq = pocketlm_runtime::model::rope_inv_freq(config);
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for p in 0..seq_len {
            for f in &inv_freq {
                let (s, c) = (p as f32 * f).sin_cos();
                sin.push(s);
                cos.push(c);
            }
        }
        let mask: Vec<f32> = (0..seq_len * seq_len)
            .map(|i| if i % seq_len > i / seq_len { -1e9 } else { 0.0 })
            .collect();
        Ok(Forward {
            config,
            layout,
            cos: Tensor::from_vec(cos, (seq_len, half), dev)?,
            sin: Tensor::from_vec(sin, (seq_len, half), dev)?,
            mask: Tensor::from_vec(mask, (seq_len, seq_len), dev)?,
        })
    }

    #[cfg(test)]
    pub(super) mod tests_support {
        use super::*;

        /// The candle forward pass of the block `tensors` on `x`, as recovery computes it.
        pub fn candle_forward(
            config: &ModelConfig,
            tensors: &[BlockTensor],
            x: &[f32],
            seq_len: usize,
        ) -> Vec<f32> {
            let dev = Device::Cpu;
            let layout = Layout::new(config, 0, tensors).unwrap();
            let forward = build_forward(config, &layout, seq_len, &dev).unwrap();
            let w: Vec<Tensor> = tensors
                .iter()
                .map(|t| Param::new(t, &dev).unwrap().weights().unwrap())
                .collect();
            let seqs = x.len() / (seq_len * config.hidden_size);
            let x = Tensor::from_slice(x, (seqs, seq_len, config.hidden_size), &dev).unwrap();
            forward
                .run(&x, &w)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        }
    }
}

#[cfg(all(test, feature = "recover"))]
mod tests {
    use super::train::tests_support::*;
    use super::*;
    use crate::calib::Calibrator;
    use pocketlm_format::config::{Architecture, ModelConfig, names};
    use pocketlm_kernels::test_util::random_vec;
    use pocketlm_kernels::{Linear, MatRef, WeightData};
    use pocketlm_runtime::model::BlockWeights;

    pub(super) fn config(bias: bool) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 8,
            hidden_size: 32,
            intermediate_size: 64,
            num_layers: 1,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            attention_bias: bias,
            features: Default::default(),
        }
    }

    /// The tensors of block 0 with random values, in `encoding` (vectors in f32), with
    /// grids chosen by round-to-nearest; `masked`: half of each matrix pruned.
    pub(super) fn block(c: &ModelConfig, encoding: Encoding, masked: bool) -> Vec<BlockTensor> {
        pocketlm_format::config::expected_tensors(c)
            .into_iter()
            .filter(|(n, _)| n.starts_with("blk.0."))
            .enumerate()
            .map(|(i, (name, shape))| {
                let n: usize = shape.iter().product();
                let mut values = random_vec(n, 100 + i as u64);
                if shape.len() == 1 {
                    if name.contains("norm") {
                        values.iter_mut().for_each(|v| *v = 1.0 + 0.2 * *v);
                    }
                    return BlockTensor {
                        name,
                        shape,
                        encoding: Encoding::F32,
                        values,
                        grids: None,
                        masked: false,
                    };
                }
                values.iter_mut().for_each(|v| *v *= 0.3);
                if masked {
                    values.iter_mut().step_by(2).for_each(|v| *v = 0.0);
                }
                let grids = encoding.is_quantized().then(|| {
                    quant::choose_grids(&values, shape[1], encoding, quant::Clipping::MinMax, None)
                });
                BlockTensor {
                    name,
                    shape,
                    encoding,
                    values,
                    grids,
                    masked,
                }
            })
            .collect()
    }

    /// The runtime's block forward on the tensors' read-back values.
    pub(super) fn runtime_forward(
        c: &ModelConfig,
        tensors: &[BlockTensor],
        x: &[f32],
        seq_len: usize,
    ) -> Vec<f32> {
        let values: Vec<Vec<f32>> = tensors.iter().map(BlockTensor::readback).collect();
        let get = |name: String| -> &[f32] {
            let i = tensors.iter().position(|t| t.name == name).unwrap();
            &values[i]
        };
        let mat = |name: String| {
            let t = tensors.iter().find(|t| t.name == name).unwrap();
            let (rows, cols) = (t.shape[0], t.shape[1]);
            Linear::Dense(MatRef::new(WeightData::F32(get(name)), rows, cols).unwrap())
        };
        let w = BlockWeights {
            layer: 0,
            attn_norm: get(names::attn_norm(0)),
            q: mat(names::attn_q(0)),
            k: mat(names::attn_k(0)),
            v: mat(names::attn_v(0)),
            biases: c.attention_bias.then(|| {
                [
                    get(names::attn_q_bias(0)),
                    get(names::attn_k_bias(0)),
                    get(names::attn_v_bias(0)),
                ]
            }),
            o: mat(names::attn_output(0)),
            ffn_norm: get(names::ffn_norm(0)),
            gate: mat(names::ffn_gate(0)),
            up: mat(names::ffn_up(0)),
            down: mat(names::ffn_down(0)),
            norms: Default::default(),
        };
        let mut cal = Calibrator::from_hidden(c, seq_len, x.to_vec());
        cal.advance(&w);
        cal.into_hidden()
    }

    const Q4: Encoding = Encoding::Q4 {
        group: 16,
        asymmetric: false,
    };
    pub(super) const Q4A: Encoding = Encoding::Q4 {
        group: 16,
        asymmetric: true,
    };

    #[test]
    fn candle_block_matches_the_runtime() {
        let seq_len = 12;
        for (bias, encoding, masked) in [
            (false, Encoding::F32, false),
            (true, Q4, false),
            (false, Q4A, true),
            (false, Encoding::Q3 { group: 32 }, false),
            (true, Encoding::Q8 { group: 32 }, true),
        ] {
            let c = config(bias);
            let tensors = block(&c, encoding, masked);
            let x = random_vec(3 * seq_len * c.hidden_size, 7);
            let expected = runtime_forward(&c, &tensors, &x, seq_len);
            let got = candle_forward(&c, &tensors, &x, seq_len);
            let worst = expected
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst < 1e-4,
                "{encoding} bias={bias} masked={masked}: max diff {worst}"
            );
        }
    }

    #[test]
    fn options_that_cannot_apply_are_refused() {
        let ok = |r: Recovery| r.validate().is_ok();
        assert!(ok(Recovery::default()));
        let codes = |mode| Recovery {
            mode,
            codes: true,
            ..Recovery::default()
        };
        assert!(ok(codes(RecoverMode::Distill)));
        assert!(ok(codes(RecoverMode::BlockwiseDistill)));
        let refused = codes(RecoverMode::Blockwise)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(refused.contains("--recover-codes"), "{refused}");
        let samples = |mode, n| Recovery {
            mode,
            samples: Some(n),
            ..Recovery::default()
        };
        assert!(ok(samples(RecoverMode::Distill, 256)));
        let refused = samples(RecoverMode::Blockwise, 256)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(refused.contains("--recover-samples"), "{refused}");
        assert!(!ok(samples(RecoverMode::Distill, 1)));
        for bad in [
            Recovery {
                steps: 0,
                ..Recovery::default()
            },
            Recovery {
                learning_rate: f32::NAN,
                ..Recovery::default()
            },
        ] {
            assert!(!ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn recovery_lowers_the_block_error_and_keeps_the_encoding() {
        let seq_len = 16;
        for (encoding, masked) in [
            (Encoding::Q3 { group: 32 }, false),
            (Q4A, true),
            (Encoding::F16, true),
        ] {
            let c = config(false);
            let teacher = block(&c, Encoding::F32, false);
            let mut student = block(&c, encoding, masked);
            let x = random_vec(8 * seq_len * c.hidden_size, 9);
            let target = runtime_forward(&c, &teacher, &x, seq_len);
            let options = Recovery {
                mode: RecoverMode::Blockwise,
                steps: 60,
                batch: 4,
                learning_rate: 1.0,
                codes: false,
                samples: None,
            };
            let zeros_before: Vec<bool> = student
                .iter()
                .flat_map(|t| t.values.iter().map(|v| *v == 0.0))
                .collect();
            let report = recover_block(
                &c,
                0,
                &mut student,
                Activations {
                    inputs: &x,
                    targets: &target,
                    seq_len,
                },
                &options,
                &mut |_, _| {},
            )
            .unwrap();
            assert!(report.kept, "{encoding}: {report:?}");
            assert!(
                report.loss_after < 0.8 * report.loss_before,
                "{encoding}: {report:?}"
            );
            // The reported error is the error of what the runtime will compute.
            let out = runtime_forward(&c, &student, &x, seq_len);
            let energy = target.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
            let error = out
                .iter()
                .zip(&target)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
            assert!(
                (error / energy - report.loss_after).abs() < 0.05 * report.loss_after,
                "{encoding}: {} vs {report:?}",
                error / energy
            );
            if masked {
                // Pruned weights stay pruned.
                let zeros_after: Vec<bool> = student
                    .iter()
                    .flat_map(|t| t.values.iter().map(|v| *v == 0.0))
                    .collect();
                for (i, (b, a)) in zeros_before.iter().zip(&zeros_after).enumerate() {
                    assert!(!b || *a, "{encoding}: weight {i} was pruned and came back");
                }
            }
            for t in &student {
                assert_eq!(
                    t.encoding,
                    if t.shape.len() == 1 {
                        Encoding::F32
                    } else {
                        encoding
                    }
                );
                if let Some(g) = &t.grids {
                    assert_eq!(g.len() * encoding.group().unwrap() as usize, t.values.len());
                }
            }
        }
    }
}
