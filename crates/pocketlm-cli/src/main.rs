//! `pocketlm` command line: convert, run, inspect, verify, eval.

mod progress;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};

use pocketlm_convert::plan::{Budget, PlanOptions};
use pocketlm_convert::recover::RecoverMode;
use pocketlm_convert::{
    self as convert, Calibration, Clipping, ConvertOptions, GptqOptions, KeepRule, LowRank,
    LowRankMethod, Method, PruneMethod, Pruning, RankAllocation, RankTarget, Recovery, Sparsity,
    SparsitySchedule,
};
use pocketlm_eval::report::{ReportOptions, build_report};
use pocketlm_eval::zeroshot::{self, Task};
use pocketlm_eval::{self as eval, PerplexityOptions};
use pocketlm_format::{Encoding, PlmFile};
use pocketlm_kernels::KernelPath;
use pocketlm_runtime::model::{KvType, ModelOptions, Profile, VerifyMode};
use pocketlm_runtime::sampler::SamplerConfig;
use pocketlm_runtime::tokenizer::ChatMessage;
use pocketlm_runtime::{GenerateOptions, Model, Session};

use crate::progress::Progress;

#[derive(Parser)]
#[command(
    name = "pocketlm",
    version,
    about = "Compressed LLMs for phones and small boards"
)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(short = 't', long, global = true)]
    threads: Option<usize>,
    /// Serve low-rank layers with this percentage of their stored rank (1-100; default 100):
    /// one file, several operating points.
    #[arg(long, global = true, value_name = "P", env = "POCKETLM_LOW_RANK_PERCENT",
          value_parser = parse_percent)]
    low_rank_percent: Option<u8>,
    /// KV cache storage: f32 (default), or q8 (int8 with a scale per head vector: 3.8x less
    /// memory for 64-wide heads).
    #[arg(long, global = true, value_name = "TYPE", env = "POCKETLM_KV_CACHE",
          value_parser = parse_kv_type)]
    kv_cache: Option<KvType>,
    /// Operating point of an elastic file: small (base weights only, low-rank layers at half
    /// rank), balanced (residuals of attn_v and ffn_down, 75% rank) or best (everything
    /// stored; the default).
    #[arg(long, global = true, value_name = "PROFILE", env = "POCKETLM_PROFILE")]
    profile: Option<Profile>,
    /// Largest weight footprint (e.g. 100MB): serve the best profile whose weights fit.
    #[arg(long, global = true, value_name = "SIZE", value_parser = pocketlm_format::parse_size)]
    memory_limit: Option<u64>,
    /// Check tensor checksums when a model is opened: off (default), eager (every tensor at
    /// open) or lazy (each tensor before its first use). `pocketlm verify` checks a file
    /// offline.
    #[arg(long, global = true, value_name = "MODE", env = "POCKETLM_VERIFY",
          value_parser = parse_verify_mode)]
    verify: Option<VerifyMode>,
    /// Kernel path instead of the detected one: scalar, generic, avx2, avxvnni, avx512 (x86),
    /// neon, dotprod, i8mm (ARM). A path this CPU lacks falls back to detection, with a
    /// warning.
    #[arg(long, global = true, value_name = "PATH", env = "POCKETLM_KERNELS",
          value_parser = parse_kernel_path)]
    kernels: Option<KernelPath>,
    #[command(subcommand)]
    command: Command,
}

fn parse_percent(s: &str) -> Result<u8, String> {
    match s.trim().trim_end_matches('%').parse::<u8>() {
        Ok(p) if (1..=100).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 1 to 100")),
    }
}

fn parse_kv_type(s: &str) -> Result<KvType, String> {
    KvType::parse(s).ok_or_else(|| format!("unknown KV cache type {s:?} (f32, q8)"))
}

fn parse_verify_mode(s: &str) -> Result<VerifyMode, String> {
    VerifyMode::parse(s)
        .ok_or_else(|| format!("unknown verification mode {s:?} (off, eager, lazy)"))
}

fn parse_kernel_path(s: &str) -> Result<KernelPath, String> {
    KernelPath::parse(s).ok_or_else(|| {
        format!("unknown kernel path {s:?} (scalar, generic, avx2, avxvnni, avx512, neon, dotprod, i8mm)")
    })
}

/// The model options every command opens models with, set once at start from the flags
/// (and their environment variables).
static MODEL_OPTIONS: std::sync::OnceLock<ModelOptions> = std::sync::OnceLock::new();

fn model_options(cli: &Cli) -> ModelOptions {
    let defaults = ModelOptions::default();
    ModelOptions {
        verify: cli.verify.unwrap_or(defaults.verify),
        low_rank_percent: cli.low_rank_percent.unwrap_or(defaults.low_rank_percent),
        kv_cache: cli.kv_cache.unwrap_or(defaults.kv_cache),
        profile: cli.profile.unwrap_or(defaults.profile),
        max_weight_bytes: cli.memory_limit.unwrap_or(defaults.max_weight_bytes),
        ..defaults
    }
}

/// Opens a model with the command line's options.
fn open_model(path: &std::path::Path) -> Result<Model, pocketlm_runtime::model::ModelError> {
    Model::open_with(path, MODEL_OPTIONS.get().cloned().unwrap_or_default())
}

#[derive(Subcommand)]
enum Command {
    /// Convert a Hugging Face directory or a GGUF file into a .plm file.
    Convert(Box<ConvertArgs>),
    /// Generate text, streaming it to stdout; speed on stderr.
    Run(RunArgs),
    /// Describe a .plm file: architecture, size, bits per weight, tensors, FLOPs per token.
    Inspect {
        model: PathBuf,
        /// List every tensor.
        #[arg(long)]
        tensors: bool,
        #[arg(long)]
        json: bool,
    },
    /// Measure prefill and decode speed (llama-bench style), time to first token, memory.
    Bench {
        model: PathBuf,
        /// Prompt tokens for the prefill test (pp).
        #[arg(short = 'p', long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Generated tokens for the decode test (tg).
        #[arg(short = 'n', long, default_value_t = 64)]
        gen_tokens: usize,
        #[arg(short = 'r', long, default_value_t = 3)]
        repetitions: usize,
        #[arg(long)]
        json: bool,
    },
    /// Check every tensor checksum of a .plm file.
    Verify { model: PathBuf },
    /// Evaluate model quality.
    #[command(subcommand)]
    Eval(EvalCommand),
}

#[derive(Args)]
struct ConvertArgs {
    /// Hugging Face model directory or .gguf file.
    src: PathBuf,
    #[arg(short, long)]
    output: PathBuf,
    /// Encoding of weight matrices: f32, f16, bf16, q8, q4 (symmetric), q4a (with a
    /// minimum) or q3 (symmetric 3-bit), optionally with a group size such as q4/g64.
    /// Default f16; with --budget, the first quantized candidate.
    #[arg(long, visible_alias = "dtype")]
    weights: Option<Encoding>,
    /// Group size for quantized weights (overrides a /gN suffix).
    #[arg(long)]
    group: Option<u32>,
    /// Elastic file: with each quantized block matrix, store what quantization lost in this
    /// encoding (e.g. q4/g32); `--profile balanced|best` adds it back at run time, `small`
    /// reads the base alone.
    #[arg(long, value_name = "ENCODING")]
    residual: Option<Encoding>,
    /// Encoding of the token embedding (and tied output); default q8 when quantizing.
    #[arg(long)]
    embedding: Option<Encoding>,
    /// Encoding of an untied output layer; default: as the embedding.
    #[arg(long)]
    output_weights: Option<Encoding>,
    /// Quantization method: rtn, gptq, awq or awq+gptq (the last three need --calib).
    #[arg(long, default_value = "rtn")]
    method: Method,
    /// Calibration text (plain UTF-8). Default for calibrated methods:
    /// data/calib/default.txt, downloaded by scripts/fetch-calib.sh.
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration sequences.
    #[arg(long, default_value_t = Calibration::DEFAULT_SAMPLES)]
    calib_samples: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = Calibration::DEFAULT_SEQ_LEN)]
    calib_len: usize,
    /// Grid choice per group: minmax, or search (error-minimising clipping). Default:
    /// minmax for rtn, search for calibrated methods.
    #[arg(long)]
    clip: Option<ClipArg>,
    /// GPTQ damping, as a fraction of the Hessian's mean diagonal.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// GPTQ: quantize columns in their natural order instead of by activation energy.
    #[arg(long)]
    no_act_order: bool,
    /// Mixed precision: PATTERN=ENCODING, e.g. `0=q8` (block 0), `28-29=q8`,
    /// `*ffn_down*=q8`. Repeatable; the last matching rule wins.
    #[arg(long, value_name = "PATTERN=ENCODING")]
    keep: Vec<KeepRule>,
    /// Prune the block matrices: magnitude, wanda or sparsegpt (the last two need --calib;
    /// sparsegpt quantizes the survivors in the same pass when the weights are quantized).
    #[arg(long)]
    prune: Option<PruneMethod>,
    /// Unstructured sparsity for --prune: fraction (0.5) or percentage (50%) of every row.
    #[arg(long, conflicts_with = "nm")]
    sparsity: Option<Sparsity>,
    /// N:M sparsity for --prune, e.g. 2:4. f16 matrices pruned 2:4 are stored in the 2:4
    /// sparse encoding (9 bits per weight, faster decode).
    #[arg(long)]
    nm: Option<Sparsity>,
    /// How --sparsity is spread over the blocks: uniform, or owl[:SPREAD[:THRESHOLD]]
    /// (blocks with more outlier Wanda scores on the uncompressed model keep more weights;
    /// sparsities within 2·SPREAD, default 0.08, averaging --sparsity; needs --calib).
    #[arg(long, default_value = "uniform")]
    sparsity_schedule: SparsitySchedule,
    /// Structured pruning: remove this fraction (0.25 or 25%) of every block's MLP channels
    /// (rows of gate and up, columns of down; down compensated on --calib activations), so
    /// every kernel runs a smaller dense shape. The width is rounded to whole groups.
    #[arg(long, value_parser = parse_fraction)]
    prune_channels: Option<f32>,
    /// Structured pruning: remove this fraction (0.34 or 34%) of every block's key/value
    /// heads, each with the query heads that read it (rows of q, k, v; columns of the output
    /// projection, compensated on --calib activations). Every block keeps at least one.
    #[arg(long, value_parser = parse_fraction)]
    prune_heads: Option<f32>,
    /// Store pruned matrices dense even where a sparse encoding applies (for comparisons).
    #[arg(long)]
    dense_storage: bool,
    /// Factorize the block matrices as W ≈ U·V: svd (data-free), asvd or svdllm (activation
    /// aware; need --calib). The factors are stored in --weights (quantized with --method).
    #[arg(long)]
    lowrank: Option<LowRankMethod>,
    /// For --lowrank: fraction of the block matrices' parameters to remove, e.g. 0.2.
    #[arg(long, conflicts_with = "rank")]
    ratio: Option<f64>,
    /// For --lowrank: the same rank for every matrix (rounded up to the quantization group).
    #[arg(long)]
    rank: Option<usize>,
    /// For --lowrank --ratio: uniform (each matrix loses the ratio), energy (a block's
    /// budget goes where the singular-value energy is) or global (one budget for the whole
    /// model, shared by energy across blocks; measured in a first pass).
    #[arg(long, default_value = "uniform")]
    rank_alloc: RankAllocation,
    /// Plan a recipe per block for this file size (e.g. 80MB, 76MiB): the planner measures
    /// each candidate's KL cost on every block and picks the least total within the budget,
    /// then verifies the file. Needs --calib; --method applies to quantized candidates.
    #[arg(long, value_parser = pocketlm_format::parse_size, conflicts_with = "bits_per_weight")]
    budget: Option<u64>,
    /// Plan for this many bits per weight (tensor bytes × 8 / the model's parameters).
    #[arg(long, conflicts_with = "min_tokens_per_s")]
    bits_per_weight: Option<f64>,
    /// Plan for this decode speed: decode is bound by memory bandwidth, so the tensors may
    /// take at most bandwidth / T bytes per token. The file's decode speed here is measured
    /// after conversion.
    #[arg(long, value_name = "T", conflicts_with = "budget")]
    min_tokens_per_s: Option<f64>,
    /// With --min-tokens-per-s: the target device's read bandwidth in GB/s (default: measured
    /// on this machine with the -t threads).
    #[arg(long, value_name = "GB_S", requires = "min_tokens_per_s")]
    bandwidth: Option<f64>,
    /// Candidate recipes for the planner: ENCODING[+SPARSITY[/METHOD]][+lrP%[/METHOD]],
    /// comma separated, e.g. q8,q4/g32,q3/g64,f16+2:4,q4/g32+lr20%.
    #[arg(long, default_value = convert::plan::DEFAULT_CANDIDATES)]
    candidates: String,
    /// Calibration sequences the planner measures costs on.
    #[arg(long, default_value_t = PlanOptions::DEFAULT_SAMPLES)]
    plan_samples: usize,
    /// Tokens per planner sequence.
    #[arg(long, default_value_t = PlanOptions::DEFAULT_SEQ_LEN)]
    plan_len: usize,
    /// Write the planner's measurements and choice as JSON.
    #[arg(long, value_name = "FILE")]
    plan_json: Option<PathBuf>,
    /// Reuse the costs measured by an earlier --plan-json run with the same candidates
    /// (plan another budget without measuring again).
    #[arg(long, value_name = "FILE")]
    plan_from: Option<PathBuf>,
    /// Recovery after compression. blockwise: tune what each compressed block keeps (grid
    /// scales, the latent weights codes are rounded from, surviving weights, low-rank factors,
    /// norms) so its output matches the original block's on the calibration text. kd:
    /// distil the original model's next-token distribution into the whole compressed model,
    /// tuning grid scales, norms and low-rank factors (codes unchanged unless
    /// --recover-codes); the best of its held-out checks is kept. blockwise+kd: both.
    /// Needs --calib and a build with `--features recover`.
    #[arg(long)]
    recover: Option<RecoverMode>,
    /// Optimizer steps for --recover: per block for blockwise, in all for kd.
    #[arg(long, visible_alias = "steps", default_value_t = Recovery::default().steps)]
    recover_steps: usize,
    /// Calibration sequences per step for --recover.
    #[arg(long, default_value_t = Recovery::default().batch)]
    recover_batch: usize,
    /// Multiplier of --recover's learning rates.
    #[arg(long, default_value_t = Recovery::default().learning_rate)]
    recover_lr: f32,
    /// With kd: train the latent weights the codes are rounded from as well as the grids
    /// (quantization-aware fine-tuning with straight-through rounding), so codes may change.
    #[arg(long)]
    recover_codes: bool,
    /// With kd: distil on this many calibration sequences (default: --calib-samples). The
    /// quantizer needs few; distillation overfits few that it sees many times, so give it
    /// about --recover-steps × --recover-batch for one pass over unseen text.
    #[arg(long, value_name = "N")]
    recover_samples: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ClipArg {
    Minmax,
    Search,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Perplexity over a text file, chunked as llama.cpp's llama-perplexity.
    Ppl {
        model: PathBuf,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Evaluate only the first N chunks.
        #[arg(long)]
        chunks: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// KL divergence of MODEL's next-token distributions from BASE's on a text (chunked as
    /// ppl), top-1 agreement and both perplexities.
    Kld {
        model: PathBuf,
        /// The reference model (e.g. the f16 file MODEL was quantized from).
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Evaluate only the first N chunks.
        #[arg(long)]
        chunks: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Measures many files of one model alike (size, bits per weight, perplexity, with
    /// --bench decode speed), marks the size–perplexity Pareto front among them and the
    /// --reference points, and writes a Markdown table, JSON and SVG charts.
    Sweep {
        models: Vec<PathBuf>,
        /// The perplexity text (needed when files are given).
        #[arg(long)]
        text: Option<PathBuf>,
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Evaluate only the first N chunks.
        #[arg(long)]
        chunks: Option<usize>,
        /// Points measured elsewhere, e.g. `llama.cpp Q4_K_M=105.5MB:28.336[:DECODE_TOK_S]`.
        #[arg(long = "reference", value_name = "NAME=SIZE:PPL[:TOK_S]")]
        references: Vec<pocketlm_eval::sweep::SweepPoint>,
        /// Points measured by an earlier sweep (its --json output), added as they are.
        #[arg(long, value_name = "FILE")]
        load: Vec<PathBuf>,
        /// Also measure decode/prefill speed (as `pocketlm bench` with its defaults).
        #[arg(long)]
        bench: bool,
        /// Chart of perplexity vs size (SVG); with --bench also `<stem>-speed.svg`.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Zero-shot multiple-choice accuracy (acc, acc_norm) scored as lm-evaluation-harness.
    Zeroshot {
        model: PathBuf,
        #[arg(long, value_enum)]
        task: TaskArg,
        /// JSON Lines data in the Hugging Face datasets layout of the task.
        file: PathBuf,
        /// Evaluate only the first N examples.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Size, bits per weight, compression, FLOPs per token and recipe; with --text quality
    /// (ppl, and KLD/top-1 against --base), with --bench speed.
    Report {
        model: PathBuf,
        /// Compare with this file (compression; KLD and top-1 with --text).
        #[arg(long)]
        base: Option<PathBuf>,
        #[arg(long)]
        text: Option<PathBuf>,
        /// Chunk length for --text, and the context of the FLOPs figure.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        #[arg(long)]
        chunks: Option<usize>,
        /// Also measure prefill/decode speed (as `pocketlm bench` with its defaults).
        #[arg(long)]
        bench: bool,
        #[arg(long)]
        json: bool,
    },
    /// Per-block sensitivity of a checkpoint to quantization: converts it with one block at
    /// a time quantized (the rest at --base-weights) and ranks blocks by perplexity increase,
    /// to choose `convert --keep` rules.
    Sensitivity {
        /// Hugging Face model directory or .gguf file.
        src: PathBuf,
        /// The encoding whose cost is measured, e.g. q4 or q4a/g64.
        #[arg(long, default_value = "q4")]
        weights: Encoding,
        /// Encoding of the other blocks.
        #[arg(long, default_value = "f16")]
        base_weights: Encoding,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        #[arg(long, default_value_t = 4)]
        chunks: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TaskArg {
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
struct RunArgs {
    model: PathBuf,
    #[arg(short, long, default_value = "")]
    prompt: String,
    /// Tokens to generate.
    #[arg(short = 'n', long, default_value_t = 256)]
    max_tokens: usize,
    /// Context length (KV cache positions).
    #[arg(short = 'c', long, default_value_t = 2048)]
    ctx: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let _ = MODEL_OPTIONS.set(model_options(&cli));
    if let Some(path) = cli.kernels {
        let chosen = if path.is_supported() {
            path
        } else {
            let detected = KernelPath::detect();
            log::warn!(
                "kernel path {} is not supported on this CPU; using {}",
                path.name(),
                detected.name()
            );
            detected
        };
        pocketlm_kernels::select_path(chosen);
    }
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = cli.threads {
        pool = pool.num_threads(n);
    }
    let pool = match pool.build() {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("error: cannot start the thread pool: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Run on a pool thread: each parallel product then starts from inside the pool instead
    // of waking it from outside (a futex round trip per matrix on short decode steps).
    match pool.install(|| run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn run(command: Command) -> CliResult {
    match command {
        Command::Convert(args) => cmd_convert(*args),
        Command::Run(args) => cmd_run(args),
        Command::Inspect {
            model,
            tensors,
            json,
        } => cmd_inspect(model, tensors, json),
        Command::Bench {
            model,
            prompt_tokens,
            gen_tokens,
            repetitions,
            json,
        } => cmd_bench(model, prompt_tokens, gen_tokens, repetitions, json),
        Command::Verify { model } => {
            let file = PlmFile::open(&model)?;
            file.verify()?;
            println!(
                "{}: OK ({} tensors, checksums match)",
                model.display(),
                file.tensors().len()
            );
            Ok(())
        }
        Command::Eval(EvalCommand::Ppl {
            model,
            text,
            ctx,
            chunks,
            json,
        }) => cmd_ppl(model, text, ctx, chunks, json),
        Command::Eval(EvalCommand::Kld {
            model,
            base,
            text,
            ctx,
            chunks,
            json,
        }) => cmd_kld(model, base, text, ctx, chunks, json),
        Command::Eval(EvalCommand::Zeroshot {
            model,
            task,
            file,
            limit,
            json,
        }) => cmd_zeroshot(model, task.into(), file, limit, json),
        Command::Eval(EvalCommand::Sweep {
            models,
            text,
            ctx,
            chunks,
            mut references,
            load,
            bench,
            svg,
            json,
        }) => {
            let options = PerplexityOptions {
                context: ctx,
                max_chunks: chunks,
            };
            for path in &load {
                let points: Vec<pocketlm_eval::sweep::SweepPoint> =
                    serde_json::from_str(&read_text(path)?)
                        .map_err(|e| format!("{}: not a sweep --json file: {e}", path.display()))?;
                references.extend(points);
            }
            let text = match (&text, models.is_empty()) {
                (Some(path), _) => read_text(path)?,
                (None, true) => String::new(),
                (None, false) => return Err("--text FILE is needed to measure files".into()),
            };
            cmd_sweep(&models, &text, &options, references, bench, svg, json)
        }
        Command::Eval(EvalCommand::Report {
            model,
            base,
            text,
            ctx,
            chunks,
            bench,
            json,
        }) => cmd_report(model, base, text, ctx, chunks, bench, json),
        Command::Eval(EvalCommand::Sensitivity {
            src,
            weights,
            base_weights,
            text,
            ctx,
            chunks,
            json,
        }) => {
            let options = convert::sensitivity::SensitivityOptions {
                encoding: weights,
                base: base_weights,
                text: read_text(&text)?,
                perplexity: PerplexityOptions {
                    context: ctx,
                    max_chunks: Some(chunks),
                },
            };
            cmd_sensitivity(src, options, json)
        }
    }
}

fn cmd_sweep(
    models: &[PathBuf],
    text: &str,
    options: &PerplexityOptions,
    mut points: Vec<pocketlm_eval::sweep::SweepPoint>,
    bench: bool,
    svg: Option<PathBuf>,
    json: Option<PathBuf>,
) -> CliResult {
    use pocketlm_eval::sweep::{self, Axis};
    let speed = bench.then(pocketlm_eval::bench::BenchOptions::default);
    let progress = Progress::with_length(
        models.len() as u64,
        "{elapsed_precise} {bar:40} {pos}/{len} files {msg}",
    );
    for path in models {
        progress.set_message(path.display().to_string());
        let model = open_model(path)?;
        points.push(sweep::measure_file(
            path,
            &model,
            text,
            options,
            speed.as_ref(),
        )?);
        progress.inc();
    }
    progress.finish();
    if points.is_empty() {
        return Err("nothing to sweep: give .plm files (and/or --reference points)".into());
    }
    sweep::mark_pareto(&mut points);
    print!("{}", sweep::render_markdown(&points));
    if let Some(path) = &svg {
        sweep::render_svg(&points, Axis::Size, path)?;
        if points.iter().any(|p| p.decode_tokens_per_s.is_some()) {
            let stem = path
                .file_stem()
                .map_or("sweep".into(), |s| s.to_string_lossy());
            let speed_path = path.with_file_name(format!("{stem}-speed.svg"));
            sweep::render_svg(&points, Axis::DecodeSpeed, &speed_path)?;
        }
    }
    if let Some(path) = &json {
        std::fs::write(path, serde_json::to_string_pretty(&points)?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn cmd_sensitivity(
    src: PathBuf,
    options: convert::sensitivity::SensitivityOptions,
    json: bool,
) -> CliResult {
    let model = pocketlm_convert::import::open(&src)?;
    let progress = Progress::new("{elapsed_precise} {bar:40} {pos}/{len} conversions");
    let report = convert::sensitivity::scan(&model, &options, &mut |done, total| {
        progress.update(done, total)
    })?;
    progress.finish();
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "base ({}) ppl {:.4}; one block at {} each, most sensitive first:",
        options.base, report.base_ppl, report.encoding
    );
    println!("{:>6} {:>10} {:>10}", "block", "ppl", "increase");
    for l in &report.layers {
        println!("{:>6} {:>10.4} {:>+10.4}", l.layer, l.ppl, l.ppl_increase);
    }
    Ok(())
}

/// `0.25` or `25%`.
fn parse_fraction(s: &str) -> Result<f32, String> {
    match s.parse::<Sparsity>().map_err(|e| e.to_string())? {
        Sparsity::Unstructured(f) => Ok(f),
        Sparsity::NM { .. } => Err(format!(
            "'{s}': expected a fraction (0.25) or a percentage (25%)"
        )),
    }
}

fn read_text(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Where calibrated methods look for calibration text when `--calib` is not given.
const DEFAULT_CALIBRATION: &str = "data/calib/default.txt";

fn cmd_convert(a: ConvertArgs) -> CliResult {
    let budget = match (a.budget, a.bits_per_weight, a.min_tokens_per_s) {
        (Some(bytes), _, _) => Some(Budget::FileBytes(bytes)),
        (None, Some(bpw), _) if bpw.is_finite() && bpw > 0.0 => Some(Budget::BitsPerWeight(bpw)),
        (None, Some(bpw), _) => {
            return Err(format!("--bits-per-weight {bpw} must be positive").into());
        }
        (None, None, Some(t)) if t.is_finite() && t > 0.0 => {
            let bandwidth = match a.bandwidth {
                Some(gb) if gb.is_finite() && gb > 0.0 => gb * 1e9,
                Some(gb) => return Err(format!("--bandwidth {gb} must be positive").into()),
                None => {
                    let gb = pocketlm_eval::bench::measure_read_bandwidth();
                    eprintln!("read bandwidth here: {gb:.1} GB/s (--bandwidth sets the target's)");
                    gb * 1e9
                }
            };
            Some(Budget::TokensPerSecond {
                tokens_per_s: t,
                bandwidth,
            })
        }
        (None, None, Some(t)) => {
            return Err(format!("--min-tokens-per-s {t} must be positive").into());
        }
        (None, None, None) => None,
    };
    let plan = match budget {
        Some(budget) => Some(PlanOptions {
            budget,
            candidates: convert::plan::parse_candidates(&a.candidates)
                .map_err(|e| format!("--candidates: {e}"))?,
            samples: a.plan_samples,
            seq_len: a.plan_len,
        }),
        None => None,
    };
    let default_weights = plan
        .as_ref()
        .and_then(|p| {
            p.candidates
                .iter()
                .map(|c| c.weights)
                .find(|w| w.is_quantized())
        })
        .unwrap_or(Encoding::F16);
    let weights = match (a.weights.unwrap_or(default_weights), a.group) {
        (Encoding::Q8 { .. }, Some(group)) => Encoding::Q8 { group },
        (Encoding::Q4 { asymmetric, .. }, Some(group)) => Encoding::Q4 { group, asymmetric },
        (Encoding::Q3 { .. }, Some(group)) => Encoding::Q3 { group },
        (w, Some(_)) => {
            return Err(format!("--group applies to q8/q4/q3 weights, not {w}").into());
        }
        (w, None) => w,
    };
    let pruning = match (a.prune, a.sparsity.or(a.nm)) {
        (Some(method), Some(sparsity)) => Some(Pruning { method, sparsity }),
        (Some(_), None) => return Err("--prune needs --sparsity F or --nm N:M".into()),
        (None, Some(_)) => return Err("--sparsity/--nm need --prune METHOD".into()),
        (None, None) => None,
    };
    let lowrank = match (a.lowrank, a.ratio, a.rank) {
        (Some(method), Some(ratio), None) => Some(LowRank {
            method,
            target: RankTarget::Ratio(ratio),
            allocation: a.rank_alloc,
        }),
        (Some(method), None, Some(rank)) => Some(LowRank {
            method,
            target: RankTarget::Rank(rank),
            allocation: a.rank_alloc,
        }),
        (Some(_), None, None) => return Err("--lowrank needs --ratio F or --rank N".into()),
        (None, Some(_), _) | (None, _, Some(_)) => {
            return Err("--ratio/--rank need --lowrank METHOD".into());
        }
        (Some(_), Some(_), Some(_)) => return Err("choose one of --ratio and --rank".into()),
        (None, None, None) => None,
    };
    let mut options = ConvertOptions {
        weights,
        embedding: a.embedding,
        output: a.output_weights,
        method: a.method,
        clipping: a.clip.map(|c| match c {
            ClipArg::Minmax => Clipping::MinMax,
            ClipArg::Search => Clipping::Search,
        }),
        gptq: GptqOptions {
            damp: a.damp,
            act_order: !a.no_act_order,
            ..GptqOptions::default()
        },
        calibration: None,
        keep: a.keep,
        pruning,
        sparsity_schedule: a.sparsity_schedule,
        mlp_channel_pruning: a.prune_channels,
        attention_head_pruning: a.prune_heads,
        residual: a.residual,
        lowrank,
        sparse_storage: !a.dense_storage,
        blocks: Vec::new(),
        recover: a.recover.map(|mode| Recovery {
            mode,
            steps: a.recover_steps,
            batch: a.recover_batch,
            learning_rate: a.recover_lr,
            codes: a.recover_codes,
            samples: a.recover_samples,
        }),
    };
    options.calibration = if plan.is_some() || options.needs_calibration() {
        let path = a
            .calib
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CALIBRATION));
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if a.calib.is_none() {
                format!(
                    "this recipe needs calibration text: {} ({e}); pass --calib FILE or run \
                     scripts/fetch-calib.sh",
                    path.display()
                )
            } else {
                format!("--calib {}: {e}", path.display())
            }
        })?;
        Some(Calibration {
            text: text.into(),
            source: path.display().to_string(),
            samples: a.calib_samples,
            seq_len: a.calib_len,
        })
    } else {
        if a.calib.is_some() {
            eprintln!("note: --calib is ignored: nothing in this recipe is calibrated");
        }
        None
    };
    let (src, output) = (a.src, a.output);
    let started = std::time::Instant::now();
    if let Some(plan) = plan {
        let known = match &a.plan_from {
            Some(path) => {
                let json: serde_json::Value = serde_json::from_str(&read_text(path)?)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let costs = serde_json::from_value(json["sensitivities"].clone())
                    .map_err(|e| format!("{}: not a --plan-json file: {e}", path.display()))?;
                Some(costs)
            }
            None => None,
        };
        return convert_planned(
            &src,
            &output,
            &options,
            &plan,
            known,
            a.plan_json.as_deref(),
        );
    }
    let progress = Progress::new("{elapsed_precise} {bar:40} {pos}/{len} tensors {msg}");
    let report = convert::convert_path(&src, &output, &options, &mut |done, total, name| {
        progress.update_with(done, total, name.to_string());
    })?;
    progress.finish();
    print_written(&output, &report, started);
    Ok(())
}

/// The converter's closing lines: fallbacks, then what was written and how long it took.
fn print_written(output: &Path, report: &convert::ConvertReport, started: std::time::Instant) {
    for (name, reason) in &report.fallbacks {
        eprintln!("note: {name} kept in f16: {reason}");
    }
    if !report.recovery.is_empty() {
        let kept = report.recovery.iter().filter(|b| b.kept).count();
        let mean = |f: fn(&convert::BlockRecovery) -> f64| {
            report.recovery.iter().map(f).sum::<f64>() / report.recovery.len() as f64
        };
        eprintln!(
            "recovery: block output error {:.3e} -> {:.3e} on average; {kept} of {} blocks improved",
            mean(|b| b.loss_before),
            mean(|b| if b.kept { b.loss_after } else { b.loss_before }),
            report.recovery.len()
        );
    }
    if let Some(kd) = &report.distillation {
        eprintln!(
            "distillation: KL {:.4} -> {:.4} on {} held-out sequences ({:.4} -> {:.4} on {} \
             training ones); {}",
            kd.kl_before,
            kd.kl_after,
            kd.held_out,
            kd.train_kl_before,
            kd.train_kl_after,
            kd.train_scored,
            if kd.kept {
                format!("kept the values of step {}", kd.best_step)
            } else {
                "not better, left as compressed".to_string()
            }
        );
    }
    eprintln!(
        "wrote {} ({} tensors, {:.1} M parameters, {:.1} MB) in {:.1} s",
        output.display(),
        report.tensors,
        report.parameters as f64 / 1e6,
        report.file_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
}

/// `convert --budget`: measure, plan, convert, verify, and print the plan.
fn convert_planned(
    src: &Path,
    output: &Path,
    options: &ConvertOptions,
    plan: &PlanOptions,
    known: Option<convert::plan::Sensitivities>,
    json: Option<&Path>,
) -> CliResult {
    let started = std::time::Instant::now();
    let model = pocketlm_convert::import::open(src)?;
    let progress = Progress::new("{elapsed_precise} {bar:40} {pos}/{len} {msg}");
    let (report, convert_report) = convert::plan::convert_with_plan(
        &model,
        output,
        options,
        plan,
        known,
        &mut |done, total, what| {
            progress.update_with(done, total, what.to_string());
        },
    )?;
    progress.finish();
    let s = &report.sensitivities;
    println!(
        "plan for {} over {} candidates, costs measured on {} tokens (KL, nats/token):",
        report.plan.budget,
        s.candidates.len(),
        s.tokens
    );
    let widths: Vec<usize> = s.candidates.iter().map(|c| c.len().max(9)).collect();
    print!("{:>5}", "block");
    for (c, w) in s.candidates.iter().zip(&widths) {
        print!("  {c:>w$}");
    }
    println!("  chosen");
    for (b, &chosen) in report.plan.choice.iter().enumerate() {
        print!("{b:>5}");
        for (c, (kl, w)) in s.kl[b].iter().zip(&widths).enumerate() {
            let mark = if c == chosen { '*' } else { ' ' };
            print!(" {kl:>w$.5}{mark}");
        }
        println!("  {}", s.candidates[chosen]);
    }
    for (c, &n) in s.candidates.iter().zip(&s.fallbacks) {
        if n > 0 {
            println!("note: {c} keeps up to {n} matrices per block in f16 (it cannot encode them)");
        }
    }
    println!(
        "embedding/output: {:.2} MB, KL {:.5}",
        s.fixed_bytes as f64 / 1e6,
        s.fixed_kl
    );
    println!(
        "predicted: {:.2} MB ({:.3} bits per weight in tensors), KL {:.5}; measured: {:.2} MB, KL {:.5}",
        report.plan.predicted_file_bytes as f64 / 1e6,
        report.plan.predicted_bits_per_weight,
        report.plan.predicted_kl,
        report.file_bytes as f64 / 1e6,
        report.measured_kl
    );
    if let (Some(predicted), Some(measured)) = (
        report.plan.predicted_tokens_per_s,
        report.measured_tokens_per_s,
    ) {
        println!(
            "decode: predicted {predicted:.1} tokens/s (bandwidth / bytes per token); measured \
             here {measured:.1} tokens/s"
        );
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    print_written(output, &convert_report, started);
    Ok(())
}

fn cmd_run(a: RunArgs) -> CliResult {
    let load_started = std::time::Instant::now();
    let model = Arc::new(open_model(&a.model)?);
    let load_ms = load_started.elapsed().as_secs_f64() * 1e3;
    let options = GenerateOptions {
        max_tokens: a.max_tokens,
        sampler: SamplerConfig {
            temperature: a.temp,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repetition_penalty: a.repeat_penalty,
            repeat_last_n: a.repeat_last_n,
            seed: a.seed,
        },
        stop: a.stop,
        ignore_eos: a.ignore_eos,
    };
    options.sampler.validate()?;
    let mut session = Session::new(Arc::clone(&model), a.ctx)?;
    let mut stdout = std::io::stdout().lock();
    let mut emit = |piece: &str| {
        // A closed pipe (e.g. `| head`) ends generation instead of failing.
        stdout.write_all(piece.as_bytes()).is_ok() && stdout.flush().is_ok()
    };
    let generation = if a.chat {
        let mut messages = Vec::new();
        if let Some(system) = a.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: system,
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: a.prompt,
        });
        session.chat(&messages, &options, &mut emit)?
    } else {
        if !a.prompt.is_empty() {
            emit(&a.prompt);
        }
        session.generate(&a.prompt, &options, &mut emit)?
    };
    emit("\n");
    let s = &generation.stats;
    eprintln!(
        "load {:.0} ms | prompt {} tokens, prefill {:.1} tok/s | time to first token {:.0} ms | \
         generated {} tokens, decode {:.1} tok/s | stop: {:?} | threads {} | kernels {}",
        load_ms,
        s.prompt_tokens,
        s.prefill_tokens_per_second(),
        s.time_to_first_token_ms,
        s.generated_tokens,
        s.decode_tokens_per_second(),
        generation.stop_reason,
        rayon::current_num_threads(),
        pocketlm_kernels::active_path().name(),
    );
    Ok(())
}

fn cmd_inspect(path: PathBuf, list_tensors: bool, json: bool) -> CliResult {
    let model = open_model(&path)?;
    let file = model.file();
    let config = model.config();
    let params: u64 = file
        .tensors()
        .iter()
        .filter(|t| !pocketlm_format::config::names::is_residual(&t.name))
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    let tensor_bytes: u64 = file.tensors().iter().map(|t| t.length).sum();
    let bits_per_weight = tensor_bytes as f64 * 8.0 / params.max(1) as f64;
    let mut encodings = std::collections::BTreeMap::<&str, (usize, u64)>::new();
    for t in file.tensors() {
        let e = encodings.entry(t.encoding.name()).or_default();
        e.0 += 1;
        e.1 += t.shape.iter().product::<usize>() as u64;
    }
    let flops = model.flops_per_token(0);
    if json {
        let tensors: Vec<_> = file
            .tensors()
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "shape": t.shape, "encoding": t.encoding.name(), "bytes": t.length}))
            .collect();
        let out = serde_json::json!({
            "architecture": config.architecture.name(),
            "config": config,
            "parameters": params,
            "file_bytes": file.file_size(),
            "tensor_bytes": tensor_bytes,
            "bits_per_weight": bits_per_weight,
            "flops_per_token": flops,
            "recipe": file.metadata().get("recipe"),
            "tensors": tensors,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("file              {}", path.display());
    println!("architecture      {}", config.architecture.name());
    println!(
        "shape             {} layers, hidden {}, ffn {}, heads {} (kv {}), head dim {}, vocab {}",
        config.num_layers,
        config.hidden_size,
        config.intermediate_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.vocab_size
    );
    println!("context           {}", config.max_position_embeddings);
    println!(
        "parameters        {} ({:.2} M)",
        params,
        params as f64 / 1e6
    );
    println!(
        "file size         {} bytes ({:.2} MB)",
        file.file_size(),
        file.file_size() as f64 / 1e6
    );
    println!("bits per weight   {bits_per_weight:.3}");
    println!(
        "FLOPs per token   {:.3} G (at position 0; +{} per position of context)",
        flops as f64 / 1e9,
        2 * 2 * config.num_layers * config.q_dim()
    );
    for (name, (count, n)) in &encodings {
        println!("encoding {name:<8} {count} tensors, {n} weights");
    }
    if let Some(recipe) = file.metadata().get("recipe") {
        println!("recipe            {recipe}");
    }
    if list_tensors {
        for t in file.tensors() {
            println!(
                "  {:<32} {:<14} {:<5} {:>10} bytes",
                t.name,
                format!("{:?}", t.shape),
                t.encoding.name(),
                t.length
            );
        }
    }
    Ok(())
}

fn cmd_bench(
    path: PathBuf,
    prompt_tokens: usize,
    generated_tokens: usize,
    repetitions: usize,
    json: bool,
) -> CliResult {
    let model = open_model(&path)?;
    let options = pocketlm_eval::bench::BenchOptions {
        prompt_tokens,
        generated_tokens,
        repetitions,
    };
    let r = pocketlm_eval::bench::bench(&model, &options)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let mb = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1} MB"));
    println!("model             {}", path.display());
    println!(
        "threads           {} ({} kernels)",
        r.threads, r.kernel_path
    );
    println!(
        "prefill pp{:<6}  {:.1} tok/s (worst {:.1})",
        r.prompt_tokens, r.prefill_tokens_per_s, r.prefill_tokens_per_s_min
    );
    println!(
        "decode tg{:<7}  {:.1} tok/s (worst {:.1})",
        r.generated_tokens, r.decode_tokens_per_s, r.decode_tokens_per_s_min
    );
    println!(
        "time to first token {:.1} ms ({} prompt tokens)",
        r.ttft_ms, r.prompt_tokens
    );
    println!(
        "bandwidth bound   {:.1} tok/s = {:.1} GB/s read / {:.1} MB per token; decode at {:.0}%",
        r.bandwidth_bound_tokens_per_s,
        r.read_bandwidth_gb_s,
        r.bytes_per_token as f64 / 1e6,
        r.bandwidth_efficiency * 100.0
    );
    println!(
        "memory            peak RSS {}, file-backed {}, anonymous {}",
        mb(r.peak_rss_mb),
        mb(r.rss_file_mb),
        mb(r.rss_anon_mb)
    );
    Ok(())
}

fn cmd_ppl(
    path: PathBuf,
    text: PathBuf,
    ctx: usize,
    chunks: Option<usize>,
    json: bool,
) -> CliResult {
    let model = open_model(&path)?;
    let text = read_text(&text)?;
    let progress = Progress::new("{bar:40} {pos}/{len} chunks, ppl {msg}");
    let result = eval::perplexity(
        &model,
        &text,
        &PerplexityOptions {
            context: ctx,
            max_chunks: chunks,
        },
        |done, total, ppl| {
            progress.update_with(done, total, format!("{ppl:.4}"));
        },
    )?;
    progress.finish();
    if json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "ppl {:.4} ± {:.4} over {} chunks of {} tokens ({} scored) in {:.1} s",
            result.ppl,
            result.ppl * result.nll_stderr,
            result.chunks,
            result.context,
            result.tokens_scored,
            result.seconds
        );
    }
    Ok(())
}

fn cmd_kld(
    path: PathBuf,
    base: PathBuf,
    text: PathBuf,
    ctx: usize,
    chunks: Option<usize>,
    json: bool,
) -> CliResult {
    let model = open_model(&path)?;
    let base = open_model(&base)?;
    let text = read_text(&text)?;
    let progress = Progress::new("{bar:40} {pos}/{len} chunks, KLD {msg}");
    let r = eval::kl_divergence(
        &model,
        &base,
        &text,
        &PerplexityOptions {
            context: ctx,
            max_chunks: chunks,
        },
        |done, total, kld| {
            progress.update_with(done, total, format!("{kld:.6}"));
        },
    )?;
    progress.finish();
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "KLD             {:.6} ± {:.6} (median {:.6}, p99 {:.6}, max {:.6})",
        r.kld, r.kld_stderr, r.kld_median, r.kld_p99, r.kld_max
    );
    println!(
        "top-1 agreement {:.2}% ± {:.2}%",
        r.top1_agreement * 100.0,
        r.top1_agreement_stderr * 100.0
    );
    println!(
        "ppl             {:.4} (base {:.4}), ratio {:.4}, delta {:+.4}, ln ratio {:.5} ± {:.5}",
        r.ppl, r.ppl_base, r.ppl_ratio, r.ppl_delta, r.ln_ppl_ratio, r.ln_ppl_ratio_stderr
    );
    println!(
        "scored          {} tokens in {} chunks of {} in {:.1} s",
        r.tokens_scored, r.chunks, r.context, r.seconds
    );
    Ok(())
}

fn cmd_zeroshot(
    path: PathBuf,
    task: Task,
    file: PathBuf,
    limit: Option<usize>,
    json: bool,
) -> CliResult {
    let model = open_model(&path)?;
    let examples = zeroshot::load_examples(task, &file, limit)?;
    if examples.is_empty() {
        return Err(format!("{}: no examples", file.display()).into());
    }
    let progress = Progress::new("{bar:40} {pos}/{len} examples, acc {msg}");
    let r = zeroshot::evaluate(&model, task, &examples, |done, total, acc| {
        progress.update_with(done, total, format!("{acc:.4}"));
    })?;
    progress.finish();
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "{}: acc {:.4} ± {:.4}, acc_norm {:.4} ± {:.4} over {} examples ({} / {} correct) in {:.1} s",
        r.task,
        r.accuracy,
        r.accuracy_stderr,
        r.accuracy_norm,
        r.accuracy_norm_stderr,
        r.examples,
        r.correct,
        r.correct_norm,
        r.seconds
    );
    if r.truncated > 0 {
        println!(
            "note: {} contexts were cut to fit the model's window",
            r.truncated
        );
    }
    Ok(())
}

fn cmd_report(
    path: PathBuf,
    base: Option<PathBuf>,
    text: Option<PathBuf>,
    ctx: usize,
    chunks: Option<usize>,
    run_bench: bool,
    json: bool,
) -> CliResult {
    let model = open_model(&path)?;
    let base = base.map(|b| open_model(&b)).transpose()?;
    let text = text.map(|t| read_text(&t)).transpose()?;
    let options = ReportOptions {
        perplexity: PerplexityOptions {
            context: ctx,
            max_chunks: chunks,
        },
        bench: run_bench.then(pocketlm_eval::bench::BenchOptions::default),
    };
    let progress = Progress::new("{bar:40} {pos}/{len} chunks ({msg})");
    let report = build_report(
        &model,
        base.as_ref(),
        text.as_deref(),
        &options,
        |stage, done, total| {
            progress.update_with(done, total, stage);
        },
    )?;
    progress.finish();
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.render_table());
    }
    Ok(())
}
