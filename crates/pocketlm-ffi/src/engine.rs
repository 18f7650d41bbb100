//! [`Engine`]: a mapped model and its thread pool, and the options it opens with.

use std::path::Path;
use std::sync::Arc;

use pocketlm_kernels::{self as kernels, KernelPath};
use pocketlm_runtime::cpu::{CpuTopology, parse_cpu_mask, plan_threads};
use pocketlm_runtime::model::{KvType, Model, ModelOptions, Profile};

use crate::conversation::Conversation;
use crate::generation::ContextPolicy;
use crate::session::Session;
use crate::{DEFAULT_CONTEXT_LENGTH, PocketLmError, guard};

/// How an [`Engine`] runs. All fields have defaults.
#[derive(Clone, Debug, Default, PartialEq, uniffi::Record)]
pub struct EngineOptions {
    /// Worker threads for this engine's pool; 0 = one per performance core (on phones the
    /// prime and big cores, read from sysfs `cpu_capacity` / `cpuinfo_max_freq`), or one per
    /// core where the cores are alike.
    #[uniffi(default = 0)]
    pub threads: u32,
    /// Cores to pin the workers to: a hex mask (`"0xf0"`) or a list (`"0-3,6"`). None = the
    /// performance cores on a big.LITTLE CPU (pinned), else no pinning.
    #[uniffi(default = None)]
    pub cpu_mask: Option<String>,
    /// KV-cache positions per session; 0 = min(model's trained context, 2048). Larger values
    /// are capped at the trained context.
    #[uniffi(default = 0)]
    pub context_length: u32,
    /// Kernel path (`"scalar"`, `"generic"`, `"avx2"`, `"avxvnni"`, `"avx512"`, `"neon"`,
    /// `"dotprod"`, `"i8mm"`); None = detect.
    /// The choice is process-wide: it takes effect if no model has run yet in this process;
    /// asking for a different path afterwards is an
    /// `InvalidConfig` error. `ModelInfo::kernel_path` reports the path in use.
    #[uniffi(default = None)]
    pub kernel_path: Option<String>,
    /// Serve low-rank layers with this percentage (1..=100) of their stored rank. Their
    /// factors are stored rank-ordered, so a lower percentage reads (and pages in) fewer bytes
    /// and runs faster, at some quality cost, from the same file. 0 = 100 (the full stored
    /// rank). Dense layers are unaffected.
    #[uniffi(default = 0)]
    pub low_rank_percent: u8,
    /// KV cache storage: `"f32"`, or `"q8"` (int8 with a scale per head vector, 3.8× less
    /// memory for 64-wide heads, so longer contexts fit). None = f32.
    #[uniffi(default = None)]
    pub kv_cache: Option<String>,
    /// Operating point of an elastic file: `"small"` (base weights only, low-rank layers at
    /// half rank), `"balanced"` (residuals of attn_v and ffn_down, 75% rank) or `"best"`
    /// (everything stored). Only the chosen point's pages are read. None = best.
    #[uniffi(default = None)]
    pub profile: Option<String>,
    /// Largest weight footprint in bytes: the engine steps down from `profile` to the best
    /// point whose weights fit, and fails with `InvalidConfig` if none does. 0 = no limit.
    #[uniffi(default = 0)]
    pub max_weight_bytes: u64,
    /// What sessions do when a prompt does not fit their context; None = drop the oldest
    /// turns for chat, fail for raw text.
    #[uniffi(default = None)]
    pub context_policy: Option<ContextPolicy>,
}

/// What an engine has loaded.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct ModelInfo {
    /// `llama`, `qwen2`, ...
    pub architecture: String,
    pub parameters: u64,
    /// Tensor bytes × 8 / parameters.
    pub bits_per_weight: f64,
    pub file_size_bytes: u64,
    /// KV-cache positions per session (from [`EngineOptions::context_length`]).
    pub context_length: u32,
    /// The model's trained context.
    pub max_context_length: u32,
    pub vocab_size: u32,
    /// Whether the file ships a chat template (otherwise `chat` uses a built-in fallback).
    pub has_chat_template: bool,
    /// The kernel path in use (process-wide).
    pub kernel_path: String,
    /// Worker threads of this engine's pool.
    pub threads: u32,
    /// Cores the workers are pinned to (empty: the operating system places them).
    pub pinned_cores: Vec<u32>,
    /// Percentage of their stored rank low-rank layers are served with.
    pub low_rank_percent: u8,
    /// KV cache storage of this engine's sessions (`f32` or `q8`).
    pub kv_cache: String,
    /// The operating point served (`small`, `balanced`, `best`).
    pub profile: String,
    /// Bytes of the weights the forward pass reads at that point.
    pub weight_bytes: u64,
}

/// A loaded model: the memory-mapped `.plm` file and a worker thread pool. Thread-safe;
/// create sessions from it with [`Engine::new_session`].
#[derive(uniffi::Object)]
pub struct Engine {
    pub(crate) model: Arc<Model>,
    pub(crate) pool: Arc<rayon::ThreadPool>,
    /// Spinning helpers for one-token products (2+ threads; on the pinned cores if any).
    pub(crate) team: Option<Arc<pocketlm_kernels::pool::Team>>,
    pinned_cores: Vec<usize>,
    pub(crate) context_length: usize,
    pub(crate) context_policy: Option<ContextPolicy>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("path", &self.model.file().path())
            .field("threads", &self.pool.current_num_threads())
            .field("context_length", &self.context_length)
            .finish()
    }
}

fn resolve_kernel_path(name: Option<&str>) -> Result<(), PocketLmError> {
    let Some(name) = name else { return Ok(()) };
    let invalid = |reason: String| PocketLmError::InvalidConfig { reason };
    let path = KernelPath::parse(name).ok_or_else(|| {
        invalid(format!(
            "unknown kernel path '{name}' (expected scalar, generic, neon, sse2 or avx2)"
        ))
    })?;
    if !path.is_supported() {
        return Err(invalid(format!(
            "kernel path '{}' is not supported on this CPU",
            path.name()
        )));
    }
    let active = kernels::select_path(path);
    if active != path {
        return Err(invalid(format!(
            "kernel path '{}' requested, but this process already uses '{}' (the kernel path \
             is process-wide and fixed when the first model runs)",
            path.name(),
            active.name()
        )));
    }
    Ok(())
}

#[uniffi::export]
impl Engine {
    /// Maps and validates the `.plm` file at `path` (nothing is copied; weights stay in the
    /// page cache).
    #[uniffi::constructor]
    pub fn open(path: String, options: EngineOptions) -> Result<Arc<Engine>, PocketLmError> {
        guard(|| {
            resolve_kernel_path(options.kernel_path.as_deref())?;
            let mask = match options.cpu_mask.as_deref() {
                Some(mask) => parse_cpu_mask(mask).map_err(|e| PocketLmError::InvalidConfig {
                    reason: e.to_string(),
                })?,
                None => Vec::new(),
            };
            let placement = plan_threads(&CpuTopology::detect(), options.threads as usize, &mask);
            let pool = placement
                .build_pool(|i| format!("pocketlm-{i}"))
                .map_err(|e| PocketLmError::InvalidConfig {
                    reason: format!("cannot start {} threads: {e}", placement.threads),
                })?;
            let mut model_options = ModelOptions::default();
            match options.low_rank_percent {
                0 => {}
                p @ 1..=100 => model_options.low_rank_percent = p,
                p => {
                    return Err(PocketLmError::InvalidConfig {
                        reason: format!("low_rank_percent must be 0 (default) or 1..=100, got {p}"),
                    });
                }
            }
            if let Some(name) = options.kv_cache.as_deref() {
                model_options.kv_cache =
                    KvType::parse(name).ok_or_else(|| PocketLmError::InvalidConfig {
                        reason: format!("kv_cache must be \"f32\" or \"q8\", got {name:?}"),
                    })?;
            }
            if let Some(name) = options.profile.as_deref() {
                model_options.profile =
                    Profile::parse(name).ok_or_else(|| PocketLmError::InvalidConfig {
                        reason: format!(
                            "profile must be \"small\", \"balanced\" or \"best\", got {name:?}"
                        ),
                    })?;
            }
            if options.max_weight_bytes > 0 {
                model_options.max_weight_bytes = options.max_weight_bytes;
            }
            let model = Model::open_with(Path::new(&path), model_options)?;
            let trained = model.config().max_position_embeddings;
            let context_length = match options.context_length {
                0 => trained.min(DEFAULT_CONTEXT_LENGTH as usize),
                n => (n as usize).min(trained),
            }
            .max(1);
            Ok(Arc::new(Engine {
                model: Arc::new(model),
                pool: Arc::new(pool),
                team: placement.build_team().map(Arc::new),
                pinned_cores: placement.pinned_cores,
                context_length,
                context_policy: options.context_policy,
            }))
        })
    }

    pub fn info(&self) -> ModelInfo {
        let file = self.model.file();
        let config = self.model.config();
        let parameters: u64 = file
            .tensors()
            .iter()
            .filter(|t| !pocketlm_format::config::names::is_residual(&t.name))
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum();
        ModelInfo {
            architecture: config.architecture.name().to_string(),
            parameters,
            bits_per_weight: file.tensor_bytes_total() as f64 * 8.0 / parameters.max(1) as f64,
            file_size_bytes: file.file_size(),
            context_length: self.context_length as u32,
            max_context_length: config.max_position_embeddings as u32,
            vocab_size: config.vocab_size as u32,
            has_chat_template: self.model.tokenizer().has_chat_template(),
            kernel_path: kernels::active_path().name().to_string(),
            threads: self.pool.current_num_threads() as u32,
            pinned_cores: self.pinned_cores.iter().map(|&c| c as u32).collect(),
            low_rank_percent: self.model.options().low_rank_percent,
            kv_cache: self.model.options().kv_cache.name().to_string(),
            profile: self.model.profile().name().to_string(),
            weight_bytes: self.model.weight_bytes(),
        }
    }

    /// A new conversation with an empty KV cache. Sessions share this engine's weights and
    /// thread pool. Fails with `InvalidConfig` when the KV cache for the engine's context
    /// length does not fit the memory limit.
    pub fn new_session(self: Arc<Self>) -> Result<Arc<Session>, PocketLmError> {
        guard(|| Ok(Arc::new(Session::new(self)?)))
    }

    /// A new conversation, starting with `system` as its system message when given.
    pub fn new_conversation(
        self: Arc<Self>,
        system: Option<String>,
    ) -> Result<Arc<Conversation>, PocketLmError> {
        guard(|| {
            let session = Session::new(self)?;
            Ok(Arc::new(Conversation::new(session, system.as_deref())?))
        })
    }

    /// A conversation saved with [`Conversation::save`] (by this same model file and KV
    /// cache type): its messages and KV cache, so the next turn computes only itself.
    pub fn restore_conversation(
        self: Arc<Self>,
        path: String,
    ) -> Result<Arc<Conversation>, PocketLmError> {
        guard(|| {
            Ok(Arc::new(Conversation::restored(
                Session::new(self)?,
                &path,
            )?))
        })
    }

    /// Number of tokens `text` encodes to (without BOS).
    pub fn count_tokens(&self, text: String) -> Result<u32, PocketLmError> {
        guard(|| Ok(self.model.tokenizer().encode(&text, false)?.len() as u32))
    }
}
