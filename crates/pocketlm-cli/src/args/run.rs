//! `pocketlm run` and `pocketlm chat`: prompt, conversation and session flags.

use std::path::PathBuf;

use clap::Args;

use super::shared::GenerationArgs;

#[derive(Args)]
pub struct RunArgs {
    pub model: PathBuf,
    #[arg(short, long, default_value = "")]
    pub prompt: String,
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long)]
    pub system: Option<String>,
}

#[derive(Args)]
pub struct ChatArgs {
    pub model: PathBuf,
    /// System message at the start of the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// After each turn, one JSON line on stderr: turn, prompt_tokens, reused_tokens,
    /// dropped_messages, ttft_ms, prefill and decode tokens/s, generated_tokens, stop_reason.
    #[arg(long)]
    pub stats_json: bool,
    /// Save the session (KV cache, tokens, conversation) to this file when the chat ends.
    #[arg(long, value_name = "FILE")]
    pub save_session: Option<PathBuf>,
    /// Start from a session saved with --save-session (same model file and KV cache type).
    #[arg(long, value_name = "FILE")]
    pub load_session: Option<PathBuf>,
    /// Compute every turn from the whole conversation again (for measuring what prefix reuse
    /// saves).
    #[arg(long)]
    pub no_prefix_reuse: bool,
}
