//! Cost of one continuous-batching decode step against the number of sequences in it.
//!
//! ```text
//! cargo run --release -p pocketlm-runtime --example batch_step_bench -- MODEL.plm [ROWS...] [--steps N]
//! ```
//!
//! For each row count (default 1 2 4 8) it prefills that many caches with 16 prompt tokens,
//! then times `--steps` (default 16) steps of [`Model::forward_batch`] with one new token per
//! sequence, and one `Model::forward` per step for the single-sequence reference. Prints the
//! time per step, the aggregate tokens per second and the cost of a step relative to one
//! row: a step that only read the weights once would cost little more than one row on a model
//! that decodes from memory. Threads: rayon's (`RAYON_NUM_THREADS`).

use std::path::PathBuf;
use std::time::Instant;

use pocketlm_runtime::model::{BatchInput, KvCache, Logits, Model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut path = None;
    let mut rows: Vec<usize> = Vec::new();
    let mut steps = 16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--steps" {
            steps = args.next().ok_or("--steps needs a number")?.parse()?;
        } else if path.is_none() {
            path = Some(PathBuf::from(a));
        } else {
            rows.push(a.parse()?);
        }
    }
    let path = path.ok_or("usage: batch_step_bench MODEL.plm [ROWS...] [--steps N]")?;
    if rows.is_empty() {
        rows = vec![1, 2, 4, 8];
    }
    let model = Model::open(&path)?;
    let vocab = model.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..16u32).map(|i| (i * 7 + 3) % vocab).collect();

    // Single-sequence reference through the ordinary forward pass.
    let mut cache = model.new_cache(16 + steps + 1)?;
    model.forward(&prompt, &mut cache, Logits::Last)?;
    let start = Instant::now();
    for s in 0..steps {
        model.forward(&[(s as u32 * 13 + 5) % vocab], &mut cache, Logits::Last)?;
    }
    let single_ms = start.elapsed().as_secs_f64() * 1e3 / steps as f64;
    println!(
        "forward, 1 sequence: {single_ms:.2} ms per step, {:.1} tok/s",
        1e3 / single_ms
    );

    println!(
        "{:>4}  {:>12}  {:>14}  {:>16}",
        "rows", "ms per step", "aggregate tok/s", "step / 1-row step"
    );
    for &n in &rows {
        let mut caches: Vec<KvCache> = (0..n)
            .map(|_| model.new_cache(16 + steps + 1))
            .collect::<Result<_, _>>()?;
        for cache in &mut caches {
            model.forward(&prompt, cache, Logits::Last)?;
        }
        let start = Instant::now();
        for s in 0..steps {
            let tokens: Vec<[u32; 1]> = (0..n)
                .map(|i| [((s * n + i) as u32 * 13 + 5) % vocab])
                .collect();
            let mut inputs: Vec<BatchInput<'_>> = caches
                .iter_mut()
                .zip(&tokens)
                .map(|(cache, t)| BatchInput {
                    tokens: t,
                    cache,
                    logits: true,
                })
                .collect();
            model.forward_batch(&mut inputs)?;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / steps as f64;
        println!(
            "{n:>4}  {ms:>12.2}  {:>14.1}  {:>16.2}",
            n as f64 * 1e3 / ms,
            ms / single_ms
        );
    }
    Ok(())
}
