//! `pocketlm inspect` and `pocketlm verify`: reading a .plm file.

use std::path::PathBuf;

use clap::Args;

#[derive(Args)]
pub struct InspectArgs {
    pub model: PathBuf,
    /// List every tensor.
    #[arg(long)]
    pub tensors: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    pub model: PathBuf,
}
