//! Integer kernels for the quantized encodings (q8, q4 symmetric, q4 asymmetric, q3
//! symmetric; grouped).
//!
//! Activations are quantized on the fly to int8 in blocks of [`QUANT_BLOCK`] with an f32
//! scale, so each block's product is an integer dot product (`maddubs` on AVX2, `sdot` on ARM)
//! scaled once: `Σ w·x ≈ d_w · d_x · Σ q_w·q_x`. The scalar functions here are the reference
//! every SIMD path is tested against; the on-disk layout is [`crate::format::QuantLayout`].

use half::f16;

use crate::format::{Encoding, Q3_BLOCK_BYTES, QUANT_BLOCK, QuantLayout, TensorView};

/// Which quantized format a matrix uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantKind {
    Q8,
    Q4,
    Q4Asym,
    Q3,
}

impl QuantKind {
    /// Bytes that `cols` weights (a multiple of 32) of one row occupy.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            QuantKind::Q8 => cols,
            QuantKind::Q4 | QuantKind::Q4Asym => cols / 2,
            QuantKind::Q3 => cols / QUANT_BLOCK * Q3_BLOCK_BYTES,
        }
    }
}

/// A quantized matrix borrowed from its tensor bytes (zero-copy from the map).
#[derive(Clone, Copy, Debug)]
pub struct QuantMatrix<'a> {
    pub kind: QuantKind,
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// q8: `rows × cols` i8 (as bytes); q4: `rows × cols / 2` packed nibbles; q3: 12 bytes
    /// of bit planes per 32 values.
    pub quants: &'a [u8],
    pub scales: &'a [f16],
    pub mins: Option<&'a [f16]>,
    /// Columns of the stored rows: `cols`, or more for a view of the first columns.
    stored_cols: usize,
}

impl<'a> QuantMatrix<'a> {
    /// Splits a tensor's bytes by `layout`; `None` when the bytes do not match it or the scale
    /// regions are misaligned (impossible for views of a validated file).
    pub fn from_parts(encoding: Encoding, layout: &QuantLayout, bytes: &'a [u8]) -> Option<Self> {
        let kind = match encoding {
            Encoding::Q8 { .. } => QuantKind::Q8,
            Encoding::Q4 {
                asymmetric: false, ..
            } => QuantKind::Q4,
            Encoding::Q4 {
                asymmetric: true, ..
            } => QuantKind::Q4Asym,
            Encoding::Q3 { .. } => QuantKind::Q3,
            _ => return None,
        };
        if bytes.len() != layout.total {
            return None;
        }
        let scales = bytemuck::try_cast_slice(bytes.get(layout.scales.clone())?).ok()?;
        let mins = match &layout.mins {
            Some(r) => Some(bytemuck::try_cast_slice(bytes.get(r.clone())?).ok()?),
            None => None,
        };
        Some(QuantMatrix {
            kind,
            rows: layout.rows,
            cols: layout.cols,
            group: layout.group,
            quants: bytes.get(layout.quants.clone())?,
            scales,
            mins,
            stored_cols: layout.cols,
        })
    }

    /// The first `rows` rows (`None` beyond the matrix).
    pub fn first_rows(self, rows: usize) -> Option<Self> {
        (rows <= self.rows).then_some(QuantMatrix { rows, ..self })
    }

    /// The first `cols` columns of each row, read in place: `None` beyond the matrix or when
    /// `cols` is not a whole number of groups.
    pub fn first_cols(self, cols: usize) -> Option<Self> {
        (cols <= self.cols && cols.is_multiple_of(self.group))
            .then_some(QuantMatrix { cols, ..self })
    }

    pub fn from_view(view: &TensorView<'a>) -> Option<Self> {
        let layout = view.encoding.quant_layout(view.shape)?;
        QuantMatrix::from_parts(view.encoding, &layout, view.bytes)
    }

    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group
    }

    /// Bytes of one row: its codes, scales and minimums.
    pub fn row_bytes(&self) -> usize {
        let codes = match self.kind {
            QuantKind::Q8 => self.cols,
            _ => self.cols / 2,
        };
        let per_group = if self.mins.is_some() { 4 } else { 2 };
        codes + per_group * self.groups_per_row()
    }

    fn row_quants(&self, r: usize) -> &'a [u8] {
        let start = r * self.kind.row_bytes(self.stored_cols);
        &self.quants[start..start + self.kind.row_bytes(self.cols)]
    }

    fn row_scales(&self, r: usize) -> &'a [f16] {
        let start = r * (self.stored_cols / self.group);
        &self.scales[start..start + self.groups_per_row()]
    }

    fn row_mins(&self, r: usize) -> Option<&'a [f16]> {
        let start = r * (self.stored_cols / self.group);
        self.mins.map(|m| &m[start..start + self.groups_per_row()])
    }

    /// Row `r` decoded to f32 (reference dequantization).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let q = self.row_quants(r);
        let scales = self.row_scales(r);
        let mins = self.row_mins(r);
        for (c, o) in out.iter_mut().enumerate().take(self.cols) {
            let g = c / self.group;
            let d = scales[g].to_f32();
            *o = match self.kind {
                QuantKind::Q8 => q[c] as i8 as f32 * d,
                QuantKind::Q4 => (nibble(q, c) as f32 - 8.0) * d,
                QuantKind::Q4Asym => nibble(q, c) as f32 * d + mins.map_or(0.0, |m| m[g].to_f32()),
                QuantKind::Q3 => (level3(q, c) as f32 - 4.0) * d,
            };
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }

    /// One row in the form the dot kernels take.
    pub fn row(&self, r: usize) -> QuantRow<'a> {
        QuantRow {
            kind: self.kind,
            blocks_per_group: self.group / QUANT_BLOCK,
            quants: self.row_quants(r),
            scales: self.row_scales(r),
            mins: self.row_mins(r),
        }
    }
}

/// Value `c` of a nibble-packed row: block `c / 32`, byte `c % 16`, high nibble for the
/// second half of the block.
fn nibble(q: &[u8], c: usize) -> u8 {
    let byte = q[c / QUANT_BLOCK * 16 + c % 16];
    if c % QUANT_BLOCK < 16 {
        byte & 0x0F
    } else {
        byte >> 4
    }
}

/// Level (0..=7) of value `c` of a q3 row: block `c / 32` is 12 bytes; value `i` of the block
/// has its low two bits in byte `i % 8`, bits `2 · (i / 8)..`, and its high bit at bit `i` of
/// the block's trailing four bytes.
fn level3(q: &[u8], c: usize) -> u8 {
    let block = &q[c / QUANT_BLOCK * Q3_BLOCK_BYTES..][..Q3_BLOCK_BYTES];
    let i = c % QUANT_BLOCK;
    let low = (block[i % 8] >> (2 * (i / 8))) & 3;
    let high = (block[8 + i / 8] >> (i % 8)) & 1;
    low | high << 2
}

/// Packs 32 levels (0..=7) into the 12 bytes of a q3 block (the inverse of [`level3`]).
fn pack3(levels: &[u8; QUANT_BLOCK], out: &mut [u8]) {
    out[..Q3_BLOCK_BYTES].fill(0);
    for (i, &l) in levels.iter().enumerate() {
        debug_assert!(l < 8);
        out[i % 8] |= (l & 3) << (2 * (i / 8));
        out[8 + i / 8] |= (l >> 2) << (i % 8);
    }
}

/// One quantized weight row.
#[derive(Clone, Copy, Debug)]
pub struct QuantRow<'a> {
    pub kind: QuantKind,
    pub blocks_per_group: usize,
    pub quants: &'a [u8],
    pub scales: &'a [f16],
    pub mins: Option<&'a [f16]>,
}

/// Activations quantized to int8 per block of 32: `x ≈ d · q`. `dsums[b] = d[b] · Σ q` serves
/// the minimum term of asymmetric weights.
#[derive(Clone, Debug, Default)]
pub struct QuantizedActivations {
    pub tokens: usize,
    pub cols: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub dsums: Vec<f32>,
}

impl QuantizedActivations {
    /// Quantizes `tokens × cols` activations (`cols` a multiple of 32).
    pub fn quantize(x: &[f32], tokens: usize, cols: usize) -> Self {
        debug_assert_eq!(x.len(), tokens * cols);
        debug_assert_eq!(cols % QUANT_BLOCK, 0);
        let blocks = x.len() / QUANT_BLOCK;
        let mut out = QuantizedActivations {
            tokens,
            cols,
            qs: vec![0; x.len()],
            d: vec![0.0; blocks],
            dsums: vec![0.0; blocks],
        };
        for (b, (xb, qb)) in x
            .chunks_exact(QUANT_BLOCK)
            .zip(out.qs.chunks_exact_mut(QUANT_BLOCK))
            .enumerate()
        {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qb.iter_mut().zip(xb) {
                // Round half away from zero via truncation (`f32::round` is a libm call);
                // |v · inv| ≤ 127 by construction of `d`.
                let scaled = v * inv;
                *q = (scaled + 0.5f32.copysign(scaled)) as i8;
                sum += *q as i32;
            }
            out.d[b] = d;
            out.dsums[b] = d * sum as f32;
        }
        out
    }

    pub fn row(&self, t: usize) -> ActRow<'_> {
        let nb = self.cols / QUANT_BLOCK;
        ActRow {
            qs: &self.qs[t * self.cols..(t + 1) * self.cols],
            d: &self.d[t * nb..(t + 1) * nb],
            dsums: &self.dsums[t * nb..(t + 1) * nb],
        }
    }
}

/// One token's quantized activations.
#[derive(Clone, Copy, Debug)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub dsums: &'a [f32],
}

/// Scalar reference: Σ over blocks of `d_w · d_x · Σ q_w·q_x` (+ the minimum term).
pub fn dot_scalar(w: &QuantRow<'_>, x: &ActRow<'_>) -> f32 {
    let mut acc = 0.0f32;
    for (b, (&dx, &dsum)) in x.d.iter().zip(x.dsums).enumerate() {
        let g = b / w.blocks_per_group;
        let dw = w.scales[g].to_f32();
        let xq = &x.qs[b * QUANT_BLOCK..(b + 1) * QUANT_BLOCK];
        let isum: i32 = match w.kind {
            QuantKind::Q8 => {
                let wq = &w.quants[b * QUANT_BLOCK..(b + 1) * QUANT_BLOCK];
                wq.iter()
                    .zip(xq)
                    .map(|(&a, &b)| a as i8 as i32 * b as i32)
                    .sum()
            }
            QuantKind::Q4 | QuantKind::Q4Asym => {
                let offset = if w.kind == QuantKind::Q4 { 8 } else { 0 };
                let wq = &w.quants[b * 16..(b + 1) * 16];
                (0..16)
                    .map(|j| {
                        let lo = (wq[j] & 0x0F) as i32 - offset;
                        let hi = (wq[j] >> 4) as i32 - offset;
                        lo * xq[j] as i32 + hi * xq[j + 16] as i32
                    })
                    .sum()
            }
            QuantKind::Q3 => {
                let wq = &w.quants[b * Q3_BLOCK_BYTES..(b + 1) * Q3_BLOCK_BYTES];
                (0..QUANT_BLOCK)
                    .map(|i| (level3(wq, i) as i32 - 4) * xq[i] as i32)
                    .sum()
            }
        };
        acc += dw * dx * isum as f32;
        if let Some(m) = w.mins {
            acc += m[g].to_f32() * dsum;
        }
    }
    acc
}

/// Round-to-nearest quantization of a `[rows, cols]` f32 matrix into the bytes of `encoding`
/// (the exact tensor data the format stores). Scales: q8 `amax / 127`; q4 symmetric maps the
/// value of largest magnitude to −8 (ggml's choice, using the full 16 levels), q3 likewise to
/// −4 (all 8 levels); q4 asymmetric spans `[min, max]` with 15 steps. Better scale choices (clipping, GPTQ, AWQ) live in the
/// converter and call [`encode_with_scales`].
pub fn quantize_rtn(w: &[f32], rows: usize, cols: usize, encoding: Encoding) -> Option<Vec<u8>> {
    let layout = encoding.quant_layout(&[rows, cols])?;
    let group = layout.group;
    let mut scales = Vec::with_capacity(rows * cols / group);
    let mut mins = Vec::new();
    for g in w.chunks_exact(group) {
        let (lo, hi) = g
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        match encoding {
            Encoding::Q8 { .. } => scales.push(lo.abs().max(hi.abs()) / 127.0),
            Encoding::Q4 {
                asymmetric: false, ..
            } => {
                let extreme = if hi.abs() > lo.abs() { hi } else { lo };
                scales.push(extreme / -8.0);
            }
            Encoding::Q3 { .. } => {
                let extreme = if hi.abs() > lo.abs() { hi } else { lo };
                scales.push(extreme / -4.0);
            }
            _ => {
                scales.push((hi - lo) / 15.0);
                mins.push(lo);
            }
        }
    }
    let mins = (!mins.is_empty()).then_some(&mins[..]);
    encode_with_scales(w, rows, cols, encoding, &scales, mins)
}

/// Quantizes `w` with the given per-group scales (and minimums for asymmetric q4), rounding
/// to nearest, and lays the result out as the format's tensor bytes.
pub fn encode_with_scales(
    w: &[f32],
    rows: usize,
    cols: usize,
    encoding: Encoding,
    scales: &[f32],
    mins: Option<&[f32]>,
) -> Option<Vec<u8>> {
    let layout = encoding.quant_layout(&[rows, cols])?;
    let group = layout.group;
    if w.len() != rows * cols || scales.len() != rows * cols / group {
        return None;
    }
    let asymmetric = layout.mins.is_some();
    if asymmetric && mins.is_none_or(|m| m.len() != scales.len()) {
        return None;
    }
    let mut out = vec![0u8; layout.total];
    // Quantize against the f16-rounded scale actually stored, so rounding sees the real grid.
    let stored: Vec<f32> = scales.iter().map(|&d| f16::from_f32(d).to_f32()).collect();
    let stored_mins: Vec<f32> = mins
        .map(|m| m.iter().map(|&v| f16::from_f32(v).to_f32()).collect())
        .unwrap_or_default();
    let quants = &mut out[layout.quants.clone()];
    match encoding {
        Encoding::Q8 { .. } => {
            for (i, (&v, q)) in w.iter().zip(quants.iter_mut()).enumerate() {
                let d = stored[i / group];
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                *q = (v * inv).round().clamp(-127.0, 127.0) as i8 as u8;
            }
        }
        Encoding::Q3 { .. } => {
            let mut levels = [0u8; QUANT_BLOCK];
            for (b, packed) in quants.chunks_exact_mut(Q3_BLOCK_BYTES).enumerate() {
                for (j, l) in levels.iter_mut().enumerate() {
                    let i = b * QUANT_BLOCK + j;
                    let d = stored[i / group];
                    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                    *l = (w[i] * inv + 4.0).round().clamp(0.0, 7.0) as u8;
                }
                pack3(&levels, packed);
            }
        }
        _ => {
            let level = |i: usize| -> u8 {
                let g = i / group;
                let d = stored[g];
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                if asymmetric {
                    ((w[i] - stored_mins[g]) * inv).round().clamp(0.0, 15.0) as u8
                } else {
                    (w[i] * inv + 8.0).round().clamp(0.0, 15.0) as u8
                }
            };
            for (b, packed) in quants.chunks_exact_mut(16).enumerate() {
                let base = b * QUANT_BLOCK;
                for (j, byte) in packed.iter_mut().enumerate() {
                    *byte = level(base + j) | (level(base + j + 16) << 4);
                }
            }
        }
    }
    for (i, d) in stored.iter().enumerate() {
        let at = layout.scales.start + 2 * i;
        out[at..at + 2].copy_from_slice(&f16::from_f32(*d).to_le_bytes());
    }
    if let Some(range) = &layout.mins {
        for (i, m) in stored_mins.iter().enumerate() {
            let at = range.start + 2 * i;
            out[at..at + 2].copy_from_slice(&f16::from_f32(*m).to_le_bytes());
        }
    }
    Some(out)
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    //! AVX2 + FMA + F16C: 32 weights per step, `maddubs`/`madd` for the integer products.

    use std::arch::x86_64::*;

    use super::{ActRow, QuantKind, QuantRow};
    use crate::format::{Q3_BLOCK_BYTES, QUANT_BLOCK};
    use crate::kernels::dense::avx2::hsum;

    /// One f16 value widened with F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f16_to_f32(h: half::f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
    }

    const KIND_Q8: u8 = 0;
    const KIND_Q4: u8 = 1;
    const KIND_Q4_ASYM: u8 = 2;
    const KIND_Q3: u8 = 3;

    /// 32 weights of block `b` in value order: q8 as is; q4 unpacked nibbles (minus 8 when
    /// symmetric); q3 levels rebuilt from the two bit planes, minus 4.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_weights<const KIND: u8>(quants: *const u8, b: usize) -> __m256i {
        // SAFETY: the caller guarantees block `b` lies inside the row (32, 16 or 12 bytes).
        unsafe {
            if KIND == KIND_Q8 {
                return _mm256_loadu_si256(quants.add(b * QUANT_BLOCK) as *const __m256i);
            }
            if KIND == KIND_Q3 {
                return load_q3(quants.add(b * Q3_BLOCK_BYTES));
            }
            let packed = _mm_loadu_si128(quants.add(b * 16) as *const __m128i);
            let mask = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(packed, mask);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(packed), mask);
            let v = _mm256_set_m128i(hi, lo);
            if KIND == KIND_Q4 {
                _mm256_sub_epi8(v, _mm256_set1_epi8(8))
            } else {
                v
            }
        }
    }

    /// The 32 signed weights (−4..=3) of the q3 block at `p` (12 bytes), in value order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_q3(p: *const u8) -> __m256i {
        // SAFETY: the caller guarantees 12 readable bytes at `p`; both reads are unaligned.
        let (low_plane, high_plane) = unsafe {
            (
                (p as *const u64).read_unaligned(),
                (p.add(8) as *const u32).read_unaligned(),
            )
        };
        // Low bits: 64-bit lane k holds the plane shifted right by 2k, so byte j of lane k has
        // the pair of value 8k + j in its bottom two bits.
        let low = _mm256_and_si256(
            _mm256_srlv_epi64(
                _mm256_set1_epi64x(low_plane as i64),
                _mm256_set_epi64x(6, 4, 2, 0),
            ),
            _mm256_set1_epi8(3),
        );
        // High bits: byte i takes plane byte i / 8 (each 128-bit lane holds the whole u32),
        // then tests bit i % 8.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(high_plane as i32),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        // level − 4 = low − 4 when the high bit is clear, low when it is set.
        _mm256_sub_epi8(low, _mm256_andnot_si256(set, _mm256_set1_epi8(4)))
    }

    /// Σ w·x of 32 bytes as 8 i32 lanes: signed weights use the sign trick so `maddubs`
    /// (unsigned × signed) applies; asymmetric q4 nibbles are already unsigned.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block_dot<const KIND: u8>(w: __m256i, x: __m256i) -> __m256i {
        let pairs = if KIND == KIND_Q4_ASYM {
            _mm256_maddubs_epi16(w, x)
        } else {
            _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
        };
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w` and every `x` describe rows of equal
    /// length (a multiple of 32) and `N ≥ 1`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_n<const N: usize>(w: &QuantRow<'_>, x: [&ActRow<'_>; N]) -> [f32; N] {
        // SAFETY: forwarded contract; the kind is fixed per call so the loop is specialised.
        unsafe {
            match w.kind {
                QuantKind::Q8 => dot_kind::<KIND_Q8, N>(w, x),
                QuantKind::Q4 => dot_kind::<KIND_Q4, N>(w, x),
                QuantKind::Q4Asym => dot_kind::<KIND_Q4_ASYM, N>(w, x),
                QuantKind::Q3 => dot_kind::<KIND_Q3, N>(w, x),
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_kind<const KIND: u8, const N: usize>(
        w: &QuantRow<'_>,
        x: [&ActRow<'_>; N],
    ) -> [f32; N] {
        let bpg = w.blocks_per_group;
        let blocks = w.scales.len() * bpg;
        debug_assert!(
            x.iter()
                .all(|r| r.d.len() == blocks && r.qs.len() == blocks * QUANT_BLOCK)
        );
        let xq: [*const i8; N] = x.map(|r| r.qs.as_ptr());
        let xd: [*const f32; N] = x.map(|r| r.d.as_ptr());
        let xs: [*const f32; N] = x.map(|r| r.dsums.as_ptr());
        let qp = w.quants.as_ptr();
        let sp = w.scales.as_ptr();
        // Asymmetric q4: Σ_b m_g · d_x · Σ q_x, accumulated beside the vector sums.
        let mp = w.mins.unwrap_or(w.scales).as_ptr();
        let mut min_acc = [[0.0f32; 2]; N];
        // Two accumulators per token: consecutive blocks alternate between them, so the FMA
        // latency chain does not bound a single-token (decode) product.
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        // Group sizes are powers of two in practice (32/64/128): then a shift finds the
        // group of a block; other sizes take the same path with a division.
        let shift = bpg.is_power_of_two().then(|| bpg.trailing_zeros());
        let group_of = |b: usize| match shift {
            Some(sh) => b >> sh,
            None => b / bpg,
        };
        let mut b = 0;
        while b < blocks {
            let pair = b + 1 < blocks;
            // SAFETY: b (and b + 1 when `pair`) < blocks: every read below lies inside the
            // weight row (32, 16 or 12 bytes a block), its scales, and each activation row.
            unsafe {
                let dw0 = f16_to_f32(*sp.add(group_of(b)));
                if KIND == KIND_Q4_ASYM {
                    let m0 = f16_to_f32(*mp.add(group_of(b)));
                    for k in 0..N {
                        min_acc[k][0] += m0 * *xs[k].add(b);
                    }
                }
                let wv0 = load_weights::<KIND>(qp, b);
                for k in 0..N {
                    let xv = _mm256_loadu_si256(xq[k].add(b * QUANT_BLOCK) as *const __m256i);
                    let dot = _mm256_cvtepi32_ps(block_dot::<KIND>(wv0, xv));
                    let d = _mm256_set1_ps(dw0 * *xd[k].add(b));
                    acc[k][0] = _mm256_fmadd_ps(d, dot, acc[k][0]);
                }
                if pair {
                    let dw1 = f16_to_f32(*sp.add(group_of(b + 1)));
                    if KIND == KIND_Q4_ASYM {
                        let m1 = f16_to_f32(*mp.add(group_of(b + 1)));
                        for k in 0..N {
                            min_acc[k][1] += m1 * *xs[k].add(b + 1);
                        }
                    }
                    let wv1 = load_weights::<KIND>(qp, b + 1);
                    for k in 0..N {
                        let xv =
                            _mm256_loadu_si256(xq[k].add((b + 1) * QUANT_BLOCK) as *const __m256i);
                        let dot = _mm256_cvtepi32_ps(block_dot::<KIND>(wv1, xv));
                        let d = _mm256_set1_ps(dw1 * *xd[k].add(b + 1));
                        acc[k][1] = _mm256_fmadd_ps(d, dot, acc[k][1]);
                    }
                }
            }
            b += 2;
        }
        let mut out = [0.0f32; N];
        for k in 0..N {
            out[k] = hsum(_mm256_add_ps(acc[k][0], acc[k][1])) + min_acc[k][0] + min_acc[k][1];
        }
        out
    }
}

#[cfg(target_arch = "aarch64")]
pub mod neon {
    //! AArch64: NEON (widening multiplies) and the dotprod extension (`sdot`, emitted with
    //! inline assembly because its intrinsic is not stable yet).

    use std::arch::aarch64::*;
    use std::arch::asm;

    use super::{ActRow, QuantKind, QuantRow};
    use crate::format::{Q3_BLOCK_BYTES, QUANT_BLOCK};

    const KIND_Q8: u8 = 0;
    const KIND_Q4: u8 = 1;
    const KIND_Q4_ASYM: u8 = 2;
    const KIND_Q3: u8 = 3;

    /// Block `b`'s 32 weights as two signed 16-byte vectors in value order.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load_weights<const KIND: u8>(q: *const u8, b: usize) -> (int8x16_t, int8x16_t) {
        // SAFETY: the caller guarantees block `b` lies inside the row (32, 16 or 12 bytes).
        unsafe {
            if KIND == KIND_Q8 {
                let p = q.add(b * QUANT_BLOCK) as *const i8;
                return (vld1q_s8(p), vld1q_s8(p.add(16)));
            }
            if KIND == KIND_Q3 {
                return load_q3(q.add(b * Q3_BLOCK_BYTES));
            }
            let packed = vld1q_u8(q.add(b * 16));
            let lo = vreinterpretq_s8_u8(vandq_u8(packed, vdupq_n_u8(0x0F)));
            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(packed));
            if KIND == KIND_Q4 {
                let eight = vdupq_n_s8(8);
                (vsubq_s8(lo, eight), vsubq_s8(hi, eight))
            } else {
                (lo, hi)
            }
        }
    }

    /// The 32 signed weights (−4..=3) of the q3 block at `p` (12 bytes), in value order.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load_q3(p: *const u8) -> (int8x16_t, int8x16_t) {
        // SAFETY: the caller guarantees 12 readable bytes at `p`: 8 for the 2-bit plane, then
        // 4 (read unaligned) for the 1-bit plane.
        let (plane, high_plane) =
            unsafe { (vld1_u8(p), (p.add(8) as *const u32).read_unaligned()) };
        // Byte j of the plane holds the low pairs of values j, j + 8, j + 16, j + 24.
        let three = vdup_n_u8(3);
        let low0 = vcombine_u8(vand_u8(plane, three), vand_u8(vshr_n_u8::<2>(plane), three));
        let low1 = vcombine_u8(vand_u8(vshr_n_u8::<4>(plane), three), vshr_n_u8::<6>(plane));
        // Byte i gets plane byte i / 8 and tests bit i % 8.
        let high = vreinterpretq_u8_u32(vdupq_n_u32(high_plane));
        let bit = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
        let idx0 = vcombine_u8(vdup_n_u8(0), vdup_n_u8(1));
        let idx1 = vcombine_u8(vdup_n_u8(2), vdup_n_u8(3));
        let set0 = vtstq_u8(vqtbl1q_u8(high, idx0), bit);
        let set1 = vtstq_u8(vqtbl1q_u8(high, idx1), bit);
        // level − 4 = low − 4 when the high bit is clear, low when it is set.
        let four = vdupq_n_u8(4);
        (
            vreinterpretq_s8_u8(vsubq_u8(low0, vbicq_u8(four, set0))),
            vreinterpretq_s8_u8(vsubq_u8(low1, vbicq_u8(four, set1))),
        )
    }

    /// Σ w·x over 32 values as four i32 lanes, with widening multiplies (plain NEON).
    /// |w|, |x| ≤ 127, so two products fit an i16 lane before widening.
    #[inline]
    #[target_feature(enable = "neon")]
    fn dot_widening(w: (int8x16_t, int8x16_t), x: (int8x16_t, int8x16_t)) -> int32x4_t {
        let a = vaddq_s16(
            vmull_s8(vget_low_s8(w.0), vget_low_s8(x.0)),
            vmull_high_s8(w.0, x.0),
        );
        let b = vaddq_s16(
            vmull_s8(vget_low_s8(w.1), vget_low_s8(x.1)),
            vmull_high_s8(w.1, x.1),
        );
        vaddq_s32(vpaddlq_s16(a), vpaddlq_s16(b))
    }

    /// `acc + Σ a·b` per group of four bytes (`sdot`).
    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: sdot only reads and writes the named vector registers.
        unsafe {
            asm!(
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        acc
    }

    #[inline]
    #[target_feature(enable = "neon,dotprod")]
    fn dot_sdot(w: (int8x16_t, int8x16_t), x: (int8x16_t, int8x16_t)) -> int32x4_t {
        sdot(sdot(vdupq_n_s32(0), w.0, x.0), w.1, x.1)
    }

    macro_rules! dot_kernel {
        ($name:ident, $features:literal, $block_dot:ident) => {
            #[target_feature(enable = $features)]
            unsafe fn $name<const KIND: u8, const N: usize>(
                w: &QuantRow<'_>,
                x: [&ActRow<'_>; N],
            ) -> [f32; N] {
                let bpg = w.blocks_per_group;
                let blocks = w.scales.len() * bpg;
                debug_assert!(x.iter().all(|r| r.d.len() == blocks));
                let mut acc = [vdupq_n_f32(0.0); N];
                let mut min_acc = [0.0f32; N];
                let qp = w.quants.as_ptr();
                for b in 0..blocks {
                    let g = b / bpg;
                    let dw = w.scales[g].to_f32();
                    // SAFETY: b < blocks: the block's weight bytes and each row's 32
                    // activation bytes lie inside their slices.
                    unsafe {
                        let wv = load_weights::<KIND>(qp, b);
                        for k in 0..N {
                            let xp = x[k].qs.as_ptr().add(b * QUANT_BLOCK);
                            let xv = (vld1q_s8(xp), vld1q_s8(xp.add(16)));
                            let dot = vcvtq_f32_s32($block_dot(wv, xv));
                            acc[k] = vfmaq_n_f32(acc[k], dot, dw * x[k].d[b]);
                        }
                    }
                    if KIND == KIND_Q4_ASYM {
                        let m = w.mins.map_or(0.0, |m| m[g].to_f32());
                        for k in 0..N {
                            min_acc[k] += m * x[k].dsums[b];
                        }
                    }
                }
                let mut out = [0.0f32; N];
                for k in 0..N {
                    out[k] = vaddvq_f32(acc[k]) + min_acc[k];
                }
                out
            }
        };
    }

    dot_kernel!(dot_neon_kind, "neon", dot_widening);
    dot_kernel!(dot_dotprod_kind, "neon,dotprod", dot_sdot);

    /// # Safety
    /// `w` and every `x` describe rows of equal length (a multiple of 32).
    #[target_feature(enable = "neon")]
    pub unsafe fn dot_n<const N: usize>(w: &QuantRow<'_>, x: [&ActRow<'_>; N]) -> [f32; N] {
        // SAFETY: forwarded contract; NEON is part of the AArch64 baseline.
        unsafe {
            match w.kind {
                QuantKind::Q8 => dot_neon_kind::<KIND_Q8, N>(w, x),
                QuantKind::Q4 => dot_neon_kind::<KIND_Q4, N>(w, x),
                QuantKind::Q4Asym => dot_neon_kind::<KIND_Q4_ASYM, N>(w, x),
                QuantKind::Q3 => dot_neon_kind::<KIND_Q3, N>(w, x),
            }
        }
    }

    /// # Safety
    /// The CPU must support the dotprod extension; rows as for [`dot_n`].
    #[target_feature(enable = "neon,dotprod")]
    pub unsafe fn dot_n_dotprod<const N: usize>(w: &QuantRow<'_>, x: [&ActRow<'_>; N]) -> [f32; N] {
        // SAFETY: forwarded contract.
        unsafe {
            match w.kind {
                QuantKind::Q8 => dot_dotprod_kind::<KIND_Q8, N>(w, x),
                QuantKind::Q4 => dot_dotprod_kind::<KIND_Q4, N>(w, x),
                QuantKind::Q4Asym => dot_dotprod_kind::<KIND_Q4_ASYM, N>(w, x),
                QuantKind::Q3 => dot_dotprod_kind::<KIND_Q3, N>(w, x),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::random_vec;

    fn encodings() -> Vec<Encoding> {
        let mut v = Vec::new();
        for group in [32, 64, 128] {
            v.push(Encoding::Q8 { group });
            v.push(Encoding::Q4 {
                group,
                asymmetric: false,
            });
            v.push(Encoding::Q4 {
                group,
                asymmetric: true,
            });
            v.push(Encoding::Q3 { group });
        }
        v
    }

    fn matrix<'a>(
        encoding: Encoding,
        rows: usize,
        cols: usize,
        bytes: &'a [u8],
    ) -> QuantMatrix<'a> {
        let layout = encoding.quant_layout(&[rows, cols]).unwrap();
        QuantMatrix::from_parts(encoding, &layout, bytes).unwrap()
    }

    #[test]
    fn rtn_round_trip_error_is_within_half_a_step() {
        for enc in encodings() {
            let (rows, cols) = (3, 256);
            let w = random_vec(rows * cols, 5);
            let bytes = quantize_rtn(&w, rows, cols, enc).unwrap();
            let m = matrix(enc, rows, cols, &bytes);
            let back = m.dequantize();
            let group = enc.group().unwrap() as usize;
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let d = m.scales[i / group].to_f32().abs();
                // Half a step, plus f16 rounding of the scale/min stored with the group.
                // Symmetric q4 (q3) has 8 (4) negative levels and 7 (3) positive ones: when the group's
                // extreme is negative, values near +|extreme| clip one step short.
                let steps = if matches!(
                    enc,
                    Encoding::Q4 {
                        asymmetric: false,
                        ..
                    } | Encoding::Q3 { .. }
                ) {
                    1.0
                } else {
                    0.5
                };
                let tol = steps * d + 0.01 * a.abs().max(d) + 1e-3;
                assert!(
                    (a - b).abs() <= tol,
                    "{enc}: w[{i}] = {a}, got {b} (step {d})"
                );
            }
        }
    }

    #[test]
    fn nibble_layout_matches_the_spec() {
        let enc = Encoding::Q4 {
            group: 32,
            asymmetric: true,
        };
        // Values 0..16 then 15..0 over one block; scale 1, min 0 → levels equal the values.
        let w: Vec<f32> = (0..16).chain((0..16).rev()).map(|v| v as f32).collect();
        let bytes = encode_with_scales(&w, 1, 32, enc, &[1.0], Some(&[0.0])).unwrap();
        assert_eq!(bytes[0], 15 << 4); // value 0 low, value 16 (=15) high
        assert_eq!(bytes[15], 15); // value 15 (=15) low, value 31 (=0) high
        assert_eq!(matrix(enc, 1, 32, &bytes).dequantize(), w);
    }

    #[test]
    fn q3_bit_planes_match_the_spec() {
        let enc = Encoding::Q3 { group: 32 };
        // Scale −1: level = 4 − w, so w = 4 − level. Levels 0..8 repeated, then one block of
        // a single high bit.
        let levels: Vec<u8> = (0..32).map(|i| (i % 8) as u8).collect();
        let w: Vec<f32> = levels.iter().map(|&l| 4.0 - l as f32).collect();
        let bytes = encode_with_scales(&w, 1, 32, enc, &[-1.0], None).unwrap();
        // Byte j: value j (level j % 8) in bits 0-1, j + 8 in 2-3, j + 16 in 4-5, j + 24 in
        // 6-7; every value i has level i % 8, so each byte repeats the pair of j % 4.
        for (j, &byte) in bytes[..8].iter().enumerate() {
            let pair = (j % 4) as u8;
            assert_eq!(byte, pair * 0b0101_0101, "byte {j}");
        }
        // High bits: set for levels 4..8, i.e. values with i % 8 >= 4.
        assert_eq!(&bytes[8..12], &[0xF0; 4]);
        assert_eq!(matrix(enc, 1, 32, &bytes).dequantize(), w);

        let mut one = [4.0f32; 32]; // level 0 everywhere ...
        one[13] = -3.0; // ... but value 13 has level 7
        let bytes = encode_with_scales(&one, 1, 32, enc, &[-1.0], None).unwrap();
        assert_eq!(bytes[5], 0b11 << 2); // value 13 = 5 + 8: byte 5, bits 2-3
        assert_eq!(
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
            1 << 13
        );
        assert!(
            bytes[..8]
                .iter()
                .enumerate()
                .all(|(j, &b)| j == 5 || b == 0)
        );
        assert_eq!(matrix(enc, 1, 32, &bytes).dequantize(), one);
    }

    #[test]
    fn q3_views_of_first_rows_and_columns_read_in_place() {
        let enc = Encoding::Q3 { group: 64 };
        let (rows, cols) = (5, 256);
        let w = random_vec(rows * cols, 21);
        let bytes = quantize_rtn(&w, rows, cols, enc).unwrap();
        let m = matrix(enc, rows, cols, &bytes);
        let full = m.dequantize();
        let view = m.first_rows(3).unwrap().first_cols(128).unwrap();
        assert!(m.first_cols(96).is_none(), "cuts only on whole groups");
        assert!(m.first_cols(320).is_none() && m.first_rows(6).is_none());
        let part = view.dequantize();
        for r in 0..3 {
            assert_eq!(
                &part[r * 128..(r + 1) * 128],
                &full[r * cols..r * cols + 128]
            );
        }
        let x = random_vec(128, 22);
        let acts = QuantizedActivations::quantize(&x, 1, 128);
        let xq = dequantized(&acts);
        for r in 0..3 {
            let want: f32 = part[r * 128..(r + 1) * 128]
                .iter()
                .zip(&xq)
                .map(|(a, b)| a * b)
                .sum();
            let got = dot_scalar(&view.row(r), &acts.row(0));
            assert!(
                (got - want).abs() < 1e-3 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
    }

    /// The activations as the integer dot products see them: `q · d` per block.
    fn dequantized(acts: &QuantizedActivations) -> Vec<f32> {
        acts.qs
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * acts.d[i / QUANT_BLOCK])
            .collect()
    }

    #[test]
    fn dot_scalar_matches_dequantized_product() {
        for enc in encodings() {
            let (rows, cols) = (2, 384);
            let w = random_vec(rows * cols, 11);
            let x = random_vec(cols, 12);
            let bytes = quantize_rtn(&w, rows, cols, enc).unwrap();
            let m = matrix(enc, rows, cols, &bytes);
            let acts = QuantizedActivations::quantize(&x, 1, cols);
            let xq = dequantized(&acts);
            let mut row = vec![0.0; cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut row);
                let want: f32 = row.iter().zip(&xq).map(|(a, b)| a * b).sum();
                let got = dot_scalar(&m.row(r), &acts.row(0));
                assert!(
                    (got - want).abs() < 1e-3 * want.abs().max(1.0),
                    "{enc}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn activation_quantization_error_is_bounded() {
        let x = random_vec(96, 3);
        let a = QuantizedActivations::quantize(&x, 1, 96);
        for (i, v) in x.iter().enumerate() {
            let d = a.d[i / 32];
            assert!((a.qs[i] as f32 * d - v).abs() <= 0.5 * d + 1e-7);
        }
        let zeros = QuantizedActivations::quantize(&[0.0; 32], 1, 32);
        assert_eq!(zeros.d[0], 0.0);
        assert!(zeros.qs.iter().all(|&q| q == 0));
    }

    #[test]
    fn every_supported_path_matches_scalar_for_every_encoding() {
        use crate::kernels::{KernelPath, quant_dot_n};
        let paths: Vec<KernelPath> = KernelPath::ALL
            .into_iter()
            .filter(|p| p.is_supported())
            .collect();
        eprintln!("testing kernel paths {paths:?}");
        for path in paths {
            for enc in encodings() {
                let group = enc.group().unwrap() as usize;
                for cols in [group, 2 * group, 5 * group] {
                    let rows = 3;
                    let w = random_vec(rows * cols, cols as u64);
                    let bytes = quantize_rtn(&w, rows, cols, enc).unwrap();
                    let m = matrix(enc, rows, cols, &bytes);
                    let x = random_vec(4 * cols, 7 + cols as u64);
                    let acts = QuantizedActivations::quantize(&x, 4, cols);
                    let rows_x = [acts.row(0), acts.row(1), acts.row(2), acts.row(3)];
                    for r in 0..rows {
                        let wr = m.row(r);
                        let got4 = quant_dot_n(
                            path,
                            &wr,
                            [&rows_x[0], &rows_x[1], &rows_x[2], &rows_x[3]],
                        );
                        let got1 = quant_dot_n(path, &wr, [&rows_x[2]]);
                        for k in 0..4 {
                            let want = dot_scalar(&wr, &rows_x[k]);
                            assert!(
                                (got4[k] - want).abs() <= 1e-4 * want.abs().max(1.0),
                                "{path:?} {enc} cols {cols}: {} vs {want}",
                                got4[k]
                            );
                        }
                        let want = dot_scalar(&wr, &rows_x[2]);
                        assert!(
                            (got1[0] - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "{path:?} {enc}"
                        );
                    }
                }
            }
        }
    }
}
