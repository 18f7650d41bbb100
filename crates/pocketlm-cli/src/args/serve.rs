//! `pocketlm serve`: address, slots, context and limits of the OpenAI-compatible server.

use std::path::PathBuf;

use clap::Args;

#[derive(Args)]
pub struct ServeArgs {
    pub model: PathBuf,
    /// Address to listen on (loopback by default; 0.0.0.0 serves the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Slots: requests served at once, each with its own KV cache of --ctx positions.
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
    /// Context per slot (KV cache positions; prompt plus reply must fit).
    #[arg(short = 'c', long, default_value_t = 2048)]
    pub ctx: usize,
    /// Requests that may wait for a free slot; more get 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "POCKETLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Model name in /v1/models and responses (default: the file name without extension).
    #[arg(long)]
    pub alias: Option<String>,
    /// Run each slot on a thread of its own instead of batching all busy slots into one
    /// forward pass per token (continuous batching, the default).
    #[arg(long)]
    pub no_batching: bool,
    /// Prompt tokens one batched step reads, shared by the requests still reading their
    /// prompts; smaller keeps other streams' tokens flowing during a long prompt.
    #[arg(long, default_value_t = pocketlm_runtime::session::DEFAULT_STEP_PROMPT_TOKENS)]
    pub step_prompt_tokens: usize,
}
