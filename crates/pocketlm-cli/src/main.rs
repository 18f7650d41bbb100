//! `pocketlm` command line: convert, run, inspect, verify, eval.
//!
//! `args` declares the flags, `commands` carries them out; commands open models through
//! `model_options::open_model`, so the global flags reach every one of them.

mod args;
mod commands;
mod model_options;
mod progress;

use std::process::ExitCode;

use clap::Parser;
use pocketlm_kernels::KernelPath;
use pocketlm_kernels::pool::on_team;
use pocketlm_runtime::cpu::{CpuTopology, plan_threads};

use crate::args::Cli;
use crate::model_options::{
    CPU_MASK, DECODE_TEAM, MODEL_OPTIONS, THREAD_PLACEMENT, decode_team, model_options,
};

/// Exit status of a process whose output pipe closed (128 + SIGPIPE, as if the signal ended it).
const BROKEN_PIPE_STATUS: i32 = 141;

/// `pocketlm inspect --json | head`: once the reader has gone, `println!` panics on the
/// broken pipe. Rust ignores SIGPIPE, so that panic is how the CLI learns its output is no
/// longer wanted; it then exits quietly, as a Unix tool killed by SIGPIPE would, instead of
/// printing a panic and a backtrace.
fn exit_quietly_on_broken_pipe() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(BROKEN_PIPE_STATUS);
        }
        default_hook(info);
    }));
}

fn main() -> ExitCode {
    exit_quietly_on_broken_pipe();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let _ = MODEL_OPTIONS.set(model_options(&cli.global));
    let _ = CPU_MASK.set(
        cli.global
            .cpu_mask
            .as_ref()
            .map_or_else(Vec::new, |m| m.0.clone()),
    );
    if let Some(path) = cli.global.kernels {
        select_kernels(path);
    }
    let placement = plan_threads(
        &CpuTopology::detect(),
        cli.global.threads.unwrap_or(0),
        cli.global.cpu_mask.as_ref().map_or(&[], |m| &m.0),
    );
    log::info!(
        "{} worker threads, pinned to cores {:?}",
        placement.threads,
        placement.pinned_cores
    );
    let pool = match placement.build_pool(|i| format!("pocketlm-{i}")) {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("error: cannot start the thread pool: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = DECODE_TEAM.set(!cli.global.no_decode_team);
    let _ = THREAD_PLACEMENT.set(placement.clone());
    let team = decode_team(&placement);
    // Run on a pool thread: each parallel product then starts from inside the pool instead
    // of waking it from outside (a futex round trip per matrix on short decode steps); with a
    // decode team, one-token products go to its spinning helpers.
    let result = pool.install(|| on_team(team.as_ref(), || commands::execute(cli.command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--kernels`: a path this CPU lacks falls back to the detected one, with a warning.
fn select_kernels(path: KernelPath) {
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
