//! `pocketlm bench`: the speed test's sizes.

use std::path::PathBuf;

use clap::Args;

use super::shared::JsonOutput;

#[derive(Args)]
pub struct BenchArgs {
    pub model: PathBuf,
    /// Prompt tokens for the prefill test (pp).
    #[arg(short = 'p', long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Generated tokens for the decode test (tg).
    #[arg(short = 'n', long, default_value_t = 64)]
    pub gen_tokens: usize,
    #[arg(short = 'r', long, default_value_t = 3)]
    pub repetitions: usize,
    /// Run the whole test once per thread count (e.g. 1,2,4,8), one row each, each on its own
    /// pool placed as `--threads N` would place it (pinned to `--cpu-mask` when given).
    #[arg(long, value_name = "LIST", value_delimiter = ',', num_args = 1..)]
    pub threads_sweep: Option<Vec<usize>>,
    #[command(flatten)]
    pub output: JsonOutput,
}
