//! Block-wise recovery's training: each compressed tensor as trainable parameters (grid
//! scales, latent weights rounded with a straight-through estimator, surviving weights,
//! factors, norms), the block's forward pass in candle, Adam, and the loop that tunes one
//! block against the original block's output. Distillation reuses the parameters, the
//! forward pass and the optimizer.

use candle_core::{D, DType, Device, Tensor, Var, backprop::GradStore};

use super::{
    Activations, BASE_RATES, BlockRecovery, BlockTensor, Grid, Rates, RecoverError, Recovery,
};
use pocketlm_format::config::{ModelConfig, names};
use pocketlm_kernels::hadamard::BlockHadamard;
use pocketlm_runtime::model::{InputRotations, LinearInput};

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

/// One linear input's randomized block Hadamard transform as candle tensors: `R·x` is the
/// signs (normalization folded in) times `x`, then each block of channels times the
/// unnormalized Walsh–Hadamard matrix. Applied to activations, so a model whose block
/// matrices are stored rotated (`W·Rᵀ`) trains on the same products the runtime computes.
struct Rotation {
    /// `[width]`.
    scaled_signs: Tensor,
    /// `[block, block]`, symmetric.
    hadamard: Tensor,
    block: usize,
}

impl Rotation {
    fn new(transform: &BlockHadamard, dev: &Device) -> candle_core::Result<Rotation> {
        let (block, signs) = (transform.block(), transform.scaled_signs());
        // Column i of the Walsh–Hadamard matrix is R·eᵢ over channel i's sign (for i in the
        // first block, whose rows it spans).
        let mut hadamard = vec![0.0f32; block * block];
        let mut unit = vec![0.0f32; transform.width()];
        for i in 0..block {
            unit.fill(0.0);
            unit[i] = 1.0;
            transform.rotate(&mut unit);
            for (row, v) in unit[..block].iter().enumerate() {
                hadamard[row * block + i] = (v / signs[i]).round();
            }
        }
        Ok(Rotation {
            scaled_signs: Tensor::from_slice(signs, transform.width(), dev)?,
            hadamard: Tensor::from_vec(hadamard, (block, block), dev)?,
            block,
        })
    }

    /// `x` (`rows × width`) with every row rotated.
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, width) = x.dims2()?;
        x.broadcast_mul(&self.scaled_signs)?
            .reshape((rows * width / self.block, self.block))?
            .matmul(&self.hadamard)?
            .reshape((rows, width))
    }
}

/// Each linear input's rotation, in [`LinearInput::ALL`]'s order, when `config` records
/// that the model is stored rotated.
fn rotations(config: &ModelConfig, dev: &Device) -> candle_core::Result<Option<Vec<Rotation>>> {
    let Some(transforms) = InputRotations::of(config) else {
        return Ok(None);
    };
    LinearInput::ALL
        .iter()
        .map(|&input| Rotation::new(transforms.for_input(input), dev))
        .collect::<candle_core::Result<Vec<_>>>()
        .map(Some)
}

/// The block's forward pass in candle, on `x` (`sequences × seq_len × hidden`), with the
/// weights `w` (one per recovered tensor) — the same computation as the runtime's.
pub(super) struct Forward<'a> {
    config: &'a ModelConfig,
    layout: &'a Layout,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    /// See [`rotations`].
    rotations: Option<Vec<Rotation>>,
}

impl Forward<'_> {
    /// `x` as the linear layers reading `input` see it: rotated when the model is stored
    /// rotated.
    fn linear_input(&self, input: LinearInput, x: Tensor) -> candle_core::Result<Tensor> {
        let Some(rotations) = &self.rotations else {
            return Ok(x);
        };
        let at = LinearInput::ALL.iter().position(|&i| i == input);
        rotations[at.expect("LinearInput::ALL lists every input")].apply(&x)
    }

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
        let h = self.linear_input(LinearInput::Attention, h)?;
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
        let attn = self.linear_input(LinearInput::AttentionOutput, attn)?;
        let x2 = (x2 + self.linear(&attn, &lay.o, w)?)?;
        let h = self.rms_norm(&x2, &w[lay.ffn_norm])?;
        let h = self.linear_input(LinearInput::Mlp, h)?;
        let gate = self.linear(&h, &lay.gate, w)?.silu()?;
        let up = self.linear(&h, &lay.up, w)?;
        let act = self.linear_input(LinearInput::MlpDown, (gate * up)?)?;
        let mlp = self.linear(&act, &lay.down, w)?;
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
        rotations: rotations(config, dev)?,
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
