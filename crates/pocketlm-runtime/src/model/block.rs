//! One transformer block, shared by the runtime's forward pass and the converter's
//! calibration (which runs blocks on in-memory f32 weights and observes the inputs of every
//! linear layer).

use rayon::prelude::*;

use super::attention::{self, KvCache, ScoreRule};
use super::family;
use super::rope::Rope;
use pocketlm_format::config::ModelConfig;
use pocketlm_kernels::hadamard::BlockHadamard;
use pocketlm_kernels::{self as kernels, Linear};

/// Norms only some families have (see [`pocketlm_format::config::FamilyFeatures`]).
#[derive(Clone, Copy, Default)]
pub struct FamilyNorms<'a> {
    /// Per-head RMSNorm of queries and keys, `head_dim` wide (Qwen3, Gemma 3).
    pub q_norm: Option<&'a [f32]>,
    pub k_norm: Option<&'a [f32]>,
    /// Norms of the attention and MLP outputs before the residual add (Gemma 2/3).
    pub post_attention_norm: Option<&'a [f32]>,
    pub post_ffw_norm: Option<&'a [f32]>,
}

/// The weights of one block, in any encoding the kernels read.
#[derive(Clone, Copy)]
pub struct BlockWeights<'a> {
    /// The block's index in the model: it selects the layer's attention window and rotary
    /// embedding (calibration runs every block in cache slot 0).
    pub layer: usize,
    pub attn_norm: &'a [f32],
    pub q: Linear<'a>,
    pub k: Linear<'a>,
    pub v: Linear<'a>,
    pub biases: Option<[&'a [f32]; 3]>,
    pub o: Linear<'a>,
    pub ffn_norm: &'a [f32],
    pub gate: Linear<'a>,
    pub up: Linear<'a>,
    pub down: Linear<'a>,
    pub norms: FamilyNorms<'a>,
    /// The transforms of the linear layers' inputs, when the matrices were stored rotated
    /// ([`pocketlm_format::config::Incoherence`]).
    pub rotations: Option<&'a InputRotations>,
}

/// The four distinct inputs the linear layers of a block read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinearInput {
    /// Normed residual stream, read by q, k and v.
    Attention,
    /// Attention heads' output, read by the output projection o.
    AttentionOutput,
    /// Normed residual stream, read by gate and up.
    Mlp,
    /// `act(gate) * up` (SwiGLU or GeGLU), read by down.
    MlpDown,
}

impl LinearInput {
    pub const ALL: [LinearInput; 4] = [
        LinearInput::Attention,
        LinearInput::AttentionOutput,
        LinearInput::Mlp,
        LinearInput::MlpDown,
    ];
}

/// The randomized block Hadamard transform of each linear-layer input of a model whose
/// block matrices are stored rotated: the same transform for every block.
#[derive(Clone, Debug)]
pub struct InputRotations {
    hidden: BlockHadamard,
    attention_output: BlockHadamard,
    mlp_down: BlockHadamard,
}

impl InputRotations {
    /// The transforms `config` records, if it records any.
    pub fn of(config: &ModelConfig) -> Option<InputRotations> {
        Some(InputRotations::new(config, config.incoherence?.seed))
    }

    /// The transforms of `config`'s widths with signs from `seed`.
    pub fn new(config: &ModelConfig, seed: u64) -> InputRotations {
        InputRotations {
            hidden: BlockHadamard::new(config.hidden_size, seed),
            attention_output: BlockHadamard::new(config.q_dim(), seed),
            mlp_down: BlockHadamard::new(config.intermediate_size, seed),
        }
    }

    pub fn for_input(&self, input: LinearInput) -> &BlockHadamard {
        match input {
            LinearInput::Attention | LinearInput::Mlp => &self.hidden,
            LinearInput::AttentionOutput => &self.attention_output,
            LinearInput::MlpDown => &self.mlp_down,
        }
    }
}

/// Sees `(which input, tokens × width activations)` before the linear layers consume them.
pub type Observer<'o> = &'o mut dyn FnMut(LinearInput, &[f32]);

/// Activation buffers for a batch of `tokens`, reused across blocks.
pub struct BlockScratch {
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// `tokens × rank` products of low-rank layers (grown on first use).
    between: Vec<f32>,
}

impl BlockScratch {
    pub fn new(config: &ModelConfig, tokens: usize) -> BlockScratch {
        let n = tokens;
        let (d, qd, kvd, f) = (
            config.hidden_size,
            config.q_dim(),
            config.kv_dim(),
            config.intermediate_size,
        );
        BlockScratch {
            h: vec![0.0; n * d],
            q: vec![0.0; n * qd],
            k: vec![0.0; n * kvd],
            v: vec![0.0; n * kvd],
            attn: vec![0.0; n * qd],
            proj: vec![0.0; n * d],
            gate: vec![0.0; n * f],
            up: vec![0.0; n * f],
            between: Vec::new(),
        }
    }
}

/// One sequence's rows in a batched block: `tokens` consecutive rows of the residual
/// stream, at positions `start..` of its own `cache`.
pub struct Segment<'c> {
    pub cache: &'c mut KvCache,
    pub start: usize,
    pub tokens: usize,
}

/// Runs block `w` on the residual stream `x` (`tokens × hidden`, updated in place) for tokens
/// at positions `start..`, writing their keys/values into layer `layer` of `cache` (the caller
/// advances the cache after the last block).
#[allow(clippy::too_many_arguments)]
pub fn block_forward(
    config: &ModelConfig,
    rope: &Rope,
    w: &BlockWeights<'_>,
    x: &mut [f32],
    cache: &mut KvCache,
    layer: usize,
    start: usize,
    s: &mut BlockScratch,
    observe: Option<Observer<'_>>,
) {
    let tokens = x.len() / config.hidden_size;
    let mut segments = [Segment {
        cache,
        start,
        tokens,
    }];
    block_forward_batch(config, rope, w, x, &mut segments, layer, s, observe);
}

/// [`block_forward`] over several sequences at once: the linear layers run on all their
/// rows together (one pass over the weights), rotary embedding and attention on each
/// sequence's rows with its own cache. `segments` cover the rows of `x` in order.
#[allow(clippy::too_many_arguments)]
pub fn block_forward_batch(
    config: &ModelConfig,
    rope: &Rope,
    w: &BlockWeights<'_>,
    x: &mut [f32],
    segments: &mut [Segment<'_>],
    layer: usize,
    s: &mut BlockScratch,
    mut observe: Option<Observer<'_>>,
) {
    let c = config;
    let n = x.len() / c.hidden_size;
    debug_assert_eq!(segments.iter().map(|g| g.tokens).sum::<usize>(), n);
    let (qd, kvd) = (c.q_dim(), c.kv_dim());
    // Shows the observer an input, then rotates it in place when the matrices reading it
    // were stored rotated (nothing else reads these buffers).
    let mut see = |input: LinearInput, a: &mut [f32]| {
        if let Some(o) = observe.as_mut() {
            o(input, a)
        }
        if let Some(r) = w.rotations {
            r.for_input(input).rotate_rows(a);
        }
    };
    kernels::rms_norm(x, w.attn_norm, c.rms_norm_eps, &mut s.h);
    see(LinearInput::Attention, &mut s.h);
    kernels::linear_many(
        &s.h,
        n,
        &mut [(&w.q, &mut s.q), (&w.k, &mut s.k), (&w.v, &mut s.v)],
        &mut s.between,
    );
    if let Some([bq, bk, bv]) = w.biases {
        add_row_bias(&mut s.q, bq);
        add_row_bias(&mut s.k, bk);
        add_row_bias(&mut s.v, bv);
    }
    if let (Some(qn), Some(kn)) = (w.norms.q_norm, w.norms.k_norm) {
        family::rms_norm_rows_in_place(&mut s.q, qn, c.rms_norm_eps);
        family::rms_norm_rows_in_place(&mut s.k, kn, c.rms_norm_eps);
    }
    let rule = ScoreRule::for_layer(c, w.layer);
    let mut row = 0;
    for segment in segments.iter_mut() {
        let rows = row..row + segment.tokens;
        row = rows.end;
        let (start, cache) = (segment.start, &mut *segment.cache);
        let q = &mut s.q[rows.start * qd..rows.end * qd];
        let k = &mut s.k[rows.start * kvd..rows.end * kvd];
        let v = &s.v[rows.start * kvd..rows.end * kvd];
        if let Some(rotation) = rope.for_layer(c, w.layer, cache.capacity()) {
            q.par_chunks_mut(qd)
                .zip(k.par_chunks_mut(kvd))
                .enumerate()
                .for_each(|(t, (qt, kt))| {
                    rotation.apply(qt, start + t);
                    rotation.apply(kt, start + t);
                });
        }
        // A ring layer attends before storing: this batch may overwrite slots it still reads.
        let ring = cache.ring(layer).is_some();
        if !ring {
            cache.write(layer, start, k, v);
        }
        let attn = &mut s.attn[rows.start * qd..rows.end * qd];
        attention::attend(c, cache, layer, start, rule, q, (k, v), attn);
        if ring {
            cache.write(layer, start, k, v);
        }
    }
    see(LinearInput::AttentionOutput, &mut s.attn);
    kernels::linear(&s.attn, n, &w.o, &mut s.proj, &mut s.between);
    add_output(x, &mut s.proj, w.norms.post_attention_norm, c.rms_norm_eps);

    kernels::rms_norm(x, w.ffn_norm, c.rms_norm_eps, &mut s.h);
    see(LinearInput::Mlp, &mut s.h);
    kernels::linear_many(
        &s.h,
        n,
        &mut [(&w.gate, &mut s.gate), (&w.up, &mut s.up)],
        &mut s.between,
    );
    family::activation_mul(c.features.activation, &mut s.gate, &s.up);
    see(LinearInput::MlpDown, &mut s.gate);
    kernels::linear(&s.gate, n, &w.down, &mut s.proj, &mut s.between);
    add_output(x, &mut s.proj, w.norms.post_ffw_norm, c.rms_norm_eps);
}

/// Adds a sub-layer's output to the residual stream, normed first where the family says.
fn add_output(x: &mut [f32], out: &mut [f32], post_norm: Option<&[f32]>, eps: f32) {
    if let Some(weight) = post_norm {
        family::rms_norm_rows_in_place(out, weight, eps);
    }
    add_in_place(x, out);
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn add_row_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add_in_place(row, bias);
    }
}
