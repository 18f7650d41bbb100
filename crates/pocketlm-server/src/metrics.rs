//! Counters and histograms for `GET /metrics`, written in Prometheus' text format by hand
//! (a handful of series do not need a metrics crate). Updated from the slot threads and the
//! request handlers without locks except for the per-route request counts.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What the scheduler reports at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SchedulerGauges {
    pub slots: usize,
    pub busy_slots: usize,
    pub queue_depth: usize,
    /// KV cache bytes allocated for all slots (fixed at start).
    pub kv_cache_allocated_bytes: u64,
    /// KV cache bytes holding positions (cached history plus running prompts).
    pub kv_cache_used_bytes: u64,
}

#[derive(Debug)]
struct Histogram {
    /// Upper bounds in seconds, ascending; `+Inf` is implied.
    bounds: &'static [f64],
    /// Observations at or below each bound (not cumulative; summed when written).
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.bounds.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", self.count.load(Ordering::Relaxed));
    }
}

const TTFT_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const TOKEN_LATENCY_BOUNDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

#[derive(Debug)]
pub struct Metrics {
    /// (route, status) → responses.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    prompt_tokens: AtomicU64,
    cached_prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cancelled_generations: AtomicU64,
    time_to_first_token: Histogram,
    token_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            cached_prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            cancelled_generations: AtomicU64::new(0),
            time_to_first_token: Histogram::new(TTFT_BOUNDS),
            token_latency: Histogram::new(TOKEN_LATENCY_BOUNDS),
        }
    }
}

impl Metrics {
    pub fn record_response(&self, route: &'static str, status: u16) {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *requests.entry((route, status)).or_default() += 1;
    }

    /// A finished generation's token counts.
    pub fn record_generation(&self, prompt: usize, cached: usize, completion: usize) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.cached_prompt_tokens
            .fetch_add(cached as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
    }

    pub fn record_cancelled(&self) {
        self.cancelled_generations.fetch_add(1, Ordering::Relaxed);
    }

    /// From the request's arrival (queueing included) to its first generated token.
    pub fn observe_time_to_first_token(&self, value: Duration) {
        self.time_to_first_token.observe(value);
    }

    /// Between two streamed pieces of text of one generation.
    pub fn observe_token_latency(&self, value: Duration) {
        self.token_latency.observe(value);
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self, gauges: SchedulerGauges) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP pocketlm_requests_total HTTP responses by route and status code.\n\
             # TYPE pocketlm_requests_total counter\n",
        );
        {
            let requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            for ((route, status), count) in requests.iter() {
                let _ = writeln!(
                    out,
                    "pocketlm_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}"
                );
            }
        }
        let counters = [
            (
                "pocketlm_prompt_tokens_total",
                "Prompt tokens of finished generations (reused ones included).",
                &self.prompt_tokens,
            ),
            (
                "pocketlm_prompt_tokens_cached_total",
                "Prompt tokens reused from a slot's KV cache instead of computed.",
                &self.cached_prompt_tokens,
            ),
            (
                "pocketlm_completion_tokens_total",
                "Generated tokens.",
                &self.completion_tokens,
            ),
            (
                "pocketlm_generations_cancelled_total",
                "Generations stopped early because the client went away or the server shut down.",
                &self.cancelled_generations,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let gauge_rows = [
            (
                "pocketlm_slots",
                "Slots (sessions with their own KV cache).",
                gauges.slots as u64,
            ),
            (
                "pocketlm_slots_busy",
                "Slots running a request.",
                gauges.busy_slots as u64,
            ),
            (
                "pocketlm_queue_depth",
                "Requests waiting for a free slot.",
                gauges.queue_depth as u64,
            ),
            (
                "pocketlm_kv_cache_allocated_bytes",
                "KV cache memory reserved for all slots.",
                gauges.kv_cache_allocated_bytes,
            ),
            (
                "pocketlm_kv_cache_used_bytes",
                "KV cache memory holding positions (cached histories and running prompts).",
                gauges.kv_cache_used_bytes,
            ),
        ];
        for (name, help, value) in gauge_rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        self.time_to_first_token.write(
            &mut out,
            "pocketlm_time_to_first_token_seconds",
            "From a request's arrival (queueing included) to its first generated token.",
        );
        self.token_latency.write(
            &mut out,
            "pocketlm_token_latency_seconds",
            "Time between consecutive streamed tokens of a generation.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let metrics = Metrics::default();
        metrics.observe_time_to_first_token(Duration::from_millis(3));
        metrics.observe_time_to_first_token(Duration::from_millis(70));
        metrics.observe_time_to_first_token(Duration::from_secs(100));
        let text = metrics.render(SchedulerGauges::default());
        assert!(text.contains("pocketlm_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("pocketlm_time_to_first_token_seconds_bucket{le=\"0.1\"} 2"));
        assert!(text.contains("pocketlm_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("pocketlm_time_to_first_token_seconds_count 3"));
    }
}
