//! Flags every command takes (`global = true`), most with an environment variable so that
//! scripts and apps can set them once.

use clap::Args;
use pocketlm_kernels::KernelPath;
use pocketlm_runtime::model::{KvType, Profile, VerifyMode};

#[derive(Args)]
pub struct GlobalArgs {
    /// Worker threads (default: one per performance core; all cores when they are alike).
    #[arg(short = 't', long, global = true)]
    pub threads: Option<usize>,
    /// Cores to run on, pinned: a hex mask (0xf0) or a list (0-3,6). Default: the
    /// performance cores of a big.LITTLE CPU, pinned; elsewhere the OS places the workers.
    #[arg(long, global = true, value_name = "MASK", value_parser = parse_cpu_mask)]
    pub cpu_mask: Option<CpuMask>,
    /// Run one-token products on rayon's work-stealing pool instead of the decode team
    /// (helper threads that spin between the products of a decode step; used with 2+
    /// threads, on the pinned cores when there are any). For comparisons.
    #[arg(long, global = true)]
    pub no_decode_team: bool,
    /// Serve low-rank layers with this percentage of their stored rank (1-100; default 100):
    /// one file, several operating points.
    #[arg(long, global = true, value_name = "P", env = "POCKETLM_LOW_RANK_PERCENT",
          value_parser = parse_percent)]
    pub low_rank_percent: Option<u8>,
    /// KV cache storage: f32 (default), or q8 (int8 with a scale per head vector: 3.8x less
    /// memory for 64-wide heads).
    #[arg(long, global = true, value_name = "TYPE", env = "POCKETLM_KV_CACHE",
          value_parser = parse_kv_type)]
    pub kv_cache: Option<KvType>,
    /// Operating point of an elastic file: small (base weights only, low-rank layers at half
    /// rank), balanced (residuals of attn_v and ffn_down, 75% rank) or best (everything
    /// stored; the default).
    #[arg(long, global = true, value_name = "PROFILE", env = "POCKETLM_PROFILE")]
    pub profile: Option<Profile>,
    /// Largest weight footprint (e.g. 100MB): serve the best profile whose weights fit.
    #[arg(long, global = true, value_name = "SIZE", value_parser = pocketlm_format::parse_size)]
    pub memory_limit: Option<u64>,
    /// Check tensor checksums when a model is opened: off (default), eager (every tensor at
    /// open) or lazy (each tensor before its first use). `pocketlm verify` checks a file
    /// offline.
    #[arg(long, global = true, value_name = "MODE", env = "POCKETLM_VERIFY",
          value_parser = parse_verify_mode)]
    pub verify: Option<VerifyMode>,
    /// Kernel path instead of the detected one: scalar, generic, avx2, avxvnni, avx512 (x86),
    /// neon, dotprod, i8mm (ARM). A path this CPU lacks falls back to detection, with a
    /// warning.
    #[arg(long, global = true, value_name = "PATH", env = "POCKETLM_KERNELS",
          value_parser = parse_kernel_path)]
    pub kernels: Option<KernelPath>,
}

/// The cores of `--cpu-mask` (a newtype: clap would take a bare `Vec` for a repeated flag).
#[derive(Clone, Debug)]
pub struct CpuMask(pub Vec<usize>);

fn parse_cpu_mask(s: &str) -> Result<CpuMask, String> {
    pocketlm_runtime::cpu::parse_cpu_mask(s)
        .map(CpuMask)
        .map_err(|e| e.to_string())
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
        let known: Vec<&str> = KernelPath::ALL.iter().map(|p| p.name()).collect();
        format!("unknown kernel path {s:?} ({})", known.join(", "))
    })
}
