//! Speed benchmark in the shape of llama.cpp's `llama-bench`: prefill of a `pp`-token prompt
//! and decode of `tg` tokens, repeated; plus time to first token, resident memory and the
//! memory-bandwidth bound of decode.

use std::time::Instant;

use pocketlm_runtime::model::{Logits, Model, ModelError};
use pocketlm_runtime::sampler::argmax;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub repetitions: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            prompt_tokens: 128,
            generated_tokens: 64,
            repetitions: 3,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub repetitions: usize,
    /// Best of the repetitions (as llama-bench's mean is dominated by the same steady state;
    /// the spread is reported beside it).
    pub prefill_tokens_per_s: f64,
    pub prefill_tokens_per_s_min: f64,
    pub decode_tokens_per_s: f64,
    pub decode_tokens_per_s_min: f64,
    /// Prefill of the prompt plus choosing the first token, from a cold KV cache.
    pub ttft_ms: f64,
    /// Bytes of weights one decode step reads (every matrix once, one embedding row).
    pub bytes_per_token: u64,
    /// Single-pass read bandwidth measured on this machine with the same threads (GB/s).
    pub read_bandwidth_gb_s: f64,
    /// The buffer that bandwidth was read from ([`bandwidth_buffer_bytes`]).
    pub read_bandwidth_buffer_mb: f64,
    /// Decode speed if every step were limited only by reading the weights once.
    pub bandwidth_bound_tokens_per_s: f64,
    /// `decode_tokens_per_s / bandwidth_bound_tokens_per_s`.
    pub bandwidth_efficiency: f64,
    pub peak_rss_mb: Option<f64>,
    /// Resident pages backed by the model file (shared, reclaimable) vs anonymous memory.
    pub rss_file_mb: Option<f64>,
    pub rss_anon_mb: Option<f64>,
    pub threads: usize,
    pub kernel_path: &'static str,
}

/// Runs the benchmark. Prompt tokens are a fixed pseudo-random sequence over the vocabulary
/// (as llama-bench does), so results do not depend on a text file.
pub fn bench(model: &Model, options: &BenchOptions) -> Result<BenchResult, ModelError> {
    let config = model.config();
    let prompt: Vec<u32> = (0..options.prompt_tokens as u64)
        .map(|i| ((i * 2_654_435_761 + 12_345) % config.vocab_size as u64) as u32)
        .collect();
    let capacity = options.prompt_tokens + options.generated_tokens + 1;
    let mut cache = model.new_cache(capacity)?;
    if cache.capacity() < capacity {
        return Err(ModelError::ContextFull {
            needed: capacity,
            capacity: cache.capacity(),
        });
    }
    // Warm-up: touches every weight page once, so runs measure steady state like llama-bench.
    model.forward(&prompt[..prompt.len().min(8)], &mut cache, Logits::Last)?;

    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut ttft_ms = f64::INFINITY;
    for _ in 0..options.repetitions.max(1) {
        cache.clear();
        let started = Instant::now();
        let mut logits = if prompt.is_empty() {
            Vec::new()
        } else {
            model.forward(&prompt, &mut cache, Logits::Last)?
        };
        let prefill_s = started.elapsed().as_secs_f64();
        let mut token = if logits.is_empty() {
            0
        } else {
            argmax(&logits) as u32
        };
        ttft_ms = ttft_ms.min(started.elapsed().as_secs_f64() * 1e3);
        if !prompt.is_empty() {
            prefill.push(prompt.len() as f64 / prefill_s);
        }
        if options.generated_tokens > 0 {
            let started = Instant::now();
            for _ in 0..options.generated_tokens {
                logits = model.forward(&[token], &mut cache, Logits::Last)?;
                token = argmax(&logits) as u32;
            }
            decode.push(options.generated_tokens as f64 / started.elapsed().as_secs_f64());
        }
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let worst = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min).min(best(v));
    // Before the bandwidth test, whose buffer would otherwise count as peak memory.
    let memory = ResidentMemory::read();
    let bytes_per_token = decode_bytes_per_token(model);
    let buffer_bytes = bandwidth_buffer_bytes();
    let read_bandwidth_gb_s = read_bandwidth(buffer_bytes);
    let bound = read_bandwidth_gb_s * 1e9 / bytes_per_token.max(1) as f64;
    let decode_best = best(&decode);
    Ok(BenchResult {
        prompt_tokens: options.prompt_tokens,
        generated_tokens: options.generated_tokens,
        repetitions: options.repetitions.max(1),
        prefill_tokens_per_s: best(&prefill),
        prefill_tokens_per_s_min: worst(&prefill),
        decode_tokens_per_s: decode_best,
        decode_tokens_per_s_min: worst(&decode),
        ttft_ms,
        bytes_per_token,
        read_bandwidth_gb_s,
        read_bandwidth_buffer_mb: buffer_bytes as f64 / (1 << 20) as f64,
        bandwidth_bound_tokens_per_s: bound,
        bandwidth_efficiency: if bound > 0.0 {
            decode_best / bound
        } else {
            0.0
        },
        peak_rss_mb: memory.peak_mb,
        rss_file_mb: memory.file_mb,
        rss_anon_mb: memory.anon_mb,
        threads: rayon::current_num_threads(),
        kernel_path: pocketlm_kernels::active_path().name(),
    })
}

/// Weight bytes a decode step reads: the block matrices as served (a low-rank layer served at
/// a lower rank reads only its first components), the norms, the output layer, and one row
/// of the embedding table (plus the whole table again when it doubles as the output layer).
pub fn decode_bytes_per_token(model: &Model) -> u64 {
    let config = model.config();
    let mut bytes: u64 = model.block_linears().iter().map(|l| l.bytes_read()).sum();
    for t in model.used_tensors() {
        let block_matrix = t.name.starts_with("blk.") && t.shape.len() == 2;
        if t.name == pocketlm_format::config::names::TOKEN_EMBD {
            bytes += t.length / config.vocab_size.max(1) as u64;
            if config.tie_word_embeddings {
                bytes += t.length;
            }
        } else if !block_matrix {
            bytes += t.length;
        }
    }
    bytes
}

/// Bytes of the buffer [`measure_read_bandwidth`] reads: four times the largest CPU cache,
/// so that the passes stream from memory as a model larger than the cache does (a 256 MiB
/// buffer on a CPU with a 300 MiB L3 measured the cache, not memory), and at least 256 MiB.
pub fn bandwidth_buffer_bytes() -> usize {
    const MIN: usize = 256 << 20;
    const MAX: usize = 4 << 30;
    largest_cache_bytes().map_or(MIN, |cache| cache.saturating_mul(4).clamp(MIN, MAX))
}

/// The largest cache of CPU 0 as sysfs describes it (Linux/Android), if it does.
fn largest_cache_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|entry| {
        let size = std::fs::read_to_string(entry.ok()?.path().join("size")).ok()?;
        parse_cache_size(&size)
    })
    .max()
}

/// sysfs writes cache sizes as `32768K` (or `M`, or plain bytes).
fn parse_cache_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let value: usize = digits.parse().ok()?;
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    value.checked_mul(scale)
}

/// Read bandwidth of a [`bandwidth_buffer_bytes`] buffer summed by every pool thread (best
/// of three passes), in GB/s.
pub fn measure_read_bandwidth() -> f64 {
    read_bandwidth(bandwidth_buffer_bytes())
}

/// Read bandwidth of a `bytes` buffer, as [`measure_read_bandwidth`] measures it.
fn read_bandwidth(bytes: usize) -> f64 {
    use rayon::prelude::*;
    let buffer: Vec<u64> = (0..bytes / 8).into_par_iter().map(|i| i as u64).collect();
    let mut best = 0.0f64;
    let mut checksum = 0u64;
    for _ in 0..3 {
        let started = Instant::now();
        let sum: u64 = buffer
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
            .reduce(|| 0, u64::wrapping_add);
        let seconds = started.elapsed().as_secs_f64();
        checksum = checksum.wrapping_add(sum);
        best = best.max(bytes as f64 / seconds / 1e9);
    }
    // Keeps the sums observable so the reads cannot be optimised away.
    std::hint::black_box(checksum);
    best
}

/// Resident memory of this process from /proc (Linux/Android); `None` elsewhere.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResidentMemory {
    pub peak_mb: Option<f64>,
    pub file_mb: Option<f64>,
    pub anon_mb: Option<f64>,
}

impl ResidentMemory {
    pub fn read() -> ResidentMemory {
        let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
            return ResidentMemory::default();
        };
        let field = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
        };
        ResidentMemory {
            peak_mb: field("VmHWM:"),
            file_mb: field("RssFile:"),
            anon_mb: field("RssAnon:"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        assert_eq!(parse_cache_size("32768K\n"), Some(32 << 20));
        assert_eq!(parse_cache_size("300M"), Some(300 << 20));
        assert_eq!(parse_cache_size("1G"), Some(1 << 30));
        assert_eq!(parse_cache_size("49152"), Some(49152));
        assert_eq!(parse_cache_size("12Q"), None);
        assert_eq!(parse_cache_size("K"), None);
    }

    #[test]
    fn the_bandwidth_buffer_is_at_least_256_mib_and_covers_the_cache_four_times() {
        let bytes = bandwidth_buffer_bytes();
        assert!(bytes >= 256 << 20);
        if let Some(cache) = largest_cache_bytes() {
            assert!(
                bytes >= (cache * 4).min(4 << 30),
                "{bytes} for a {cache}-byte cache"
            );
        }
    }
}
