//! Flag groups several commands share, flattened into them (`#[command(flatten)]`) so each
//! flag is named, defaulted and explained once. The structs have `//` comments, not doc
//! comments: clap would take a doc comment for the about text of every command using them.

use clap::Args;
use pocketlm_eval::PerplexityOptions;
use std::path::{Path, PathBuf};

use pocketlm_runtime::constrain::OutputConstraint;
use pocketlm_runtime::sampler::SamplerConfig;

use crate::commands::CliError;
use pocketlm_runtime::{ContextPolicy, GenerateOptions};

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

// Length, context and sampling of a generation (run, chat).
#[derive(Args)]
pub struct GenerationArgs {
    /// Tokens to generate (per reply in chat).
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Context length (KV cache positions).
    #[arg(short = 'c', long, default_value_t = 2048)]
    pub ctx: usize,
    /// What to do when a prompt does not fit the context: error, drop-oldest-turns (chat:
    /// keep the system prompt and the latest turns) or truncate-start (raw text: keep the
    /// end). Default: drop-oldest-turns for chat, error for raw text.
    #[arg(long, value_name = "POLICY")]
    pub context_policy: Option<ContextPolicy>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// The output must be JSON matching this JSON Schema file.
    #[arg(long, value_name = "FILE", group = "constraint")]
    pub json_schema: Option<PathBuf>,
    /// The output must match this grammar file: GBNF (`root ::= ...`, as llama.cpp) or Lark
    /// (`start: ...`, llguidance's dialect).
    #[arg(long, value_name = "FILE", group = "constraint")]
    pub grammar: Option<PathBuf>,
    /// The output must match this regular expression.
    #[arg(long, value_name = "REGEX", group = "constraint")]
    pub regex: Option<String>,
    /// The output must be one of these strings (repeat the flag for each).
    #[arg(long, value_name = "TEXT", group = "constraint")]
    pub choice: Vec<String>,
    /// Chat: set the template's `enable_thinking` (Qwen3, SmolLM3 reason before answering
    /// unless it is false). Without the flag the template's default applies.
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub think: Option<bool>,
}

impl GenerationArgs {
    pub fn options(&self) -> Result<GenerateOptions, CliError> {
        let options = GenerateOptions {
            max_tokens: self.max_tokens,
            sampler: SamplerConfig {
                temperature: self.temp,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repeat_penalty,
                repeat_last_n: self.repeat_last_n,
                seed: self.seed,
            },
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            constraint: self.constraint()?,
            enable_thinking: self.think,
        };
        options.sampler.validate()?;
        Ok(options)
    }
}

impl GenerationArgs {
    /// The output constraint the flags ask for (at most one; clap enforces that).
    fn constraint(&self) -> Result<Option<OutputConstraint>, CliError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
        };
        Ok(if let Some(path) = &self.json_schema {
            let text = read(path)?;
            let schema = serde_json::from_str(&text)
                .map_err(|e| format!("--json-schema {}: not JSON: {e}", path.display()))?;
            Some(OutputConstraint::JsonSchema(schema))
        } else if let Some(path) = &self.grammar {
            let text = read(path)?;
            // GBNF rules are written `name ::= ...`; Lark's `name: ...`.
            Some(if text.contains("::=") {
                OutputConstraint::Gbnf(text)
            } else {
                OutputConstraint::Lark(text)
            })
        } else if let Some(regex) = &self.regex {
            Some(OutputConstraint::Regex(regex.clone()))
        } else if !self.choice.is_empty() {
            Some(OutputConstraint::Choice(self.choice.clone()))
        } else {
            None
        })
    }
}
