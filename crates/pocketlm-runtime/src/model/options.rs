//! How a model is opened: checksum verification, the elastic profile, memory limits.

use super::KvType;

/// Default upper bound on one KV cache, in bytes. A context far beyond what the device can
/// hold fails with [`ModelError::MemoryLimit`] up front instead of aborting on OOM; raise it
/// with [`ModelOptions::max_kv_cache_bytes`].
pub const DEFAULT_MAX_KV_CACHE_BYTES: u64 = 8 << 30;

/// Default upper bound on the activations of one forward pass (hidden states, projections
/// and logits of the batch), in bytes.
pub const DEFAULT_MAX_ACTIVATION_BYTES: u64 = 4 << 30;

/// When tensor checksums are checked at run time (`pocketlm verify` checks them all offline).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VerifyMode {
    /// Never: loading stays O(table), and the data is trusted once the table validates.
    #[default]
    Off,
    /// Every tensor when the model is opened (reads the whole file once).
    Eager,
    /// Each tensor just before the forward pass first reads it, once per model.
    Lazy,
}

impl VerifyMode {
    /// `0`/`off`/`no`/`false`/empty, `1`/`eager`/`all`/`yes`/`true`/`on`, or `lazy`.
    pub fn parse(s: &str) -> Option<VerifyMode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "0" | "off" | "no" | "false" => Some(VerifyMode::Off),
            "1" | "eager" | "all" | "yes" | "true" | "on" => Some(VerifyMode::Eager),
            "lazy" => Some(VerifyMode::Lazy),
            _ => None,
        }
    }
}

/// Operating points of an elastic file: which stored parts the runtime reads. A file without
/// residuals or low-rank factors serves the same weights at every point.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Profile {
    /// Base weights only; low-rank layers at half their stored rank.
    Small,
    /// Residuals of `attn_v` and `ffn_down` (where quantization costs most, which is why
    /// llama.cpp's Q4_K_M keeps them at higher precision); low-rank layers at 75% rank.
    Balanced,
    /// Everything the file stores.
    #[default]
    Best,
}

impl Profile {
    /// From the most to the least the file stores.
    pub const DESCENDING: [Profile; 3] = [Profile::Best, Profile::Balanced, Profile::Small];

    pub fn name(self) -> &'static str {
        match self {
            Profile::Small => "small",
            Profile::Balanced => "balanced",
            Profile::Best => "best",
        }
    }

    pub fn parse(s: &str) -> Option<Profile> {
        match s.trim().to_ascii_lowercase().as_str() {
            "small" => Some(Profile::Small),
            "balanced" => Some(Profile::Balanced),
            "best" => Some(Profile::Best),
            _ => None,
        }
    }

    /// Whether a block matrix's residual is read (`sensitive`: it is `attn_v` or `ffn_down`).
    pub(super) fn reads_residual(self, sensitive: bool) -> bool {
        match self {
            Profile::Small => false,
            Profile::Balanced => sensitive,
            Profile::Best => true,
        }
    }

    /// The largest share of a low-rank layer's stored rank this point serves.
    pub(super) fn low_rank_percent(self) -> u8 {
        match self {
            Profile::Small => 50,
            Profile::Balanced => 75,
            Profile::Best => 100,
        }
    }
}

/// A profile name other than `small`, `balanced` or `best`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown profile '{0}' (small, balanced, best)")]
pub struct UnknownProfile(pub String);

impl std::str::FromStr for Profile {
    type Err = UnknownProfile;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Profile::parse(s).ok_or_else(|| UnknownProfile(s.to_string()))
    }
}

/// Load-time options of a [`Model`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelOptions {
    pub verify: VerifyMode,
    /// Largest KV cache [`Model::new_cache`] will allocate.
    pub max_kv_cache_bytes: u64,
    /// Largest activation footprint one [`Model::forward`] call may allocate.
    pub max_activation_bytes: u64,
    /// Serve low-rank layers with this percentage of their stored rank (1..=100): the first
    /// components of the rank-ordered factors, read in place, so only their pages are
    /// touched. Rounded down to whole quantization groups; dense layers are unaffected.
    pub low_rank_percent: u8,
    /// How [`Model::new_cache`] stores keys and values.
    pub kv_cache: KvType,
    /// The operating point of an elastic file (residuals read, low-rank share served).
    pub profile: Profile,
    /// Largest weight footprint (bytes of the tensors the forward pass reads): at load, the
    /// model steps down from `profile` to the best point that fits, and fails if none does.
    pub max_weight_bytes: u64,
    /// Sliding-window layers keep only their window in a ring buffer (the default); `false`
    /// keeps every position, as for global layers (to compare, or to truncate anywhere).
    pub window_ring_buffers: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            verify: VerifyMode::Off,
            max_kv_cache_bytes: DEFAULT_MAX_KV_CACHE_BYTES,
            max_activation_bytes: DEFAULT_MAX_ACTIVATION_BYTES,
            low_rank_percent: 100,
            kv_cache: KvType::F32,
            profile: Profile::Best,
            max_weight_bytes: u64::MAX,
            window_ring_buffers: true,
        }
    }
}
