//! Decode speed and KV memory of sliding-window layers with ring buffers vs a full cache.
//!
//! ```text
//! cargo run --release -p pocketlm-runtime --example window_cache_bench -- MODEL.plm [CONTEXT] [TOKENS]
//! ```
//!
//! Fills the cache to CONTEXT positions (default 4096) with a fixed token pattern, then
//! times TOKENS (default 32) single-token decode steps, once with ring buffers and once with
//! every layer keeping the whole context. Threads: rayon's (set `RAYON_NUM_THREADS`).

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
    for ring in [true, false] {
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
        println!(
            "{}: KV cache {:.1} MiB, decode at {context} context: {:.1} tok/s",
            if ring { "ring buffers" } else { "full cache  " },
            cache.memory_bytes() as f64 / (1 << 20) as f64,
            tokens as f64 / seconds
        );
    }
    Ok(())
}
