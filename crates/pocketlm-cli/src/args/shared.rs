//! Flag groups several commands share, flattened into them (`#[command(flatten)]`) so each
//! flag is named, defaulted and explained once. The structs have `//` comments, not doc
//! comments: clap would take a doc comment for the about text of every command using them.

use clap::Args;
use pocketlm_eval::PerplexityOptions;

// `--json`: the result as one JSON object on stdout instead of text; scripts rely on it
// (tests/cli.rs checks every command).
#[derive(Args)]
pub struct JsonOutput {
    #[arg(long)]
    pub json: bool,
}

// `--ctx` and `--chunks`: how a text is cut for perplexity (ppl, kld, sweep).
#[derive(Args)]
pub struct ChunkArgs {
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate only the first N chunks.
    #[arg(long)]
    pub chunks: Option<usize>,
}

impl ChunkArgs {
    pub fn perplexity_options(&self) -> PerplexityOptions {
        PerplexityOptions {
            context: self.ctx,
            max_chunks: self.chunks,
        }
    }
}
