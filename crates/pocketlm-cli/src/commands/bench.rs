//! `pocketlm bench`: prefill and decode speed, time to first token, memory.

use pocketlm_eval::bench::{BenchOptions, BenchResult};
use pocketlm_runtime::cpu::{CpuTopology, plan_threads};

use crate::args::{BenchArgs, JsonOutput};
use crate::commands::CliResult;
use crate::model_options::{CPU_MASK, decode_team, open_model};
use pocketlm_kernels::pool::on_team;

pub fn execute(args: BenchArgs) -> CliResult {
    let BenchArgs {
        model: path,
        prompt_tokens,
        gen_tokens: generated_tokens,
        repetitions,
        threads_sweep,
        output: JsonOutput { json },
    } = args;
    let model = open_model(&path)?;
    let options = BenchOptions {
        prompt_tokens,
        generated_tokens,
        repetitions,
    };
    if let Some(counts) = threads_sweep {
        return sweep_threads(&model, &options, &counts, json);
    }
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
        "bandwidth bound   {:.1} tok/s = {:.1} GB/s read ({:.0} MiB buffer) / {:.1} MB per token; decode at {:.0}%",
        r.bandwidth_bound_tokens_per_s,
        r.read_bandwidth_gb_s,
        r.read_bandwidth_buffer_mb,
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

/// `--threads-sweep`: the test once per thread count, each on a pool of that size placed as
/// the global `--threads` would place it; one row per count (one JSON array with `--json`).
fn sweep_threads(
    model: &pocketlm_runtime::Model,
    options: &BenchOptions,
    counts: &[usize],
    json: bool,
) -> CliResult {
    let topology = CpuTopology::detect();
    let mask = CPU_MASK.get().map_or(&[][..], Vec::as_slice);
    if !json {
        println!(
            "{:>7}  {:>12}  {:>12}  {:>9}  {:>9}  {:>11}  {:>12}",
            "threads",
            format!("pp{} tok/s", options.prompt_tokens),
            format!("tg{} tok/s", options.generated_tokens),
            "ttft ms",
            "read GB/s",
            "bound tok/s",
            "of bandwidth"
        );
    }
    let mut results: Vec<BenchResult> = Vec::new();
    for &threads in counts {
        if threads == 0 {
            return Err(
                format!("--threads-sweep: thread counts start at 1 (got {threads})").into(),
            );
        }
        let placement = plan_threads(&topology, threads, mask);
        let pool = placement.build_pool(|i| format!("pocketlm-sweep-{i}"))?;
        let team = decode_team(&placement);
        let r = pool.install(|| {
            on_team(team.as_ref(), || {
                pocketlm_eval::bench::bench(model, options)
            })
        })?;
        if !json {
            println!(
                "{:>7}  {:>12.1}  {:>12.1}  {:>9.1}  {:>9.1}  {:>11.1}  {:>11.0}%",
                r.threads,
                r.prefill_tokens_per_s,
                r.decode_tokens_per_s,
                r.ttft_ms,
                r.read_bandwidth_gb_s,
                r.bandwidth_bound_tokens_per_s,
                r.bandwidth_efficiency * 100.0
            );
        }
        results.push(r);
    }
    if json {
        println!("{}", serde_json::to_string(&results)?);
    }
    Ok(())
}
