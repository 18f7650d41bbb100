//! Integer kernels for the quantized encodings (q8, q4 symmetric, q4 asymmetric, q3
//! symmetric; grouped).
//!
//! Activations are quantized on the fly to int8 in blocks of [`QUANT_BLOCK`] with an f32
//! scale, so each block's product is an integer dot product (`vpdpbusd`, `maddubs`, `sdot`,
//! `smmla`) scaled once: `Σ w·x ≈ d_w · d_x · Σ q_w·q_x`.
//!
//! Weights are stored in tiles of [`TILE_ROWS`] rows ([`pocketlm_format::QuantLayout`]): one
//! 64-byte load holds the same eight columns of all eight rows, so a broadcast of eight
//! activation bytes against it yields eight rows' partial sums in eight (pairs of) lanes, and
//! the kernels never reduce across lanes until a tile's rows are done. The reference
//! ([`dot_scalar`]) reads one weight at a time through [`QuantMatrix::level`]; every SIMD
//! path (`x86`, `arm`) is tested against it.

/// The kinds as codes, the const parameter the SIMD kernels are specialised on; their facts
/// come from the format's table ([`pocketlm_format::QUANT_KINDS`]).
pub(crate) mod kinds {
    use pocketlm_format::{QUANT_KINDS, QuantKind, QuantStorage};

    pub const Q8: u8 = QuantKind::Q8 as u8;
    pub const Q4: u8 = QuantKind::Q4 as u8;
    pub const Q4A: u8 = QuantKind::Q4Asym as u8;
    pub const Q3: u8 = QuantKind::Q3 as u8;
    pub const Q8S: u8 = QuantKind::Q8Sparse48 as u8;
    pub const Q4S: u8 = QuantKind::Q4Sparse48 as u8;
    pub const Q8M: u8 = QuantKind::Q8Masked as u8;
    pub const Q4M: u8 = QuantKind::Q4Masked as u8;
    pub const Q4G: u8 = QuantKind::Q4Grid as u8;
    pub const Q3G: u8 = QuantKind::Q3Grid as u8;

    /// The levels of a non-uniform grid kind by code, padded with zeros to a 16-byte lookup
    /// table (all zeros for the other kinds).
    pub const fn grid(kind: u8) -> [i8; 16] {
        let mut table = [0; 16];
        if let Some(levels) = QUANT_KINDS[kind as usize].grid {
            let mut i = 0;
            while i < levels.len() {
                table[i] = levels[i];
                i += 1;
            }
        }
        table
    }

    /// Whether `kind`'s levels come from a non-uniform grid.
    pub const fn is_grid(kind: u8) -> bool {
        QUANT_KINDS[kind as usize].grid.is_some()
    }

    /// Whether `kind` is a masked (unstructured sparse) kind.
    pub const fn is_masked(kind: u8) -> bool {
        matches!(QUANT_KINDS[kind as usize].storage, QuantStorage::Masked)
    }

    /// Whether `kind` stores fewer codes than weights (4 of 8, or masked): the kernels
    /// expand its tiles to q8 when many tokens meet them.
    pub const fn is_sparse(kind: u8) -> bool {
        !matches!(QUANT_KINDS[kind as usize].storage, QuantStorage::Dense)
    }

    /// Bytes of the codes of one piece of masked kind `kind` whose eight row masks are the
    /// bytes of `masks` (q8 one per kept weight; q4 two to a byte, rounded up).
    #[inline]
    pub const fn masked_piece_bytes(kind: u8, masks: u64) -> usize {
        let kept = masks.count_ones() as usize;
        if QUANT_KINDS[kind as usize].code_bits == 4 {
            kept.div_ceil(2)
        } else {
            kept
        }
    }

    /// Bytes of one tile block of kind `kind`.
    pub const fn block_bytes(kind: u8) -> usize {
        QUANT_KINDS[kind as usize].tile_block_bytes()
    }

    /// The stored code that means level 0, as the kernels subtract it.
    pub const fn zero_point(kind: u8) -> i32 {
        QUANT_KINDS[kind as usize].zero_point
    }

    /// Whether the integer products take `kind`'s levels as signed bytes (q8 codes, grid
    /// levels): the x86 kernels offset them for `vpdpbusd`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub const fn signed(kind: u8) -> bool {
        QUANT_KINDS[kind as usize].signed
    }
}

/// `$run::<K>($args)` with `K` the kind code of `$kind` (a [`QuantKind`]).
macro_rules! by_kind {
    ($kind:expr, $($run:ident)::+, $($args:expr),*) => {{
        use $crate::quant::{QuantKind, kinds};
        match $kind {
            QuantKind::Q8 => $($run)::+::<{ kinds::Q8 }>($($args),*),
            QuantKind::Q4 => $($run)::+::<{ kinds::Q4 }>($($args),*),
            QuantKind::Q4Asym => $($run)::+::<{ kinds::Q4A }>($($args),*),
            QuantKind::Q3 => $($run)::+::<{ kinds::Q3 }>($($args),*),
            QuantKind::Q8Sparse48 => $($run)::+::<{ kinds::Q8S }>($($args),*),
            QuantKind::Q4Sparse48 => $($run)::+::<{ kinds::Q4S }>($($args),*),
            QuantKind::Q8Masked => $($run)::+::<{ kinds::Q8M }>($($args),*),
            QuantKind::Q4Masked => $($run)::+::<{ kinds::Q4M }>($($args),*),
            QuantKind::Q4Grid => $($run)::+::<{ kinds::Q4G }>($($args),*),
            QuantKind::Q3Grid => $($run)::+::<{ kinds::Q3G }>($($args),*),
        }
    }};
}

#[cfg(target_arch = "aarch64")]
pub mod arm;
#[cfg(target_arch = "x86_64")]
pub mod x86;

use std::ops::Range;

use half::f16;

use super::KernelPath;
use pocketlm_format::{
    Encoding, MASKED_CODE_PADDING, QUANT_BLOCK, QuantLayout, TILE_PIECE, TILE_ROWS, TensorView,
};

pub use pocketlm_format::QuantKind;

/// Masked kinds: bytes of the codes of the pieces whose masks are `masks` (8 bytes a piece;
/// q8 one per kept weight, q4 two to a byte with each piece rounded up).
#[inline]
pub fn masked_code_bytes(kind: QuantKind, masks: &[u8]) -> usize {
    masks
        .chunks_exact(8)
        .map(|m| kinds::masked_piece_bytes(kind as u8, u64::from_le_bytes(m.try_into().unwrap())))
        .sum()
}

/// A quantized matrix borrowed from its tensor bytes (zero-copy from the map).
#[derive(Clone, Copy, Debug)]
pub struct QuantMatrix<'a> {
    pub kind: QuantKind,
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// Row tiles, each `stored_cols / 32` tile blocks ([`QuantKind::tile_block_bytes`]).
    pub quants: &'a [u8],
    /// Per tile, per group, the scales of the tile's rows.
    pub scales: &'a [f16],
    pub mins: Option<&'a [f16]>,
    /// Masked kinds: per tile of the stored matrix, the start of its codes (u32 LE), then
    /// the end; empty otherwise.
    pub offsets: &'a [u8],
    /// Masked kinds: the kept codes and their padding; empty otherwise.
    pub codes: &'a [u8],
    /// Columns of the stored rows: `cols`, or more for a view of the first columns.
    stored_cols: usize,
}

impl<'a> QuantMatrix<'a> {
    /// Splits a tensor's bytes by `layout`; `None` when the bytes do not match it or the scale
    /// regions are misaligned (impossible for views of a validated file).
    pub fn from_parts(encoding: Encoding, layout: &QuantLayout, bytes: &'a [u8]) -> Option<Self> {
        let kind = encoding.quant_kind()?;
        if bytes.len() != layout.total {
            return None;
        }
        let scales = bytemuck::try_cast_slice(bytes.get(layout.scales.clone())?).ok()?;
        let mins = match &layout.mins {
            Some(r) => Some(bytemuck::try_cast_slice(bytes.get(r.clone())?).ok()?),
            None => None,
        };
        let region = |r: &Option<Range<usize>>| match r {
            Some(r) => bytes.get(r.clone()),
            None => Some(&[][..]),
        };
        Some(QuantMatrix {
            kind,
            rows: layout.rows,
            cols: layout.cols,
            group: layout.group,
            quants: bytes.get(layout.quants.clone())?,
            scales,
            mins,
            offsets: region(&layout.offsets)?,
            codes: region(&layout.codes)?,
            stored_cols: layout.cols,
        })
    }

    /// The first `rows` rows (`None` beyond the matrix). The last tile may then hold rows
    /// beyond the view; the kernels compute them and drop the results.
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

    /// Blocks of [`QUANT_BLOCK`] columns in a row of the view.
    pub fn blocks_per_row(&self) -> usize {
        self.cols / QUANT_BLOCK
    }

    /// Row tiles the view covers (the last one possibly partial).
    pub fn tiles(&self) -> usize {
        self.rows.div_ceil(TILE_ROWS)
    }

    /// Bytes of one row: its codes, scales and minimums (masked kinds: the mask and the
    /// stored rows' mean share of the code stream).
    pub fn row_bytes(&self) -> usize {
        let mut codes = self.cols * self.kind.block_bits() / 8;
        if self.kind.is_masked() {
            let stored_rows = (self.offsets.len() / 4).saturating_sub(1) * TILE_ROWS;
            let stream = self.codes.len().saturating_sub(MASKED_CODE_PADDING);
            codes += stream * self.cols / self.stored_cols.max(1) / stored_rows.max(1);
        }
        let per_group = if self.mins.is_some() { 4 } else { 2 };
        codes + per_group * self.groups_per_row()
    }

    /// Masked kinds: the masks of tile `tile` (the view's blocks, 32 bytes each) and the code
    /// stream from the tile's first code on (padding included), when the tile's offsets
    /// agree with the masks of all its stored blocks; `None` otherwise, and the whole tile
    /// reads as zero (only a corrupt file has such a tile, and no kernel reads outside the
    /// stream for it). The kernels walk the codes piece by piece from here.
    #[inline]
    pub(crate) fn masked_tile(&self, tile: usize) -> Option<(&'a [u8], &'a [u8])> {
        let stored = 32 * (self.stored_cols / QUANT_BLOCK);
        let all_masks = self.quants.get(tile * stored..(tile + 1) * stored)?;
        let offset = |i: usize| -> Option<usize> {
            let bytes = self.offsets.get(4 * i..4 * i + 4)?;
            Some(u32::from_le_bytes(bytes.try_into().ok()?) as usize)
        };
        let (start, end) = (offset(tile)?, offset(tile + 1)?);
        let fits = start <= end
            && end - start == masked_code_bytes(self.kind, all_masks)
            && end.checked_add(MASKED_CODE_PADDING)? <= self.codes.len();
        fits.then(|| {
            (
                &all_masks[..32 * self.blocks_per_row()],
                &self.codes[start..],
            )
        })
    }

    /// Where the SIMD kernels start walking tile `tile`'s codes: [`QuantMatrix::masked_tile`]'s
    /// stream, `None` for a corrupt tile (which reads as zero). Always inlined: the check
    /// then compiles inside each kernel's target features (without it, decode measured 6–8%
    /// slower).
    #[inline(always)]
    pub(crate) fn masked_cursor(&self, tile: usize) -> Option<*const u8> {
        self.masked_tile(tile).map(|(_, stream)| stream.as_ptr())
    }

    /// The codes of tile `t`: the view's blocks, [`QuantKind::tile_block_bytes`] each.
    pub fn tile_quants(&self, t: usize) -> &'a [u8] {
        let block = self.kind.tile_block_bytes();
        let start = t * (self.stored_cols / QUANT_BLOCK) * block;
        &self.quants[start..start + self.blocks_per_row() * block]
    }

    /// The scales of tile `t`: per group of the view, one per row of the tile.
    pub fn tile_scales(&self, t: usize) -> &'a [f16] {
        let start = t * TILE_ROWS * (self.stored_cols / self.group);
        &self.scales[start..start + TILE_ROWS * self.groups_per_row()]
    }

    /// The minimums of tile `t` (asymmetric q4), in the order of [`QuantMatrix::tile_scales`].
    pub fn tile_mins(&self, t: usize) -> Option<&'a [f16]> {
        let start = t * TILE_ROWS * (self.stored_cols / self.group);
        self.mins
            .map(|m| &m[start..start + TILE_ROWS * self.groups_per_row()])
    }

    /// Tile `tile` as a one-tile q8 matrix over `codes` (its levels expanded into the q8
    /// tile layout by a kernel), with the tile's scales: how a sparse (4 of 8) tile meeting many
    /// tokens is multiplied.
    pub(crate) fn expanded_tile<'b>(&self, tile: usize, codes: &'b [u8]) -> QuantMatrix<'b>
    where
        'a: 'b,
    {
        debug_assert!(self.mins.is_none() && codes.len() == self.blocks_per_row() * 256);
        QuantMatrix {
            kind: QuantKind::Q8,
            rows: (self.rows - tile * TILE_ROWS).min(TILE_ROWS),
            cols: self.cols,
            group: self.group,
            quants: codes,
            scales: self.tile_scales(tile),
            mins: None,
            offsets: &[],
            codes: &[],
            stored_cols: self.cols,
        }
    }

    /// The signed level of weight `(r, c)`: `w = level · scale` (`+ min` for asymmetric q4).
    /// This is the definition of the tile layout that the SIMD kernels implement.
    pub fn level(&self, r: usize, c: usize) -> i32 {
        let block = self.kind.tile_block_bytes();
        let tile = self.tile_quants(r / TILE_ROWS);
        let b = &tile[c / QUANT_BLOCK * block..][..block];
        let (i, k, j) = (r % TILE_ROWS, c % QUANT_BLOCK / TILE_PIECE, c % TILE_PIECE);
        let code = match self.kind {
            QuantKind::Q8 => return b[64 * k + 8 * i + j] as i8 as i32,
            QuantKind::Q4 | QuantKind::Q4Asym | QuantKind::Q4Grid => {
                let byte = b[64 * (k / 2) + 8 * i + j];
                if k % 2 == 0 { byte & 0x0F } else { byte >> 4 }
            }
            QuantKind::Q3 | QuantKind::Q3Grid => {
                let low = (b[8 * i + j] >> (2 * k)) & 3;
                let high = (b[64 + 8 * k + i] >> j) & 1;
                low | high << 2
            }
            QuantKind::Q8Sparse48 | QuantKind::Q4Sparse48 => {
                let mask = b[8 * k + i];
                if mask >> j & 1 == 0 {
                    return 0;
                }
                // The kept codes of the row's piece in column order: this one's index is
                // the number of kept columns before it.
                let n = (mask & ((1u16 << j) - 1) as u8).count_ones() as usize;
                if n >= TILE_PIECE / 2 {
                    // More than four kept columns: a corrupt mask (valid files set four bits
                    // a byte). Read as pruned, as no kernel reads past its row's codes either.
                    return 0;
                }
                if self.kind == QuantKind::Q8Sparse48 {
                    return b[32 + 32 * k + 4 * i + n] as i8 as i32;
                }
                let byte = b[32 + 32 * (k / 2) + 4 * i + n];
                if k % 2 == 0 { byte & 0x0F } else { byte >> 4 }
            }
            QuantKind::Q8Masked | QuantKind::Q4Masked => {
                let Some((masks, codes)) = self.masked_tile(r / TILE_ROWS) else {
                    return 0;
                };
                // The piece's codes follow the tile's earlier pieces'; this one's index is the
                // number of kept weights before it in the piece, row by row.
                let piece = 32 * (c / QUANT_BLOCK) + 8 * k;
                let mask = masks[piece + i];
                if mask >> j & 1 == 0 {
                    return 0;
                }
                let n = masks[piece..piece + i]
                    .iter()
                    .map(|m| m.count_ones() as usize)
                    .sum::<usize>()
                    + (mask & ((1u16 << j) - 1) as u8).count_ones() as usize;
                let at = masked_code_bytes(self.kind, &masks[..piece]);
                return masked_level(self.kind, &codes[at..], n);
            }
        };
        match self.kind.info().grid {
            Some(levels) => levels[code as usize] as i32,
            None => code as i32 - self.kind.zero_point(),
        }
    }

    /// Scale of row `r`, group `g`.
    pub fn scale(&self, r: usize, g: usize) -> f32 {
        self.tile_scales(r / TILE_ROWS)[g * TILE_ROWS + r % TILE_ROWS].to_f32()
    }

    /// Minimum of row `r`, group `g` (0 for symmetric encodings).
    pub fn min(&self, r: usize, g: usize) -> f32 {
        self.tile_mins(r / TILE_ROWS)
            .map_or(0.0, |m| m[g * TILE_ROWS + r % TILE_ROWS].to_f32())
    }

    /// Row `r` decoded to f32 (reference dequantization).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.kind.is_masked() {
            // Walk the tile's masks once, not once per weight.
            let mut dense = vec![0u8; self.blocks_per_row() * 256];
            expand_masked_tile_scalar(self, r / TILE_ROWS, &mut dense);
            let q8 = self.expanded_tile(r / TILE_ROWS, &dense);
            return q8.dequantize_row(r % TILE_ROWS, out);
        }
        for g in 0..self.groups_per_row() {
            let (d, m) = (self.scale(r, g), self.min(r, g));
            let cols = g * self.group..(g + 1) * self.group;
            for (c, o) in cols.clone().zip(&mut out[cols]) {
                *o = self.level(r, c) as f32 * d + m;
            }
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }
}

/// Activations quantized to int8 per block of 32: `x ≈ d · q`. `dsums[b] = d[b] · Σ q` serves
/// the minimum term of asymmetric weights and the zero point of unsigned codes.
#[derive(Clone, Debug, Default)]
pub struct QuantizedActivations {
    pub tokens: usize,
    pub cols: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub dsums: Vec<f32>,
}

/// Tokens from which activation quantization is split across the thread pool.
const PARALLEL_QUANTIZE_TOKENS: usize = 16;

impl QuantizedActivations {
    /// Quantizes `tokens × cols` activations (`cols` a multiple of 32) with the reference
    /// rounding.
    pub fn quantize(x: &[f32], tokens: usize, cols: usize) -> Self {
        Self::quantize_with(KernelPath::Scalar, x, tokens, cols)
    }

    /// [`QuantizedActivations::quantize`] on `path`; every path gives the same bytes.
    pub fn quantize_with(path: KernelPath, x: &[f32], tokens: usize, cols: usize) -> Self {
        use rayon::prelude::*;
        assert_eq!(x.len(), tokens * cols, "activation shape");
        assert_eq!(
            cols % QUANT_BLOCK,
            0,
            "activation width must be whole blocks"
        );
        let blocks = x.len() / QUANT_BLOCK;
        let mut out = QuantizedActivations {
            tokens,
            cols,
            qs: vec![0; x.len()],
            d: vec![0.0; blocks],
            dsums: vec![0.0; blocks],
        };
        let bpt = cols / QUANT_BLOCK;
        if tokens >= PARALLEL_QUANTIZE_TOKENS {
            out.qs
                .par_chunks_mut(cols)
                .zip(out.d.par_chunks_mut(bpt))
                .zip(out.dsums.par_chunks_mut(bpt))
                .enumerate()
                .for_each(|(t, ((qs, d), dsums))| {
                    quantize_blocks(path, &x[t * cols..(t + 1) * cols], qs, d, dsums)
                });
        } else {
            quantize_blocks(path, x, &mut out.qs, &mut out.d, &mut out.dsums);
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

/// Quantizes whole blocks of `x` into `qs`, with scales `d` and `dsums`.
fn quantize_blocks(path: KernelPath, x: &[f32], qs: &mut [i8], d: &mut [f32], dsums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if path.is_x86_simd() {
        // SAFETY: the x86 SIMD paths are only selected when AVX2 and FMA are available;
        // the slices hold whole blocks of matching counts.
        return unsafe { x86::quantize_blocks(x, qs, d, dsums) };
    }
    #[cfg(target_arch = "aarch64")]
    if path != KernelPath::Scalar && path != KernelPath::Generic {
        // SAFETY: NEON is part of the AArch64 baseline; the slices hold whole blocks.
        return unsafe { arm::quantize_blocks(x, qs, d, dsums) };
    }
    let _ = path;
    for (b, (xb, qb)) in x
        .chunks_exact(QUANT_BLOCK)
        .zip(qs.chunks_exact_mut(QUANT_BLOCK))
        .enumerate()
    {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qb.iter_mut().zip(xb) {
            // Round half away from zero via truncation (`f32::round` is a libm call);
            // |v · inv| ≤ 127 by construction of the scale. The SIMD paths do the same
            // operations, so every path gives the same bytes.
            let scaled = v * inv;
            *q = (scaled + 0.5f32.copysign(scaled)) as i8;
            sum += *q as i32;
        }
        d[b] = scale;
        dsums[b] = scale * sum as f32;
    }
}

/// One token's quantized activations.
#[derive(Clone, Copy, Debug)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub dsums: &'a [f32],
}

/// Scalar reference: row `r` of `w` against one token, Σ over blocks of
/// `d_w · d_x · Σ level·q_x` (+ the minimum term `m · d_x · Σ q_x`).
pub fn dot_scalar(w: &QuantMatrix<'_>, r: usize, x: &ActRow<'_>) -> f32 {
    let bpg = w.group / QUANT_BLOCK;
    let mut acc = 0.0f32;
    for (b, (&dx, &dsum)) in x.d.iter().zip(x.dsums).enumerate().take(w.blocks_per_row()) {
        let g = b / bpg;
        let isum: i32 = (0..QUANT_BLOCK)
            .map(|j| w.level(r, b * QUANT_BLOCK + j) * x.qs[b * QUANT_BLOCK + j] as i32)
            .sum();
        acc += w.scale(r, g) * dx * isum as f32;
        if w.mins.is_some() {
            acc += w.min(r, g) * dsum;
        }
    }
    acc
}

/// Products of the tiles `tiles` of `w` with every token of `acts`: `out[t]` receives token
/// `t`'s results for rows `8 · tiles.start..min(8 · tiles.end, w.rows)`.
pub fn gemm_tiles(
    path: KernelPath,
    w: &QuantMatrix<'_>,
    acts: &QuantizedActivations,
    tiles: Range<usize>,
    out: &mut [&mut [f32]],
) {
    assert!(tiles.end <= w.tiles(), "gemm_tiles: tile range");
    assert_eq!(acts.cols, w.cols, "gemm_tiles: activation width");
    assert_eq!(
        out.len(),
        acts.tokens,
        "gemm_tiles: one output row per token"
    );
    let rows = (tiles.end * TILE_ROWS).min(w.rows) - (tiles.start * TILE_ROWS).min(w.rows);
    assert!(
        out.iter().all(|o| o.len() == rows),
        "gemm_tiles: output rows"
    );
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: each x86 SIMD path is only selected after run-time detection of its
        // features; shapes were checked above.
        KernelPath::Avx2 | KernelPath::AvxVnni | KernelPath::Avx512 => unsafe {
            x86::gemm_tiles(path, w, acts, tiles, out)
        },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is baseline; dotprod and i8mm are selected after run-time detection.
        p if p.is_arm_simd() => unsafe { arm::gemm_tiles(path, w, acts, tiles, out) },
        _ if w.kind.is_masked() => {
            // Walking the masks once per tile, not once per weight.
            let mut dense = vec![0u8; w.blocks_per_row() * 256];
            for tile in tiles.clone() {
                expand_masked_tile_scalar(w, tile, &mut dense);
                let q8 = w.expanded_tile(tile, &dense);
                let at = (tile - tiles.start) * TILE_ROWS;
                for (t, o) in out.iter_mut().enumerate() {
                    let x = acts.row(t);
                    for i in 0..q8.rows {
                        o[at + i] = dot_scalar(&q8, i, &x);
                    }
                }
            }
        }
        _ => {
            let first = tiles.start * TILE_ROWS;
            for (t, o) in out.iter_mut().enumerate() {
                let x = acts.row(t);
                for (i, v) in o.iter_mut().enumerate() {
                    *v = dot_scalar(w, first + i, &x);
                }
            }
        }
    }
}

/// Stores the tile results `res` (token-major, 8 rows each) of the tile at row offset `at`
/// of each output row in `out`, cutting the padded rows of a last, partial tile.
#[inline]
pub(crate) fn store_tile<const T: usize>(
    res: &[[f32; TILE_ROWS]; T],
    out: &mut [&mut [f32]],
    at: usize,
) {
    for (r, o) in res.iter().zip(out.iter_mut()) {
        if o.len() >= at + TILE_ROWS {
            o[at..at + TILE_ROWS].copy_from_slice(r);
        } else {
            let n = o.len() - at;
            o[at..].copy_from_slice(&r[..n]);
        }
    }
}

/// Round-to-nearest quantization of a `[rows, cols]` f32 matrix into the bytes of `encoding`
/// (the exact tensor data the format stores). Scales: q8 `amax / 127`; q4 symmetric maps the
/// value of largest magnitude to −8 (ggml's choice, using the full 16 levels), q3 likewise to
/// −4 (all 8 levels); q4 asymmetric spans `[min, max]` with 15 steps. Better scale choices
/// (clipping, GPTQ, AWQ) live in the converter and call [`encode_with_scales`].
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
        match encoding.quant_base() {
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
            Encoding::Q4Grid { .. } | Encoding::Q3Grid { .. } => {
                // The extreme lands on the grid's first level (−127).
                let extreme = if hi.abs() > lo.abs() { hi } else { lo };
                scales.push(extreme / -127.0);
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

/// The code of the grid level nearest to `level` (a weight over its scale), `levels`
/// ascending; ties go to the lower level.
pub fn nearest_grid_code(levels: &[i8], level: f32) -> u8 {
    // Levels ascend: the code is the number of midpoints below `level`.
    levels
        .windows(2)
        .map(|p| (level > 0.5 * (p[0] as f32 + p[1] as f32)) as u8)
        .sum()
}

/// Writes `code` (unsigned, zero point included; q8: the i8 bits) of row `i` of a tile,
/// column `c` of the block, into the tile block `block` (the inverse of
/// [`QuantMatrix::level`]).
fn put_code(kind: QuantKind, block: &mut [u8], i: usize, c: usize, code: u8) {
    let (k, j) = (c / TILE_PIECE, c % TILE_PIECE);
    match kind {
        QuantKind::Q8 => block[64 * k + 8 * i + j] = code,
        QuantKind::Q4 | QuantKind::Q4Asym | QuantKind::Q4Grid => {
            block[64 * (k / 2) + 8 * i + j] |= if k % 2 == 0 { code } else { code << 4 }
        }
        QuantKind::Q3 | QuantKind::Q3Grid => {
            debug_assert!(code < 8);
            block[8 * i + j] |= (code & 3) << (2 * k);
            block[64 + 8 * k + i] |= (code >> 2) << j;
        }
        QuantKind::Q8Sparse48 | QuantKind::Q4Sparse48 => {
            unreachable!("sparse rows are written by put_sparse48_row")
        }
        QuantKind::Q8Masked | QuantKind::Q4Masked => {
            unreachable!("masked tiles are written by put_masked_tile")
        }
    }
}

/// Shuffle controls that expand the kept codes of one row of a sparse (4 of 8) piece: for the mask byte
/// `m` (bit `j`: column `j` kept), byte `j` of entry `m` is the index of column `j`'s code
/// among the row's kept codes, or `0x80` (a zero from a byte shuffle or table lookup) when it
/// is pruned.
pub(crate) static SPARSE48_SHUFFLE: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut m = 0;
    while m < 256 {
        let (mut entry, mut kept, mut j) = (0u64, 0u64, 0);
        while j < 8 {
            let byte = if m >> j & 1 == 1 {
                kept += 1;
                kept - 1
            } else {
                0x80
            };
            entry |= byte << (8 * j);
            j += 1;
        }
        table[m] = entry;
        m += 1;
    }
    table
};

/// Writes row `i` of a tile block of a sparse kind: four kept positions of every piece of
/// eight columns (the non-zero values of `w`, completed with the first zero positions) into
/// the mask, and their codes (`code(c)` for column `c`) into the kept region. `None` when a
/// piece has more than four non-zero values.
fn put_sparse48_row(
    kind: QuantKind,
    block: &mut [u8],
    i: usize,
    w: &[f32],
    code: impl Fn(usize) -> u8,
) -> Option<()> {
    for k in 0..QUANT_BLOCK / TILE_PIECE {
        let piece = &w[TILE_PIECE * k..TILE_PIECE * (k + 1)];
        let nonzero = piece.iter().filter(|v| **v != 0.0).count();
        if nonzero > TILE_PIECE / 2 {
            return None;
        }
        let mut mask = 0u8;
        let mut zeros_to_keep = TILE_PIECE / 2 - nonzero;
        for (j, v) in piece.iter().enumerate() {
            if *v != 0.0 {
                mask |= 1 << j;
            } else if zeros_to_keep > 0 {
                mask |= 1 << j;
                zeros_to_keep -= 1;
            }
        }
        block[8 * k + i] = mask;
        for (n, j) in (0..TILE_PIECE).filter(|j| mask >> j & 1 == 1).enumerate() {
            let code = code(8 * k + j);
            match kind {
                QuantKind::Q8Sparse48 => block[32 + 32 * k + 4 * i + n] = code,
                _ => {
                    block[32 + 32 * (k / 2) + 4 * i + n] |=
                        if k % 2 == 0 { code } else { code << 4 }
                }
            }
        }
    }
    Some(())
}

/// Masked kinds: the level of the `n`th kept weight of the piece whose codes start at
/// `codes[0]` (q8: one i8 a code; q4: two codes a byte, low nibble first, zero point 8).
fn masked_level(kind: QuantKind, codes: &[u8], n: usize) -> i32 {
    if kind == QuantKind::Q8Masked {
        return codes[n] as i8 as i32;
    }
    let byte = codes[n / 2];
    let code = if n.is_multiple_of(2) {
        byte & 0x0F
    } else {
        byte >> 4
    };
    code as i32 - kind.zero_point()
}

/// Masked kinds: tile `tile` of `w` expanded into `out` as a q8 tile of signed levels (256
/// bytes a block, the layout [`QuantMatrix::expanded_tile`] reads). The reference for the
/// SIMD expansions, and the one the scalar paths use.
pub(crate) fn expand_masked_tile_scalar(w: &QuantMatrix<'_>, tile: usize, out: &mut [u8]) {
    assert_eq!(out.len(), w.blocks_per_row() * 256, "expanded tile size");
    out.fill(0);
    let Some((tile_masks, codes)) = w.masked_tile(tile) else {
        return;
    };
    let mut at = 0;
    for (dense, masks) in out.chunks_exact_mut(256).zip(tile_masks.chunks_exact(32)) {
        for k in 0..QUANT_BLOCK / TILE_PIECE {
            let mut n = 0;
            for i in 0..TILE_ROWS {
                let mask = masks[8 * k + i];
                for j in (0..TILE_PIECE).filter(|j| mask >> j & 1 == 1) {
                    dense[64 * k + 8 * i + j] = masked_level(w.kind, &codes[at..], n) as i8 as u8;
                    n += 1;
                }
            }
            at += masked_code_bytes(w.kind, &masks[8 * k..8 * k + 8]);
        }
    }
}

/// Writes the masks of tile `tile` (rows `8 · tile..`, fewer in a last partial tile) of a
/// masked kind into `masks` (32 bytes a block) and appends their kept codes (`code(i)` for
/// element `i` of `w`, kept where `w` is non-zero) to `stream`, recording the tile's start in
/// `offsets` (as u32 LE).
#[allow(clippy::too_many_arguments)]
fn put_masked_tile(
    kind: QuantKind,
    w: &[f32],
    rows: usize,
    cols: usize,
    tile: usize,
    masks: &mut [u8],
    offsets: &mut Vec<u8>,
    stream: &mut Vec<u8>,
    code: impl Fn(usize) -> u8,
) -> Option<()> {
    let tile_rows = tile * TILE_ROWS..((tile + 1) * TILE_ROWS).min(rows);
    offsets.extend_from_slice(&u32::try_from(stream.len()).ok()?.to_le_bytes());
    for (b, block_masks) in masks.chunks_exact_mut(32).enumerate() {
        for k in 0..QUANT_BLOCK / TILE_PIECE {
            let mut kept = Vec::with_capacity(TILE_ROWS * TILE_PIECE);
            for r in tile_rows.clone() {
                let mut mask = 0u8;
                for j in 0..TILE_PIECE {
                    let i = r * cols + b * QUANT_BLOCK + k * TILE_PIECE + j;
                    if w[i] != 0.0 {
                        mask |= 1 << j;
                        kept.push(code(i));
                    }
                }
                block_masks[8 * k + r % TILE_ROWS] = mask;
            }
            if kind == QuantKind::Q8Masked {
                stream.extend_from_slice(&kept);
            } else {
                stream.extend(
                    kept.chunks(2)
                        .map(|p| p[0] | p.get(1).map_or(0, |h| h << 4)),
                );
            }
        }
    }
    Some(())
}

/// Quantizes `w` with the given per-group scales (and minimums for asymmetric q4), rounding
/// to nearest, and lays the result out as the format's tensor bytes. `scales` (and `mins`)
/// are row-major: `rows × cols / group`.
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
    let kind = QuantMatrix::from_parts(encoding, &layout, &out)?.kind;
    // Quantize against the f16-rounded scale actually stored, so rounding sees the real grid.
    let stored: Vec<f32> = scales.iter().map(|&d| f16::from_f32(d).to_f32()).collect();
    let stored_mins: Vec<f32> = mins
        .map(|m| m.iter().map(|&v| f16::from_f32(v).to_f32()).collect())
        .unwrap_or_default();
    let groups = cols / group;
    let code = |i: usize| -> u8 {
        let g = i / group;
        let d = stored[g];
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        match kind {
            QuantKind::Q8 | QuantKind::Q8Sparse48 | QuantKind::Q8Masked => {
                (w[i] * inv).round().clamp(-127.0, 127.0) as i8 as u8
            }
            QuantKind::Q4 | QuantKind::Q4Sparse48 | QuantKind::Q4Masked => {
                (w[i] * inv + 8.0).round().clamp(0.0, 15.0) as u8
            }
            QuantKind::Q4Asym => ((w[i] - stored_mins[g]) * inv).round().clamp(0.0, 15.0) as u8,
            QuantKind::Q3 => (w[i] * inv + 4.0).round().clamp(0.0, 7.0) as u8,
            QuantKind::Q4Grid | QuantKind::Q3Grid => {
                nearest_grid_code(kind.info().grid.unwrap_or(&[]), w[i] * inv)
            }
        }
    };
    let block_bytes = kind.tile_block_bytes();
    let tile_bytes = cols / QUANT_BLOCK * block_bytes;
    if kind.is_masked() {
        let (offsets_range, codes_range) = (layout.offsets.clone()?, layout.codes.clone()?);
        let mut offsets = Vec::with_capacity(offsets_range.len());
        let mut stream = Vec::with_capacity(codes_range.len());
        for (tile, masks) in out[layout.quants.clone()]
            .chunks_exact_mut(tile_bytes)
            .enumerate()
        {
            put_masked_tile(
                kind,
                w,
                rows,
                cols,
                tile,
                masks,
                &mut offsets,
                &mut stream,
                code,
            )?;
        }
        offsets.extend_from_slice(&u32::try_from(stream.len()).ok()?.to_le_bytes());
        // The encoding was sized for these values (`Encoding::masked_storage`).
        if stream.len() + MASKED_CODE_PADDING != codes_range.len() {
            return None;
        }
        out[offsets_range].copy_from_slice(&offsets);
        out[codes_range.start..codes_range.start + stream.len()].copy_from_slice(&stream);
    }
    let quants = &mut out[layout.quants.clone()];
    for r in (0..rows).filter(|_| !kind.is_masked()) {
        let tile = &mut quants[r / TILE_ROWS * tile_bytes..][..tile_bytes];
        for (b, block) in tile.chunks_exact_mut(block_bytes).enumerate() {
            let start = r * cols + b * QUANT_BLOCK;
            if kind.is_sparse48() {
                let run = &w[start..start + QUANT_BLOCK];
                put_sparse48_row(kind, block, r % TILE_ROWS, run, |c| code(start + c))?;
            } else {
                for c in 0..QUANT_BLOCK {
                    put_code(kind, block, r % TILE_ROWS, c, code(start + c));
                }
            }
        }
    }
    // Scales (and minimums) go tile by tile, group by group, one per row of the tile.
    let position = |r: usize, g: usize| (r / TILE_ROWS * groups + g) * TILE_ROWS + r % TILE_ROWS;
    for r in 0..rows {
        for g in 0..groups {
            let at = layout.scales.start + 2 * position(r, g);
            out[at..at + 2].copy_from_slice(&f16::from_f32(stored[r * groups + g]).to_le_bytes());
            if let Some(range) = &layout.mins {
                let at = range.start + 2 * position(r, g);
                let m = stored_mins[r * groups + g];
                out[at..at + 2].copy_from_slice(&f16::from_f32(m).to_le_bytes());
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{paths, random_vec};

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
            v.push(Encoding::Q4Grid { group });
            v.push(Encoding::Q3Grid { group });
            v.push(Encoding::Q8Sparse48 { group });
            v.push(Encoding::Q4Sparse48 { group });
            v.extend(masked(group));
        }
        v
    }

    /// The masked encodings at `group`, their code streams unsized (see [`sized`]).
    fn masked(group: u32) -> [Encoding; 2] {
        [
            Encoding::Q8Masked {
                group,
                code_bytes: 0,
            },
            Encoding::Q4Masked {
                group,
                code_bytes: 0,
            },
        ]
    }

    /// Every supported path's products of `m` with `acts` agree with the scalar reference.
    fn assert_paths_match_scalar(m: &QuantMatrix<'_>, acts: &QuantizedActivations, what: &str) {
        let want = products(KernelPath::Scalar, m, acts, 0..m.tiles());
        for path in paths() {
            let got = products(path, m, acts, 0..m.tiles());
            for (g, e) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!(
                    (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                    "{path:?} {what}: {g} vs {e}"
                );
            }
        }
    }

    /// `enc` with a masked encoding's code stream sized for `w`.
    fn sized(enc: Encoding, w: &[f32], rows: usize, cols: usize) -> Encoding {
        if enc.is_masked() {
            enc.quant_base().masked_storage(w, rows, cols).unwrap()
        } else {
            enc
        }
    }

    /// `w` quantized by RTN into `enc` (sized for `w`), with the encoding used.
    fn rtn(enc: Encoding, w: &[f32], rows: usize, cols: usize) -> (Encoding, Vec<u8>) {
        let enc = sized(enc, w, rows, cols);
        (enc, quantize_rtn(w, rows, cols, enc).unwrap())
    }

    /// Random weights; for the sparse (4 of 8) encodings pruned 2:4 (the two smaller of every
    /// four zeroed; runs alternate with 4:8 runs where the four smaller of eight are)
    /// (and some runs with fewer non-zeros).
    fn weights(encoding: Encoding, n: usize, seed: u64) -> Vec<f32> {
        let mut w = random_vec(n, seed);
        if encoding.is_masked() {
            // Unstructured: about 60% pruned at random, with some pieces of eight all kept
            // and some all pruned, so row codes cross bytes and pieces are ragged.
            let keep = random_vec(n, seed ^ 0x5eed);
            for (i, (v, k)) in w.iter_mut().zip(&keep).enumerate() {
                let piece = i / 8;
                let pruned = match piece % 11 {
                    3 => false,
                    7 => true,
                    _ => *k < 0.2,
                };
                if pruned {
                    *v = 0.0;
                }
            }
            return w;
        }
        if matches!(
            encoding,
            Encoding::Q8Sparse48 { .. } | Encoding::Q4Sparse48 { .. }
        ) {
            for (i, piece) in w.chunks_exact_mut(8).enumerate() {
                let runs: Vec<&mut [f32]> = if i % 2 == 0 {
                    piece.chunks_mut(4).collect()
                } else {
                    vec![piece]
                };
                for (r, run) in runs.into_iter().enumerate() {
                    let mut order: Vec<usize> = (0..run.len()).collect();
                    order.sort_by(|&a, &b| run[a].abs().total_cmp(&run[b].abs()));
                    let drop = run.len() / 2 + usize::from((i + r) % 7 == 3);
                    for &j in &order[..drop] {
                        run[j] = 0.0;
                    }
                }
            }
        }
        w
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
    fn nearest_grid_code_picks_the_closest_level() {
        let levels = pocketlm_format::GRID4_LEVELS;
        let three = pocketlm_format::GRID3_LEVELS;
        for (code, &l) in three.iter().enumerate() {
            assert_eq!(nearest_grid_code(&three, l as f32) as usize, code);
        }
        assert_eq!(nearest_grid_code(&three, 1000.0), 7);
        for (code, &l) in levels.iter().enumerate() {
            assert_eq!(nearest_grid_code(&levels, l as f32) as usize, code);
        }
        // Against a brute-force search, on both sides of every midpoint and beyond the ends.
        for step in -1400..=1400 {
            let x = step as f32 * 0.1;
            let brute = (0..16)
                .min_by(|&a, &b| {
                    let da = (x - levels[a] as f32).abs();
                    let db = (x - levels[b] as f32).abs();
                    da.total_cmp(&db)
                })
                .unwrap();
            let got = nearest_grid_code(&levels, x) as usize;
            let (dg, db) = (
                (x - levels[got] as f32).abs(),
                (x - levels[brute] as f32).abs(),
            );
            assert!(dg <= db, "{x}: code {got} ({dg}) vs {brute} ({db})");
        }
    }

    #[test]
    fn rtn_round_trip_error_is_within_half_a_step() {
        for enc in encodings() {
            // 11 rows: one whole tile and a ragged one.
            let (rows, cols) = (11, 256);
            let w = weights(enc, rows * cols, 5);
            let (enc, bytes) = rtn(enc, &w, rows, cols);
            let m = matrix(enc, rows, cols, &bytes);
            let back = m.dequantize();
            let group = enc.group().unwrap() as usize;
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let d = m.scale(i / cols, i % cols / group).abs();
                // Half a step, plus f16 rounding of the scale/min stored with the group.
                // Symmetric q4 (q3) has 8 (4) negative levels and 7 (3) positive ones: when the group's
                // extreme is negative, values near +|extreme| clip one step short.
                let steps = if matches!(
                    enc,
                    Encoding::Q4 {
                        asymmetric: false,
                        ..
                    } | Encoding::Q3 { .. }
                        | Encoding::Q4Sparse48 { .. }
                        | Encoding::Q4Masked { .. }
                ) {
                    1.0
                } else if let Some(grid) = enc.quant_kind().and_then(|k| k.info().grid) {
                    // Half the widest gap between levels, or the clip above the top level.
                    let levels: Vec<f32> = grid.iter().map(|&l| l as f32).collect();
                    let half_gap = levels.windows(2).map(|p| 0.5 * (p[1] - p[0]));
                    half_gap.fold(127.0 - levels[levels.len() - 1], f32::max)
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
    fn q8_and_q4_tiles_match_the_spec() {
        // 8 rows × 32: row r, column c holds the level (c + r) % 16 − 8, scale 1.
        let (rows, cols) = (8, 32);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i % cols + i / cols) % 16) as f32 - 8.0)
            .collect();
        let q4 = Encoding::Q4 {
            group: 32,
            asymmetric: false,
        };
        let bytes = encode_with_scales(&w, rows, cols, q4, &[1.0; 8], None).unwrap();
        for r in 0..rows {
            for c in 0..cols {
                let (k, j) = (c / 8, c % 8);
                let byte = bytes[64 * (k / 2) + 8 * r + j];
                let code = if k % 2 == 0 { byte & 15 } else { byte >> 4 };
                assert_eq!(code as usize, (c + r) % 16, "row {r} col {c}");
            }
        }
        // Scales start at byte 128 (already a multiple of 64), one per row of the tile.
        assert_eq!(&bytes[128..130], &f16::from_f32(1.0).to_le_bytes());
        assert_eq!(matrix(q4, rows, cols, &bytes).dequantize(), w);

        let q8 = Encoding::Q8 { group: 32 };
        let bytes = encode_with_scales(&w, rows, cols, q8, &[1.0; 8], None).unwrap();
        for r in 0..rows {
            for c in 0..cols {
                let code = bytes[64 * (c / 8) + 8 * r + c % 8] as i8;
                assert_eq!(code as f32, w[r * cols + c], "row {r} col {c}");
            }
        }
        assert_eq!(matrix(q8, rows, cols, &bytes).dequantize(), w);
    }

    #[test]
    fn q3_bit_planes_match_the_spec() {
        let enc = Encoding::Q3 { group: 32 };
        // 9 rows (a second, padded tile) × 64: row r, column c at level (c + 3r) % 8, scale
        // −1, so w = 4 − level.
        let (rows, cols) = (9, 64);
        let level = |r: usize, c: usize| ((c + 3 * r) % 8) as u8;
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| 4.0 - level(i / cols, i % cols) as f32)
            .collect();
        let bytes = encode_with_scales(&w, rows, cols, enc, &[-1.0; 18], None).unwrap();
        // Two tiles of two 96-byte blocks.
        assert_eq!(enc.quant_layout(&[rows, cols]).unwrap().quants, 0..384);
        for r in 0..rows {
            for c in 0..cols {
                let block = &bytes[(r / 8) * 192 + (c / 32) * 96..][..96];
                let (i, k, j) = (r % 8, c % 32 / 8, c % 8);
                let low = (block[8 * i + j] >> (2 * k)) & 3;
                let high = (block[64 + 8 * k + i] >> j) & 1;
                assert_eq!(low | high << 2, level(r, c), "row {r} col {c}");
            }
        }
        let m = matrix(enc, rows, cols, &bytes);
        assert_eq!(m.dequantize(), w);
        // The padded rows of the last tile are zero codes with zero scales.
        assert_eq!(m.tile_scales(1)[1].to_f32(), 0.0);
    }

    #[test]
    fn sparse_tiles_match_the_spec_and_refuse_dense_pieces() {
        // 8 rows × 32: row r keeps columns r % 4 and (r + 1) % 4 of every run of four, at
        // level 1 + (r + c) % 7, never zero (scale 1).
        let (rows, cols) = (8, 32);
        let kept = |r: usize, c: usize| c % 4 == r % 4 || c % 4 == (r + 1) % 4;
        let level = |r: usize, c: usize| (1 + (r + c) % 7) as f32;
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                if kept(r, c) { level(r, c) } else { 0.0 }
            })
            .collect();
        for enc in [
            Encoding::Q8Sparse48 { group: 32 },
            Encoding::Q4Sparse48 { group: 32 },
        ] {
            let bytes = encode_with_scales(&w, rows, cols, enc, &[1.0; 8], None).unwrap();
            // One tile block (160 or 96 bytes), scales at the next multiple of 64.
            let q8 = enc == Encoding::Q8Sparse48 { group: 32 };
            assert_eq!(bytes.len(), if q8 { 192 + 16 } else { 128 + 16 });
            for r in 0..rows {
                for c in 0..cols {
                    let (k, j) = (c / 8, c % 8);
                    let mask = bytes[8 * k + r];
                    assert_eq!(mask >> j & 1 == 1, kept(r, c), "{enc} row {r} col {c}");
                    if !kept(r, c) {
                        continue;
                    }
                    let n = (0..j).filter(|&b| mask >> b & 1 == 1).count();
                    let code = if q8 {
                        bytes[32 + 32 * k + 4 * r + n] as i8 as f32
                    } else {
                        let byte = bytes[32 + 32 * (k / 2) + 4 * r + n];
                        (if k % 2 == 0 { byte & 15 } else { byte >> 4 }) as f32 - 8.0
                    };
                    assert_eq!(code, level(r, c), "{enc} row {r} col {c}");
                }
            }
            assert_eq!(matrix(enc, rows, cols, &bytes).dequantize(), w);
            // Five non-zeros in a piece of eight cannot be stored; three in a run of four can.
            let mut dense = w.clone();
            dense[..8].copy_from_slice(&[1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
            assert!(encode_with_scales(&dense, rows, cols, enc, &[1.0; 8], None).is_some());
            dense[..8].copy_from_slice(&[1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]);
            assert!(encode_with_scales(&dense, rows, cols, enc, &[1.0; 8], None).is_none());
        }
    }

    /// Masks with more than four kept columns (only a corrupt file has them) decode and
    /// multiply without reading past a row's codes or panicking, on every path.
    #[test]
    fn corrupt_sparse_masks_are_read_safely() {
        for enc in [
            Encoding::Q8Sparse48 { group: 32 },
            Encoding::Q4Sparse48 { group: 32 },
        ] {
            let (rows, cols) = (16, 64);
            let w = weights(enc, rows * cols, 3);
            let mut bytes = quantize_rtn(&w, rows, cols, enc).unwrap();
            let block = enc.tile_block_bytes().unwrap();
            for b in 0..bytes.len() / block.max(1) {
                if (b + 1) * block <= enc.quant_layout(&[rows, cols]).unwrap().quants.end {
                    bytes[b * block..b * block + 32].fill(0xFF);
                }
            }
            let m = matrix(enc, rows, cols, &bytes);
            assert!(m.dequantize().iter().all(|v| v.is_finite()));
            let acts = QuantizedActivations::quantize(&random_vec(3 * cols, 4), 3, cols);
            for path in paths() {
                let got = products(path, &m, &acts, 0..m.tiles());
                assert!(
                    got.iter().flatten().all(|v| v.is_finite()),
                    "{path:?} {enc}"
                );
            }
        }
    }

    #[test]
    fn views_of_first_rows_and_columns_read_in_place() {
        for enc in encodings() {
            let group = enc.group().unwrap() as usize;
            let (rows, cols) = (13, 4 * group);
            let w = weights(enc, rows * cols, 21);
            let (enc, bytes) = rtn(enc, &w, rows, cols);
            let m = matrix(enc, rows, cols, &bytes);
            let full = m.dequantize();
            let view = m.first_rows(11).unwrap().first_cols(2 * group).unwrap();
            assert!(
                m.first_cols(group / 2).is_none(),
                "cuts only on whole groups"
            );
            assert!(m.first_cols(5 * group).is_none() && m.first_rows(14).is_none());
            let part = view.dequantize();
            for r in 0..11 {
                assert_eq!(
                    &part[r * 2 * group..(r + 1) * 2 * group],
                    &full[r * cols..r * cols + 2 * group],
                    "{enc} row {r}"
                );
            }
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
            let (rows, cols) = (10, 384);
            let w = weights(enc, rows * cols, 11);
            let x = random_vec(cols, 12);
            let (enc, bytes) = rtn(enc, &w, rows, cols);
            let m = matrix(enc, rows, cols, &bytes);
            let acts = QuantizedActivations::quantize(&x, 1, cols);
            let xq = dequantized(&acts);
            let mut row = vec![0.0; cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut row);
                let want: f32 = row.iter().zip(&xq).map(|(a, b)| a * b).sum();
                let got = dot_scalar(&m, r, &acts.row(0));
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
    fn every_path_quantizes_activations_to_the_same_bytes() {
        // Values at exact rounding ties and zero blocks too.
        let mut x = random_vec(40 * 96, 8);
        for (i, v) in x.iter_mut().enumerate().take(96) {
            *v = (i as f32 - 48.0) * 0.5;
        }
        x[96..128].fill(0.0);
        for tokens in [1, 40] {
            let x = &x[..tokens * 96];
            let want = QuantizedActivations::quantize(x, tokens, 96);
            for path in paths() {
                let got = QuantizedActivations::quantize_with(path, x, tokens, 96);
                assert_eq!(got.qs, want.qs, "{path:?}");
                assert_eq!(got.d, want.d, "{path:?}");
                assert_eq!(got.dsums, want.dsums, "{path:?}");
            }
        }
    }

    /// Each token's results for the rows of `tiles`.
    fn products(
        path: KernelPath,
        m: &QuantMatrix<'_>,
        acts: &QuantizedActivations,
        tiles: Range<usize>,
    ) -> Vec<Vec<f32>> {
        let rows = (tiles.end * TILE_ROWS).min(m.rows) - tiles.start * TILE_ROWS;
        let mut out = vec![vec![f32::NAN; rows]; acts.tokens];
        let mut slices: Vec<&mut [f32]> = out.iter_mut().map(|o| &mut o[..]).collect();
        gemm_tiles(path, m, acts, tiles, &mut slices);
        out
    }

    #[test]
    fn every_supported_path_matches_scalar_for_every_encoding() {
        let paths = paths();
        eprintln!("testing kernel paths {paths:?}");
        for enc in encodings() {
            let group = enc.group().unwrap() as usize;
            // Ragged tiles (rows not a multiple of 8), 1..=3 groups a row, token counts around
            // every kernel's token width (2, 4, 8).
            for (i, &(rows, groups, tokens)) in [
                (1, 1, 1),
                (8, 1, 2),
                (13, 3, 3),
                (24, 2, 5),
                (17, 1, 9),
                (9, 2, 11),
                (16, 1, 17),
            ]
            .iter()
            .enumerate()
            {
                let cols = groups * group;
                let w = weights(enc, rows * cols, 30 + i as u64);
                let (enc, bytes) = rtn(enc, &w, rows, cols);
                let m = matrix(enc, rows, cols, &bytes);
                let x = random_vec(tokens * cols, 7 + i as u64);
                let acts = QuantizedActivations::quantize(&x, tokens, cols);
                let tiles = m.tiles();
                let want = products(KernelPath::Scalar, &m, &acts, 0..tiles);
                for &path in &paths {
                    let got = products(path, &m, &acts, 0..tiles);
                    // A later tile range alone gives the same results.
                    let tail = products(path, &m, &acts, tiles / 2..tiles);
                    for t in 0..tokens {
                        for r in 0..rows {
                            let (g, e) = (got[t][r], want[t][r]);
                            assert!(
                                (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                                "{path:?} {enc} {rows}×{cols} tokens {tokens}: token {t} row {r}: {g} vs {e}"
                            );
                            if r >= tiles / 2 * TILE_ROWS {
                                assert_eq!(
                                    tail[t][r - tiles / 2 * TILE_ROWS],
                                    g,
                                    "{path:?} {enc}: tile range"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn arm_tokens_get_the_same_bits_alone_as_in_a_prefill() {
        // AArch64's multi-token kernels (four tokens by element with `sdot`, or with `smmla`)
        // do each row and token's float operations in the one-token kernel's order, so a
        // prompt's logits do not depend on how many tokens a product held. x86's do not
        // promise this (their multi-token runs sum in another order).
        let arm = [KernelPath::Dotprod, KernelPath::I8mm];
        for path in paths().into_iter().filter(|p| arm.contains(p)) {
            for enc in encodings() {
                let group = enc.group().unwrap() as usize;
                let (rows, cols, tokens) = (21, 2 * group, 11);
                let w = weights(enc, rows * cols, 5);
                let (enc, bytes) = rtn(enc, &w, rows, cols);
                let m = matrix(enc, rows, cols, &bytes);
                let x = random_vec(tokens * cols, 6);
                let all = products(
                    path,
                    &m,
                    &QuantizedActivations::quantize(&x, tokens, cols),
                    0..m.tiles(),
                );
                for (t, row) in all.iter().enumerate() {
                    let one = QuantizedActivations::quantize(&x[t * cols..(t + 1) * cols], 1, cols);
                    let alone = products(path, &m, &one, 0..m.tiles());
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(row), bits(&alone[0]), "{path:?} {enc}: token {t}");
                }
            }
        }
    }

    #[test]
    fn masked_tiles_match_the_spec() {
        // 9 rows (a second, partial tile) × 64: row r keeps column c when (c + 3r) % 5 < 2
        // (so pieces keep 3 or 4 of 8 and rows start mid-byte in q4), level 1 + (r + c) % 7.
        let (rows, cols) = (9, 64);
        let kept = |r: usize, c: usize| (c + 3 * r) % 5 < 2;
        let level = |r: usize, c: usize| (1 + (r + c) % 7) as f32;
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                if kept(r, c) { level(r, c) } else { 0.0 }
            })
            .collect();
        for base in [
            Encoding::Q8 { group: 32 },
            Encoding::Q4 {
                group: 32,
                asymmetric: false,
            },
        ] {
            let enc = base.masked_storage(&w, rows, cols).unwrap();
            let layout = enc.quant_layout(&[rows, cols]).unwrap();
            let bytes = encode_with_scales(&w, rows, cols, enc, &[1.0; 18], None).unwrap();
            // Masks: 2 tiles × 2 blocks × 32 bytes; then 3 offsets; then the codes.
            assert_eq!(layout.quants, 0..128);
            assert_eq!(layout.offsets, Some(128..140));
            let q8 = !matches!(enc, Encoding::Q4Masked { .. });
            let offset = |i: usize| {
                u32::from_le_bytes(bytes[128 + 4 * i..132 + 4 * i].try_into().unwrap()) as usize
            };
            let codes = &bytes[140..];
            let mut stream = Vec::new();
            for tile in 0..2 {
                assert_eq!(offset(tile), stream.len(), "{enc} tile offset");
                for b in 0..2 {
                    for k in 0..4 {
                        let mut piece = Vec::new();
                        for i in 0..8 {
                            let r = 8 * tile + i;
                            let mask = bytes[64 * tile + 32 * b + 8 * k + i];
                            for j in 0..8 {
                                let c = 32 * b + 8 * k + j;
                                let want = r < rows && kept(r, c);
                                assert_eq!(mask >> j & 1 == 1, want, "{enc} row {r} col {c}");
                                if want {
                                    piece.push(level(r, c) as i32 + if q8 { 0 } else { 8 });
                                }
                            }
                        }
                        if q8 {
                            stream.extend(piece.iter().map(|&v| v as u8));
                        } else {
                            stream.extend(
                                piece
                                    .chunks(2)
                                    .map(|p| p[0] as u8 | (p.get(1).map_or(0, |&h| h as u8) << 4)),
                            );
                        }
                    }
                }
            }
            assert_eq!(offset(2), stream.len());
            assert_eq!(&codes[..stream.len()], &stream[..], "{enc} codes");
            assert_eq!(enc.params().1 as usize, stream.len());
            assert_eq!(matrix(enc, rows, cols, &bytes).dequantize(), w, "{enc}");
            // Sized for other values, the encoding refuses these.
            let other = Encoding::Q8Masked {
                group: 32,
                code_bytes: enc.params().1 + 1,
            };
            assert!(encode_with_scales(&w, rows, cols, other, &[1.0; 18], None).is_none());
        }
        // Masked storage exists for q8 and symmetric q4 only.
        let q4a = Encoding::Q4 {
            group: 32,
            asymmetric: true,
        };
        assert!(q4a.masked_storage(&w, rows, cols).is_none());
    }

    /// Offsets or masks that disagree (only a corrupt file has them) make their block read
    /// as zero on every path, with no read outside the code stream and no panic.
    #[test]
    fn corrupt_masked_blocks_read_as_zero_on_every_path() {
        for base in masked(32) {
            let (rows, cols) = (24, 96);
            let w = weights(base, rows * cols, 9);
            let (enc, clean) = rtn(base, &w, rows, cols);
            let layout = enc.quant_layout(&[rows, cols]).unwrap();
            let offsets = layout.offsets.clone().unwrap();
            let acts = QuantizedActivations::quantize(&random_vec(2 * cols, 5), 2, cols);
            type Corruption<'a> = &'a dyn Fn(&mut [u8]);
            let corruptions: [Corruption<'_>; 4] = [
                // A mask bit set that the offsets do not pay for.
                &|b: &mut [u8]| b[32 * 4 + 3] ^= 0x10,
                // An offset past the stream.
                &|b: &mut [u8]| {
                    b[offsets.start + 4 * 2..offsets.start + 4 * 3]
                        .copy_from_slice(&u32::MAX.to_le_bytes())
                },
                // Offsets out of order.
                &|b: &mut [u8]| {
                    b[offsets.start + 4 * 2..offsets.start + 4 * 3]
                        .copy_from_slice(&1u32.to_le_bytes())
                },
                // Every mask full.
                &|b: &mut [u8]| b[layout.quants.clone()].fill(0xFF),
            ];
            for (c, corrupt) in corruptions.iter().enumerate() {
                let mut bytes = clean.clone();
                corrupt(&mut bytes);
                let m = matrix(enc, rows, cols, &bytes);
                let dense = m.dequantize();
                assert!(dense.iter().all(|v| v.is_finite()));
                assert_ne!(
                    dense,
                    matrix(enc, rows, cols, &clean).dequantize(),
                    "{enc} corruption {c}"
                );
                assert_paths_match_scalar(&m, &acts, &format!("{enc} corruption {c}"));
            }
        }
    }

    /// The scalar expansion of masked tiles (what the scalar paths use, and the layout the
    /// SIMD expansions write; the product tests compare those on every path) reads every
    /// weight as `level` does.
    #[test]
    fn masked_expansion_matches_the_reference() {
        for base in masked(64) {
            let (rows, cols) = (19, 192);
            let w = weights(base, rows * cols, 17);
            let (enc, bytes) = rtn(base, &w, rows, cols);
            let m = matrix(enc, rows, cols, &bytes);
            let mut dense = vec![0u8; m.blocks_per_row() * 256];
            for tile in 0..m.tiles() {
                expand_masked_tile_scalar(&m, tile, &mut dense);
                let q8 = m.expanded_tile(tile, &dense);
                for i in 0..q8.rows {
                    for c in 0..cols {
                        assert_eq!(
                            q8.level(i, c),
                            m.level(8 * tile + i, c),
                            "{enc} tile {tile} row {i} col {c}"
                        );
                    }
                }
            }
        }
    }

    /// Rows that keep every weight of a piece and start in the middle of a byte (q4) take
    /// the kernels' slow path for a row pair; it must agree with the reference too.
    #[test]
    fn masked_full_row_pairs_starting_mid_byte_match_scalar() {
        // Rows keep 3, 4, 8, 8, 8, 8, 5, 1 weights of each piece of 8 (so rows 2–3 start at
        // code 7 and rows 4–5 at code 23, both odd), in two tiles and two blocks.
        let keep = [3usize, 4, 8, 8, 8, 8, 5, 1];
        let (rows, cols) = (16, 64);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                if c % 8 < keep[r % 8] {
                    ((r * 7 + c * 3) % 13) as f32 * 0.25 - 1.6
                } else {
                    0.0
                }
            })
            .collect();
        for base in masked(32) {
            let (enc, bytes) = rtn(base, &w, rows, cols);
            let m = matrix(enc, rows, cols, &bytes);
            for tokens in [1, 3] {
                let x = random_vec(tokens * cols, 2);
                let acts = QuantizedActivations::quantize(&x, tokens, cols);
                assert_paths_match_scalar(&m, &acts, &format!("{enc} tokens {tokens}"));
            }
        }
    }
}
