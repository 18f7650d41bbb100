//! Logit distillation (recovery mode `Distill`): the compressed model (student) is tuned so that its
//! next-token distribution on the calibration text matches the original model's (teacher),
//! by KL divergence over the whole model at once, where block-wise reconstruction sees one
//! block at a time.
//!
//! By default only a small parameter set is trained, so the file keeps every code it had
//! (parameter-efficient quantization-aware tuning, as PEQA): the scale of every quantization
//! group and the minimum of asymmetric ones, the norms and biases, and float low-rank
//! factors. Float and pruned matrices stay as they are. With [`Recovery::codes`] the latent
//! weights the codes are rounded from are trained too (quantization-aware fine-tuning with
//! straight-through rounding), so codes may change.
//!
//! The teacher is summarised by its top-k probabilities per position plus the mass of the
//! rest, computed once from the original model's final activations, so neither the teacher
//! model nor full-vocabulary logits are kept while training. The KL divergence between
//! those coarse distributions (the top k tokens and one bucket for the rest) is the loss;
//! it is exact for the mass the top k cover and never more than the full KL divergence.
//! Training visits the calibration sequences in a shuffled order, a fresh one each pass, at a
//! constant step size that decays over the last quarter of the steps (`step_size`). A
//! held-out part of them, spread over the text, is scored every [`CHECK_EVERY`] steps; the
//! values of the best check are kept (early stopping), none if no check beat the start.

mod teacher;

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Tensor, TensorId, Var};

use super::train::{Adam, Forward, Layout, Param, build_forward, rms};
use super::{BlockTensor, Distillation, Grid, Rates, RecoverError, Recovery};
use pocketlm_format::config::ModelConfig;
use pocketlm_runtime::sampler::SplitMix64;
use teacher::LOG_FLOOR;
#[cfg(test)]
use teacher::top_k;
pub use teacher::{TOP_K, TeacherLogits};

type Result<T> = std::result::Result<T, RecoverError>;

/// Adam step sizes for distillation: latent weights (with [`Recovery::codes`]) in steps of
/// their group's grid, grid scales and minimum shifts relative to the initial scale, float
/// low-rank factors and vectors relative to their tensor's RMS.
pub const DISTILL_RATES: Rates = Rates {
    latent: 5e-3,
    grid: 3e-3,
    float: 6e-3,
    vector: 3e-3,
};

/// Optimizer steps between two scores of the held-out sequences.
pub const CHECK_EVERY: usize = 8;

/// Sequences scored at most, both held out and for the training KL reported. A score is a
/// forward pass over each (SmolLM2-135M, 256 positions: about 0.9 s on 2 cores, where a step
/// of 4 takes 15 s), so uncapped, a 1024-sequence run would spend as long on its checks of
/// 128 as on training, and half an hour on its two training scores.
pub const SCORED_SEQUENCES: usize = 32;

/// How many of `sequences` are held out: an eighth, at least one when there are two, at most
/// [`SCORED_SEQUENCES`].
pub fn held_out_count(sequences: usize) -> usize {
    if sequences >= 2 {
        (sequences / 8).clamp(1, SCORED_SEQUENCES)
    } else {
        0
    }
}

/// `count` of `ids`, evenly spread over them (the middle of each of `count` equal spans).
fn spread(ids: &[usize], count: usize) -> Vec<usize> {
    let count = count.min(ids.len());
    (0..count)
        .map(|i| ids[(2 * i + 1) * ids.len() / (2 * count)])
        .collect()
}

/// The held-out sequences and the training ones. The held-out ones are spread evenly over
/// the calibration text: it is a concatenation of parts (web text, Wikipedia, code, other
/// languages, stories), and held-out sequences from its end alone would score one part.
fn split(sequences: usize) -> (Vec<usize>, Vec<usize>) {
    let all: Vec<usize> = (0..sequences).collect();
    let held = spread(&all, held_out_count(sequences));
    let train = all.into_iter().filter(|i| !held.contains(i)).collect();
    (held, train)
}

/// Seed of the order training visits its sequences in.
const ORDER_SEED: u64 = 0x706c_6d6b_6400;

/// `ids` in a pseudo-random order (Fisher–Yates), so that consecutive batches mix the
/// calibration text's parts and the last steps before a check do not all tune toward one.
fn shuffled(ids: &[usize], rng: &mut SplitMix64) -> Vec<usize> {
    let mut out = ids.to_vec();
    for i in (1..out.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        out.swap(i, j);
    }
    out
}

/// Fraction of the steps, at the end, over which the step size decays.
const DECAY_FRACTION: f64 = 0.25;

/// The step size of step `step` of `steps`, relative to the initial one: constant, then over
/// the last [`DECAY_FRACTION`] of the steps half a cosine down toward 0. With a constant step
/// size the held-out KL wobbles in the last steps of a long run (a batch of 4 sequences is a
/// noisy gradient) and early stopping keeps whichever check happened to be low; decaying lets
/// the last steps settle. Decay over the whole run was tried on stories260K and lost, since
/// it slows the steps that still have much to learn.
fn step_size(step: usize, steps: usize) -> f64 {
    let start = (1.0 - DECAY_FRACTION) * steps as f64;
    let decay = DECAY_FRACTION * steps as f64;
    if (step as f64) < start || decay <= 0.0 {
        return 1.0;
    }
    0.5 * (1.0 + (std::f64::consts::PI * (step as f64 - start) / decay).cos())
}

/// How one tensor's values come from the trained parameters.
enum Tuned {
    /// Codes fixed, grids trained: `w = q · (s0 · r) + (m0 + s0 · dm)` per group.
    Grid {
        q: Tensor,
        r: Var,
        dm: Option<Var>,
        s0: Tensor,
        m0: Tensor,
        shape: (usize, usize),
    },
    /// `w = z · rho`.
    Float { z: Var, rho: f32, vector: bool },
    /// Latent weights and grids trained, codes rounded from the latent weights.
    Latent(Param),
    /// Not trained.
    Frozen(Tensor),
}

impl Tuned {
    fn new(t: &BlockTensor, codes: bool, dev: &Device) -> candle_core::Result<Tuned> {
        let is_factor = t.name.ends_with("#u") || t.name.ends_with("#v");
        let vector = t.shape.len() == 1;
        match &t.grids {
            Some(_) if codes => Ok(Tuned::Latent(Param::new(t, dev)?)),
            Some(grids) => {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let groups = grids.len() / rows;
                let group = cols / groups;
                // The codes the file holds, from the values as the runtime reads them.
                let readback = t.readback();
                let q: Vec<f32> = readback
                    .chunks(group)
                    .zip(grids)
                    .flat_map(|(vals, g)| {
                        vals.iter().map(move |&v| {
                            if g.scale != 0.0 {
                                ((v - g.min) / g.scale).round()
                            } else {
                                0.0
                            }
                        })
                    })
                    .collect();
                let s0: Vec<f32> = grids.iter().map(|g| g.scale).collect();
                let m0: Vec<f32> = grids.iter().map(|g| g.min).collect();
                let asymmetric = grids[0].levels().0 == 0.0;
                Ok(Tuned::Grid {
                    q: Tensor::from_vec(q, (rows, groups, group), dev)?,
                    r: Var::ones((rows, groups, 1), DType::F32, dev)?,
                    dm: if asymmetric {
                        Some(Var::zeros((rows, groups, 1), DType::F32, dev)?)
                    } else {
                        None
                    },
                    s0: Tensor::from_vec(s0, (rows, groups, 1), dev)?,
                    m0: Tensor::from_vec(m0, (rows, groups, 1), dev)?,
                    shape: (rows, cols),
                })
            }
            None if vector || is_factor => {
                let rho = rms(&t.values);
                let z: Vec<f32> = t.values.iter().map(|v| v / rho).collect();
                Ok(Tuned::Float {
                    z: Var::from_tensor(&Tensor::from_vec(z, t.shape.clone(), dev)?)?,
                    rho,
                    vector,
                })
            }
            None => Ok(Tuned::Frozen(Tensor::from_vec(
                t.readback(),
                t.shape.clone(),
                dev,
            )?)),
        }
    }

    fn scale_and_min(
        r: &Var,
        dm: &Option<Var>,
        s0: &Tensor,
        m0: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let scale = (r.as_tensor() * s0)?;
        let min = match dm {
            Some(dm) => ((dm.as_tensor() * s0)? + m0)?,
            None => m0.clone(),
        };
        Ok((scale, min))
    }

    fn weights(&self) -> candle_core::Result<Tensor> {
        match self {
            Tuned::Grid {
                q,
                r,
                dm,
                s0,
                m0,
                shape,
            } => {
                let (scale, min) = Self::scale_and_min(r, dm, s0, m0)?;
                q.broadcast_mul(&scale)?
                    .broadcast_add(&min)?
                    .reshape(*shape)
            }
            Tuned::Float { z, rho, .. } => z.as_tensor() * *rho as f64,
            Tuned::Latent(p) => p.weights(),
            Tuned::Frozen(w) => Ok(w.clone()),
        }
    }

    fn variables(&self, rates: &Rates) -> Vec<(Var, f64)> {
        match self {
            Tuned::Grid { r, dm, .. } => {
                let mut v = vec![(r.clone(), rates.grid)];
                if let Some(dm) = dm {
                    v.push((dm.clone(), rates.grid));
                }
                v
            }
            Tuned::Float { z, vector, .. } => {
                vec![(z.clone(), if *vector { rates.vector } else { rates.float })]
            }
            Tuned::Latent(p) => p.variables(rates, false),
            Tuned::Frozen(_) => Vec::new(),
        }
    }

    /// Writes the tuned values back into `t`: new grids with the same codes.
    fn store(&self, t: &mut BlockTensor) -> candle_core::Result<()> {
        match self {
            Tuned::Grid {
                q, r, dm, s0, m0, ..
            } => {
                let (scale, min) = Self::scale_and_min(r, dm, s0, m0)?;
                let scale = scale.flatten_all()?.to_vec1::<f32>()?;
                let min = min.flatten_all()?.to_vec1::<f32>()?;
                let q = q.flatten_all()?.to_vec1::<f32>()?;
                let group = q.len() / scale.len();
                let grids = t.grids.as_mut().expect("quantized tensor has grids");
                for (g, grid) in grids.iter_mut().enumerate() {
                    *grid = Grid::from_parts(t.encoding, scale[g], min[g]);
                    // Values exactly on the new grid at the old codes, so the encoder writes
                    // the same codes (pruned positions included).
                    let (s, m) = (grid.scale, grid.min);
                    for (v, &code) in t.values[g * group..(g + 1) * group]
                        .iter_mut()
                        .zip(&q[g * group..(g + 1) * group])
                    {
                        *v = code * s + m;
                    }
                }
            }
            Tuned::Float { .. } => {
                t.values = self.weights()?.flatten_all()?.to_vec1::<f32>()?;
            }
            Tuned::Latent(p) => p.store(t)?,
            Tuned::Frozen(_) => {}
        }
        Ok(())
    }
}

/// What the student is: its blocks' tensors, the final norm and the output matrix (fixed),
/// and the embedded calibration sequences it starts from.
pub struct Student<'a> {
    pub blocks: &'a mut [Vec<BlockTensor>],
    pub output_norm: &'a mut BlockTensor,
    /// `vocab × hidden`, as the runtime reads it.
    pub head: &'a [f32],
    /// `sequences × seq_len × hidden`: the compressed model's embedding of the calibration
    /// sequences.
    pub inputs: &'a [f32],
    pub seq_len: usize,
}

/// Tunes the student's small parameter set (see the module docs) for `options.steps` Adam
/// steps so that its next-token distribution matches `teacher` (one entry per position of
/// `student.inputs`). The tensors are updated in place when that lowers the KL divergence
/// on the held-out sequences. `progress(step, loss)` follows the optimisation.
pub fn distill(
    config: &ModelConfig,
    student: Student<'_>,
    teacher: &TeacherLogits,
    options: &Recovery,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<Distillation> {
    let dev = Device::Cpu;
    let (d, seq_len) = (config.hidden_size, student.seq_len);
    let span = seq_len * d;
    let sequences = student.inputs.len() / span.max(1);
    if sequences == 0 || teacher.positions() != sequences * seq_len {
        return Err(RecoverError::TeacherPositions {
            positions: teacher.positions(),
            sequences,
            seq_len,
        });
    }
    if student.blocks.len() != config.num_layers {
        return Err(RecoverError::BlockCount {
            blocks: student.blocks.len(),
            layers: config.num_layers,
        });
    }
    let vocab = student.head.len() / d;
    let (held_ids, train_ids) = split(sequences);
    let (held_out, train) = (held_ids.len(), train_ids.len());
    let scored_ids = spread(&train_ids, SCORED_SEQUENCES);
    let train_scored = scored_ids.len();

    let layouts = student
        .blocks
        .iter()
        .enumerate()
        .map(|(l, tensors)| Layout::new(config, l, tensors))
        .collect::<Result<Vec<_>>>()?;
    let forwards = layouts
        .iter()
        .map(|layout| build_forward(config, layout, seq_len, &dev))
        .collect::<candle_core::Result<Vec<Forward<'_>>>>()?;
    let tuned = student
        .blocks
        .iter()
        .map(|tensors| {
            tensors
                .iter()
                .map(|t| Tuned::new(t, options.codes, &dev))
                .collect::<candle_core::Result<Vec<_>>>()
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let norm = Tuned::new(student.output_norm, false, &dev)?;
    let head = Tensor::from_slice(student.head, (vocab, d), &dev)?;
    let rates = DISTILL_RATES.scaled(options.learning_rate);
    let vars: Vec<(Var, f64)> = tuned
        .iter()
        .flatten()
        .chain(std::iter::once(&norm))
        .flat_map(|t| t.variables(&rates))
        .collect();
    let parameters = vars.iter().map(|(v, _)| v.elem_count()).sum();

    let k = teacher.k;
    // Rows `width` wide of `values`, `seq_len` of them per sequence, for sequences `ids`.
    fn gather<T: Copy>(values: &[T], ids: &[usize], rows: usize, width: usize) -> Vec<T> {
        ids.iter()
            .flat_map(|&i| &values[i * rows * width..(i + 1) * rows * width])
            .copied()
            .collect()
    }
    let teacher_of = |ids: &[usize]| -> candle_core::Result<[Tensor; 3]> {
        let positions = ids.len() * seq_len;
        Ok([
            Tensor::from_vec(
                gather(&teacher.indices, ids, seq_len, k),
                (positions, k),
                &dev,
            )?,
            Tensor::from_vec(
                gather(&teacher.log_probs, ids, seq_len, k),
                (positions, k),
                &dev,
            )?,
            Tensor::from_vec(gather(&teacher.rest, ids, seq_len, 1), (positions, 1), &dev)?,
        ])
    };
    let block_weights = |l: usize, detached: bool| -> candle_core::Result<Vec<Tensor>> {
        tuned[l]
            .iter()
            .map(|t| {
                let w = t.weights()?;
                Ok(if detached { w.detach() } else { w })
            })
            .collect()
    };
    let input = |ids: &[usize]| -> candle_core::Result<Tensor> {
        let values = gather(student.inputs, ids, seq_len, d);
        Tensor::from_vec(values, (ids.len(), seq_len, d), &dev)
    };
    // Mean KL divergence per position of sequences `ids`, from the final residual stream
    // `x` (`ids.len() × seq_len × hidden`).
    let head_loss = |x: &Tensor, ids: &[usize]| -> candle_core::Result<Tensor> {
        let h = forwards[0].rms_norm(&x.reshape((ids.len() * seq_len, d))?, &norm.weights()?)?;
        let logits = h.matmul(&head.t()?)?;
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let [top_ids, log_p, log_p_rest] = teacher_of(ids)?;
        let log_q = shifted.gather(&top_ids, D::Minus1)?.broadcast_sub(&log_z)?;
        let q_rest = (1.0 - log_q.exp()?.sum_keepdim(D::Minus1)?)?;
        let log_q_rest = q_rest.clamp(LOG_FLOOR.exp(), 1.0)?.log()?;
        let top = (log_p.exp()? * (&log_p - log_q)?)?.sum_keepdim(D::Minus1)?;
        let rest = (log_p_rest.exp()? * (&log_p_rest - log_q_rest)?)?;
        (top + rest)?.mean_all()
    };
    // The residual stream entering each block and leaving the last, without gradients.
    let residuals = |ids: &[usize]| -> candle_core::Result<Vec<Tensor>> {
        let mut xs = vec![input(ids)?];
        for (l, forward) in forwards.iter().enumerate() {
            let x = forward.run(&xs[l], &block_weights(l, true)?)?;
            xs.push(x);
        }
        Ok(xs)
    };
    let batch = options.batch.min(train.max(1));
    let mean_loss = |ids: &[usize]| -> candle_core::Result<f64> {
        let mut total = 0.0;
        for chunk in ids.chunks(batch) {
            let x = residuals(chunk)?.pop().expect("final residual stream");
            let loss = head_loss(&x, chunk)?.detach();
            total += loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        }
        Ok(total / ids.len().max(1) as f64)
    };
    let held = || -> candle_core::Result<f64> {
        if held_out == 0 {
            mean_loss(&train_ids)
        } else {
            mean_loss(&held_ids)
        }
    };
    // The loss and every trained variable's gradient on sequences `ids`. The
    // graph is kept for one block at a time (gradient checkpointing): the forward pass keeps
    // only each block's input, then each block is run again, last first, and back-propagated
    // from the gradient of its output (`sum(out · grad)` has that gradient), so memory stays
    // bounded by one block's graph and the output layer's logits.
    let gradients = |ids: &[usize]| -> candle_core::Result<(f64, HashMap<TensorId, Tensor>)> {
        let mut xs = residuals(ids)?;
        let last = Var::from_tensor(&xs.pop().expect("final residual stream"))?;
        let loss = head_loss(last.as_tensor(), ids)?;
        let value = loss.to_scalar::<f32>()? as f64;
        let mut found = HashMap::new();
        let mut keep = |store: &mut GradStore, vars: &[(Var, f64)]| {
            for (var, _) in vars {
                if let Some(g) = store.remove(var.as_tensor()) {
                    found.insert(var.as_tensor().id(), g.detach());
                }
            }
        };
        let mut store = loss.backward()?;
        keep(&mut store, &norm.variables(&rates));
        let mut grad = store
            .remove(last.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no gradient at the output".into()))?
            .detach();
        drop(store);
        for (l, forward) in forwards.iter().enumerate().rev() {
            let x = Var::from_tensor(&xs[l])?;
            let out = forward.run(x.as_tensor(), &block_weights(l, false)?)?;
            let mut store = (out * &grad)?.sum_all()?.backward()?;
            let vars: Vec<(Var, f64)> = tuned[l].iter().flat_map(|t| t.variables(&rates)).collect();
            keep(&mut store, &vars);
            if l > 0 {
                grad = store
                    .remove(x.as_tensor())
                    .ok_or_else(|| candle_core::Error::Msg(format!("no gradient into block {l}")))?
                    .detach();
            }
        }
        Ok((value, found))
    };

    let kl_before = held()?;
    let train_kl_before = mean_loss(&scored_ids)?;
    let variables: Vec<Var> = vars.iter().map(|(v, _)| v.clone()).collect();
    let mut adam = Adam::new(vars)?;
    let batches = train.div_ceil(batch);
    let mut rng = SplitMix64(ORDER_SEED);
    let mut order = Vec::new();
    // Early stopping: the held-out KL of the best check so far, its step and its values.
    let (mut kl_after, mut best_step) = (kl_before, 0);
    let mut best: Option<Vec<Tensor>> = None;
    for step in 0..options.steps {
        // Each pass over the training sequences visits them in a fresh order.
        if step % batches == 0 {
            order = shuffled(&train_ids, &mut rng);
        }
        let first = (step % batches) * batch;
        let ids = &order[first..(first + batch).min(train)];
        let (value, grads) = gradients(ids)?;
        if !value.is_finite() {
            log::warn!("distillation diverged at step {step}; keeping the best check so far");
            break;
        }
        adam.step_scaled(step_size(step, options.steps), |var| {
            grads.get(&var.id()).cloned()
        })?;
        progress(step + 1, value);
        let done = step + 1;
        if done.is_multiple_of(CHECK_EVERY) || done == options.steps {
            let kl = held()?;
            log::info!("kd: step {done} held-out KL {kl:.4} (best {kl_after:.4})");
            if kl.is_finite() && kl < kl_after {
                kl_after = kl;
                best_step = done;
                let copies = variables.iter().map(|v| v.as_tensor().copy());
                best = Some(copies.collect::<candle_core::Result<_>>()?);
            }
        }
    }
    let kept = best.is_some();
    // The values of the best check (or, when none beat the start, the last step's: they are
    // not stored) are the ones the training KL is measured on.
    if let Some(best) = &best {
        for (v, b) in variables.iter().zip(best) {
            v.set(b)?;
        }
    }
    let train_kl_after = mean_loss(&scored_ids)?;
    if kept {
        for (ts, tensors) in tuned.iter().zip(student.blocks.iter_mut()) {
            for (t, tensor) in ts.iter().zip(tensors.iter_mut()) {
                t.store(tensor)?;
            }
        }
        norm.store(student.output_norm)?;
    }
    Ok(Distillation {
        kl_before,
        kl_after,
        train_kl_before,
        train_kl_after,
        held_out,
        train_scored,
        kept,
        best_step,
        parameters,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Q4A, block, config, runtime_forward};
    use super::*;
    use pocketlm_format::Encoding;
    use pocketlm_kernels::test_util::random_vec;

    /// The integer codes a quantized tensor is stored with.
    fn codes(t: &BlockTensor) -> Vec<f32> {
        let grids = t.grids.as_ref().unwrap();
        let group = t.values.len() / grids.len();
        t.readback()
            .chunks(group)
            .zip(grids)
            .flat_map(|(v, g)| v.iter().map(move |&v| ((v - g.min) / g.scale).round()))
            .collect()
    }

    #[test]
    fn distillation_lowers_the_kl_divergence_and_moves_codes_only_when_asked() {
        let c = config(false);
        let (seq_len, sequences) = (12, 16);
        let d = c.hidden_size;
        let embedding = random_vec(c.vocab_size * d, 5);
        let tokens: Vec<usize> = (0..sequences * seq_len)
            .map(|i| (i * 7 + i / 5) % c.vocab_size)
            .collect();
        let inputs: Vec<f32> = tokens
            .iter()
            .flat_map(|&t| embedding[t * d..(t + 1) * d].to_vec())
            .collect();
        let norm = vec![1.0f32; d];
        let teacher_block = block(&c, Encoding::F32, false);
        let hidden = runtime_forward(&c, &teacher_block, &inputs, seq_len);
        // Four of the eight tokens kept: the rest bucket is exercised.
        let teacher = TeacherLogits::from_hidden(&c, &hidden, &norm, &embedding, 4);
        assert_eq!(teacher.positions(), sequences * seq_len);

        for (encoding, codes_trained) in [
            (Encoding::Q3 { group: 32 }, false),
            (Q4A, false),
            (Encoding::Q3 { group: 32 }, true),
            (Q4A, true),
        ] {
            let mut blocks = vec![block(&c, encoding, encoding == Q4A)];
            let codes_before: Vec<Vec<f32>> = blocks[0]
                .iter()
                .filter(|t| t.grids.is_some())
                .map(codes)
                .collect();
            let mut output_norm = BlockTensor {
                name: "output_norm.weight".into(),
                shape: vec![d],
                encoding: Encoding::F32,
                values: norm.clone(),
                grids: None,
                masked: false,
            };
            let options = Recovery {
                mode: super::super::RecoverMode::Distill,
                steps: 80,
                batch: 4,
                learning_rate: 3.0,
                codes: codes_trained,
                samples: None,
            };
            let report = distill(
                &c,
                Student {
                    blocks: &mut blocks,
                    output_norm: &mut output_norm,
                    head: &embedding,
                    inputs: &inputs,
                    seq_len,
                },
                &teacher,
                &options,
                &mut |_, _| {},
            )
            .unwrap();
            assert_eq!((report.held_out, report.train_scored), (2, 14));
            assert!(
                report.kept && report.kl_after < 0.8 * report.kl_before,
                "{encoding}: {report:?}"
            );
            // The values kept are those of a held-out check.
            assert!(
                report.best_step > 0
                    && (report.best_step.is_multiple_of(CHECK_EVERY)
                        || report.best_step == options.steps),
                "{report:?}"
            );
            assert!(report.train_kl_after < report.train_kl_before);
            let codes_after: Vec<Vec<f32>> = blocks[0]
                .iter()
                .filter(|t| t.grids.is_some())
                .map(codes)
                .collect();
            if codes_trained {
                assert_ne!(codes_before, codes_after, "{encoding}: no code moved");
            } else {
                assert_eq!(codes_before, codes_after, "{encoding}: codes changed");
            }
            assert_ne!(output_norm.values, norm, "the final norm is tuned");
        }
    }

    #[test]
    fn an_eighth_is_held_out_up_to_the_scored_cap() {
        let counts: Vec<usize> = [1, 2, 15, 16, 48, 256, 257, 1024]
            .into_iter()
            .map(held_out_count)
            .collect();
        assert_eq!(counts, [0, 1, 1, 2, 6, 32, 32, 32]);
    }

    #[test]
    fn held_out_sequences_are_spread_over_the_text_and_training_is_shuffled() {
        for sequences in [1, 2, 7, 48, 257, 1024] {
            let (held, train) = split(sequences);
            assert_eq!(held.len(), held_out_count(sequences));
            let mut all: Vec<usize> = held.iter().chain(&train).copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..sequences).collect::<Vec<_>>(), "{sequences}");
        }
        // 32 of 1024: one in the middle of every span of 32.
        let (held, _) = split(1024);
        assert_eq!(held[..3], [16, 48, 80]);
        assert_eq!(held[31], 1008);
        assert_eq!(split(48).0, [4, 12, 20, 28, 36, 44]);

        let ids: Vec<usize> = (0..100).collect();
        let mut rng = SplitMix64(ORDER_SEED);
        let (first, second) = (shuffled(&ids, &mut rng), shuffled(&ids, &mut rng));
        assert_ne!(first, ids);
        assert_ne!(first, second, "each pass has its own order");
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, ids);
        // A fixed seed: the same conversion visits the same order.
        assert_eq!(first, shuffled(&ids, &mut SplitMix64(ORDER_SEED)));
    }

    #[test]
    fn the_step_size_is_constant_then_decays_over_the_last_quarter() {
        let sizes: Vec<f64> = (0..256).map(|step| step_size(step, 256)).collect();
        assert!(sizes[..=192].iter().all(|&s| s == 1.0));
        assert!(
            (sizes[224] - 0.5).abs() < 1e-12,
            "half way down: {}",
            sizes[224]
        );
        assert!(sizes[255] > 0.0 && sizes[255] < 1e-2, "{}", sizes[255]);
        assert!(sizes.windows(2).all(|w| w[1] <= w[0]), "never rises");
        assert_eq!(step_size(0, 1), 1.0);
        assert_eq!(step_size(0, 0), 1.0);
    }

    #[test]
    fn top_k_keeps_the_largest_and_the_rest_mass() {
        let row = [0.5f32, 3.0, -1.0, 2.0, 0.0];
        let (ids, log_probs, rest) = top_k(&row, 2);
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, vec![1, 3]);
        let z: f32 = row.iter().map(|v| v.exp()).sum();
        for (&i, &lp) in ids.iter().zip(&log_probs) {
            assert!((lp - (row[i as usize].exp() / z).ln()).abs() < 1e-5);
        }
        let rest_mass = (0.5f32.exp() + (-1.0f32).exp() + 1.0) / z;
        assert!((rest - rest_mass.ln()).abs() < 1e-5, "{rest}");
        // All tokens kept: the rest has (nearly) no mass.
        let (_, _, rest) = top_k(&row, 5);
        assert!(rest <= -10.0, "{rest}");
    }
}
