//! `pocketlm inspect` and `pocketlm verify`: reading a .plm file.

use std::path::PathBuf;

use clap::Args;

use super::shared::JsonOutput;

#[derive(Args)]
pub struct InspectArgs {
    pub model: PathBuf,
    /// List every tensor.
    #[arg(long)]
    pub tensors: bool,
    #[command(flatten)]
    pub output: JsonOutput,
}

#[derive(Args)]
pub struct VerifyArgs {
    pub model: PathBuf,
}
