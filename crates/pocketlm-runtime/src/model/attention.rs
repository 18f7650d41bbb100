//! Grouped-query causal attention over a per-layer KV cache.

use rayon::prelude::*;

use pocketlm_format::config::ModelConfig;
use pocketlm_kernels as kernels;

/// How a KV cache stores keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// f32, as computed.
    #[default]
    F32,
    /// int8 with one f32 scale per head vector (one position of one KV head), rounded to
    /// nearest: 3.8× smaller than f32 for 64-wide heads, so long contexts fit small devices.
    Q8,
}

impl KvType {
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::Q8 => "q8",
        }
    }

    pub fn parse(name: &str) -> Option<KvType> {
        match name.trim().to_ascii_lowercase().as_str() {
            "f32" => Some(KvType::F32),
            "q8" | "int8" => Some(KvType::Q8),
            _ => None,
        }
    }

    /// Bytes one head vector of `head_dim` values occupies.
    pub fn head_bytes(self, head_dim: usize) -> Option<usize> {
        match self {
            KvType::F32 => head_dim.checked_mul(4),
            KvType::Q8 => head_dim.checked_add(4),
        }
    }
}

/// One layer's keys (or values): `capacity × kv_dim` values.
#[derive(Clone)]
enum Store {
    F32(Vec<f32>),
    /// Codes `capacity × kv_dim`, one scale per head vector (`capacity × kv_heads`).
    Q8 {
        codes: Vec<i8>,
        scales: Vec<f32>,
    },
}

impl Store {
    fn try_new(
        kind: KvType,
        values: usize,
        heads: usize,
    ) -> Result<Store, std::collections::TryReserveError> {
        fn zeroed<T: Clone + Default>(
            n: usize,
        ) -> Result<Vec<T>, std::collections::TryReserveError> {
            let mut v = Vec::new();
            v.try_reserve_exact(n)?;
            v.resize(n, T::default());
            Ok(v)
        }
        Ok(match kind {
            KvType::F32 => Store::F32(zeroed(values)?),
            KvType::Q8 => Store::Q8 {
                codes: zeroed(values)?,
                scales: zeroed(heads)?,
            },
        })
    }

    /// Stores `x` (whole head vectors of `head_dim`) from value offset `at`.
    fn write(&mut self, at: usize, x: &[f32], head_dim: usize) {
        match self {
            Store::F32(v) => v[at..at + x.len()].copy_from_slice(x),
            Store::Q8 { codes, scales } => {
                let codes = &mut codes[at..at + x.len()];
                let first = at / head_dim;
                for (h, (xs, qs)) in x
                    .chunks_exact(head_dim)
                    .zip(codes.chunks_exact_mut(head_dim))
                    .enumerate()
                {
                    let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let scale = amax / 127.0;
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    for (q, v) in qs.iter_mut().zip(xs) {
                        *q = (v * inv).round() as i8;
                    }
                    scales[first + h] = scale;
                }
            }
        }
    }
}

/// One layer's stored keys or values for the cached positions (see [`KvCache::stored_rows`]).
pub(crate) enum StoredRows<'a> {
    F32(&'a [f32]),
    /// Codes `len × kv_dim` and one scale per head vector (`len × kv_heads`).
    Q8 {
        codes: &'a [i8],
        scales: &'a [f32],
    },
}

/// Keys and values of every layer for positions `0..len`, preallocated for `capacity`.
///
/// A sliding-window layer whose window is shorter than the capacity keeps a ring buffer of
/// `window` slots instead (position `p` in slot `p % window`): its memory is bounded by the
/// window, not the context.
#[derive(Clone)]
pub struct KvCache {
    keys: Vec<Store>,
    values: Vec<Store>,
    /// Per layer, the ring size of a windowed layer; `None` for a layer holding every position.
    rings: Vec<Option<usize>>,
    kind: KvType,
    kv_dim: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    /// An f32 cache (the converter's calibration passes).
    pub fn new(num_layers: usize, kv_dim: usize, capacity: usize) -> KvCache {
        KvCache::try_new(KvType::F32, num_layers, kv_dim, kv_dim, capacity)
            .expect("KV cache allocation")
    }

    /// Bytes a cache of this geometry needs (keys and values, all layers); `None` on overflow.
    pub fn required_bytes(
        kind: KvType,
        num_layers: usize,
        kv_dim: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Option<usize> {
        let heads = kv_dim / head_dim.max(1);
        2usize
            .checked_mul(num_layers)?
            .checked_mul(heads)?
            .checked_mul(capacity)?
            .checked_mul(kind.head_bytes(head_dim)?)
    }

    /// Bytes of a cache whose layers have the given windows (`None`: full context), each
    /// windowed layer holding only `min(window, capacity)` positions.
    pub fn required_bytes_windowed(
        kind: KvType,
        windows: &[Option<usize>],
        kv_dim: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Option<usize> {
        windows.iter().try_fold(0usize, |sum, w| {
            let slots = w.map_or(capacity, |w| w.min(capacity));
            sum.checked_add(KvCache::required_bytes(kind, 1, kv_dim, head_dim, slots)?)
        })
    }

    /// A cache of `kind` for `capacity` positions of `num_layers` layers of `kv_dim` values
    /// in heads of `head_dim`; reports allocation failure instead of aborting the process.
    pub fn try_new(
        kind: KvType,
        num_layers: usize,
        kv_dim: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<KvCache, std::collections::TryReserveError> {
        KvCache::try_new_windowed(kind, &vec![None; num_layers], kv_dim, head_dim, capacity)
    }

    /// [`KvCache::try_new`] where layer `l` attends to `windows[l]` positions (`None`: all):
    /// those with a window shorter than `capacity` get a ring buffer of the window.
    pub fn try_new_windowed(
        kind: KvType,
        windows: &[Option<usize>],
        kv_dim: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<KvCache, std::collections::TryReserveError> {
        assert!(
            head_dim > 0 && kv_dim.is_multiple_of(head_dim),
            "KV cache: kv_dim {kv_dim} is not a whole number of heads of {head_dim}"
        );
        let num_layers = windows.len();
        let rings: Vec<Option<usize>> = windows
            .iter()
            .map(|w| w.filter(|&w| w > 0 && w < capacity))
            .collect();
        let mut keys = Vec::new();
        let mut vals = Vec::new();
        keys.try_reserve_exact(num_layers)?;
        vals.try_reserve_exact(num_layers)?;
        for ring in &rings {
            let slots = ring.unwrap_or(capacity);
            let values = slots.saturating_mul(kv_dim);
            let heads = slots.saturating_mul(kv_dim / head_dim);
            keys.push(Store::try_new(kind, values, heads)?);
            vals.push(Store::try_new(kind, values, heads)?);
        }
        Ok(KvCache {
            keys,
            values: vals,
            rings,
            kind,
            kv_dim,
            head_dim,
            capacity,
            len: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn kind(&self) -> KvType {
        self.kind
    }

    /// Bytes held by the cache (both keys and values, all layers).
    pub fn memory_bytes(&self) -> usize {
        let windows: Vec<Option<usize>> = self.rings.clone();
        KvCache::required_bytes_windowed(
            self.kind,
            &windows,
            self.kv_dim,
            self.head_dim,
            self.capacity,
        )
        .unwrap_or(usize::MAX)
    }

    /// Whether `layer` keeps a ring buffer (of the returned number of positions).
    pub fn ring(&self, layer: usize) -> Option<usize> {
        self.rings.get(layer).copied().flatten()
    }

    /// Whether [`KvCache::truncate`] to `new_len` keeps every position `0..new_len` usable.
    /// Prefix reuse asks this first: a cache that overwrites old positions (a sliding-window
    /// ring buffer) can only go back as far as the positions it still holds.
    pub fn can_truncate_to(&self, new_len: usize) -> bool {
        new_len <= self.len
            && self.rings.iter().flatten().all(|&window| {
                // The token at `new_len` attends back to `new_len - window + 1`; the ring
                // holds `len - window..len`.
                new_len.saturating_sub(window - 1) >= self.len.saturating_sub(window)
            })
    }

    /// Forgets positions `new_len..` (e.g. to reuse a shared prompt prefix). Ring layers
    /// are only correct afterwards where [`KvCache::can_truncate_to`] said so.
    pub fn truncate(&mut self, new_len: usize) {
        self.len = self.len.min(new_len);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn num_layers(&self) -> usize {
        self.keys.len()
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Rows `layer` holds when the cache holds `len` positions: all of them, or the last
    /// `window` of a ring layer (position `p` in row `p % window`).
    pub fn rows_held(&self, layer: usize, len: usize) -> usize {
        self.ring(layer).map_or(len, |window| len.min(window))
    }

    /// What one layer's keys (`values == false`) or values hold for the cached positions, as
    /// stored (a ring layer's rows in slot order): saved sessions write exactly these rows.
    pub(crate) fn stored_rows(&self, layer: usize, values: bool) -> StoredRows<'_> {
        let store = if values {
            &self.values[layer]
        } else {
            &self.keys[layer]
        };
        let rows = self.rows_held(layer, self.len);
        let n = rows * self.kv_dim;
        let heads = rows * (self.kv_dim / self.head_dim);
        match store {
            Store::F32(v) => StoredRows::F32(&v[..n]),
            Store::Q8 { codes, scales } => StoredRows::Q8 {
                codes: &codes[..n],
                scales: &scales[..heads],
            },
        }
    }

    /// Writes rows saved by [`KvCache::stored_rows`] back into positions `0..` of one layer.
    /// The caller has checked kind and lengths against this cache; [`KvCache::set_len`]
    /// declares them once every layer is written.
    pub(crate) fn restore_rows(&mut self, layer: usize, values: bool, rows: StoredRows<'_>) {
        let store = if values {
            &mut self.values[layer]
        } else {
            &mut self.keys[layer]
        };
        match (store, rows) {
            (Store::F32(v), StoredRows::F32(saved)) => v[..saved.len()].copy_from_slice(saved),
            (
                Store::Q8 { codes, scales },
                StoredRows::Q8 {
                    codes: saved_codes,
                    scales: saved_scales,
                },
            ) => {
                codes[..saved_codes.len()].copy_from_slice(saved_codes);
                scales[..saved_scales.len()].copy_from_slice(saved_scales);
            }
            _ => unreachable!("restore_rows: the caller checked the cache kind"),
        }
    }

    /// Declares positions `0..len` valid after [`KvCache::restore_rows`].
    pub(crate) fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "set_len {len} beyond capacity");
        self.len = len;
    }

    /// Stores keys/values of positions `start..start + n` of `layer`; a ring layer keeps
    /// the last `window` of them, each in slot `position % window`.
    pub(crate) fn write(&mut self, layer: usize, start: usize, k: &[f32], v: &[f32]) {
        let kv_dim = self.kv_dim;
        match self.rings[layer] {
            None => {
                let at = start * kv_dim;
                self.keys[layer].write(at, k, self.head_dim);
                self.values[layer].write(at, v, self.head_dim);
            }
            Some(window) => {
                let n = k.len() / kv_dim;
                for t in n.saturating_sub(window)..n {
                    let at = (start + t) % window * kv_dim;
                    let rows = t * kv_dim..(t + 1) * kv_dim;
                    self.keys[layer].write(at, &k[rows.clone()], self.head_dim);
                    self.values[layer].write(at, &v[rows], self.head_dim);
                }
            }
        }
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// How one layer's attention scores are formed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ScoreRule {
    /// Positions attended to, the current one included (`None`: all before it).
    pub window: Option<usize>,
    /// Multiplier of `q · k` (`1/√head_dim` unless the family says otherwise).
    pub scale: f32,
    /// Gemma 2's `cap · tanh(score / cap)`.
    pub softcap: Option<f32>,
}

impl ScoreRule {
    pub fn for_layer(config: &ModelConfig, layer: usize) -> ScoreRule {
        let f = &config.features;
        ScoreRule {
            window: config.layer_window(layer),
            scale: f
                .attention_scale
                .unwrap_or(1.0 / (config.head_dim as f32).sqrt()),
            softcap: f.attn_logit_softcap,
        }
    }
}

/// Where a run of attended positions lives: slots of the cache, or rows of this batch's
/// fresh keys/values (a ring layer attends before it stores them).
#[derive(Clone, Debug)]
enum Span {
    Stored(std::ops::Range<usize>),
    Fresh(std::ops::Range<usize>),
}

/// The attended positions of the token at `position` (batch row `t`, batch starting at
/// `start`), as at most three spans.
fn spans(ring: Option<usize>, window: Option<usize>, start: usize, t: usize, out: &mut Vec<Span>) {
    out.clear();
    let position = start + t;
    let first = window.map_or(0, |w| (position + 1).saturating_sub(w));
    match ring {
        None => out.push(Span::Stored(first..position + 1)),
        Some(slots) => {
            let stored_end = start.max(first);
            if first < stored_end {
                let (a, len) = (first % slots, stored_end - first);
                if a + len <= slots {
                    out.push(Span::Stored(a..a + len));
                } else {
                    out.push(Span::Stored(a..slots));
                    out.push(Span::Stored(0..a + len - slots));
                }
            }
            out.push(Span::Fresh(first.max(start) - start..t + 1));
        }
    }
}

/// Attention weights below this are dropped (see `attend`).
const NEGLIGIBLE_WEIGHT: f32 = 1e-30;

/// One KV head's rows of a layer: stored in the cache, or this batch's fresh keys/values
/// (`tokens × kv_dim`), for the kernels that take a whole run of positions per call.
struct HeadRows<'a> {
    keys: &'a Store,
    values: &'a Store,
    fresh: (&'a [f32], &'a [f32]),
    kv_dim: usize,
    kv_heads: usize,
    kv_head: usize,
    hd: usize,
}

impl HeadRows<'_> {
    /// The elements covering this head's rows `r` (the kernels step `kv_dim` between them).
    fn run_of(&self, r: &std::ops::Range<usize>) -> std::ops::Range<usize> {
        let off = self.kv_head * self.hd;
        match r.len() {
            0 => 0..0,
            _ => r.start * self.kv_dim + off..(r.end - 1) * self.kv_dim + off + self.hd,
        }
    }

    /// `scale · q · k` for every position of `runs`, in order, into `scores`.
    fn scores(
        &self,
        path: kernels::KernelPath,
        runs: &[Span],
        q: &[f32],
        scale: f32,
        scores: &mut Vec<f32>,
    ) {
        use kernels::attention::scores as run_scores;
        scores.clear();
        for run in runs {
            let filled = scores.len();
            let (Span::Stored(r) | Span::Fresh(r)) = run;
            scores.resize(filled + r.len(), 0.0);
            let out = &mut scores[filled..];
            let elements = self.run_of(r);
            match (run, self.keys) {
                (Span::Stored(_), Store::F32(k)) => {
                    run_scores(path, q, &k[elements], self.kv_dim, scale, out)
                }
                (Span::Stored(slots), Store::Q8 { codes, scales }) => {
                    run_scores(path, q, &codes[elements], self.kv_dim, scale, out);
                    // Each stored row's own scale.
                    for (s, p) in out.iter_mut().zip(slots.clone()) {
                        *s *= scales[p * self.kv_heads + self.kv_head];
                    }
                }
                (Span::Fresh(_), _) => {
                    run_scores(path, q, &self.fresh.0[elements], self.kv_dim, scale, out)
                }
            }
        }
    }

    /// `o = Σ w · v` over the positions of `runs`, `weights` in the same order (an int8
    /// cache's row scales are folded into them).
    fn weighted_sum(
        &self,
        path: kernels::KernelPath,
        runs: &[Span],
        weights: &mut [f32],
        o: &mut [f32],
    ) {
        use kernels::attention::weighted_sum as run_sum;
        o.fill(0.0);
        let mut used = 0;
        for run in runs {
            let (Span::Stored(r) | Span::Fresh(r)) = run;
            let w = &mut weights[used..used + r.len()];
            used += r.len();
            let elements = self.run_of(r);
            match (run, self.values) {
                (Span::Stored(_), Store::F32(v)) => run_sum(path, w, &v[elements], self.kv_dim, o),
                (Span::Stored(slots), Store::Q8 { codes, scales }) => {
                    for (w, p) in w.iter_mut().zip(slots.clone()) {
                        *w *= scales[p * self.kv_heads + self.kv_head];
                    }
                    run_sum(path, w, &codes[elements], self.kv_dim, o);
                }
                (Span::Fresh(_), _) => run_sum(path, w, &self.fresh.1[elements], self.kv_dim, o),
            }
        }
    }
}

/// For each new token `t` (at position `start + t`) and head, attends over the positions
/// `rule` lets it see in `layer` of `cache`. `q` is `tokens × q_dim` (already rotated); `out`
/// likewise. Full layers must already hold this batch's keys/values; ring layers read them
/// from `fresh` (keys, values: `tokens × kv_dim` each) and store them afterwards.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    config: &ModelConfig,
    cache: &KvCache,
    layer: usize,
    start: usize,
    rule: ScoreRule,
    q: &[f32],
    fresh: (&[f32], &[f32]),
    out: &mut [f32],
) {
    let hd = config.head_dim;
    let group = config.num_heads / config.num_kv_heads;
    let kv_dim = config.kv_dim();
    let kv_heads = config.num_kv_heads;
    let scale = rule.scale;
    let ring = cache.rings[layer];
    let (keys, values) = (&cache.keys[layer], &cache.values[layer]);
    let path = kernels::active_path();
    // One task per (token, head): independent rows of the output.
    let head =
        |i: usize, o: &mut [f32], qh: &[f32], scores: &mut Vec<f32>, runs: &mut Vec<Span>| {
            let t = i / config.num_heads;
            let kv_head = i % config.num_heads / group;
            let rows = HeadRows {
                keys,
                values,
                fresh,
                kv_dim,
                kv_heads,
                kv_head,
                hd,
            };
            spans(ring, rule.window, start, t, runs);
            rows.scores(path, runs, qh, scale, scores);
            if let Some(cap) = rule.softcap {
                for s in scores.iter_mut() {
                    *s = cap * (*s / cap).tanh();
                }
            }
            kernels::softmax(scores);
            // Weights far below the sum's resolution become 0: their products with values are
            // subnormal, and x86 takes a microcode assist for each such FMA (a random-weight
            // 1.1B spent 13% of a batched decode step there).
            for w in scores.iter_mut() {
                if *w < NEGLIGIBLE_WEIGHT {
                    *w = 0.0;
                }
            }
            rows.weighted_sum(path, runs, scores, o);
        };
    if out.len() == config.num_heads * hd {
        // One token (decode): on the decode team when this thread has one. Each worker keeps
        // its score buffer across heads, layers and tokens (no allocation per head).
        thread_local! {
            static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<Span>)> =
                const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
        }
        kernels::pool::for_each_chunk_mut(out, hd, &|i, o| {
            SCRATCH.with_borrow_mut(|(scores, runs)| {
                head(i, o, &q[i * hd..(i + 1) * hd], scores, runs)
            });
        });
        return;
    }
    out.par_chunks_mut(hd)
        .zip(q.par_chunks(hd))
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::with_capacity(3)),
            |(scores, runs), (i, (o, qh))| head(i, o, qh, scores, runs),
        );
}

#[cfg(test)]
mod tests {
    use super::*;
    use pocketlm_format::config::Architecture;
    use pocketlm_kernels::test_util::random_vec;

    #[test]
    fn kv_types_parse_and_size() {
        for k in [KvType::F32, KvType::Q8] {
            assert_eq!(KvType::parse(k.name()), Some(k));
        }
        assert_eq!(KvType::parse("f16"), None);
        // 2 layers × 3 positions × 2 heads of 64, keys and values: f32 4 bytes a value, q8 1
        // byte a value + a 4-byte scale per head vector.
        assert_eq!(
            KvCache::required_bytes(KvType::F32, 2, 128, 64, 3),
            Some(2 * 2 * 3 * 128 * 4)
        );
        assert_eq!(
            KvCache::required_bytes(KvType::Q8, 2, 128, 64, 3),
            Some(2 * 2 * 3 * 2 * 68)
        );
        let c = KvCache::try_new(KvType::Q8, 2, 128, 64, 3).unwrap();
        assert_eq!(c.memory_bytes(), 2 * 2 * 3 * 2 * 68);
    }

    /// The int8 cache stays within its rounding of the f32 one.
    #[test]
    fn q8_cache_attention_is_close_to_f32() {
        let config = ModelConfig {
            head_dim: 32,
            hidden_size: 128,
            ..test_config()
        };
        let (kvd, qd) = (64, 128);
        let k = random_vec(7 * kvd, 11);
        let v = random_vec(7 * kvd, 12);
        let q = random_vec(2 * qd, 13);
        let mut outs = Vec::new();
        for kind in [KvType::F32, KvType::Q8] {
            let mut cache = KvCache::try_new(kind, 1, kvd, 32, 16).unwrap();
            cache.write(0, 0, &k, &v);
            let mut out = vec![0.0; 2 * qd];
            let rule = ScoreRule::for_layer(&config, 0);
            attend(&config, &cache, 0, 5, rule, &q, (&[], &[]), &mut out);
            outs.push(out);
        }
        let worst = outs[0]
            .iter()
            .zip(&outs[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst > 0.0 && worst < 0.02, "q8 vs f32: {worst}");
    }

    fn test_config() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 8,
            hidden_size: 16,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 16,
            tie_word_embeddings: true,
            attention_bias: false,
            features: Default::default(),
            incoherence: None,
        }
    }

    /// A ring of the window attends exactly as a full cache with the same window, whatever
    /// the batch split (prefill longer than the window, then single tokens, then a batch).
    #[test]
    fn ring_buffer_attends_as_a_windowed_full_cache() {
        let config = test_config();
        let (kvd, qd, window, total) = (8, 16, 3, 14);
        let k = random_vec(total * kvd, 21);
        let v = random_vec(total * kvd, 22);
        let q = random_vec(total * qd, 23);
        let rule = ScoreRule {
            window: Some(window),
            scale: 0.5,
            softcap: Some(2.0),
        };
        let run = |windows: &[Option<usize>]| {
            let mut cache = KvCache::try_new_windowed(KvType::F32, windows, kvd, 4, 16).unwrap();
            let mut out = vec![0.0; total * qd];
            let mut start = 0;
            for n in [5, 1, 1, 4, 3] {
                let (kb, vb) = (
                    &k[start * kvd..(start + n) * kvd],
                    &v[start * kvd..(start + n) * kvd],
                );
                let ring = cache.ring(0).is_some();
                if !ring {
                    cache.write(0, start, kb, vb);
                }
                let rows = start * qd..(start + n) * qd;
                attend(
                    &config,
                    &cache,
                    0,
                    start,
                    rule,
                    &q[rows.clone()],
                    (kb, vb),
                    &mut out[rows],
                );
                if ring {
                    cache.write(0, start, kb, vb);
                }
                cache.advance(n);
                start += n;
            }
            (out, cache)
        };
        let (full, full_cache) = run(&[None]);
        let (ring, ring_cache) = run(&[Some(window)]);
        assert_eq!(ring_cache.ring(0), Some(window));
        assert!(ring_cache.memory_bytes() * 5 < full_cache.memory_bytes());
        for (a, b) in full.iter().zip(&ring) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn ring_buffer_truncates_only_to_positions_it_still_holds() {
        let mut cache = KvCache::try_new_windowed(KvType::F32, &[None, Some(4)], 8, 4, 32).unwrap();
        cache.advance(3);
        // Nothing overwritten yet: any shorter length is fine.
        assert!(cache.can_truncate_to(0) && cache.can_truncate_to(3));
        cache.advance(7); // positions 6..10 held
        assert!(cache.can_truncate_to(10) && cache.can_truncate_to(9));
        // The token at 8 would need position 5, overwritten by 9.
        assert!(!cache.can_truncate_to(8) && !cache.can_truncate_to(0));
        assert!(!cache.can_truncate_to(11));
        // A window as long as the context keeps every position: no ring at all.
        let full = KvCache::try_new_windowed(KvType::F32, &[Some(32)], 8, 4, 32).unwrap();
        assert_eq!(full.ring(0), None);
    }

    #[test]
    fn attention_matches_naive_gqa() {
        let config = test_config();
        let (hd, kvd, qd) = (4, 8, 16);
        let mut cache = KvCache::new(1, kvd, 16);
        // 3 cached positions, then 2 new tokens
        let k = random_vec(5 * kvd, 1);
        let v = random_vec(5 * kvd, 2);
        cache.write(0, 0, &k, &v);
        let q = random_vec(2 * qd, 3);
        let mut out = vec![0.0; 2 * qd];
        let rule = ScoreRule::for_layer(&config, 0);
        attend(&config, &cache, 0, 3, rule, &q, (&[], &[]), &mut out);
        for t in 0..2 {
            for h in 0..4 {
                let kvh = h / 2;
                let qh = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
                let n = 3 + t + 1;
                let mut s: Vec<f32> = (0..n)
                    .map(|p| {
                        (0..hd)
                            .map(|j| qh[j] * k[p * kvd + kvh * hd + j])
                            .sum::<f32>()
                            / 2.0
                    })
                    .collect();
                let m = s.iter().copied().fold(f32::MIN, f32::max);
                let z: f32 = s
                    .iter_mut()
                    .map(|x| {
                        *x = (*x - m).exp();
                        *x
                    })
                    .sum();
                for j in 0..hd {
                    let want: f32 = (0..n).map(|p| s[p] / z * v[p * kvd + kvh * hd + j]).sum();
                    let got = out[t * qd + h * hd + j];
                    assert!((got - want).abs() < 1e-5, "t{t} h{h} j{j}: {got} vs {want}");
                }
            }
        }
    }
}
