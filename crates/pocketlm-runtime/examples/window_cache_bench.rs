//! Decode speed and KV memory of sliding-window layers with ring buffers vs a full cache.
//!
//! ```text
//! cargo run --release -p pocketlm-runtime --example window_cache_bench -- MODEL.plm [CONTEXT] [TOKENS]
//! ```
//!
//! Fills the cache to CONTEXT positions (default 4096) with a fixed token pattern, then
//! times TOKENS (default 32) single-token decode steps, with ring buffers and with every layer
//! keeping the whole context, twice each, interleaved. Besides wall time it reports tokens
//! per second of process CPU time (Linux `/proc/self/stat`), which a machine shared with
//! other jobs disturbs less. Threads: rayon's (set `RAYON_NUM_THREADS=1`).

use std::path::PathBuf;
use std::time::Instant;

use pocketlm_runtime::model::{Logits, Model, ModelOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(
        args.next()
            .ok_or("usage: window_cache_bench MODEL.plm [CONTEXT] [TOKENS]")?,
    );
    let context: usize = args.next().map_or(Ok(4096), |a| a.parse())?;
    let tokens: usize = args.next().map_or(Ok(32), |a| a.parse())?;
    for ring in [true, false, true, false] {
        let options = ModelOptions {
            window_ring_buffers: ring,
            ..ModelOptions::default()
        };
        let model = Model::open_with(&path, options)?;
        let vocab = model.config().vocab_size as u32;
        let mut cache = model.new_cache(context + tokens)?;
        let prompt: Vec<u32> = (0..context as u32).map(|i| (i * 7 + 3) % vocab).collect();
        for chunk in prompt.chunks(256) {
            model.forward(chunk, &mut cache, Logits::Last)?;
        }
        let mut next = 1;
        let cpu_start = cpu_seconds();
        let start = Instant::now();
        for _ in 0..tokens {
            let logits = model.forward(&[next], &mut cache, Logits::Last)?;
            next = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i as u32);
        }
        let seconds = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds().zip(cpu_start).map(|(end, start)| end - start);
        println!(
            "{}: KV cache {:.1} MiB, decode at {context} context: {:.1} tok/s wall, {} tok/s CPU time",
            if ring { "ring buffers" } else { "full cache  " },
            cache.memory_bytes() as f64 / (1 << 20) as f64,
            tokens as f64 / seconds,
            cpu.map_or("?".into(), |c| format!("{:.1}", tokens as f64 / c))
        );
    }
    Ok(())
}

/// User + system CPU seconds of this process (Linux; clock ticks of 1/100 s).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
