//! The Llama-family decoder, reading its weights in place from a memory-mapped .plm file.
//!
//! One forward pass serves prefill (many tokens, batched products) and decode (one token):
//! RMSNorm → q/k/v (+bias) → RoPE → grouped-query attention over the KV cache → output
//! projection → RMSNorm → SwiGLU MLP, then the final norm and the (tied or untied) output.

mod attention;
pub mod block;
mod error;
mod family;
mod forward;
mod options;
pub mod rope;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::tokenizer::Tokenizer;
use pocketlm_format::TokenizerSpec;
use pocketlm_format::config::{ModelConfig, names};
use pocketlm_format::{Encoding, PlmError, PlmFile, TensorEntry};
use pocketlm_kernels::{Linear, MatRef};

pub(crate) use attention::StoredRows;
pub use attention::{KvCache, KvType};
pub use block::{
    BlockScratch, BlockWeights, FamilyNorms, InputRotations, LinearInput, Segment, block_forward,
    block_forward_batch,
};
pub use error::ModelError;
pub(crate) use error::human_bytes;
pub use forward::BatchInput;
pub use options::{
    DEFAULT_MAX_ACTIVATION_BYTES, DEFAULT_MAX_KV_CACHE_BYTES, ModelOptions, Profile,
    UnknownProfile, VerifyMode,
};
pub use pocketlm_format::config::expected_tensors;
pub use rope::Rope;

/// Index of a tensor in the file's table (resolved and validated once at load).
type TensorIndex = usize;

/// Where a linear layer's weights are: one matrix, or the two factors of a low-rank one.
#[derive(Clone, Copy, Debug)]
enum LinearIndex {
    Dense(TensorIndex),
    LowRank {
        v: TensorIndex,
        u: TensorIndex,
    },
    /// A quantized matrix and its stored residual (`sensitive`: `attn_v` or `ffn_down`, whose
    /// residual the balanced profile reads).
    Residual {
        base: TensorIndex,
        residual: TensorIndex,
        sensitive: bool,
    },
}

impl LinearIndex {
    /// The tensors `profile` reads.
    fn tensors(self, profile: Profile) -> Vec<TensorIndex> {
        match self {
            LinearIndex::Dense(i) => vec![i],
            LinearIndex::LowRank { v, u } => vec![v, u],
            LinearIndex::Residual {
                base,
                residual,
                sensitive,
            } => {
                if profile.reads_residual(sensitive) {
                    vec![base, residual]
                } else {
                    vec![base]
                }
            }
        }
    }
}

struct Layer {
    attn_norm: TensorIndex,
    q: LinearIndex,
    k: LinearIndex,
    v: LinearIndex,
    biases: Option<[TensorIndex; 3]>,
    /// q/k norms and post-norms, where the family has them.
    qk_norms: Option<[TensorIndex; 2]>,
    post_norms: Option<[TensorIndex; 2]>,
    o: LinearIndex,
    ffn_norm: TensorIndex,
    gate: LinearIndex,
    up: LinearIndex,
    down: LinearIndex,
}

impl Layer {
    fn linears(&self) -> [LinearIndex; 7] {
        [
            self.q, self.k, self.v, self.o, self.gate, self.up, self.down,
        ]
    }

    fn indices(&self, profile: Profile) -> Vec<TensorIndex> {
        let mut v = vec![self.attn_norm, self.ffn_norm];
        v.extend(self.linears().into_iter().flat_map(|l| l.tensors(profile)));
        v.extend(self.biases.into_iter().flatten());
        v.extend(self.qk_norms.into_iter().flatten());
        v.extend(self.post_norms.into_iter().flatten());
        v
    }
}

/// Which logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only for the last token (generation).
    Last,
    /// For every token of the batch (scoring).
    All,
    /// For the last `n` tokens of the batch (perplexity scores only the second half).
    LastN(usize),
}

/// A loaded model: the mapped file plus resolved tensor indices. Cheap to share across
/// sessions (`Arc<Model>`); all weights stay in the page cache, shared between processes.
pub struct Model {
    file: Arc<PlmFile>,
    config: ModelConfig,
    tokenizer_spec: TokenizerSpec,
    tokenizer: Tokenizer,
    token_embd: TensorIndex,
    output_norm: TensorIndex,
    output: TensorIndex,
    layers: Vec<Layer>,
    rope: Rope,
    /// The input transforms of a model stored with rotated block matrices.
    rotations: Option<InputRotations>,
    options: ModelOptions,
    /// With [`VerifyMode::Lazy`]: per table entry, whether its checksum has been checked.
    verified: Option<Vec<AtomicBool>>,
    /// The token trie of constrained output, built on first use and shared by sessions.
    #[cfg(feature = "constrained")]
    constraint_vocabulary: std::sync::OnceLock<
        Result<Arc<crate::constrain::ConstraintVocabulary>, crate::constrain::ConstraintError>,
    >,
}

impl Model {
    /// Opens `path` with the default [`ModelOptions`] (no checksum verification).
    pub fn open(path: &Path) -> Result<Model, ModelError> {
        Model::open_with(path, ModelOptions::default())
    }

    pub fn open_with(path: &Path, options: ModelOptions) -> Result<Model, ModelError> {
        let file = PlmFile::open(path)?;
        Model::from_file_with(Arc::new(file), options)
    }

    /// [`Model::from_file_with`] with default options (no checksum verification).
    pub fn from_file(file: Arc<PlmFile>) -> Result<Model, ModelError> {
        Model::from_file_with(file, ModelOptions::default())
    }

    /// Validates the metadata (config, tokenizer) and every tensor the config needs (present,
    /// shape, encoding) against `file`, then verifies checksums as `options.verify` says.
    pub fn from_file_with(file: Arc<PlmFile>, options: ModelOptions) -> Result<Model, ModelError> {
        let path = file.path().display().to_string();
        let meta_err = |message: String| ModelError::Metadata {
            path: path.clone(),
            message,
        };
        let meta = file.metadata();
        let config: ModelConfig = serde_json::from_value(
            meta.get("config")
                .cloned()
                .ok_or_else(|| meta_err("no 'config' object".into()))?,
        )
        .map_err(|e| meta_err(format!("config: {e}")))?;
        config
            .validate()
            .map_err(|e| meta_err(format!("config: {e}")))?;
        let tokenizer_spec: TokenizerSpec = serde_json::from_value(
            meta.get("tokenizer")
                .cloned()
                .ok_or_else(|| meta_err("no 'tokenizer' object".into()))?,
        )
        .map_err(|e| meta_err(format!("tokenizer: {e}")))?;
        let tokenizer = Tokenizer::from_spec(&tokenizer_spec)?;

        let index = |name: &str| -> Option<TensorIndex> {
            file.tensors().iter().position(|t| t.name == name)
        };
        let mut linears = std::collections::HashMap::new();
        for (name, shape) in expected_tensors(&config) {
            if let Some(entry) = file.entry(&name) {
                check_entry(&file, &path, entry, &shape)?;
                if shape.len() == 2 {
                    let base = index(&name).unwrap_or(0);
                    let residual_name = names::residual(&name);
                    let linear = match file.entry(&residual_name) {
                        Some(r) if name.starts_with("blk.") => {
                            check_entry(&file, &path, r, &shape)?;
                            LinearIndex::Residual {
                                base,
                                residual: index(&residual_name).unwrap_or(0),
                                sensitive: name.contains(".attn_v.") || name.contains(".ffn_down."),
                            }
                        }
                        _ => LinearIndex::Dense(base),
                    };
                    linears.insert(name.clone(), linear);
                }
                continue;
            }
            let (v_name, u_name) = (names::lowrank_v(&name), names::lowrank_u(&name));
            match (file.entry(&v_name), file.entry(&u_name)) {
                (Some(v), Some(u)) if shape.len() == 2 && name.starts_with("blk.") => {
                    let rank = v.shape.first().copied().unwrap_or(0);
                    if rank == 0 {
                        return Err(ModelError::Tensor {
                            path: path.clone(),
                            name: v_name,
                            message: "a low-rank factor needs rank ≥ 1".into(),
                        });
                    }
                    check_entry(&file, &path, v, &[rank, shape[1]])?;
                    check_entry(&file, &path, u, &[shape[0], rank])?;
                    let (v, u) = (index(&v_name).unwrap_or(0), index(&u_name).unwrap_or(0));
                    linears.insert(name, LinearIndex::LowRank { v, u });
                }
                _ => {
                    return Err(ModelError::Tensor {
                        path: path.clone(),
                        name,
                        message: "missing (required by the model config)".into(),
                    });
                }
            }
        }
        // Presence was checked above for every expected tensor.
        let linear = |name: &str| linears[name];
        let index = |name: &str| index(name).unwrap_or(usize::MAX);
        let layers = (0..config.num_layers)
            .map(|l| Layer {
                attn_norm: index(&names::attn_norm(l)),
                q: linear(&names::attn_q(l)),
                k: linear(&names::attn_k(l)),
                v: linear(&names::attn_v(l)),
                biases: config.attention_bias.then(|| {
                    [
                        index(&names::attn_q_bias(l)),
                        index(&names::attn_k_bias(l)),
                        index(&names::attn_v_bias(l)),
                    ]
                }),
                qk_norms: config
                    .features
                    .qk_norm
                    .then(|| [index(&names::attn_q_norm(l)), index(&names::attn_k_norm(l))]),
                post_norms: config.features.post_norms.then(|| {
                    [
                        index(&names::post_attention_norm(l)),
                        index(&names::post_ffw_norm(l)),
                    ]
                }),
                o: linear(&names::attn_output(l)),
                ffn_norm: index(&names::ffn_norm(l)),
                gate: linear(&names::ffn_gate(l)),
                up: linear(&names::ffn_up(l)),
                down: linear(&names::ffn_down(l)),
            })
            .collect();
        let token_embd = index(names::TOKEN_EMBD);
        let output = if config.tie_word_embeddings {
            token_embd
        } else {
            index(names::OUTPUT)
        };
        let verified = match options.verify {
            VerifyMode::Off => None,
            VerifyMode::Eager => {
                file.verify()?;
                None
            }
            VerifyMode::Lazy => Some(
                (0..file.tensors().len())
                    .map(|_| AtomicBool::new(false))
                    .collect(),
            ),
        };
        let mut model = Model {
            options,
            verified,
            #[cfg(feature = "constrained")]
            constraint_vocabulary: std::sync::OnceLock::new(),
            rope: Rope::new(&config),
            rotations: InputRotations::of(&config),
            token_embd,
            output_norm: index(names::OUTPUT_NORM),
            output,
            layers,
            config,
            tokenizer_spec,
            tokenizer,
            file,
        };
        model.fit_weight_limit()?;
        Ok(model)
    }

    /// Steps the profile down until the weights the forward pass reads fit
    /// `max_weight_bytes`.
    fn fit_weight_limit(&mut self) -> Result<(), ModelError> {
        let limit = self.options.max_weight_bytes;
        if limit == u64::MAX {
            // No limit: nothing to size at load.
            return Ok(());
        }
        let wanted = self.options.profile;
        for profile in Profile::DESCENDING.into_iter().filter(|p| *p <= wanted) {
            self.options.profile = profile;
            let bytes = self.weight_bytes();
            if bytes <= limit {
                if profile != wanted {
                    log::info!(
                        "profile {} instead of {}: its weights ({}) fit the {} limit",
                        profile.name(),
                        wanted.name(),
                        human_bytes(bytes),
                        human_bytes(limit)
                    );
                }
                return Ok(());
            }
            if profile == Profile::Small {
                return Err(ModelError::WeightsOverLimit {
                    profile: profile.name(),
                    bytes,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// Bytes of the tensors the forward pass reads at the current operating point (low-rank
    /// layers as served, residuals as the profile says).
    pub fn weight_bytes(&self) -> u64 {
        let vectors: u64 = self
            .used_tensors()
            .iter()
            .filter(|t| t.shape.len() == 1)
            .map(|t| t.length)
            .sum();
        let embedding = [self.token_embd, self.output]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|i| self.entry(i).length)
            .sum::<u64>();
        let blocks: u64 = self.block_linears().iter().map(|l| l.bytes_read()).sum();
        vectors + embedding + blocks
    }

    /// The operating point served (after any step-down for `max_weight_bytes`).
    pub fn profile(&self) -> Profile {
        self.options.profile
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The token trie constrained output needs, built once per model (tens of milliseconds
    /// for a 49k vocabulary) and shared by every session.
    #[cfg(feature = "constrained")]
    pub fn constraint_vocabulary(
        &self,
    ) -> Result<Arc<crate::constrain::ConstraintVocabulary>, crate::constrain::ConstraintError>
    {
        self.constraint_vocabulary
            .get_or_init(|| crate::constrain::ConstraintVocabulary::new(&self.tokenizer))
            .clone()
    }

    pub fn tokenizer_spec(&self) -> &TokenizerSpec {
        &self.tokenizer_spec
    }

    pub fn file(&self) -> &PlmFile {
        &self.file
    }

    pub fn options(&self) -> &ModelOptions {
        &self.options
    }

    /// A KV cache for up to `capacity` positions (clamped to the model's trained context).
    /// Fails with [`ModelError::MemoryLimit`] when it would exceed
    /// [`ModelOptions::max_kv_cache_bytes`], and with [`ModelError::OutOfMemory`] when the
    /// allocation itself fails, instead of aborting the process.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache, ModelError> {
        let capacity = capacity.clamp(1, self.config.max_position_embeddings);
        let (kv_dim, head_dim) = (self.config.kv_dim(), self.config.head_dim);
        let windows: Vec<Option<usize>> = (0..self.config.num_layers)
            .map(|l| {
                self.config
                    .layer_window(l)
                    .filter(|_| self.options.window_ring_buffers)
            })
            .collect();
        let kind = self.options.kv_cache;
        let limit = self.options.max_kv_cache_bytes;
        let bytes = KvCache::required_bytes_windowed(kind, &windows, kv_dim, head_dim, capacity)
            .map_or(u64::MAX, |b| b as u64);
        if bytes > limit {
            return Err(ModelError::MemoryLimit {
                what: "KV cache",
                capacity,
                bytes,
                limit,
            });
        }
        KvCache::try_new_windowed(kind, &windows, kv_dim, head_dim, capacity).map_err(|source| {
            ModelError::OutOfMemory {
                what: "KV cache",
                bytes,
                source,
            }
        })
    }

    /// Bytes [`Model::forward`] allocates for a batch of `n` tokens returning `keep` logit rows.
    pub fn activation_bytes(&self, n: usize, keep: usize) -> u64 {
        let c = &self.config;
        let per_token = 3 * c.hidden_size as u64
            + 2 * c.q_dim() as u64
            + 2 * c.kv_dim() as u64
            + 2 * c.intermediate_size as u64;
        let floats = (n as u64).saturating_mul(per_token).saturating_add(
            (keep as u64).saturating_mul(c.vocab_size as u64 + c.hidden_size as u64),
        );
        floats.saturating_mul(4)
    }

    /// With lazy verification, checks the checksum of each of `indices` not yet checked.
    fn ensure_verified(&self, indices: &[TensorIndex]) -> Result<(), ModelError> {
        let Some(flags) = &self.verified else {
            return Ok(());
        };
        for &i in indices {
            if flags[i].load(Ordering::Acquire) {
                continue;
            }
            let entry = self.entry(i);
            let actual = crc32fast::hash(self.file.view(entry).bytes);
            if actual != entry.checksum {
                return Err(PlmError::Checksum {
                    name: entry.name.clone(),
                    expected: entry.checksum,
                    actual,
                }
                .into());
            }
            flags[i].store(true, Ordering::Release);
        }
        Ok(())
    }

    fn entry(&self, index: TensorIndex) -> &TensorEntry {
        &self.file.tensors()[index]
    }

    fn matrix(&self, index: TensorIndex) -> MatRef<'_> {
        MatRef::from_view(&self.file.view(self.entry(index))).expect("matrices checked at load")
    }

    fn vector(&self, index: TensorIndex) -> &[f32] {
        self.file
            .view(self.entry(index))
            .as_f32()
            .expect("1-D tensors are f32, checked at load")
    }

    fn linear(&self, index: LinearIndex) -> Linear<'_> {
        match index {
            LinearIndex::Dense(i) => Linear::Dense(self.matrix(i)),
            LinearIndex::LowRank { v, u } => {
                let full = Linear::low_rank(self.matrix(v), self.matrix(u))
                    .expect("factor shapes checked at load");
                match self
                    .options
                    .low_rank_percent
                    .min(self.options.profile.low_rank_percent())
                {
                    100.. => full,
                    percent => full.at_percent(percent as usize),
                }
            }
            LinearIndex::Residual {
                base,
                residual,
                sensitive,
            } => {
                if self.options.profile.reads_residual(sensitive) {
                    Linear::with_residual(self.matrix(base), self.matrix(residual))
                        .expect("residual shapes checked at load")
                } else {
                    Linear::Dense(self.matrix(base))
                }
            }
        }
    }

    fn block_weights(&self, index: usize, layer: &Layer) -> BlockWeights<'_> {
        BlockWeights {
            layer: index,
            attn_norm: self.vector(layer.attn_norm),
            q: self.linear(layer.q),
            k: self.linear(layer.k),
            v: self.linear(layer.v),
            biases: layer
                .biases
                .map(|[q, k, v]| [self.vector(q), self.vector(k), self.vector(v)]),
            o: self.linear(layer.o),
            ffn_norm: self.vector(layer.ffn_norm),
            gate: self.linear(layer.gate),
            up: self.linear(layer.up),
            down: self.linear(layer.down),
            norms: FamilyNorms {
                q_norm: layer.qk_norms.map(|[q, _]| self.vector(q)),
                k_norm: layer.qk_norms.map(|[_, k]| self.vector(k)),
                post_attention_norm: layer.post_norms.map(|[a, _]| self.vector(a)),
                post_ffw_norm: layer.post_norms.map(|[_, f]| self.vector(f)),
            },
            rotations: self.rotations.as_ref(),
        }
    }

    /// Every tensor the forward pass reads, low-rank factors included (each once).
    pub fn used_tensors(&self) -> Vec<&TensorEntry> {
        let mut indices = vec![self.token_embd, self.output_norm, self.output];
        for layer in &self.layers {
            indices.extend(layer.indices(self.options.profile));
        }
        indices.sort_unstable();
        indices.dedup();
        indices.into_iter().map(|i| self.entry(i)).collect()
    }

    /// FLOPs to process one token at context position `context_len`, counting each
    /// multiply-add as 2:
    ///
    /// ```text
    /// 2 · [ Σ stored block matrix weights + V·d ]   weight matrices, output layer included
    /// + L · 4 · context_len · q                     attention (q·kᵀ scores and the weighted
    ///                                               sum of v)
    /// ```
    ///
    /// A dense block has `d·q + 2·d·kv + q·d + 3·d·f` matrix weights (`L` layers, hidden size
    /// `d`, query width `q`, key/value width `kv`, MLP width `f`, vocabulary `V`); a low-rank
    /// layer stores `rank · (rows + cols)`. Norms, RoPE, softmax and activations are not counted.
    pub fn flops_per_token(&self, context_len: usize) -> u64 {
        let c = &self.config;
        let dense_blocks = c.num_layers as u64 * c.block_matrix_weights();
        let stored: u64 = self
            .block_linears()
            .iter()
            .map(|l| l.multiply_adds() as u64)
            .sum();
        c.flops_per_token(context_len) - 2 * dense_blocks + 2 * stored
    }

    /// The linear layers of every block, in file order (q, k, v, o, gate, up, down).
    pub fn block_linears(&self) -> Vec<Linear<'_>> {
        self.layers
            .iter()
            .flat_map(|l| l.linears().map(|i| self.linear(i)))
            .collect()
    }
}

fn check_entry(
    file: &PlmFile,
    path: &str,
    entry: &TensorEntry,
    shape: &[usize],
) -> Result<(), ModelError> {
    let err = |message: String| ModelError::Tensor {
        path: path.to_string(),
        name: entry.name.clone(),
        message,
    };
    if entry.shape != shape {
        return Err(err(format!(
            "shape {:?}, the model config expects {:?}",
            entry.shape, shape
        )));
    }
    if shape.len() == 2 && MatRef::from_view(&file.view(entry)).is_none() {
        return Err(err(format!(
            "{} data cannot be used as a {}×{} matrix",
            entry.encoding, shape[0], shape[1]
        )));
    }
    if shape.len() == 1 && entry.encoding != Encoding::F32 {
        return Err(err(format!(
            "vectors (norms, biases) must be f32, found {}",
            entry.encoding.name()
        )));
    }
    Ok(())
}

/// Rotary inverse frequencies `theta^(-2i/d)`, with Llama 3 frequency scaling when configured.
pub fn rope_inv_freq(config: &ModelConfig) -> Vec<f32> {
    let hd = config.head_dim;
    let base: Vec<f64> = (0..hd / 2)
        .map(|i| (config.rope_theta as f64).powf(-((2 * i) as f64) / hd as f64))
        .collect();
    let Some(s) = config.rope_scaling else {
        return base.into_iter().map(|f| f as f32).collect();
    };
    let old_ctx = s.original_max_position_embeddings as f64;
    let low_wavelen = old_ctx / s.low_freq_factor as f64;
    let high_wavelen = old_ctx / s.high_freq_factor as f64;
    let factor = s.factor as f64;
    base.into_iter()
        .map(|freq| {
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let scaled = if wavelen < high_wavelen {
                freq
            } else if wavelen > low_wavelen {
                freq / factor
            } else {
                let smooth = (old_ctx / wavelen - s.low_freq_factor as f64)
                    / (s.high_freq_factor as f64 - s.low_freq_factor as f64);
                (1.0 - smooth) * freq / factor + smooth * freq
            };
            scaled as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pocketlm_format::config::{Architecture, Llama3RopeScaling};

    fn config() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 32,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            attention_bias: false,
            features: Default::default(),
            incoherence: None,
        }
    }

    #[test]
    fn expected_tensors_cover_parameter_count() {
        for (tied, bias, family) in [
            (true, false, false),
            (false, true, false),
            (true, false, true),
        ] {
            let mut c = config();
            c.tie_word_embeddings = tied;
            c.attention_bias = bias;
            // Gemma 3's extra tensors: q/k norms and post-norms.
            c.features.qk_norm = family;
            c.features.post_norms = family;
            let total: usize = expected_tensors(&c)
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum();
            assert_eq!(total as u64, c.parameter_count());
        }
    }

    /// The KV memory BENCHMARKS.md quotes for Gemma 3 1B (its config.json: 26 layers, one
    /// KV head of 256, a window of 512 on 5 of every 6 layers), f32 cache.
    #[test]
    fn gemma3_1b_ring_buffers_bound_kv_memory_by_the_window() {
        let mut c = config();
        c.num_layers = 26;
        c.num_heads = 4;
        c.num_kv_heads = 1;
        c.head_dim = 256;
        c.hidden_size = 1152;
        c.max_position_embeddings = 32768;
        c.features.sliding_window = Some(512);
        c.features.sliding_window_layers = (0..26).map(|l| (l + 1) % 6 != 0).collect();
        let windows: Vec<Option<usize>> = (0..26).map(|l| c.layer_window(l)).collect();
        assert_eq!(windows.iter().filter(|w| w.is_none()).count(), 4);
        let mib = |windows: &[Option<usize>], context| {
            KvCache::required_bytes_windowed(KvType::F32, windows, 256, 256, context).unwrap()
                as f64
                / (1 << 20) as f64
        };
        let full = vec![None; 26];
        assert_eq!(mib(&full, 4096), 208.0);
        assert_eq!(mib(&windows, 4096), 54.0);
        assert_eq!(mib(&full, 32768), 1664.0);
        assert_eq!(mib(&windows, 32768), 278.0);
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_and_scales_low_frequencies() {
        let mut c = config();
        c.head_dim = 128;
        c.rope_theta = 500000.0;
        let plain = rope_inv_freq(&c);
        c.rope_scaling = Some(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let scaled = rope_inv_freq(&c);
        assert_eq!(scaled[0], plain[0]); // shortest wavelength untouched
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12); // longest divided by factor
        assert!(scaled.iter().zip(&plain).all(|(s, p)| s <= p));
    }
}
