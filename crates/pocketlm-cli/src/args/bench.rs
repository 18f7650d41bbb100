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
    #[command(flatten)]
    pub output: JsonOutput,
}
