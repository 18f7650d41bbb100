//! x86-64 tile kernels for the quantized encodings: AVX2 (`maddubs`), AVX-VNNI (256-bit
//! `vpdpbusd`) and AVX-512 VNNI (512-bit `vpdpbusd`; byte masks rebuild q3's high plane).
//!
//! A piece register holds eight codes of each of four (AVX2) or eight (AVX-512) rows. It is
//! multiplied with the same eight activation bytes broadcast to every row, so 32-bit lane
//! `2i` sums row `i`'s first four products and lane `2i + 1` its last four: the lanes stay
//! per row from the first block to the last, scaled per block by a vector of the rows'
//! scales, and only the finished tile adds its lane pairs. `vpdpbusd` multiplies unsigned
//! by signed bytes, so codes stay unsigned (q8 is offset by 128 first) and the zero point
//! comes back as `zero_point · d_w · d_x · Σ q_x`, from the activations' block sums.

use std::arch::x86_64::*;
use std::ops::Range;

use super::kinds::{
    self, Q3, Q3G, Q4A, Q4M, Q4S, Q8, Q8M, Q8S, block_bytes, is_grid, is_masked, is_sparse,
    masked_piece_bytes,
};
use super::{ActRow, QuantMatrix, QuantizedActivations, SPARSE48_SHUFFLE, store_tile};
use crate::KernelPath;
use pocketlm_format::{QUANT_BLOCK, TILE_ROWS};

/// How far ahead of the block being multiplied a product asks for weight bytes.
const PREFETCH_AHEAD: usize = 2048;

/// Asks for the weight bytes `PREFETCH_AHEAD` past block `b` of a tile's codes at `q` (and
/// past a masked tile's code cursor). A model larger than the cache is bound by weight
/// traffic for one token and for the few tokens of a batched decode step alike (without it a
/// 2-token step of a 604 MB model cost 1.5x a 1-token step, with it 1.1x).
#[inline(always)]
fn prefetch_block<const K: u8>(q: *const u8, b: usize, cursor: *const u8) {
    let ahead = q.wrapping_add(b * block_bytes(K) + PREFETCH_AHEAD);
    for line in (0..block_bytes(K)).step_by(64) {
        // SAFETY: a prefetch is a hint; it never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8) };
    }
    if is_masked(K) {
        let ahead = cursor.wrapping_add(PREFETCH_AHEAD);
        // SAFETY: as above.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64) as *const i8);
        }
    }
}

/// Adds `n` to every byte of a shuffle-table entry (a row's codes start `n` bytes later).
const SHIFT_BYTES: u64 = 0x0101_0101_0101_0101;

/// Products of tiles `tiles` of `w` with every token of `acts`, into `out` as
/// [`super::gemm_tiles`] describes.
///
/// # Safety
/// `path` must be one of the x86 SIMD paths and the CPU must support its features; the
/// shapes must agree as [`super::gemm_tiles`] checks.
pub unsafe fn gemm_tiles(
    path: KernelPath,
    w: &QuantMatrix<'_>,
    acts: &QuantizedActivations,
    tiles: Range<usize>,
    out: &mut [&mut [f32]],
) {
    let rows: Vec<ActRow<'_>> = (0..acts.tokens).map(|t| acts.row(t)).collect();
    // SAFETY: forwarded contract; each family's features were detected for its path.
    unsafe {
        match path {
            KernelPath::Avx512 => by_kind!(w.kind, avx512::run, w, &rows, tiles, out),
            KernelPath::AvxVnni => by_kind!(w.kind, avx_vnni::run, w, &rows, tiles, out),
            _ => by_kind!(w.kind, avx2::run, w, &rows, tiles, out),
        }
    }
}

/// Splits every tile's tokens into runs of a power-of-two width up to `$max`, calls the tile
/// kernel `$tile::<K, T>` on each and stores its results. A sparse (4 of 8) tile meeting more
/// tokens than one run is first expanded (`$expand`) into a dense q8 tile, so the expansion
/// is paid once per tile instead of once per run (likewise a masked tile, whose codes are
/// found by walking its masks).
macro_rules! run_tiles {
    ($tile:ident, $expand:ident, $max:literal) => {
        /// # Safety
        /// The CPU must support this family's features; shapes as for `gemm_tiles`.
        pub(super) unsafe fn run<const K: u8>(
            w: &QuantMatrix<'_>,
            x: &[ActRow<'_>],
            tiles: Range<usize>,
            out: &mut [&mut [f32]],
        ) {
            let first = tiles.start;
            let expand = is_sparse(K) && x.len() > $max;
            let mut codes = vec![0u8; if expand { w.blocks_per_row() * 256 } else { 0 }];
            for tile in tiles {
                let at = (tile - first) * TILE_ROWS;
                // SAFETY: forwarded contract; `codes` holds a q8 tile of the view's blocks.
                unsafe {
                    if expand {
                        $expand::<K>(w, tile, &mut codes);
                        token_runs::<Q8>(&w.expanded_tile(tile, &codes), 0, x, out, at);
                    } else {
                        token_runs::<K>(w, tile, x, out, at);
                    }
                }
            }
        }

        /// Tile `tile` of `w` against every token of `x`, results at row `at` of `out`.
        #[inline]
        unsafe fn token_runs<const K: u8>(
            w: &QuantMatrix<'_>,
            tile: usize,
            x: &[ActRow<'_>],
            out: &mut [&mut [f32]],
            at: usize,
        ) {
            let mut t0 = 0;
            while t0 < x.len() {
                let left = x.len() - t0;
                let n = if left >= $max {
                    $max
                } else {
                    1 << left.ilog2()
                };
                let (xs, os) = (&x[t0..t0 + n], &mut out[t0..t0 + n]);
                // The first run streams the tile from memory; later runs find it in cache.
                let prefetch = t0 == 0;
                // SAFETY: forwarded contract; `xs` holds exactly `n` rows.
                unsafe {
                    match n {
                        1 => store_tile(&$tile::<K, 1>(w, tile, xs, prefetch), os, at),
                        2 => store_tile(&$tile::<K, 2>(w, tile, xs, prefetch), os, at),
                        4 => store_tile(&$tile::<K, 4>(w, tile, xs, prefetch), os, at),
                        _ => store_tile(&$tile::<K, $max>(w, tile, xs, prefetch), os, at),
                    }
                }
                t0 += n;
            }
        }
    };
}

/// The AVX2 and AVX-VNNI kernels: the same loops, with `maddubs` + `madd` or `vpdpbusd`
/// for the integer products. A tile is done as two halves of four rows (one 256-bit piece
/// register each), which leaves registers for four tokens' accumulators.
macro_rules! avx2_family {
    ($name:ident, $features:literal, $vnni:literal) => {
        pub(super) mod $name {
            use super::*;

            /// Codes of q8 are offset by 128 for `vpdpbusd`; AVX2 multiplies them signed.
            const fn zero_point(kind: u8) -> f32 {
                kinds::zero_point(kind) as f32
                    + if $vnni && kinds::signed(kind) {
                        128.0
                    } else {
                        0.0
                    }
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn load(p: *const u8) -> __m256i {
                // SAFETY: the caller guarantees 32 readable bytes at `p`.
                unsafe { _mm256_loadu_si256(p as *const __m256i) }
            }

            /// The eight activation bytes at `p` in every 64-bit lane.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn broadcast(p: *const i8) -> __m256i {
                // SAFETY: the caller guarantees 8 readable bytes at `p`.
                _mm256_set1_epi64x(unsafe { (p as *const i64).read_unaligned() })
            }

            /// q3's high bits of four rows × 8 codes (the u32 at `p`, bit `8i + j` for row
            /// `i`, code `j`) as bytes of 4 where set.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn high_bits(p: *const u8) -> __m256i {
                // SAFETY: the caller guarantees 4 readable bytes at `p`.
                let bits = unsafe { (p as *const u32).read_unaligned() };
                // Byte i takes bit-plane byte i / 8 (each 128-bit lane holds the whole u32),
                // then tests bit i % 8.
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(bits as i32),
                    _mm256_set_epi64x(
                        0x0303_0303_0303_0303,
                        0x0202_0202_0202_0202,
                        0x0101_0101_0101_0101,
                        0,
                    ),
                );
                let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
                _mm256_and_si256(set, _mm256_set1_epi8(4))
            }

            /// Pieces 0..4 of rows `4h..4h + 4` of the tile block at `blk`, as codes the
            /// integer product takes: unsigned, except q8 under plain AVX2.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn pieces<const K: u8>(blk: *const u8, h: usize) -> [__m256i; 4] {
                // SAFETY: the caller guarantees a whole tile block at `blk`; every offset
                // below stays inside it (256, 128 or 96 bytes) and `h` is 0 or 1.
                unsafe {
                    let half = 32 * h;
                    match K {
                        Q8S | Q4S => {
                            let p = [0, 1, 2, 3].map(|k| expand48::<K>(blk, k, h));
                            if K == Q8S && $vnni {
                                let flip = _mm256_set1_epi8(i8::MIN);
                                p.map(|v| _mm256_xor_si256(v, flip))
                            } else {
                                p
                            }
                        }
                        Q8 => {
                            let p = [
                                load(blk.add(half)),
                                load(blk.add(64 + half)),
                                load(blk.add(128 + half)),
                                load(blk.add(192 + half)),
                            ];
                            if $vnni {
                                let flip = _mm256_set1_epi8(i8::MIN);
                                p.map(|v| _mm256_xor_si256(v, flip))
                            } else {
                                p
                            }
                        }
                        Q3 | Q3G => {
                            let low = load(blk.add(half));
                            let three = _mm256_set1_epi8(3);
                            let high = blk.add(64 + 4 * h);
                            grid_levels::<K>([
                                _mm256_or_si256(_mm256_and_si256(low, three), high_bits(high)),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<2>(low), three),
                                    high_bits(high.add(8)),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(low), three),
                                    high_bits(high.add(16)),
                                ),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<6>(low), three),
                                    high_bits(high.add(24)),
                                ),
                            ])
                        }
                        _ => {
                            let mask = _mm256_set1_epi8(0x0F);
                            let c0 = load(blk.add(half));
                            let c1 = load(blk.add(64 + half));
                            grid_levels::<K>([
                                _mm256_and_si256(c0, mask),
                                _mm256_and_si256(_mm256_srli_epi16::<4>(c0), mask),
                                _mm256_and_si256(c1, mask),
                                _mm256_and_si256(_mm256_srli_epi16::<4>(c1), mask),
                            ])
                        }
                    }
                }
            }

            /// Grid kinds: `codes` to the grid's signed levels by a byte lookup, offset like
            /// q8's codes for `vpdpbusd`; the other kinds' codes pass through.
            #[inline]
            #[target_feature(enable = $features)]
            fn grid_levels<const K: u8>(codes: [__m256i; 4]) -> [__m256i; 4] {
                if !is_grid(K) {
                    return codes;
                }
                let levels = kinds::grid(K);
                // SAFETY: `levels` holds the 16 bytes read.
                let table = _mm256_broadcastsi128_si256(unsafe {
                    _mm_loadu_si128(levels.as_ptr() as *const __m128i)
                });
                let p = codes.map(|c| _mm256_shuffle_epi8(table, c));
                if $vnni {
                    let flip = _mm256_set1_epi8(i8::MIN);
                    p.map(|v| _mm256_xor_si256(v, flip))
                } else {
                    p
                }
            }

            /// Piece `k` of rows `4h..4h + 4` of the sparse (4 of 8) tile block at `blk`, expanded to dense
            /// codes: each row's kept codes go through the shuffle its mask byte selects;
            /// pruned columns get the zero point.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn expand48<const K: u8>(blk: *const u8, k: usize, h: usize) -> __m256i {
                // SAFETY: the caller guarantees a whole tile block at `blk`: 32 mask bytes
                // (row masks of piece k at 8k), then the kept codes (160 or 96 bytes in all);
                // every read below lies inside it.
                unsafe {
                    let m = (blk.add(8 * k + 4 * h) as *const u32).read_unaligned();
                    let entry = |i: u32| SPARSE48_SHUFFLE[(m >> (8 * i) & 0xFF) as usize] as i64;
                    // Row i of the half finds its kept codes at byte 4i of the source.
                    let control = _mm256_add_epi8(
                        _mm256_set_epi64x(entry(3), entry(2), entry(1), entry(0)),
                        _mm256_set_epi64x(
                            0x0c0c_0c0c_0c0c_0c0c,
                            0x0808_0808_0808_0808,
                            0x0404_0404_0404_0404,
                            0,
                        ),
                    );
                    let kept = if K == Q8S {
                        _mm_loadu_si128(blk.add(32 + 32 * k + 16 * h) as *const __m128i)
                    } else {
                        let v =
                            _mm_loadu_si128(blk.add(32 + 32 * (k / 2) + 16 * h) as *const __m128i);
                        let v = if k % 2 == 0 {
                            v
                        } else {
                            _mm_srli_epi16::<4>(v)
                        };
                        _mm_and_si128(v, _mm_set1_epi8(0x0F))
                    };
                    let dense = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(kept), control);
                    if K == Q4S {
                        // Pruned columns (control byte ≥ 0x80) read as the zero point 8.
                        _mm256_blendv_epi8(dense, _mm256_set1_epi8(8), control)
                    } else {
                        dense
                    }
                }
            }

            /// Pieces 0..4 of rows `4h..4h + 4` of a masked tile block (masks at `masks`,
            /// codes at `*cursor`, which moves past the block), as [`pieces`] gives them:
            /// each row's kept codes go through the shuffle its mask byte selects, so pruned
            /// columns read 0 (q8) or the zero point (q4). A q8 row pair is one 16-byte load;
            /// q4 rows are unpacked one at a time (a row may start mid-byte).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn masked_pieces<const K: u8>(
                masks: *const u8,
                cursor: &mut *const u8,
                h: usize,
            ) -> [__m256i; 4] {
                let mut out = [_mm256_setzero_si256(); 4];
                // SAFETY: the caller guarantees 32 mask bytes at `masks` and, at `*cursor`,
                // the block's codes (as many as its masks keep) followed by at least 64
                // readable bytes (`QuantMatrix::masked_tile` checked the tile): every load
                // starts at or before a piece's last code and reads at most 16 bytes.
                unsafe {
                    for (k, v) in out.iter_mut().enumerate() {
                        let m = (masks.add(8 * k) as *const u64).read_unaligned();
                        let p = *cursor;
                        let rows = (m >> (32 * h)) as u32;
                        let byte = |i: u32| (rows >> (8 * i) & 0xFF) as usize;
                        let count = |i: u32| (rows >> (8 * i) & 0xFF).count_ones() as usize;
                        // The codes of the rows before this half come first.
                        let skip = if h == 1 {
                            (m as u32).count_ones() as usize
                        } else {
                            0
                        };
                        *v = if K == Q8M {
                            let pair = |first: usize, i: u32| {
                                let control = _mm_set_epi64x(
                                    (SPARSE48_SHUFFLE[byte(i + 1)] + count(i) as u64 * SHIFT_BYTES)
                                        as i64,
                                    SPARSE48_SHUFFLE[byte(i)] as i64,
                                );
                                let src = _mm_loadu_si128(p.add(first) as *const __m128i);
                                _mm_shuffle_epi8(src, control)
                            };
                            let lo = pair(skip, 0);
                            let hi = pair(skip + count(0) + count(1), 2);
                            let levels = _mm256_set_m128i(hi, lo);
                            if $vnni {
                                _mm256_xor_si256(levels, _mm256_set1_epi8(i8::MIN))
                            } else {
                                levels
                            }
                        } else {
                            // A row pair's codes (at most 16) from the byte holding the
                            // first: one 8-byte load unpacks to 16 codes in order, enough
                            // unless the pair keeps all 16 and starts mid-byte (then the rows
                            // go one at a time).
                            let nibbles = |first: usize| {
                                let v = _mm_loadl_epi64(p.add(first / 2) as *const __m128i);
                                let nib = _mm_set1_epi8(0x0F);
                                let lo = _mm_and_si128(v, nib);
                                let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), nib);
                                _mm_unpacklo_epi8(lo, hi)
                            };
                            let shifted = |i: u32, by: usize| {
                                (SPARSE48_SHUFFLE[byte(i)] + by as u64 * SHIFT_BYTES) as i64
                            };
                            // Pruned columns (control ≥ 0x80) read the zero point.
                            let select = |codes: __m128i, control: __m128i| {
                                _mm_blendv_epi8(
                                    _mm_shuffle_epi8(codes, control),
                                    _mm_set1_epi8(8),
                                    control,
                                )
                            };
                            let pair = |first: usize, i: u32| {
                                let odd = first % 2;
                                if odd + count(i) + count(i + 1) <= 16 {
                                    let control = _mm_set_epi64x(
                                        shifted(i + 1, odd + count(i)),
                                        shifted(i, odd),
                                    );
                                    select(nibbles(first), control)
                                } else {
                                    let second = first + count(i);
                                    let r0 =
                                        select(nibbles(first), _mm_set_epi64x(-1, shifted(i, odd)));
                                    let r1 = select(
                                        nibbles(second),
                                        _mm_set_epi64x(-1, shifted(i + 1, second % 2)),
                                    );
                                    _mm_unpacklo_epi64(r0, r1)
                                }
                            };
                            let lo = pair(skip, 0);
                            let hi = pair(skip + count(0) + count(1), 2);
                            _mm256_set_m128i(hi, lo)
                        };
                        *cursor = p.add(masked_piece_bytes(K, m));
                    }
                }
                out
            }

            /// `acc` plus the sums of four products per 32-bit lane.
            #[inline]
            #[target_feature(enable = $features)]
            fn dot<const K: u8>(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
                if $vnni {
                    // SAFETY: `$vnni` is true only in the family compiled with `avxvnni`
                    // enabled; in the other one this branch is dead code.
                    #[allow(unused_unsafe)]
                    unsafe {
                        _mm256_dpbusd_avx_epi32(acc, w, x)
                    }
                } else {
                    // Unsigned codes are at most 15: two products fit an i16 unsaturated.
                    // Signed q8 codes and grid levels use the sign trick so `maddubs`
                    // (u8 × i8) applies.
                    let pairs = if kinds::signed(K) {
                        _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
                    } else {
                        _mm256_maddubs_epi16(w, x)
                    };
                    _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
                }
            }

            /// Four f16 values at `p` as f32, each twice: the lane pairs of four rows.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn row_pairs(p: *const half::f16) -> __m256 {
                // SAFETY: the caller guarantees 4 readable f16 at `p`.
                let v = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(p as *const __m128i) });
                _mm256_permutevar8x32_ps(
                    _mm256_castps128_ps256(v),
                    _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
                )
            }

            /// Rows `4h..4h + 4` of tile `tile` against the `T` tokens of `x`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn half_tile<const K: u8, const T: usize>(
                w: &QuantMatrix<'_>,
                tile: usize,
                h: usize,
                x: &[ActRow<'_>],
                prefetch: bool,
            ) -> [__m128; T] {
                debug_assert_eq!(x.len(), T);
                let q = w.tile_quants(tile).as_ptr();
                let scales = w.tile_scales(tile).as_ptr();
                let mins = w.tile_mins(tile).map_or(scales, |m| m.as_ptr());
                let bpg = w.group / QUANT_BLOCK;
                let half_zero_point = 0.5 * zero_point(K);
                let mut cursor = std::ptr::null();
                if is_masked(K) {
                    match w.masked_cursor(tile) {
                        Some(start) => cursor = start,
                        // A corrupt tile reads as zero.
                        None => return [_mm_setzero_ps(); T],
                    }
                }
                let xq: [*const i8; T] = std::array::from_fn(|t| x[t].qs.as_ptr());
                let xd: [*const f32; T] = std::array::from_fn(|t| x[t].d.as_ptr());
                let xs: [*const f32; T] = std::array::from_fn(|t| x[t].dsums.as_ptr());
                // One token (decode) alternates two accumulators between blocks, so the FMA
                // latency does not bound the loop.
                let mut acc = [[_mm256_setzero_ps(); 2]; T];
                for g in 0..w.groups_per_row() {
                    // SAFETY: g < groups: the tile's scales (and minimums) hold 8 per group;
                    // blocks b < blocks_per_row lie inside the tile's codes, and every
                    // activation row holds blocks_per_row blocks (checked by gemm_tiles).
                    unsafe {
                        let scale = row_pairs(scales.add(g * TILE_ROWS + 4 * h));
                        let min = if K == Q4A {
                            row_pairs(mins.add(g * TILE_ROWS + 4 * h))
                        } else {
                            _mm256_setzero_ps()
                        };
                        for b in g * bpg..(g + 1) * bpg {
                            // The first half touches every line of a block.
                            if prefetch && h == 0 {
                                prefetch_block::<K>(q, b, cursor);
                            }
                            let p = if is_masked(K) {
                                masked_pieces::<K>(q.add(32 * b), &mut cursor, h)
                            } else {
                                pieces::<K>(q.add(b * block_bytes(K)), h)
                            };
                            let slot = if T == 1 { b & 1 } else { 0 };
                            for t in 0..T {
                                let xp = xq[t].add(b * QUANT_BLOCK);
                                let mut i = dot::<K>(_mm256_setzero_si256(), p[0], broadcast(xp));
                                i = dot::<K>(i, p[1], broadcast(xp.add(8)));
                                i = dot::<K>(i, p[2], broadcast(xp.add(16)));
                                i = dot::<K>(i, p[3], broadcast(xp.add(24)));
                                let f = _mm256_cvtepi32_ps(i);
                                let dx = _mm256_set1_ps(*xd[t].add(b));
                                let dsum = *xs[t].add(b);
                                let scaled = if zero_point(K) == 0.0 {
                                    _mm256_mul_ps(f, dx)
                                } else {
                                    _mm256_fmsub_ps(f, dx, _mm256_set1_ps(dsum * half_zero_point))
                                };
                                acc[t][slot] = _mm256_fmadd_ps(scale, scaled, acc[t][slot]);
                                if K == Q4A {
                                    let m = _mm256_set1_ps(0.5 * dsum);
                                    acc[t][slot] = _mm256_fmadd_ps(min, m, acc[t][slot]);
                                }
                            }
                        }
                    }
                }
                std::array::from_fn(|t| {
                    // Lane pairs to rows: hadd gives rows (0, 1) in the low 128 bits and
                    // (2, 3) in the high ones.
                    let v = _mm256_add_ps(acc[t][0], acc[t][1]);
                    let s = _mm256_hadd_ps(v, v);
                    let lo = _mm256_castps256_ps128(s);
                    let hi = _mm256_extractf128_ps::<1>(s);
                    _mm_castpd_ps(_mm_unpacklo_pd(_mm_castps_pd(lo), _mm_castps_pd(hi)))
                })
            }

            #[target_feature(enable = $features)]
            unsafe fn tile<const K: u8, const T: usize>(
                w: &QuantMatrix<'_>,
                tile: usize,
                x: &[ActRow<'_>],
                prefetch: bool,
            ) -> [[f32; TILE_ROWS]; T] {
                assert_eq!(x.len(), T);
                let mut out = [[0.0f32; TILE_ROWS]; T];
                // SAFETY: forwarded contract (tile < tiles, shapes checked by gemm_tiles);
                // each store writes 4 floats into an 8-float row of `out`.
                unsafe {
                    let lo = half_tile::<K, T>(w, tile, 0, x, prefetch);
                    let hi = half_tile::<K, T>(w, tile, 1, x, prefetch);
                    for t in 0..T {
                        _mm_storeu_ps(out[t].as_mut_ptr(), lo[t]);
                        _mm_storeu_ps(out[t].as_mut_ptr().add(4), hi[t]);
                    }
                }
                out
            }

            /// The sparse (4 of 8) tile `tile` of `w` expanded into `codes` as a q8 tile (signed
            /// levels, 256 bytes a block).
            #[target_feature(enable = $features)]
            unsafe fn expand_tile<const K: u8>(w: &QuantMatrix<'_>, tile: usize, codes: &mut [u8]) {
                let q = w.tile_quants(tile).as_ptr();
                assert_eq!(codes.len(), w.blocks_per_row() * 256);
                let mut cursors = [std::ptr::null(); 2];
                if is_masked(K) {
                    match w.masked_cursor(tile) {
                        Some(start) => cursors = [start; 2],
                        None => return codes.fill(0),
                    }
                }
                for b in 0..w.blocks_per_row() {
                    for (h, cursor) in cursors.iter_mut().enumerate() {
                        // SAFETY: block b lies inside the tile's codes (masked: its masks, and
                        // the cursor walks the stream `masked_tile` checked); each store
                        // writes 32 bytes at 256b + 64k + 32h < codes.len().
                        unsafe {
                            let p = if is_masked(K) {
                                masked_pieces::<K>(q.add(32 * b), cursor, h)
                            } else {
                                pieces::<K>(q.add(b * block_bytes(K)), h)
                            };
                            for (k, v) in p.into_iter().enumerate() {
                                let level = if K == Q4S || K == Q4M {
                                    _mm256_sub_epi8(v, _mm256_set1_epi8(8))
                                } else if $vnni {
                                    _mm256_xor_si256(v, _mm256_set1_epi8(i8::MIN))
                                } else {
                                    v
                                };
                                let dst = codes.as_mut_ptr().add(256 * b + 64 * k + 32 * h);
                                _mm256_storeu_si256(dst as *mut __m256i, level);
                            }
                        }
                    }
                }
            }

            run_tiles!(tile, expand_tile, 4);
        }
    };
}

avx2_family!(avx2, "avx2,fma,f16c", false);
avx2_family!(avx_vnni, "avx2,fma,f16c,avxvnni", true);

/// AVX-512 VNNI: a whole tile (eight rows, 16 lanes) per piece register, eight tokens.
pub(super) mod avx512 {
    use super::*;

    /// Codes of q8 (and grid levels) are offset by 128 for `vpdpbusd`.
    const fn zero_point(kind: u8) -> f32 {
        kinds::zero_point(kind) as f32 + if kinds::signed(kind) { 128.0 } else { 0.0 }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi2,avx2,fma,f16c")]
    unsafe fn load(p: *const u8) -> __m512i {
        // SAFETY: the caller guarantees 64 readable bytes at `p`.
        unsafe { _mm512_loadu_si512(p as *const __m512i) }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi2,avx2,fma,f16c")]
    unsafe fn broadcast(p: *const i8) -> __m512i {
        // SAFETY: the caller guarantees 8 readable bytes at `p`.
        _mm512_set1_epi64(unsafe { (p as *const i64).read_unaligned() })
    }

    /// Pieces 0..4 of all eight rows of the tile block at `blk`, as unsigned codes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi2,avx2,fma,f16c")]
    unsafe fn pieces<const K: u8>(blk: *const u8) -> [__m512i; 4] {
        // SAFETY: the caller guarantees a whole tile block at `blk`; every offset below stays
        // inside it (256, 128 or 96 bytes).
        unsafe {
            match K {
                Q8 => {
                    let flip = _mm512_set1_epi8(i8::MIN);
                    [0, 64, 128, 192].map(|o| _mm512_xor_si512(load(blk.add(o)), flip))
                }
                Q8S => {
                    // Each piece's 32 kept codes (rows in order, four each) expand to the
                    // positions its 64-bit mask sets; pruned columns read 0, then 128 after
                    // the offset.
                    let flip = _mm512_set1_epi8(i8::MIN);
                    let masks = blk as *const u64;
                    [0, 1, 2, 3].map(|k| {
                        let kept = _mm256_loadu_si256(blk.add(32 + 32 * k) as *const __m256i);
                        let dense = _mm512_maskz_expand_epi8(
                            masks.add(k).read_unaligned(),
                            _mm512_castsi256_si512(kept),
                        );
                        _mm512_xor_si512(dense, flip)
                    })
                }
                Q4S => {
                    let nibble = _mm256_set1_epi8(0x0F);
                    let eight = _mm512_set1_epi8(8);
                    let masks = blk as *const u64;
                    let c0 = _mm256_loadu_si256(blk.add(32) as *const __m256i);
                    let c1 = _mm256_loadu_si256(blk.add(64) as *const __m256i);
                    let kept = [
                        _mm256_and_si256(c0, nibble),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(c0), nibble),
                        _mm256_and_si256(c1, nibble),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(c1), nibble),
                    ];
                    [0, 1, 2, 3].map(|k| {
                        _mm512_mask_expand_epi8(
                            eight,
                            masks.add(k).read_unaligned(),
                            _mm512_castsi256_si512(kept[k]),
                        )
                    })
                }
                Q3 | Q3G => {
                    let low = load(blk);
                    let three = _mm512_set1_epi8(3);
                    let four = _mm512_set1_epi8(4);
                    // The high plane's u64 of piece k is a byte mask over the piece: add 4
                    // where it is set.
                    let high = blk.add(64) as *const u64;
                    let m = [0, 1, 2, 3].map(|k| high.add(k).read_unaligned());
                    grid_levels::<K>([
                        _mm512_mask_add_epi8(
                            _mm512_and_si512(low, three),
                            m[0],
                            _mm512_and_si512(low, three),
                            four,
                        ),
                        {
                            let l = _mm512_and_si512(_mm512_srli_epi16::<2>(low), three);
                            _mm512_mask_add_epi8(l, m[1], l, four)
                        },
                        {
                            let l = _mm512_and_si512(_mm512_srli_epi16::<4>(low), three);
                            _mm512_mask_add_epi8(l, m[2], l, four)
                        },
                        {
                            let l = _mm512_and_si512(_mm512_srli_epi16::<6>(low), three);
                            _mm512_mask_add_epi8(l, m[3], l, four)
                        },
                    ])
                }
                _ => {
                    let mask = _mm512_set1_epi8(0x0F);
                    let c0 = load(blk);
                    let c1 = load(blk.add(64));
                    grid_levels::<K>([
                        _mm512_and_si512(c0, mask),
                        _mm512_and_si512(_mm512_srli_epi16::<4>(c0), mask),
                        _mm512_and_si512(c1, mask),
                        _mm512_and_si512(_mm512_srli_epi16::<4>(c1), mask),
                    ])
                }
            }
        }
    }

    /// Grid kinds: `codes` to the grid's signed levels by a byte lookup, offset by 128 for
    /// `vpdpbusd`; the other kinds' codes pass through.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi2,avx2,fma,f16c")]
    fn grid_levels<const K: u8>(codes: [__m512i; 4]) -> [__m512i; 4] {
        if !is_grid(K) {
            return codes;
        }
        let levels = kinds::grid(K);
        // SAFETY: `levels` holds the 16 bytes read.
        let table =
            _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(levels.as_ptr() as *const __m128i) });
        let flip = _mm512_set1_epi8(i8::MIN);
        codes.map(|c| _mm512_xor_si512(_mm512_shuffle_epi8(table, c), flip))
    }

    /// Pieces 0..4 of all eight rows of a masked tile block (masks at `masks`, codes at
    /// `*cursor`, which moves past the block), as unsigned codes like [`pieces`]: each piece's
    /// kept codes (q4: unpacked from nibbles in order) go to the positions its 64-bit mask
    /// sets with one `vpexpandb`; pruned columns read the zero point.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi2,avx2,fma,f16c")]
    unsafe fn masked_pieces<const K: u8>(masks: *const u8, cursor: &mut *const u8) -> [__m512i; 4] {
        let mut out = [_mm512_setzero_si512(); 4];
        // SAFETY: the caller guarantees 32 mask bytes at `masks` and, at `*cursor`, the
        // block's codes (as many as its masks keep) followed by at least 64 readable bytes
        // (`QuantMatrix::masked_tile` checked the tile), so a 64-byte (q8) or 32-byte (q4)
        // load at a piece's first code stays inside the stream.
        unsafe {
            for (k, v) in out.iter_mut().enumerate() {
                let m = (masks.add(8 * k) as *const u64).read_unaligned();
                let p = *cursor;
                *v = if K == Q8M {
                    let dense = _mm512_maskz_expand_epi8(m, load(p));
                    _mm512_xor_si512(dense, _mm512_set1_epi8(i8::MIN))
                } else {
                    let nib = _mm256_set1_epi8(0x0F);
                    let c = _mm256_loadu_si256(p as *const __m256i);
                    let lo = _mm256_and_si256(c, nib);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(c), nib);
                    // Per 128-bit lane, unpacking gives 16 codes in order: lane 0's low and
                    // high halves are codes 0..16 and 16..32, lane 1's 32..48 and 48..64.
                    let (a, b) = (_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi));
                    let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
                    let ordered = _mm512_shuffle_i64x2::<0b11_01_10_00>(z, z);
                    _mm512_mask_expand_epi8(_mm512_set1_epi8(8), m, ordered)
                };
                *cursor = p.add(masked_piece_bytes(K, m));
            }
        }
        out
    }

    /// Eight f16 values at `p` as f32, each twice: the lane pairs of eight rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi2,avx2,fma,f16c")]
    unsafe fn row_pairs(p: *const half::f16) -> __m512 {
        // SAFETY: the caller guarantees 8 readable f16 at `p`.
        let v = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) });
        _mm512_permutexvar_ps(
            _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
            _mm512_castps256_ps512(v),
        )
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi2,avx2,fma,f16c")]
    unsafe fn tile<const K: u8, const T: usize>(
        w: &QuantMatrix<'_>,
        tile: usize,
        x: &[ActRow<'_>],
        prefetch: bool,
    ) -> [[f32; TILE_ROWS]; T] {
        assert_eq!(x.len(), T);
        let mut out = [[0.0f32; TILE_ROWS]; T];
        let q = w.tile_quants(tile).as_ptr();
        let scales = w.tile_scales(tile).as_ptr();
        let mins = w.tile_mins(tile).map_or(scales, |m| m.as_ptr());
        let bpg = w.group / QUANT_BLOCK;
        let half_zero_point = 0.5 * zero_point(K);
        let xq: [*const i8; T] = std::array::from_fn(|t| x[t].qs.as_ptr());
        let xd: [*const f32; T] = std::array::from_fn(|t| x[t].d.as_ptr());
        let xs: [*const f32; T] = std::array::from_fn(|t| x[t].dsums.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; T];
        let mut cursor = std::ptr::null();
        if is_masked(K) {
            match w.masked_cursor(tile) {
                Some(start) => cursor = start,
                // A corrupt tile reads as zero.
                None => return out,
            }
        }
        for g in 0..w.groups_per_row() {
            // SAFETY: as in the AVX2 kernel: scales and minimums hold 8 per group of the
            // tile; blocks lie inside the tile's codes and every activation row.
            unsafe {
                let scale = row_pairs(scales.add(g * TILE_ROWS));
                let min = if K == Q4A {
                    row_pairs(mins.add(g * TILE_ROWS))
                } else {
                    _mm512_setzero_ps()
                };
                for b in g * bpg..(g + 1) * bpg {
                    if prefetch {
                        prefetch_block::<K>(q, b, cursor);
                    }
                    let p = if is_masked(K) {
                        masked_pieces::<K>(q.add(32 * b), &mut cursor)
                    } else {
                        pieces::<K>(q.add(b * block_bytes(K)))
                    };
                    let slot = if T == 1 { b & 1 } else { 0 };
                    for t in 0..T {
                        let xp = xq[t].add(b * QUANT_BLOCK);
                        let mut i =
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), p[0], broadcast(xp));
                        i = _mm512_dpbusd_epi32(i, p[1], broadcast(xp.add(8)));
                        i = _mm512_dpbusd_epi32(i, p[2], broadcast(xp.add(16)));
                        i = _mm512_dpbusd_epi32(i, p[3], broadcast(xp.add(24)));
                        let f = _mm512_cvtepi32_ps(i);
                        let dx = _mm512_set1_ps(*xd[t].add(b));
                        let dsum = *xs[t].add(b);
                        let scaled = if zero_point(K) == 0.0 {
                            _mm512_mul_ps(f, dx)
                        } else {
                            _mm512_fmsub_ps(f, dx, _mm512_set1_ps(dsum * half_zero_point))
                        };
                        acc[t][slot] = _mm512_fmadd_ps(scale, scaled, acc[t][slot]);
                        if K == Q4A {
                            let m = _mm512_set1_ps(0.5 * dsum);
                            acc[t][slot] = _mm512_fmadd_ps(min, m, acc[t][slot]);
                        }
                    }
                }
            }
        }
        let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
        for (t, a) in acc.iter().enumerate() {
            let v = _mm512_add_ps(a[0], a[1]);
            // Each lane plus its pair neighbour, then the even lanes in row order.
            let v = _mm512_add_ps(v, _mm512_permute_ps::<0b10_11_00_01>(v));
            let rows = _mm512_castps512_ps256(_mm512_permutexvar_ps(evens, v));
            // SAFETY: each row of `out` holds 8 floats.
            unsafe { _mm256_storeu_ps(out[t].as_mut_ptr(), rows) };
        }
        out
    }

    /// The sparse (4 of 8) tile `tile` of `w` expanded into `codes` as a q8 tile (signed levels,
    /// 256 bytes a block).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi2,avx2,fma,f16c")]
    unsafe fn expand_tile<const K: u8>(w: &QuantMatrix<'_>, tile: usize, codes: &mut [u8]) {
        let q = w.tile_quants(tile).as_ptr();
        assert_eq!(codes.len(), w.blocks_per_row() * 256);
        let mut cursor = std::ptr::null();
        if is_masked(K) {
            match w.masked_cursor(tile) {
                Some(start) => cursor = start,
                None => return codes.fill(0),
            }
        }
        for b in 0..w.blocks_per_row() {
            // SAFETY: block b lies inside the tile's codes (masked: its masks, and the cursor
            // walks the stream `masked_tile` checked); each store writes 64 bytes at
            // 256b + 64k < codes.len().
            unsafe {
                let p = if is_masked(K) {
                    masked_pieces::<K>(q.add(32 * b), &mut cursor)
                } else {
                    pieces::<K>(q.add(b * block_bytes(K)))
                };
                for (k, v) in p.into_iter().enumerate() {
                    let level = if K == Q4S || K == Q4M {
                        _mm512_sub_epi8(v, _mm512_set1_epi8(8))
                    } else {
                        _mm512_xor_si512(v, _mm512_set1_epi8(i8::MIN))
                    };
                    _mm512_storeu_si512(
                        codes.as_mut_ptr().add(256 * b + 64 * k) as *mut __m512i,
                        level,
                    );
                }
            }
        }
    }

    run_tiles!(tile, expand_tile, 8);
}

/// Quantizes whole blocks of 32 activations (AVX2): the same operations as the scalar
/// reference in the same order, so the bytes are identical.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `qs` has `x.len()` bytes and `d`, `dsums` one entry
/// per 32 values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_blocks(x: &[f32], qs: &mut [i8], d: &mut [f32], dsums: &mut [f32]) {
    assert!(qs.len() == x.len() && d.len() * QUANT_BLOCK == x.len() && dsums.len() == d.len());
    let sign = _mm256_set1_ps(-0.0);
    let half = _mm256_set1_ps(0.5);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (b, (xb, qb)) in x
        .chunks_exact(QUANT_BLOCK)
        .zip(qs.chunks_exact_mut(QUANT_BLOCK))
        .enumerate()
    {
        // SAFETY: each chunk holds 32 f32 (four 8-lane loads) and 32 output bytes.
        unsafe {
            let p = xb.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m));
            let scale = _mm_cvtss_f32(m) / 127.0;
            let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let ints = v.map(|v| {
                let s = _mm256_mul_ps(v, inv);
                // s + copysign(0.5, s), truncated: rounds half away from zero.
                _mm256_cvttps_epi32(_mm256_add_ps(s, _mm256_or_ps(_mm256_and_ps(s, sign), half)))
            });
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(ints[0], ints[1]),
                _mm256_packs_epi32(ints[2], ints[3]),
            );
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            _mm256_storeu_si256(qb.as_mut_ptr() as *mut __m256i, bytes);
            let pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), bytes);
            let sums = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
            let s = _mm_add_epi32(
                _mm256_castsi256_si128(sums),
                _mm256_extracti128_si256::<1>(sums),
            );
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            let sum = _mm_cvtsi128_si32(s);
            d[b] = scale;
            dsums[b] = scale * sum as f32;
        }
    }
}
