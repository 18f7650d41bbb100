//! `pocketlm bench`: prefill and decode speed, time to first token, memory.

use crate::args::{BenchArgs, JsonOutput};
use crate::commands::CliResult;
use crate::model_options::open_model;

pub fn execute(args: BenchArgs) -> CliResult {
    let BenchArgs {
        model: path,
        prompt_tokens,
        gen_tokens: generated_tokens,
        repetitions,
        output: JsonOutput { json },
    } = args;
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
