//! The command line's flags as clap derives them, one file per command group; flags that
//! several commands take are in `shared`. The argument structs carry no doc comments: clap
//! would take them for the command's about text.

mod bench;
mod convert;
mod eval;
mod global;
mod inspect;
mod run;
mod serve;
mod shared;

use clap::{Parser, Subcommand};

pub use bench::BenchArgs;
pub use convert::{ClipArg, ConvertArgs};
pub use eval::{
    EvalCommand, KldArgs, PplArgs, ReportArgs, SensitivityArgs, SweepArgs, ZeroshotArgs,
};
pub use global::GlobalArgs;
pub use inspect::{InspectArgs, VerifyArgs};
pub use run::{ChatArgs, RunArgs};
pub use serve::ServeArgs;
pub use shared::JsonOutput;

#[derive(Parser)]
#[command(
    name = "pocketlm",
    version,
    about = "Compressed LLMs for phones and small boards"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Convert a Hugging Face directory or a GGUF file into a .plm file.
    Convert(Box<ConvertArgs>),
    /// Generate text, streaming it to stdout; speed on stderr.
    Run(RunArgs),
    /// Chat with a model: interactive on a terminal; otherwise each input line is a user
    /// turn and each reply is printed in turn. Turns reuse the cached conversation.
    Chat(ChatArgs),
    /// Describe a .plm file: architecture, size, bits per weight, tensors, FLOPs per token.
    Inspect(InspectArgs),
    /// Measure prefill and decode speed (llama-bench style), time to first token, memory.
    Bench(BenchArgs),
    /// Check every tensor checksum of a .plm file.
    Verify(VerifyArgs),
    /// Serve the model over HTTP with OpenAI's API (chat and text completions, streaming).
    Serve(ServeArgs),
    /// Evaluate model quality.
    #[command(subcommand)]
    Eval(EvalCommand),
}
