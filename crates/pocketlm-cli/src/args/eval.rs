//! `pocketlm eval ...`: the quality measurements.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use pocketlm_eval::sweep::SweepPoint;
use pocketlm_eval::zeroshot::Task;
use pocketlm_format::Encoding;

use super::shared::{ChunkArgs, JsonOutput};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity over a text file, chunked as llama.cpp's llama-perplexity.
    Ppl(PplArgs),
    /// KL divergence of MODEL's next-token distributions from BASE's on a text (chunked as
    /// ppl), top-1 agreement and both perplexities.
    Kld(KldArgs),
    /// Measures many files of one model alike (size, bits per weight, perplexity, with
    /// --bench decode speed), marks the size–perplexity Pareto front among them and the
    /// --reference points, and writes a Markdown table, JSON and SVG charts.
    Sweep(SweepArgs),
    /// Zero-shot multiple-choice accuracy (acc, acc_norm) scored as lm-evaluation-harness.
    Zeroshot(ZeroshotArgs),
    /// Size, bits per weight, compression, FLOPs per token and recipe; with --text quality
    /// (ppl, and KLD/top-1 against --base), with --bench speed.
    Report(ReportArgs),
    /// Per-block sensitivity of a checkpoint to quantization: converts it with one block at
    /// a time quantized (the rest at --base-weights) and ranks blocks by perplexity increase,
    /// to choose `convert --keep` rules.
    Sensitivity(SensitivityArgs),
}

#[derive(Args)]
pub struct PplArgs {
    pub model: PathBuf,
    #[arg(long)]
    pub text: PathBuf,
    #[command(flatten)]
    pub chunking: ChunkArgs,
    #[command(flatten)]
    pub output: JsonOutput,
}

#[derive(Args)]
pub struct KldArgs {
    pub model: PathBuf,
    /// The reference model (e.g. the f16 file MODEL was quantized from).
    #[arg(long)]
    pub base: PathBuf,
    #[arg(long)]
    pub text: PathBuf,
    #[command(flatten)]
    pub chunking: ChunkArgs,
    #[command(flatten)]
    pub output: JsonOutput,
}

#[derive(Args)]
pub struct SweepArgs {
    pub models: Vec<PathBuf>,
    /// The perplexity text (needed when files are given).
    #[arg(long)]
    pub text: Option<PathBuf>,
    #[command(flatten)]
    pub chunking: ChunkArgs,
    /// Points measured elsewhere, e.g. `llama.cpp Q4_K_M=105.5MB:28.336[:DECODE_TOK_S]`.
    #[arg(long = "reference", value_name = "NAME=SIZE:PPL[:TOK_S]")]
    pub references: Vec<SweepPoint>,
    /// Points measured by an earlier sweep (its --json output), added as they are.
    #[arg(long, value_name = "FILE")]
    pub load: Vec<PathBuf>,
    /// Also measure decode/prefill speed (as `pocketlm bench` with its defaults).
    #[arg(long)]
    pub bench: bool,
    /// Chart of perplexity vs size (SVG); with --bench also `<stem>-speed.svg`.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct ZeroshotArgs {
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub task: TaskArg,
    /// JSON Lines data in the Hugging Face datasets layout of the task.
    pub file: PathBuf,
    /// Evaluate only the first N examples.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub output: JsonOutput,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum TaskArg {
    ArcEasy,
    ArcChallenge,
    Piqa,
    Hellaswag,
}

impl From<TaskArg> for Task {
    fn from(t: TaskArg) -> Task {
        match t {
            TaskArg::ArcEasy => Task::ArcEasy,
            TaskArg::ArcChallenge => Task::ArcChallenge,
            TaskArg::Piqa => Task::Piqa,
            TaskArg::Hellaswag => Task::Hellaswag,
        }
    }
}

#[derive(Args)]
pub struct ReportArgs {
    pub model: PathBuf,
    /// Compare with this file (compression; KLD and top-1 with --text).
    #[arg(long)]
    pub base: Option<PathBuf>,
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Chunk length for --text, and the context of the FLOPs figure.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Also measure prefill/decode speed (as `pocketlm bench` with its defaults).
    #[arg(long)]
    pub bench: bool,
    #[command(flatten)]
    pub output: JsonOutput,
}

#[derive(Args)]
pub struct SensitivityArgs {
    /// Hugging Face model directory or .gguf file.
    pub src: PathBuf,
    /// The encoding whose cost is measured, e.g. q4 or q4a/g64.
    #[arg(long, default_value = "q4")]
    pub weights: Encoding,
    /// Encoding of the other blocks.
    #[arg(long, default_value = "f16")]
    pub base_weights: Encoding,
    #[arg(long)]
    pub text: PathBuf,
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    #[arg(long, default_value_t = 4)]
    pub chunks: usize,
    #[command(flatten)]
    pub output: JsonOutput,
}
