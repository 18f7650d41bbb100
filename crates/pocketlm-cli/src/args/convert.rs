//! `pocketlm convert`: encodings, quantization method, pruning, low rank, the size planner and
//! recovery.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use pocketlm_convert::plan::{self, PlanOptions};
use pocketlm_convert::recover::RecoverMode;
use pocketlm_convert::{
    Calibration, KeepRule, LowRankMethod, Method, Preset, PruneMethod, RankAllocation, Recovery,
    Sparsity, SparsitySchedule,
};
use pocketlm_format::Encoding;

#[derive(Args)]
pub struct ConvertArgs {
    /// Hugging Face model directory or .gguf file.
    pub src: PathBuf,
    #[arg(short, long)]
    pub output: PathBuf,
    /// A named recipe for a size, the best measured (BENCHMARKS.md, "Compression presets"):
    /// q8 (8.5 bits per weight, round to nearest), q4 (4.5, rotated inputs + GPTQ), q3
    /// (3.3-3.7, rotated inputs + GPTQ, attn_v and ffn_down in 4 bits, then distillation
    /// over 256 calibration sequences: about an hour for a 135M model on 2 cores). q4 and q3
    /// need calibration text (--calib, default data/calib/default.txt from
    /// scripts/fetch-calib.sh). `--recover kd` adds distillation to q4 or sets q3's.
    #[arg(long, conflicts_with_all = [
        "weights", "group", "method", "clip", "keep", "rotate", "prune", "lowrank",
        "budget", "bits_per_weight", "min_tokens_per_s",
    ])]
    pub preset: Option<Preset>,
    /// Encoding of weight matrices: f32, f16, bf16, q8, q4 (symmetric), q4a (with a
    /// minimum), q3 (symmetric 3-bit), q4nl or q3nl (4 or 3 bits on a non-uniform grid),
    /// optionally with a group size such as q4/g64.
    /// Default f16; with --budget, the first quantized candidate.
    #[arg(long, visible_alias = "dtype")]
    pub weights: Option<Encoding>,
    /// Group size for quantized weights (overrides a /gN suffix).
    #[arg(long)]
    pub group: Option<u32>,
    /// Elastic file: with each quantized block matrix, store what quantization lost in this
    /// encoding (e.g. q4/g32); `--profile balanced|best` adds it back at run time, `small`
    /// reads the base alone.
    #[arg(long, value_name = "ENCODING")]
    pub residual: Option<Encoding>,
    /// Incoherence processing: store every block matrix rotated by a randomized Hadamard
    /// transform of its input (the runtime rotates the activations to match), so no input
    /// channel dominates. Improves --method gptq (not rtn at groups of 32-64). Works with
    /// awq, pruning, --residual and --recover kd; not with --lowrank or block-wise --recover.
    #[arg(long)]
    pub rotate: bool,
    /// Encoding of the token embedding (and tied output); default q8 when quantizing.
    #[arg(long)]
    pub embedding: Option<Encoding>,
    /// Encoding of an untied output layer; default: as the embedding.
    #[arg(long)]
    pub output_weights: Option<Encoding>,
    /// Quantization method: rtn, gptq, awq or awq+gptq (the last three need --calib).
    #[arg(long, default_value = "rtn")]
    pub method: Method,
    /// Calibration text (plain UTF-8). Default for calibrated methods:
    /// data/calib/default.txt, downloaded by scripts/fetch-calib.sh.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration sequences.
    #[arg(long, default_value_t = Calibration::DEFAULT_SAMPLES)]
    pub calib_samples: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = Calibration::DEFAULT_SEQ_LEN)]
    pub calib_len: usize,
    /// Grid choice per group: minmax, or search (error-minimising clipping). Default:
    /// minmax for rtn, search for calibrated methods.
    #[arg(long)]
    pub clip: Option<ClipArg>,
    /// GPTQ damping, as a fraction of the Hessian's mean diagonal.
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    /// GPTQ: quantize columns in their natural order instead of by activation energy.
    #[arg(long)]
    pub no_act_order: bool,
    /// Mixed precision: PATTERN=ENCODING, e.g. `0=q8` (block 0), `28-29=q8`,
    /// `*ffn_down*=q8`. Repeatable; the last matching rule wins.
    #[arg(long, value_name = "PATTERN=ENCODING")]
    pub keep: Vec<KeepRule>,
    /// Prune the block matrices: magnitude, wanda or sparsegpt (the last two need --calib;
    /// sparsegpt quantizes the survivors in the same pass when the weights are quantized).
    #[arg(long)]
    pub prune: Option<PruneMethod>,
    /// Unstructured sparsity for --prune: fraction (0.5) or percentage (50%) of every row.
    #[arg(long, conflicts_with = "nm")]
    pub sparsity: Option<Sparsity>,
    /// N:M sparsity for --prune, e.g. 2:4. f16 matrices pruned 2:4 are stored in the 2:4
    /// sparse encoding (9 bits per weight, faster decode).
    #[arg(long)]
    pub nm: Option<Sparsity>,
    /// How --sparsity is spread over the blocks: uniform, or owl[:SPREAD[:THRESHOLD]]
    /// (blocks with more outlier Wanda scores on the uncompressed model keep more weights;
    /// sparsities within 2·SPREAD, default 0.08, averaging --sparsity; needs --calib).
    #[arg(long, default_value = "uniform")]
    pub sparsity_schedule: SparsitySchedule,
    /// Structured pruning: remove this fraction (0.25 or 25%) of every block's MLP channels
    /// (rows of gate and up, columns of down; down compensated on --calib activations), so
    /// every kernel runs a smaller dense shape. The width is rounded to whole groups.
    #[arg(long, value_parser = parse_fraction)]
    pub prune_channels: Option<f32>,
    /// Structured pruning: remove this fraction (0.34 or 34%) of every block's key/value
    /// heads, each with the query heads that read it (rows of q, k, v; columns of the output
    /// projection, compensated on --calib activations). Every block keeps at least one.
    #[arg(long, value_parser = parse_fraction)]
    pub prune_heads: Option<f32>,
    /// Store pruned matrices dense even where a sparse encoding applies (for comparisons).
    #[arg(long)]
    pub dense_storage: bool,
    /// Factorize the block matrices as W ≈ U·V: svd (data-free), asvd or svdllm (activation
    /// aware; need --calib). The factors are stored in --weights (quantized with --method).
    #[arg(long)]
    pub lowrank: Option<LowRankMethod>,
    /// For --lowrank: fraction of the block matrices' parameters to remove, e.g. 0.2.
    #[arg(long, conflicts_with = "rank")]
    pub ratio: Option<f64>,
    /// For --lowrank: the same rank for every matrix (rounded up to the quantization group).
    #[arg(long)]
    pub rank: Option<usize>,
    /// For --lowrank --ratio: uniform (each matrix loses the ratio), energy (a block's
    /// budget goes where the singular-value energy is) or global (one budget for the whole
    /// model, shared by energy across blocks; measured in a first pass).
    #[arg(long, default_value = "uniform")]
    pub rank_alloc: RankAllocation,
    /// Plan a recipe per block for this file size (e.g. 80MB, 76MiB): the planner measures
    /// each candidate's KL cost on every block and picks the least total within the budget,
    /// then verifies the file. Needs --calib; --method applies to quantized candidates.
    #[arg(long, value_parser = pocketlm_format::parse_size, conflicts_with = "bits_per_weight")]
    pub budget: Option<u64>,
    /// Plan for this many bits per weight (tensor bytes × 8 / the model's parameters).
    #[arg(long, conflicts_with = "min_tokens_per_s")]
    pub bits_per_weight: Option<f64>,
    /// Plan for this decode speed: decode is bound by memory bandwidth, so the tensors may
    /// take at most bandwidth / T bytes per token. The file's decode speed here is measured
    /// after conversion.
    #[arg(long, value_name = "T", conflicts_with = "budget")]
    pub min_tokens_per_s: Option<f64>,
    /// With --min-tokens-per-s: the target device's read bandwidth in GB/s (default: measured
    /// on this machine with the -t threads).
    #[arg(long, value_name = "GB_S", requires = "min_tokens_per_s")]
    pub bandwidth: Option<f64>,
    /// Candidate recipes for the planner: ENCODING[+SPARSITY[/METHOD]][+lrP%[/METHOD]],
    /// comma separated, e.g. q8,q4/g32,q3/g64,f16+2:4,q4/g32+lr20%.
    #[arg(long, default_value = plan::DEFAULT_CANDIDATES)]
    pub candidates: String,
    /// Calibration sequences the planner measures costs on.
    #[arg(long, default_value_t = PlanOptions::DEFAULT_SAMPLES)]
    pub plan_samples: usize,
    /// Tokens per planner sequence.
    #[arg(long, default_value_t = PlanOptions::DEFAULT_SEQ_LEN)]
    pub plan_len: usize,
    /// Write the planner's measurements and choice as JSON.
    #[arg(long, value_name = "FILE")]
    pub plan_json: Option<PathBuf>,
    /// Reuse the costs measured by an earlier --plan-json run with the same candidates
    /// (plan another budget without measuring again).
    #[arg(long, value_name = "FILE")]
    pub plan_from: Option<PathBuf>,
    /// Recovery after compression. blockwise: tune what each compressed block keeps (grid
    /// scales, the latent weights codes are rounded from, surviving weights, low-rank factors,
    /// norms) so its output matches the original block's on the calibration text. kd:
    /// distil the original model's next-token distribution into the whole compressed model,
    /// tuning grid scales, norms and low-rank factors (codes unchanged unless
    /// --recover-codes); the best of its held-out checks is kept. blockwise+kd: both.
    /// Needs --calib and a build with `--features recover`.
    #[arg(long)]
    pub recover: Option<RecoverMode>,
    /// Optimizer steps for --recover: per block for blockwise, in all for kd.
    #[arg(long, visible_alias = "steps", default_value_t = Recovery::default().steps)]
    pub recover_steps: usize,
    /// Calibration sequences per step for --recover.
    #[arg(long, default_value_t = Recovery::default().batch)]
    pub recover_batch: usize,
    /// Multiplier of --recover's learning rates.
    #[arg(long, default_value_t = Recovery::default().learning_rate)]
    pub recover_lr: f32,
    /// With kd: train the latent weights the codes are rounded from as well as the grids
    /// (quantization-aware fine-tuning with straight-through rounding), so codes may change.
    #[arg(long)]
    pub recover_codes: bool,
    /// With kd: distil on this many calibration sequences (default: --calib-samples). The
    /// quantizer needs few; distillation overfits few that it sees many times, so give it
    /// about --recover-steps × --recover-batch for one pass over unseen text.
    #[arg(long, value_name = "N")]
    pub recover_samples: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ClipArg {
    Minmax,
    Search,
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
