//! AArch64 tile kernels for the quantized encodings: NEON (widening multiplies), dotprod
//! (`sdot`) and i8mm (`smmla`), the latter two emitted with inline assembly because their
//! intrinsics are not stable yet.
//!
//! A 16-byte register holds eight codes of two rows of a tile (one row pair), as signed
//! levels (q4's codes stay unsigned and its zero point comes back per block as `-zp · dsum`),
//! so `sdot`/`smmla` (signed × signed) apply directly.
//! - One or two tokens (decode): `sdot` against eight activation bytes broadcast to both
//!   halves leaves each row's two partial sums in adjacent lanes; `addp` gathers them.
//! - Four tokens (prefill): the activations of four tokens are interleaved once per product.
//!   With dotprod, `sdot` by element meets four columns of one row with the same four columns
//!   of four tokens, so one register accumulates a row for four tokens; with i8mm, `smmla`
//!   against eight columns of two tokens yields the 2 × 2 products of two rows and two
//!   tokens, and a `zip` per row gathers its four tokens. Both then scale per block with the
//!   one-token kernel's operations, so every token's results are bit-identical however many
//!   tokens a product holds.

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use super::kinds::{
    self, Q3, Q3G, Q4, Q4A, Q4M, Q4S, Q8, Q8M, Q8S, block_bytes, is_masked, is_sparse,
    masked_piece_bytes,
};
use super::{ActRow, QuantMatrix, QuantizedActivations, SPARSE48_SHUFFLE, store_tile};
use crate::KernelPath;
use pocketlm_format::{QUANT_BLOCK, TILE_ROWS};

/// Products of tiles `tiles` of `w` with every token of `acts`, into `out` as
/// [`super::gemm_tiles`] describes.
///
/// # Safety
/// `path` must be an AArch64 path the CPU supports (dotprod and i8mm detected at run time);
/// shapes as [`super::gemm_tiles`] checks.
pub unsafe fn gemm_tiles(
    path: KernelPath,
    w: &QuantMatrix<'_>,
    acts: &QuantizedActivations,
    tiles: Range<usize>,
    out: &mut [&mut [f32]],
) {
    let rows: Vec<ActRow<'_>> = (0..acts.tokens).map(|t| acts.row(t)).collect();
    // SAFETY: forwarded contract.
    unsafe {
        match path {
            KernelPath::I8mm => by_kind!(w.kind, run_i8mm, w, &rows, tiles, out),
            KernelPath::Dotprod => by_kind!(w.kind, run_dotprod, w, &rows, tiles, out),
            _ => by_kind!(w.kind, run_neon, w, &rows, tiles, out),
        }
    }
}

/// Eight f16 values at `p` as two f32 vectors (`fcvtl`; the conversion intrinsics need the
/// unstable f16 vector types).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn f16x8(p: *const half::f16) -> (float32x4_t, float32x4_t) {
    // SAFETY: the caller guarantees 8 readable f16 at `p`.
    let raw = unsafe { vld1q_u16(p as *const u16) };
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: fcvtl/fcvtl2 only read and write the named vector registers.
    unsafe {
        asm!(
            "fcvtl {lo:v}.4s, {raw:v}.4h",
            "fcvtl2 {hi:v}.4s, {raw:v}.8h",
            raw = in(vreg) raw,
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    (lo, hi)
}

/// The eight activation bytes at `p` in both halves of a register.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn broadcast(p: *const i8) -> int8x16_t {
    // SAFETY: the caller guarantees 8 readable bytes at `p`.
    unsafe { vreinterpretq_s8_u64(vld1q_dup_u64(p as *const u64)) }
}

/// Unsigned codes as the signed levels the products take: a grid kind's levels by a table
/// lookup, any other kind's codes minus its zero point.
#[inline]
#[target_feature(enable = "neon")]
fn code_levels<const K: u8>(codes: uint8x16_t) -> int8x16_t {
    if kinds::is_grid(K) {
        let levels = kinds::grid(K);
        // SAFETY: `levels` holds the 16 bytes read.
        vqtbl1q_s8(unsafe { vld1q_s8(levels.as_ptr()) }, codes)
    } else {
        vsubq_s8(
            vreinterpretq_s8_u8(codes),
            vdupq_n_s8(kinds::zero_point(K) as i8),
        )
    }
}

/// Pieces `2c` and `2c + 1` of the q3 tile block at `blk` (64 bytes of low bits, row pair
/// `r`'s 16 at `16r`, piece `k` at bits `2k`; then one 8-byte plane of high bits per piece,
/// row `i`'s byte at `i`, code `j` at bit `j`) as four row pairs of signed levels.
///
/// # Safety
/// A whole q3 tile block (96 bytes) at `blk`; c < 2.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn q3_pieces<const K: u8>(blk: *const u8, c: usize) -> [[int8x16_t; 4]; 2] {
    let bit = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
    let mut low = [vdupq_n_u8(0); 4];
    for (r, l) in low.iter_mut().enumerate() {
        // SAFETY: bytes 16r..16r + 16 < 64 of the block.
        *l = unsafe { vld1q_u8(blk.add(16 * r)) };
    }
    let mut out = [[vdupq_n_s8(0); 4]; 2];
    for (i, k) in [2 * c, 2 * c + 1].into_iter().enumerate() {
        // SAFETY: piece k's plane is bytes 64 + 8k .. 72 + 8k < 96 of the block.
        let plane = unsafe { vld1_u8(blk.add(64 + 8 * k)) };
        let plane = vcombine_u8(plane, plane);
        for r in 0..4 {
            let two = vandq_u8(vshlq_u8(low[r], vdupq_n_s8(-2 * k as i8)), vdupq_n_u8(3));
            // Bytes 0..8 take row 2r's plane byte, 8..16 row 2r + 1's; each tests its code's bit.
            let rows = vcombine_u8(vdup_n_u8(2 * r as u8), vdup_n_u8(2 * r as u8 + 1));
            let high = vandq_u8(vtstq_u8(vqtbl1q_u8(plane, rows), bit), vdupq_n_u8(4));
            out[i][r] = code_levels::<K>(vorrq_u8(two, high));
        }
    }
    out
}

/// Pieces `2c` and `2c + 1` of the tile block at `blk`, each as four row pairs of signed
/// levels (codes minus the zero point, or a grid's levels).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn pieces<const K: u8>(blk: *const u8, c: usize) -> [[int8x16_t; 4]; 2] {
    // SAFETY: the caller guarantees a whole tile block at `blk` and c < 2; every offset below
    // stays inside it (256, 128 or 96 bytes).
    unsafe {
        match K {
            Q8S | Q4S => [expand48::<K>(blk, 2 * c), expand48::<K>(blk, 2 * c + 1)],
            Q8 => {
                let p = blk as *const i8;
                [
                    [0, 1, 2, 3].map(|r| vld1q_s8(p.add(128 * c + 16 * r))),
                    [0, 1, 2, 3].map(|r| vld1q_s8(p.add(128 * c + 64 + 16 * r))),
                ]
            }
            // Plain loops, in a function of their own: through `array::map` closures LLVM kept
            // the decode out of line (~380 instructions a block for one token, under qemu).
            Q3 | Q3G => q3_pieces::<K>(blk, c),
            _ => {
                let packed = [0, 1, 2, 3].map(|r| vld1q_u8(blk.add(64 * c + 16 * r)));
                // q4, q4a and q4nl; masked kinds decode through `masked_pieces` at every call
                // site.
                [
                    packed.map(|v| code_levels::<K>(vandq_u8(v, vdupq_n_u8(0x0F)))),
                    packed.map(|v| code_levels::<K>(vshrq_n_u8::<4>(v))),
                ]
            }
        }
    }
}

/// Piece `k` of the sparse (4 of 8) tile block at `blk` as four row pairs of signed levels: each row's
/// kept levels go through the table lookup its mask byte selects (pruned columns read 0).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn expand48<const K: u8>(blk: *const u8, k: usize) -> [int8x16_t; 4] {
    // SAFETY: the caller guarantees a whole tile block at `blk`: 32 mask bytes, then the
    // kept codes (160 or 96 bytes in all); every read below lies inside it.
    unsafe {
        [0, 1, 2, 3].map(|r| {
            let (m0, m1) = (*blk.add(8 * k + 2 * r), *blk.add(8 * k + 2 * r + 1));
            // The second row's kept levels start at byte 4 of the table.
            let control = vcombine_u8(
                vcreate_u8(SPARSE48_SHUFFLE[m0 as usize]),
                vadd_u8(vcreate_u8(SPARSE48_SHUFFLE[m1 as usize]), vdup_n_u8(4)),
            );
            let levels = if K == Q8S {
                vld1_s8(blk.add(32 + 32 * k + 8 * r) as *const i8)
            } else {
                let v = vld1_u8(blk.add(32 + 32 * (k / 2) + 8 * r));
                let v = if k % 2 == 0 {
                    vand_u8(v, vdup_n_u8(0x0F))
                } else {
                    vshr_n_u8::<4>(v)
                };
                vsub_s8(vreinterpret_s8_u8(v), vdup_n_s8(8))
            };
            vqtbl1q_s8(vcombine_s8(levels, vdup_n_s8(0)), control)
        })
    }
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

/// `acc + A·Bᵀ` for the 2 × 8 byte matrices `a` (two rows) and `b` (two tokens): lanes
/// (row 0 · token 0, row 0 · token 1, row 1 · token 0, row 1 · token 1) (`smmla`).
#[inline]
#[target_feature(enable = "neon,i8mm")]
fn smmla(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: smmla only reads and writes the named vector registers.
    unsafe {
        asm!(
            "smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// The tile's per-group scales and minimums, and the strides the kernels walk.
struct TileRefs {
    quants: *const u8,
    scales: *const half::f16,
    mins: *const half::f16,
    blocks_per_group: usize,
    groups: usize,
}

impl TileRefs {
    fn new(w: &QuantMatrix<'_>, tile: usize) -> TileRefs {
        let scales = w.tile_scales(tile).as_ptr();
        TileRefs {
            quants: w.tile_quants(tile).as_ptr(),
            scales,
            mins: w.tile_mins(tile).map_or(scales, |m| m.as_ptr()),
            blocks_per_group: w.group / QUANT_BLOCK,
            groups: w.groups_per_row(),
        }
    }
}

/// The scales and minimums (rows 0..4, 4..8) of each block's group, for kernels that walk a
/// tile's blocks in one flat loop: with groups of 32 a group is a block, and a nested loop
/// cost ~15 instructions a block; with one block a group the loads need no bookkeeping.
struct GroupScales {
    scale: (float32x4_t, float32x4_t),
    min: (float32x4_t, float32x4_t),
    group: usize,
    left: usize,
}

impl GroupScales {
    #[inline]
    #[target_feature(enable = "neon")]
    fn new() -> GroupScales {
        let zero = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        GroupScales {
            scale: zero,
            min: zero,
            group: 0,
            left: 0,
        }
    }

    /// Moves to block `b`, the block after the previous call's (or 0).
    ///
    /// # Safety
    /// `b` < the tile's blocks per row.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn enter(&mut self, t: &TileRefs, b: usize) {
        // SAFETY: the group of block b is < t.groups, whose scales and minimums exist.
        unsafe {
            if t.blocks_per_group == 1 {
                self.scale = f16x8(t.scales.add(b * TILE_ROWS));
                self.min = f16x8(t.mins.add(b * TILE_ROWS));
            } else {
                if self.left == 0 {
                    self.scale = f16x8(t.scales.add(self.group * TILE_ROWS));
                    self.min = f16x8(t.mins.add(self.group * TILE_ROWS));
                    self.group += 1;
                    self.left = t.blocks_per_group;
                }
                self.left -= 1;
            }
        }
    }
}

/// Adds one block's row sums (rows 0..4 in `lo`, 4..8 in `hi`) of one token to `acc`:
/// `scale · d_x · sum (+ min · d_x · Σ q_x)`.
#[inline]
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
fn accumulate<const K: u8>(
    acc: &mut [float32x4_t; 2],
    lo: int32x4_t,
    hi: int32x4_t,
    scale: (float32x4_t, float32x4_t),
    min: (float32x4_t, float32x4_t),
    dx: f32,
    dsum: f32,
) {
    acc[0] = vfmaq_f32(acc[0], scale.0, vmulq_n_f32(vcvtq_f32_s32(lo), dx));
    acc[1] = vfmaq_f32(acc[1], scale.1, vmulq_n_f32(vcvtq_f32_s32(hi), dx));
    if K == Q4A {
        acc[0] = vfmaq_n_f32(acc[0], min.0, dsum);
        acc[1] = vfmaq_n_f32(acc[1], min.1, dsum);
    }
}

/// Rows of `acc` (rows 0..4, 4..8) as the tile result of one token.
#[inline]
#[target_feature(enable = "neon")]
fn finish(acc: [float32x4_t; 2]) -> [f32; TILE_ROWS] {
    let mut out = [0.0f32; TILE_ROWS];
    // SAFETY: `out` holds 8 floats: two 4-lane stores.
    unsafe {
        vst1q_f32(out.as_mut_ptr(), acc[0]);
        vst1q_f32(out.as_mut_ptr().add(4), acc[1]);
    }
    out
}

/// Plain NEON, one token: widening multiplies (`smull`) summed pairwise into four lanes per
/// row, reduced with `addp` after each block.
#[target_feature(enable = "neon")]
unsafe fn tile_neon<const K: u8>(w: &QuantMatrix<'_>, tile: usize, x: &ActRow<'_>) -> [f32; 8] {
    let t = TileRefs::new(w, tile);
    let (xq, xd, xs) = (x.qs.as_ptr(), x.d.as_ptr(), x.dsums.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 2];
    let mut cursor = std::ptr::null();
    if is_masked(K) {
        match w.masked_cursor(tile) {
            Some(c) => cursor = c,
            None => return finish(acc),
        }
    }
    for g in 0..t.groups {
        // SAFETY: g < groups and b < blocks_per_row: scales, minimums, codes and the
        // activation row hold these (checked by gemm_tiles); a masked tile's cursor walks the
        // stream `masked_tile` checked, one piece after another.
        unsafe {
            let scale = f16x8(t.scales.add(g * TILE_ROWS));
            let min = f16x8(t.mins.add(g * TILE_ROWS));
            for b in g * t.blocks_per_group..(g + 1) * t.blocks_per_group {
                let blk = t.quants.add(b * block_bytes(K));
                let mut rows = [vdupq_n_s32(0); TILE_ROWS];
                for c in 0..2 {
                    let p = if is_masked(K) {
                        masked_pieces::<K>(blk, c, &mut cursor)
                    } else {
                        pieces::<K>(blk, c)
                    };
                    for (k, piece) in p.iter().enumerate() {
                        let xv = broadcast(xq.add(b * QUANT_BLOCK + 8 * (2 * c + k)));
                        for (r, &wv) in piece.iter().enumerate() {
                            rows[2 * r] = vpadalq_s16(
                                rows[2 * r],
                                vmull_s8(vget_low_s8(wv), vget_low_s8(xv)),
                            );
                            rows[2 * r + 1] = vpadalq_s16(rows[2 * r + 1], vmull_high_s8(wv, xv));
                        }
                    }
                }
                let lo = vpaddq_s32(vpaddq_s32(rows[0], rows[1]), vpaddq_s32(rows[2], rows[3]));
                let hi = vpaddq_s32(vpaddq_s32(rows[4], rows[5]), vpaddq_s32(rows[6], rows[7]));
                accumulate::<K>(&mut acc, lo, hi, scale, min, *xd.add(b), *xs.add(b));
            }
        }
    }
    finish(acc)
}

/// dotprod, `T` tokens: `sdot` of each row pair with the broadcast activations leaves each
/// row's two partial sums in adjacent lanes; one `addp` per four rows gathers them.
///
/// q4 codes stay unsigned (one `and` or `ushr` a register instead of also subtracting the
/// zero point); the zero point comes back per block as `-zp · dsum`, as on x86.
// Kept out of line: inlined into its callers, LLVM rematerializes the constants inside the
// block loop (two more instructions a block for one token).
#[inline(never)]
#[target_feature(enable = "neon,dotprod")]
unsafe fn tile_dotprod<const K: u8, const T: usize>(
    w: &QuantMatrix<'_>,
    tile: usize,
    x: &[ActRow<'_>],
) -> [[f32; TILE_ROWS]; T] {
    assert_eq!(x.len(), T);
    let t = TileRefs::new(w, tile);
    let mut acc = [[vdupq_n_f32(0.0); 2]; T];
    let mut cursor = std::ptr::null();
    if is_masked(K) {
        match w.masked_cursor(tile) {
            Some(c) => cursor = c,
            None => return acc.map(|a| finish(a)),
        }
    }
    let unsigned = K == Q4;
    let minus_zero = vdupq_n_f32(-(kinds::zero_point(K) as f32));
    // The activation rows' pointers, held in registers instead of reloaded from the slices.
    let xq: [*const i8; T] = std::array::from_fn(|i| x[i].qs.as_ptr());
    let xd: [*const f32; T] = std::array::from_fn(|i| x[i].d.as_ptr());
    let xs: [*const f32; T] = std::array::from_fn(|i| x[i].dsums.as_ptr());
    let mut blk = t.quants;
    let mut groups = GroupScales::new();
    for b in 0..t.groups * t.blocks_per_group {
        // SAFETY: as in `tile_neon`; `blk` walks the tile's blocks in order (block `b` at
        // `quants + b · block_bytes`), b < blocks_per_row.
        unsafe {
            groups.enter(&t, b);
            let (scale, min) = (groups.scale, groups.min);
            let mut pairs = [[vdupq_n_s32(0); 4]; T];
            for c in 0..2 {
                let p = if is_masked(K) {
                    masked_pieces::<K>(blk, c, &mut cursor)
                } else if unsigned {
                    codes_q4(blk, c)
                } else {
                    pieces::<K>(blk, c)
                };
                for (k, piece) in p.iter().enumerate() {
                    for tok in 0..T {
                        let xv = broadcast(xq[tok].add(b * QUANT_BLOCK + 8 * (2 * c + k)));
                        for r in 0..4 {
                            pairs[tok][r] = sdot(pairs[tok][r], piece[r], xv);
                        }
                    }
                }
            }
            for tok in 0..T {
                let lo = vpaddq_s32(pairs[tok][0], pairs[tok][1]);
                let hi = vpaddq_s32(pairs[tok][2], pairs[tok][3]);
                let (dx, dsum) = (*xd[tok].add(b), *xs[tok].add(b));
                if unsigned {
                    // scale · d_x · Σ (code - zp) q = scale · (d_x · Σ code q - zp · dsum)
                    let l = vfmaq_n_f32(vmulq_n_f32(vcvtq_f32_s32(lo), dx), minus_zero, dsum);
                    let h = vfmaq_n_f32(vmulq_n_f32(vcvtq_f32_s32(hi), dx), minus_zero, dsum);
                    acc[tok][0] = vfmaq_f32(acc[tok][0], scale.0, l);
                    acc[tok][1] = vfmaq_f32(acc[tok][1], scale.1, h);
                } else {
                    accumulate::<K>(&mut acc[tok], lo, hi, scale, min, dx, dsum);
                }
            }
            blk = blk.add(block_bytes(K));
        }
    }
    acc.map(|a| finish(a))
}

/// Pieces `2c` and `2c + 1` of the q4 tile block at `blk` as unsigned codes (0..=15, valid
/// signed bytes for `sdot`): the zero point is left to the caller.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn codes_q4(blk: *const u8, c: usize) -> [[int8x16_t; 4]; 2] {
    // SAFETY: the caller guarantees a whole q4 tile block (128 bytes) at `blk` and c < 2.
    let packed = [0, 1, 2, 3].map(|r| unsafe { vld1q_u8(blk.add(64 * c + 16 * r)) });
    [
        packed.map(|v| vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)))),
        packed.map(|v| vreinterpretq_s8_u8(vshrq_n_u8::<4>(v))),
    ]
}

/// Four tokens' quantized activations interleaved for the four-token kernels: for every
/// `UNIT` columns (4 for `sdot` by element, 8 for `smmla`), those columns' bytes of token 0,
/// 1, 2 and 3, so one register holds the same columns of four (or two) tokens; and per block
/// the four tokens' scales and scaled sums.
struct Interleaved4 {
    qs: Vec<u64>,
    d: Vec<f32>,
    dsums: Vec<f32>,
}

/// Interleaves the activation rows `x[4g..4g + 4]` for every whole group `g` of four, in
/// units of `UNIT` (4 or 8) bytes.
#[target_feature(enable = "neon")]
fn interleave4<const UNIT: usize>(x: &[ActRow<'_>]) -> Vec<Interleaved4> {
    x.chunks_exact(4)
        .map(|four| {
            let cols = four[0].qs.len();
            let blocks = four[0].d.len();
            assert!(cols % 16 == 0 && (UNIT == 4 || UNIT == 8));
            assert!(
                four.iter().all(|r| {
                    r.qs.len() == cols && r.d.len() == blocks && r.dsums.len() == blocks
                })
            );
            let mut qs = vec![0u64; cols / 2];
            for m in 0..cols / 16 {
                // SAFETY: every row holds `cols` bytes, so bytes 16m..16m + 16 are readable;
                // `qs` holds 4 · cols bytes, so the 64 written at 64m lie inside it.
                unsafe {
                    let load = |r: &ActRow<'_>| vld1q_u8(r.qs.as_ptr().add(16 * m) as *const u8);
                    let v = [0, 1, 2, 3].map(|i| load(&four[i]));
                    // vst4 writes element i of every register before element i + 1.
                    let to = qs.as_mut_ptr().add(8 * m);
                    if UNIT == 4 {
                        let v = v.map(|v| vreinterpretq_u32_u8(v));
                        vst4q_u32(to as *mut u32, uint32x4x4_t(v[0], v[1], v[2], v[3]));
                    } else {
                        let v = v.map(|v| vreinterpretq_u64_u8(v));
                        vst4q_u64(to, uint64x2x4_t(v[0], v[1], v[2], v[3]));
                    }
                }
            }
            let gather = |rows: [&[f32]; 4]| -> Vec<f32> {
                (0..blocks).flat_map(|b| rows.map(|r| r[b])).collect()
            };
            Interleaved4 {
                qs,
                d: gather([0, 1, 2, 3].map(|i| four[i].d)),
                dsums: gather([0, 1, 2, 3].map(|i| four[i].dsums)),
            }
        })
        .collect()
}

impl Interleaved4 {
    /// The codes, scales and scaled sums, checked to cover `blocks` blocks.
    fn pointers(&self, blocks: usize) -> (*const i8, *const f32, *const f32) {
        assert!(self.qs.len() * 8 >= blocks * 4 * QUANT_BLOCK);
        assert!(self.d.len() >= 4 * blocks && self.dsums.len() >= 4 * blocks);
        let qs = self.qs.as_ptr() as *const i8;
        (qs, self.d.as_ptr(), self.dsums.as_ptr())
    }
}

/// Pieces `2c` and `2c + 1` of an unmasked tile block: q4's as unsigned codes (the zero
/// point left to the caller), every other kind's as signed levels.
///
/// # Safety
/// As [`pieces`].
#[inline]
#[target_feature(enable = "neon")]
unsafe fn unmasked_pieces<const K: u8>(blk: *const u8, c: usize) -> [[int8x16_t; 4]; 2] {
    // SAFETY: forwarded contract.
    unsafe {
        if K == Q4 {
            codes_q4(blk, c)
        } else {
            pieces::<K>(blk, c)
        }
    }
}

/// `acc + Σ a·b` per lane, with the four bytes of `b` at `LANE` for every lane of `a`
/// (`sdot` by element).
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sdot_lane<const LANE: i32>(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: sdot only reads and writes the named vector registers.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.4b[{lane}]",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            lane = const LANE,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// `acc + v · s[lane]`, `lane` < 4 known after inlining.
#[inline]
#[target_feature(enable = "neon")]
fn fma_lane(acc: float32x4_t, v: float32x4_t, s: float32x4_t, lane: usize) -> float32x4_t {
    match lane {
        0 => vfmaq_laneq_f32::<0>(acc, v, s),
        1 => vfmaq_laneq_f32::<1>(acc, v, s),
        2 => vfmaq_laneq_f32::<2>(acc, v, s),
        _ => vfmaq_laneq_f32::<3>(acc, v, s),
    }
}

/// dotprod, four tokens at once, for prefill: each row of a row pair's register meets the
/// four tokens' bytes of the same columns with `sdot` by element, so one accumulator holds a
/// row's sums for all four tokens. Against [`tile_dotprod`] this loads the activations once
/// per four tokens, zeroes half the accumulators and needs no pairwise additions.
///
/// Per row and token it does the same operations in the same order as `tile_dotprod` (the
/// integer sums are exact), so the results are bit-identical to it.
///
/// `K` must not be a masked or 4-of-8 kind (those meet several tokens as expanded q8 tiles).
#[target_feature(enable = "neon,dotprod")]
unsafe fn tile_dotprod4<const K: u8>(
    w: &QuantMatrix<'_>,
    tile: usize,
    x: &Interleaved4,
) -> [[f32; TILE_ROWS]; 4] {
    assert!(!is_sparse(K));
    let t = TileRefs::new(w, tile);
    let blocks = t.groups * t.blocks_per_group;
    let (xq, xd, xs) = x.pointers(blocks);
    // Row r's results for the four tokens.
    let mut acc = [vdupq_n_f32(0.0); TILE_ROWS];
    let mut blk = t.quants;
    let mut groups = GroupScales::new();
    for b in 0..blocks {
        // SAFETY: as in `tile_dotprod`; the interleaved activations hold 128 bytes and four
        // scales and sums per block (asserted above).
        unsafe {
            groups.enter(&t, b);
            let (scale, min) = (groups.scale, groups.min);
            let mut sums = [vdupq_n_s32(0); TILE_ROWS];
            for c in 0..2 {
                let p = unmasked_pieces::<K>(blk, c);
                for (k, piece) in p.iter().enumerate() {
                    let at = xq.add(128 * b + 32 * (2 * c + k));
                    // Columns 0..4 and 4..8 of the piece, four tokens each.
                    let (a0, a1) = (vld1q_s8(at), vld1q_s8(at.add(16)));
                    for (r, &wv) in piece.iter().enumerate() {
                        // Lanes 0, 1 of a row pair are its first row, lanes 2, 3 its second.
                        sums[2 * r] = sdot_lane::<1>(sdot_lane::<0>(sums[2 * r], a0, wv), a1, wv);
                        sums[2 * r + 1] =
                            sdot_lane::<3>(sdot_lane::<2>(sums[2 * r + 1], a0, wv), a1, wv);
                    }
                }
            }
            let (dx, dsum) = (vld1q_f32(xd.add(4 * b)), vld1q_f32(xs.add(4 * b)));
            accumulate4::<K>(&mut acc, sums, scale, min, dx, dsum);
            blk = blk.add(block_bytes(K));
        }
    }
    by_token(acc)
}

/// Adds one block's sums (row r's four tokens in `sums[r]`) to `acc`, with the same operations
/// per row and token as [`tile_dotprod`] (q4's zero point as `-zp · dsum`) and
/// [`accumulate`] (every other kind).
#[inline]
#[target_feature(enable = "neon")]
fn accumulate4<const K: u8>(
    acc: &mut [float32x4_t; TILE_ROWS],
    sums: [int32x4_t; TILE_ROWS],
    scale: (float32x4_t, float32x4_t),
    min: (float32x4_t, float32x4_t),
    dx: float32x4_t,
    dsum: float32x4_t,
) {
    let minus_zero = vdupq_n_f32(-(kinds::zero_point(K) as f32));
    for (r, &sum) in sums.iter().enumerate() {
        let (s, m) = if r < 4 {
            (scale.0, min.0)
        } else {
            (scale.1, min.1)
        };
        let scaled = vmulq_f32(vcvtq_f32_s32(sum), dx);
        if K == Q4 {
            let l = vfmaq_f32(scaled, minus_zero, dsum);
            acc[r] = fma_lane(acc[r], l, s, r % 4);
        } else {
            acc[r] = fma_lane(acc[r], scaled, s, r % 4);
            if K == Q4A {
                acc[r] = fma_lane(acc[r], dsum, m, r % 4);
            }
        }
    }
}

/// Rows × four tokens (`acc[r]`) as four tokens' tile results.
#[inline]
#[target_feature(enable = "neon")]
fn by_token(acc: [float32x4_t; TILE_ROWS]) -> [[f32; TILE_ROWS]; 4] {
    // vst4 turns rows × tokens into tokens × rows: token t's rows 0..4 at 4t in `lo`.
    let (mut lo, mut hi) = ([0.0f32; 16], [0.0f32; 16]);
    // SAFETY: each store writes 16 floats into a 16-float array.
    unsafe {
        vst4q_f32(
            lo.as_mut_ptr(),
            float32x4x4_t(acc[0], acc[1], acc[2], acc[3]),
        );
        vst4q_f32(
            hi.as_mut_ptr(),
            float32x4x4_t(acc[4], acc[5], acc[6], acc[7]),
        );
    }
    std::array::from_fn(|tok| {
        std::array::from_fn(|r| {
            if r < 4 {
                lo[4 * tok + r]
            } else {
                hi[4 * tok + r - 4]
            }
        })
    })
}

/// i8mm, four tokens at once, for prefill: `smmla` of each row pair with the same eight
/// columns of tokens 0, 1 and of tokens 2, 3 (interleaved in units of 8) gives both rows'
/// sums for all four tokens; one `zip` per row gathers its four tokens into one register, and
/// the rest is [`tile_dotprod4`]'s, so the results are bit-identical to [`tile_dotprod`]'s.
///
/// `K` must not be a masked or 4-of-8 kind.
#[target_feature(enable = "neon,dotprod,i8mm")]
unsafe fn tile_i8mm4<const K: u8>(
    w: &QuantMatrix<'_>,
    tile: usize,
    x: &Interleaved4,
) -> [[f32; TILE_ROWS]; 4] {
    assert!(!is_sparse(K));
    let t = TileRefs::new(w, tile);
    let blocks = t.groups * t.blocks_per_group;
    let (xq, xd, xs) = x.pointers(blocks);
    let mut acc = [vdupq_n_f32(0.0); TILE_ROWS];
    let mut blk = t.quants;
    let mut groups = GroupScales::new();
    for b in 0..blocks {
        // SAFETY: as in `tile_dotprod4`.
        unsafe {
            groups.enter(&t, b);
            let (scale, min) = (groups.scale, groups.min);
            // One accumulator per (token pair, row pair): lanes (row 0 · token 0, row 0 ·
            // token 1, row 1 · token 0, row 1 · token 1).
            let mut mm = [[vdupq_n_s32(0); 4]; 2];
            for c in 0..2 {
                let p = unmasked_pieces::<K>(blk, c);
                for (k, piece) in p.iter().enumerate() {
                    let at = xq.add(128 * b + 32 * (2 * c + k));
                    let pairs = [vld1q_s8(at), vld1q_s8(at.add(16))];
                    for (r, &wv) in piece.iter().enumerate() {
                        for (pair, &xv) in pairs.iter().enumerate() {
                            mm[pair][r] = smmla(mm[pair][r], wv, xv);
                        }
                    }
                }
            }
            let sums: [int32x4_t; TILE_ROWS] = std::array::from_fn(|r| {
                let (a, b) = (
                    vreinterpretq_s64_s32(mm[0][r / 2]),
                    vreinterpretq_s64_s32(mm[1][r / 2]),
                );
                vreinterpretq_s32_s64(if r % 2 == 0 {
                    vzip1q_s64(a, b)
                } else {
                    vzip2q_s64(a, b)
                })
            });
            let (dx, dsum) = (vld1q_f32(xd.add(4 * b)), vld1q_f32(xs.add(4 * b)));
            accumulate4::<K>(&mut acc, sums, scale, min, dx, dsum);
            blk = blk.add(block_bytes(K));
        }
    }
    by_token(acc)
}

/// The sparse (4 of 8) tile `tile` of `w` expanded into `codes` as a q8 tile (signed levels, 256
/// bytes a block), so a tile meeting many tokens pays the expansion once.
#[target_feature(enable = "neon")]
unsafe fn expand_tile<const K: u8>(w: &QuantMatrix<'_>, tile: usize, codes: &mut [u8]) {
    if K == Q8M || K == Q4M {
        // SAFETY: forwarded contract.
        return unsafe { expand_masked::<K>(w, tile, codes) };
    }
    let q = w.tile_quants(tile).as_ptr();
    assert_eq!(codes.len(), w.blocks_per_row() * 256);
    for b in 0..w.blocks_per_row() {
        for c in 0..2 {
            // SAFETY: block b lies inside the tile's codes; each store writes 16 bytes at
            // 256b + 64k + 16r < codes.len().
            unsafe {
                let p = pieces::<K>(q.add(b * block_bytes(K)), c);
                for (i, piece) in p.iter().enumerate() {
                    for (r, &v) in piece.iter().enumerate() {
                        let at = 256 * b + 64 * (2 * c + i) + 16 * r;
                        vst1q_s8(codes.as_mut_ptr().add(at) as *mut i8, v);
                    }
                }
            }
        }
    }
}

/// One masked piece (row masks: the 8 bytes at `masks`; kept codes at `p`) as four row pairs
/// of signed levels: per row pair, one 16-byte load at the first row's codes and a table
/// lookup whose indices (the rows' mask bytes through the table, the second row's shifted by
/// the first's count) put each kept code in its column and zeros elsewhere. q4 rows are
/// unpacked one at a time (a row may start in the middle of a byte).
///
/// # Safety
/// 8 readable bytes at `masks`; at `p`, the piece's codes followed by at least 64 readable
/// bytes (every load starts at or before the piece's last code and reads at most 16 bytes).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn masked_piece<const K: u8>(masks: *const u8, p: *const u8) -> [int8x16_t; 4] {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let mut out = [vdupq_n_s8(0); 4];
    let mut start = 0usize;
    // SAFETY: as the contract above.
    unsafe {
        for (r, pair) in out.iter_mut().enumerate() {
            let (m0, m1) = (*masks.add(2 * r), *masks.add(2 * r + 1));
            let n0 = m0.count_ones() as usize;
            *pair = if K == Q8M {
                let control = vcombine_u8(
                    vcreate_u8(SPARSE48_SHUFFLE[m0 as usize]),
                    vcreate_u8(SPARSE48_SHUFFLE[m1 as usize] + n0 as u64 * ONES),
                );
                vreinterpretq_s8_u8(vqtbl1q_u8(vld1q_u8(p.add(start)), control))
            } else {
                let row = |first: usize, mask: u8| {
                    let v = vld1_u8(p.add(first / 2));
                    // Sixteen codes in order from the byte holding the row's first.
                    let lo = vand_u8(v, vdup_n_u8(0x0F));
                    let hi = vshr_n_u8::<4>(v);
                    let ordered = vcombine_u8(vzip1_u8(lo, hi), vzip2_u8(lo, hi));
                    let control =
                        vcreate_u8(SPARSE48_SHUFFLE[mask as usize] + (first % 2) as u64 * ONES);
                    let level = vsub_u8(vqtbl1_u8(ordered, control), vdup_n_u8(8));
                    // Pruned columns (index ≥ 0x80) are level 0.
                    vand_u8(level, vclt_u8(control, vdup_n_u8(16)))
                };
                vreinterpretq_s8_u8(vcombine_u8(row(start, m0), row(start + n0, m1)))
            };
            start += n0 + m1.count_ones() as usize;
        }
    }
    out
}

/// Pieces `2c` and `2c + 1` of a masked tile block (masks at `masks`, codes at `*cursor`,
/// which moves past them), as [`pieces`] gives them.
///
/// # Safety
/// 32 readable bytes at `masks`; at `*cursor`, the block's codes from piece `2c` on, followed
/// by at least 64 readable bytes (`QuantMatrix::masked_tile` checked the tile).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn masked_pieces<const K: u8>(
    masks: *const u8,
    c: usize,
    cursor: &mut *const u8,
) -> [[int8x16_t; 4]; 2] {
    // SAFETY: as the contract above; each piece's codes start where the previous one's end.
    unsafe {
        [2 * c, 2 * c + 1].map(|k| {
            let m = masks.add(8 * k);
            let piece = masked_piece::<K>(m, *cursor);
            *cursor = cursor.add(masked_piece_bytes(K, (m as *const u64).read_unaligned()));
            piece
        })
    }
}

/// The masked tile `tile` of `w` expanded into `codes` as a q8 tile (signed levels).
#[target_feature(enable = "neon")]
unsafe fn expand_masked<const K: u8>(w: &QuantMatrix<'_>, tile: usize, codes: &mut [u8]) {
    assert_eq!(codes.len(), w.blocks_per_row() * 256);
    let Some(mut cursor) = w.masked_cursor(tile) else {
        return codes.fill(0);
    };
    let masks = w.tile_quants(tile).as_ptr();
    for b in 0..w.blocks_per_row() {
        for c in 0..2 {
            // SAFETY: block b's masks lie in the tile's; the cursor walks the stream
            // `masked_tile` checked; each store writes 16 bytes inside block b of `codes`.
            unsafe {
                let p = masked_pieces::<K>(masks.add(32 * b), c, &mut cursor);
                for (i, piece) in p.iter().enumerate() {
                    for (r, &v) in piece.iter().enumerate() {
                        let at = 256 * b + 64 * (2 * c + i) + 16 * r;
                        vst1q_s8(codes.as_mut_ptr().add(at) as *mut i8, v);
                    }
                }
            }
        }
    }
}

/// A buffer for one expanded q8 tile when `w` is sparse (4 of 8 or masked) and meets more
/// than `width` tokens (so the expansion is paid once per tile, not once per run of tokens).
fn expansion_buffer<const K: u8>(
    w: &QuantMatrix<'_>,
    tokens: usize,
    width: usize,
) -> Option<Vec<u8>> {
    let expand = is_sparse(K) && tokens > width;
    expand.then(|| vec![0u8; w.blocks_per_row() * 256])
}

/// Runs `$tokens::<K>` (or `::<Q8>` over the expanded tile) on every tile.
macro_rules! each_tile {
    ($tokens:ident, $width:literal, $w:expr, $x:expr, $tiles:expr, $out:expr $(, $extra:expr)?) => {{
        let (w, x, out) = ($w, $x, $out);
        let first = $tiles.start;
        let mut codes = expansion_buffer::<K>(w, x.len(), $width);
        for tile in $tiles {
            let at = (tile - first) * TILE_ROWS;
            // SAFETY: forwarded contract; `codes` holds a q8 tile of the view's blocks.
            unsafe {
                match codes.as_mut() {
                    Some(codes) => {
                        expand_tile::<K>(w, tile, codes);
                        $tokens::<Q8>(&w.expanded_tile(tile, codes), 0, x, out, at $(, $extra)?);
                    }
                    None => $tokens::<K>(w, tile, x, out, at $(, $extra)?),
                }
            }
        }
    }};
}

/// Tile `tile` of `m` × every token of `x` on plain NEON, one token at a time.
#[target_feature(enable = "neon")]
unsafe fn tokens_neon<const K: u8>(
    m: &QuantMatrix<'_>,
    tile: usize,
    x: &[ActRow<'_>],
    out: &mut [&mut [f32]],
    at: usize,
) {
    for (t, xr) in x.iter().enumerate() {
        // SAFETY: forwarded contract.
        let res = unsafe { tile_neon::<K>(m, tile, xr) };
        store_tile(&[res], &mut out[t..t + 1], at);
    }
}

/// Tiles of `w` × tokens of `x` on plain NEON.
#[target_feature(enable = "neon")]
unsafe fn run_neon<const K: u8>(
    w: &QuantMatrix<'_>,
    x: &[ActRow<'_>],
    tiles: Range<usize>,
    out: &mut [&mut [f32]],
) {
    each_tile!(tokens_neon, 1, w, x, tiles, out)
}

/// `$name`: tile `tile` of `m` × each group of four tokens in `fours` by `$kernel`, into
/// `out[4g..4g + 4]`; with `$kernel`'s features, so that it inlines there.
macro_rules! four_token_groups {
    ($name:ident, $kernel:ident, $features:literal) => {
        // Out of line, so that the one-token path it is called beside keeps a small frame.
        #[inline(never)]
        #[target_feature(enable = $features)]
        unsafe fn $name<const K: u8>(
            m: &QuantMatrix<'_>,
            tile: usize,
            fours: &[Interleaved4],
            out: &mut [&mut [f32]],
            at: usize,
        ) {
            for (g, four) in fours.iter().enumerate() {
                // SAFETY: forwarded contract; `four` interleaves tokens 4g..4g + 4.
                let res = unsafe { $kernel::<K>(m, tile, four) };
                store_tile(&res, &mut out[4 * g..4 * g + 4], at);
            }
        }
    };
}

four_token_groups!(groups_dotprod4, tile_dotprod4, "neon,dotprod");
four_token_groups!(groups_i8mm4, tile_i8mm4, "neon,dotprod,i8mm");

/// Tile `tile` of `m` × every token of `x` with `sdot`: each whole group of four tokens
/// (`fours`, interleaved) by element, the rest two tokens at a time.
// Inlined into the tile loop, so a one-token tile pays no call of its own.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn tokens_dotprod<const K: u8>(
    m: &QuantMatrix<'_>,
    tile: usize,
    x: &[ActRow<'_>],
    out: &mut [&mut [f32]],
    at: usize,
    fours: &[Interleaved4],
) {
    let mut t0 = 0;
    if !fours.is_empty() && !is_sparse(K) {
        // SAFETY: forwarded contract.
        unsafe { groups_dotprod4::<K>(m, tile, fours, out, at) };
        t0 = 4 * fours.len();
    }
    while t0 < x.len() {
        let n = (x.len() - t0).min(2);
        let (xs, os) = (&x[t0..t0 + n], &mut out[t0..t0 + n]);
        // SAFETY: forwarded contract; `xs` holds exactly `n` rows.
        unsafe {
            if n == 2 {
                store_tile(&tile_dotprod::<K, 2>(m, tile, xs), os, at);
            } else {
                store_tile(&tile_dotprod::<K, 1>(m, tile, xs), os, at);
            }
        }
        t0 += n;
    }
}

/// Tiles of `w` × tokens of `x` with `sdot`.
#[target_feature(enable = "neon,dotprod")]
unsafe fn run_dotprod<const K: u8>(
    w: &QuantMatrix<'_>,
    x: &[ActRow<'_>],
    tiles: Range<usize>,
    out: &mut [&mut [f32]],
) {
    if let ([x], [out]) = (x, &mut *out) {
        // SAFETY: forwarded contract.
        return unsafe { one_token_tiles::<K>(w, x, tiles, out) };
    }
    // Interleaved once for all tiles; a masked or 4-of-8 matrix meets several tokens as
    // expanded q8 tiles, which take them too.
    let fours = interleave4::<4>(x);
    each_tile!(tokens_dotprod, 2, w, x, tiles, out, &fours)
}

/// Decode's products: tiles `tiles` of `w` × one token, into `out`. A loop of its own keeps
/// the per-tile cost to a call and a store (through `tokens_dotprod` it was ~65 instructions
/// a tile, 5% of a 576-wide q4 tile's work, counted under qemu).
///
/// # Safety
/// As [`gemm_tiles`].
#[target_feature(enable = "neon,dotprod")]
unsafe fn one_token_tiles<const K: u8>(
    w: &QuantMatrix<'_>,
    x: &ActRow<'_>,
    tiles: Range<usize>,
    out: &mut [f32],
) {
    let first = tiles.start;
    for tile in tiles {
        // SAFETY: forwarded contract.
        let res = unsafe { tile_dotprod::<K, 1>(w, tile, std::slice::from_ref(x)) };
        store_tile(
            &res,
            std::slice::from_mut(&mut &mut *out),
            (tile - first) * TILE_ROWS,
        );
    }
}

/// Tile `tile` of `m` × every token of `x`: each whole group of four tokens (`fours`,
/// interleaved) with `smmla`, the rest with `sdot`.
// Inlined into the tile loop, so a one-token tile pays no call of its own.
#[inline]
#[target_feature(enable = "neon,dotprod,i8mm")]
unsafe fn tokens_i8mm<const K: u8>(
    m: &QuantMatrix<'_>,
    tile: usize,
    x: &[ActRow<'_>],
    out: &mut [&mut [f32]],
    at: usize,
    fours: &[Interleaved4],
) {
    if is_sparse(K) {
        // SAFETY: forwarded contract.
        return unsafe { tokens_dotprod::<K>(m, tile, x, out, at, &[]) };
    }
    if !fours.is_empty() {
        // SAFETY: forwarded contract.
        unsafe { groups_i8mm4::<K>(m, tile, fours, out, at) };
    }
    let done = 4 * fours.len();
    // SAFETY: forwarded contract.
    unsafe { tokens_dotprod::<K>(m, tile, &x[done..], &mut out[done..], at, &[]) };
}

/// Tiles of `w` × tokens of `x` with `smmla` (and `sdot` for the last tokens of fewer than four).
#[target_feature(enable = "neon,dotprod,i8mm")]
unsafe fn run_i8mm<const K: u8>(
    w: &QuantMatrix<'_>,
    x: &[ActRow<'_>],
    tiles: Range<usize>,
    out: &mut [&mut [f32]],
) {
    if let ([x], [out]) = (x, &mut *out) {
        // SAFETY: forwarded contract (i8mm CPUs have dotprod).
        return unsafe { one_token_tiles::<K>(w, x, tiles, out) };
    }
    let fours = interleave4::<8>(x);
    each_tile!(tokens_i8mm, 4, w, x, tiles, out, &fours)
}

/// Quantizes whole blocks of 32 activations (NEON): the same operations as the scalar
/// reference, so the bytes are identical.
///
/// # Safety
/// `qs` has `x.len()` bytes and `d`, `dsums` one entry per 32 values.
#[target_feature(enable = "neon")]
pub unsafe fn quantize_blocks(x: &[f32], qs: &mut [i8], d: &mut [f32], dsums: &mut [f32]) {
    assert!(qs.len() == x.len() && d.len() * QUANT_BLOCK == x.len() && dsums.len() == d.len());
    let sign = vdupq_n_u32(0x8000_0000);
    let half = vdupq_n_f32(0.5);
    for (b, (xb, qb)) in x
        .chunks_exact(QUANT_BLOCK)
        .zip(qs.chunks_exact_mut(QUANT_BLOCK))
        .enumerate()
    {
        // SAFETY: each chunk holds 32 f32 (eight 4-lane loads) and 32 output bytes.
        unsafe {
            let p = xb.as_ptr();
            let v: [float32x4_t; 8] = std::array::from_fn(|i| vld1q_f32(p.add(4 * i)));
            let m = v
                .iter()
                .fold(vdupq_n_f32(0.0), |m, &v| vmaxq_f32(m, vabsq_f32(v)));
            let scale = vmaxvq_f32(m) / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let ints = v.map(|v| {
                let s = vmulq_n_f32(v, inv);
                // s + copysign(0.5, s), truncated: rounds half away from zero.
                vcvtq_s32_f32(vaddq_f32(s, vbslq_f32(sign, s, half)))
            });
            let narrow = |a: int32x4_t, b: int32x4_t| vcombine_s16(vqmovn_s32(a), vqmovn_s32(b));
            let lo = vcombine_s8(
                vqmovn_s16(narrow(ints[0], ints[1])),
                vqmovn_s16(narrow(ints[2], ints[3])),
            );
            let hi = vcombine_s8(
                vqmovn_s16(narrow(ints[4], ints[5])),
                vqmovn_s16(narrow(ints[6], ints[7])),
            );
            vst1q_s8(qb.as_mut_ptr(), lo);
            vst1q_s8(qb.as_mut_ptr().add(16), hi);
            let sum = vaddlvq_s8(lo) as i32 + vaddlvq_s8(hi) as i32;
            d[b] = scale;
            dsums[b] = scale * sum as f32;
        }
    }
}
