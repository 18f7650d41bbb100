//! The global flags as the runtime's `ModelOptions`, and the one way commands open a model,
//! so that every command honours them.

use std::path::Path;
use std::sync::OnceLock;

use pocketlm_kernels::pool::Team;
use pocketlm_runtime::Model;
use pocketlm_runtime::cpu::ThreadPlacement;
use pocketlm_runtime::model::{ModelError, ModelOptions};

use crate::args::GlobalArgs;

/// The model options every command opens models with, set once at start from the flags
/// (and their environment variables).
pub static MODEL_OPTIONS: OnceLock<ModelOptions> = OnceLock::new();

/// `--cpu-mask`'s cores (empty: none given), for commands that place pools of their own
/// (`bench --threads-sweep`).
pub static CPU_MASK: OnceLock<Vec<usize>> = OnceLock::new();

/// Whether one-token products may use a decode team (`--no-decode-team` turns it off).
pub static DECODE_TEAM: OnceLock<bool> = OnceLock::new();

/// The command line's thread placement (`--threads`, `--cpu-mask`), for commands that start
/// threads of their own (`serve`'s engine).
pub static THREAD_PLACEMENT: OnceLock<ThreadPlacement> = OnceLock::new();

/// The decode team for a pool placed as `placement`, unless `--no-decode-team`.
pub fn decode_team(placement: &ThreadPlacement) -> Option<Team> {
    if DECODE_TEAM.get().copied().unwrap_or(true) {
        placement.build_team()
    } else {
        None
    }
}

pub fn model_options(global: &GlobalArgs) -> ModelOptions {
    let defaults = ModelOptions::default();
    ModelOptions {
        verify: global.verify.unwrap_or(defaults.verify),
        low_rank_percent: global.low_rank_percent.unwrap_or(defaults.low_rank_percent),
        kv_cache: global.kv_cache.unwrap_or(defaults.kv_cache),
        profile: global.profile.unwrap_or(defaults.profile),
        max_weight_bytes: global.memory_limit.unwrap_or(defaults.max_weight_bytes),
        ..defaults
    }
}

/// Opens a model with the command line's options.
pub fn open_model(path: &Path) -> Result<Model, ModelError> {
    Model::open_with(path, MODEL_OPTIONS.get().cloned().unwrap_or_default())
}
