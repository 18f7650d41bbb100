//! ggml tensor storage types and their dequantization to f32.
//!
//! Block layouts follow ggml's public format (ggml-common.h): every quantized type stores
//! fixed-size blocks of `block_size` elements, little-endian, with f16 scales.

use half::f16;

/// Super-block size of the k-quants.
const QK_K: usize = 256;

/// A ggml tensor type, by its on-disk id. Ids this crate cannot dequantize still carry
/// their block geometry (when known) so file layouts can be validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    BF16,
    /// A type id we can size but not dequantize (i-quants, integer types, ...).
    Unsupported(u32),
}

impl GgmlType {
    pub fn from_id(id: u32) -> GgmlType {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            30 => GgmlType::BF16,
            other => GgmlType::Unsupported(other),
        }
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::BF16 => 30,
            GgmlType::Unsupported(id) => id,
        }
    }

    /// ggml's name for the type ("Q4_K", "BF16", "IQ2_XS", or `"type<N>"` for unknown ids).
    pub fn name(self) -> String {
        let known = match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q8K => "Q8_K",
            GgmlType::BF16 => "BF16",
            GgmlType::Unsupported(id) => match unsupported_geometry(id) {
                Some((name, _, _)) => name,
                None => return format!("type{id}"),
            },
        };
        known.to_string()
    }

    /// (elements per block, bytes per block), or `None` for ids whose layout is unknown.
    pub fn geometry(self) -> Option<(usize, usize)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            // Current ggml stores d and s as f16 (sizeof(block_q8_1) == 36).
            GgmlType::Q8_1 => (32, 36),
            GgmlType::Q2K => (QK_K, 84),
            GgmlType::Q3K => (QK_K, 110),
            GgmlType::Q4K => (QK_K, 144),
            GgmlType::Q5K => (QK_K, 176),
            GgmlType::Q6K => (QK_K, 210),
            GgmlType::Q8K => (QK_K, 292),
            GgmlType::Unsupported(id) => {
                let (_, block, bytes) = unsupported_geometry(id)?;
                (block, bytes)
            }
        })
    }

    pub fn block_size(self) -> Option<usize> {
        self.geometry().map(|(b, _)| b)
    }

    pub fn bytes_per_block(self) -> Option<usize> {
        self.geometry().map(|(_, b)| b)
    }

    /// Whether [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        !matches!(self, GgmlType::Q3K | GgmlType::Unsupported(_))
    }

    /// Bytes taken by a row of `n` elements; errors if the layout is unknown, `n` is not a
    /// whole number of blocks, or the size overflows.
    pub fn row_bytes(self, n: usize) -> Result<usize, GgmlError> {
        let (block, bytes) = self
            .geometry()
            .ok_or(GgmlError::UnknownLayout { ty: self })?;
        if !n.is_multiple_of(block) {
            return Err(GgmlError::PartialBlock {
                ty: self,
                elements: n,
                block,
            });
        }
        (n / block)
            .checked_mul(bytes)
            .ok_or(GgmlError::SizeOverflow {
                ty: self,
                elements: n,
            })
    }
}

/// Why ggml data of a type could not be sized or dequantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GgmlError {
    #[error("unknown block layout for ggml type {}", .ty.name())]
    UnknownLayout { ty: GgmlType },
    #[error("{elements} elements is not a multiple of the {} block size {block}", .ty.name())]
    PartialBlock {
        ty: GgmlType,
        elements: usize,
        block: usize,
    },
    #[error("{elements} elements of {} overflow the byte size", .ty.name())]
    SizeOverflow { ty: GgmlType, elements: usize },
    /// The data is not exactly the size of `elements` values of the type.
    #[error("{elements} {} elements need {expected} bytes, got {actual}", .ty.name())]
    ByteCount {
        ty: GgmlType,
        elements: usize,
        expected: usize,
        actual: usize,
    },
    #[error("dequantizing {} is not supported", .ty.name())]
    Unsupported { ty: GgmlType },
}

/// Types this crate only sizes: (name, elements per block, bytes per block).
fn unsupported_geometry(id: u32) -> Option<(&'static str, usize, usize)> {
    Some(match id {
        16 => ("IQ2_XXS", QK_K, 66),
        17 => ("IQ2_XS", QK_K, 74),
        18 => ("IQ3_XXS", QK_K, 98),
        19 => ("IQ1_S", QK_K, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", QK_K, 110),
        22 => ("IQ2_S", QK_K, 82),
        23 => ("IQ4_XS", QK_K, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", QK_K, 56),
        34 => ("TQ1_0", QK_K, 54),
        35 => ("TQ2_0", QK_K, 66),
        39 => ("MXFP4", 32, 17),
        _ => return None,
    })
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Converts `n_elements` values stored as `ty` in `bytes` to f32. `bytes` must be exactly
/// the tensor's size; mismatches and unsupported types are errors, never panics.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>, GgmlError> {
    let expected = ty.row_bytes(n_elements)?;
    if bytes.len() != expected {
        return Err(GgmlError::ByteCount {
            ty,
            elements: n_elements,
            expected,
            actual: bytes.len(),
        });
    }
    let mut out = vec![0.0f32; n_elements];
    dequantize_into(ty, bytes, &mut out)?;
    Ok(out)
}

/// Like [`dequantize`], writing into `out` (whose length is the element count).
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), GgmlError> {
    let expected = ty.row_bytes(out.len())?;
    if bytes.len() != expected {
        return Err(GgmlError::ByteCount {
            ty,
            elements: out.len(),
            expected,
            actual: bytes.len(),
        });
    }
    // From here on every block slice below is in bounds: bytes.len() == blocks * block_bytes
    // and out.len() == blocks * block_size.
    let (block, block_bytes) = ty.geometry().unwrap_or((1, 1));
    let blocks = bytes
        .chunks_exact(block_bytes)
        .zip(out.chunks_exact_mut(block));
    match ty {
        GgmlType::F32 => {
            for (b, y) in blocks {
                y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, y) in blocks {
                y[0] = f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (b, y) in blocks {
                y[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| dequant_q8_0(b, y)),
        GgmlType::Q8_1 => blocks.for_each(|(b, y)| dequant_q8_1(b, y)),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| dequant_q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| dequant_q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| dequant_q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| dequant_q5_1(b, y)),
        GgmlType::Q2K => blocks.for_each(|(b, y)| dequant_q2_k(b, y)),
        GgmlType::Q4K => blocks.for_each(|(b, y)| dequant_q4_k(b, y)),
        GgmlType::Q5K => blocks.for_each(|(b, y)| dequant_q5_k(b, y)),
        GgmlType::Q6K => blocks.for_each(|(b, y)| dequant_q6_k(b, y)),
        GgmlType::Q8K => blocks.for_each(|(b, y)| dequant_q8_k(b, y)),
        GgmlType::Q3K | GgmlType::Unsupported(_) => {
            return Err(GgmlError::Unsupported { ty });
        }
    }
    Ok(())
}

/// Q8_0: f16 d, 32 × i8; x = d·q.
fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = d * f32::from(q as i8);
    }
}

/// Q8_1: f16 d, f16 s (sum cache, unused here), 32 × i8; x = d·q.
fn dequant_q8_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[4..36]) {
        *y = d * f32::from(q as i8);
    }
}

/// Q4_0: f16 d, 16 bytes; low nibbles are elements 0..16, high nibbles 16..32; x = d·(q−8).
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[2..18].iter().enumerate() {
        lo[j] = d * (i32::from(q & 0x0f) - 8) as f32;
        hi[j] = d * (i32::from(q >> 4) - 8) as f32;
    }
}

/// Q4_1: f16 d, f16 m, 16 bytes of nibbles (as Q4_0); x = d·q + m.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[4..20].iter().enumerate() {
        lo[j] = d * f32::from(q & 0x0f) + m;
        hi[j] = d * f32::from(q >> 4) + m;
    }
}

/// The 5-bit quants of Q5_0/Q5_1: nibble plus bit j (element j) or bit j+16 (element j+16)
/// of the 32-bit `qh`.
fn q5_values(qh: u32, qs: &[u8], mut emit: impl FnMut(usize, u8)) {
    for (j, &q) in qs.iter().enumerate() {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        emit(j, (q & 0x0f) | h0);
        emit(j + 16, (q >> 4) | h1);
    }
}

/// Q5_0: f16 d, u32 qh, 16 bytes; x = d·(q−16).
fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    q5_values(qh, &b[6..22], |i, q| y[i] = d * (i32::from(q) - 16) as f32);
}

/// Q5_1: f16 d, f16 m, u32 qh, 16 bytes; x = d·q + m.
fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    q5_values(qh, &b[8..24], |i, q| y[i] = d * f32::from(q) + m);
}

/// 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K/Q5_K:
/// sub-blocks 0..4 use the low 6 bits of bytes j and j+4; 4..8 take their low 4 bits from
/// byte j+4's nibbles and the top 2 from the spare high bits of bytes j−4 and j.
fn k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        let sc = (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4);
        let m = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
        (sc, m)
    }
}

/// Q4_K: f16 d, f16 dmin, 12 bytes scales, 128 bytes quants. Each 64-element chunk uses
/// 32 bytes: low nibbles are the first 32 elements (sub-block 2c), high the next (2c+1).
/// x = d·sc·q − dmin·m.
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for c in 0..4 {
        let (sc0, m0) = k_scale_min(scales, 2 * c);
        let (sc1, m1) = k_scale_min(scales, 2 * c + 1);
        let (d0, min0) = (d * f32::from(sc0), dmin * f32::from(m0));
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let q = &qs[32 * c..32 * c + 32];
        let out = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            out[l] = d0 * f32::from(q[l] & 0x0f) - min0;
            out[l + 32] = d1 * f32::from(q[l] >> 4) - min1;
        }
    }
}

/// Q5_K: Q4_K plus 32 bytes `qh`; chunk c takes its fifth bit from bit 2c (first 32
/// elements) and bit 2c+1 (next 32) of qh[l].
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..4 {
        let (sc0, m0) = k_scale_min(scales, 2 * c);
        let (sc1, m1) = k_scale_min(scales, 2 * c + 1);
        let (d0, min0) = (d * f32::from(sc0), dmin * f32::from(m0));
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let q = &qs[32 * c..32 * c + 32];
        let out = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            let h0 = ((qh[l] >> (2 * c)) & 1) << 4;
            let h1 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
            out[l] = d0 * f32::from((q[l] & 0x0f) | h0) - min0;
            out[l + 32] = d1 * f32::from((q[l] >> 4) | h1) - min1;
        }
    }
}

/// Q6_K: ql[128], qh[64], i8 scales[16], f16 d. Each 128-element half uses 64 ql bytes,
/// 32 qh bytes and 8 scales; element groups of 32 take ql low/high nibbles and successive
/// 2-bit fields of qh. x = d·scale·(q−32), one scale per 16 elements.
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let out = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = (ql[l] & 0x0f) | ((qh[l] & 3) << 4);
            let q2 = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4);
            let q3 = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            let q4 = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            let s = |k: usize| d * f32::from(sc[is + k] as i8);
            out[l] = s(0) * (i32::from(q1) - 32) as f32;
            out[l + 32] = s(2) * (i32::from(q2) - 32) as f32;
            out[l + 64] = s(4) * (i32::from(q3) - 32) as f32;
            out[l + 96] = s(6) * (i32::from(q4) - 32) as f32;
        }
    }
}

/// Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], f16 d, f16 dmin. Each
/// 128-element half reads 32 qs bytes four times at shifts 0,2,4,6; each pass covers 32
/// elements as two 16-element sub-blocks. x = d·sc·q − dmin·m.
fn dequant_q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    let mut is = 0;
    let mut pos = 0;
    for half in 0..2 {
        let q = &qs[32 * half..32 * half + 32];
        for pass in 0..4 {
            let shift = 2 * pass;
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * f32::from(sc & 0x0f);
                let ml = dmin * f32::from(sc >> 4);
                for &qb in &q[16 * part..16 * part + 16] {
                    y[pos] = dl * f32::from((qb >> shift) & 3) - ml;
                    pos += 1;
                }
            }
        }
    }
}

/// Q8_K: f32 d, 256 × i8, 16 × i16 block sums (unused here); x = d·q.
fn dequant_q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (y, &q) in y.iter_mut().zip(&b[4..260]) {
        *y = d * f32::from(q as i8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    /// Deterministic pseudo-random bytes for blocks (xorshift).
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn ids_names_and_sizes() {
        assert_eq!(GgmlType::from_id(12), GgmlType::Q4K);
        assert_eq!(GgmlType::Q4K.name(), "Q4_K");
        assert_eq!(GgmlType::from_id(30).name(), "BF16");
        assert_eq!(GgmlType::from_id(23).name(), "IQ4_XS");
        assert_eq!(GgmlType::from_id(4).name(), "type4");
        assert_eq!(GgmlType::from_id(999).geometry(), None);
        for id in 0..40 {
            assert_eq!(GgmlType::from_id(id).id(), id);
        }
        assert_eq!(GgmlType::Q6K.row_bytes(512), Ok(420));
        assert_eq!(GgmlType::Q4_1.row_bytes(576), Ok(18 * 20));
        assert!(GgmlType::Q4_0.row_bytes(33).is_err());
        assert!(GgmlType::F32.row_bytes(usize::MAX).is_err());
        assert!(GgmlType::from_id(4).row_bytes(32).is_err());
    }

    #[test]
    fn wrong_lengths_are_errors() {
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q2K,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
            GgmlType::Q8K,
        ] {
            let (block, bytes) = ty.geometry().unwrap();
            let good = noise(bytes * 2, 7);
            assert!(dequantize(ty, &good, block * 2).is_ok(), "{}", ty.name());
            assert!(dequantize(ty, &good[..bytes * 2 - 1], block * 2).is_err());
            assert!(dequantize(ty, &good, block).is_err());
            if block > 1 {
                assert!(dequantize(ty, &good, block * 2 - 1).is_err());
            }
            let mut out = vec![0.0; block * 3];
            assert!(dequantize_into(ty, &good, &mut out).is_err());
        }
        assert!(dequantize(GgmlType::Q3K, &[0; 110], 256).is_err());
        assert!(dequantize(GgmlType::from_id(16), &[0; 66], 256).is_err());
    }

    #[test]
    fn float_types() {
        let vals = [1.5f32, -2.25, 0.0, 65504.0];
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F32, &f32_bytes, 4).unwrap(), vals);
        let f16_bytes: Vec<u8> = vals.iter().flat_map(|&v| h(v)).collect();
        assert_eq!(dequantize(GgmlType::F16, &f16_bytes, 4).unwrap(), vals);
        let bf16_bytes: Vec<u8> = vals[..3]
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(
            dequantize(GgmlType::BF16, &bf16_bytes, 3).unwrap(),
            vals[..3]
        );
    }

    #[test]
    fn q8_0_block() {
        let mut b = h(0.5).to_vec();
        let qs: Vec<i8> = (0..32).map(|i| (i as i8 - 16) * 3).collect();
        b.extend(qs.iter().map(|&q| q as u8));
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        for i in 0..32 {
            assert_eq!(y[i], 0.5 * f32::from(qs[i]));
        }
    }

    /// Packs 4-bit quants the way Q4_0/Q4_1 store them: element j in the low nibble of
    /// byte j, element j+16 in the high nibble.
    fn pack_nibbles(q: &[u8; 32]) -> Vec<u8> {
        (0..16).map(|j| q[j] | (q[j + 16] << 4)).collect()
    }

    fn quants(seed: u64, bits: u32) -> [u8; 32] {
        let n = noise(32, seed);
        std::array::from_fn(|i| n[i] % (1 << bits))
    }

    #[test]
    fn q4_0_and_q4_1_blocks() {
        let q = quants(3, 4);
        let mut b = h(0.25).to_vec();
        b.extend(pack_nibbles(&q));
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for i in 0..32 {
            assert_eq!(y[i], 0.25 * (f32::from(q[i]) - 8.0), "element {i}");
        }

        let mut b = h(0.5).to_vec();
        b.extend(h(-3.0));
        b.extend(pack_nibbles(&q));
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        for i in 0..32 {
            assert_eq!(y[i], 0.5 * f32::from(q[i]) - 3.0, "element {i}");
        }
    }

    #[test]
    fn q5_0_and_q5_1_blocks() {
        let q = quants(5, 5);
        let low: [u8; 32] = std::array::from_fn(|i| q[i] & 0x0f);
        // bit i of qh is the fifth bit of element i
        let qh: u32 = (0..32).map(|i| u32::from(q[i] >> 4) << i).sum();

        let mut b = h(0.125).to_vec();
        b.extend(qh.to_le_bytes());
        b.extend(pack_nibbles(&low));
        let y = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
        for i in 0..32 {
            assert_eq!(y[i], 0.125 * (f32::from(q[i]) - 16.0), "element {i}");
        }

        let mut b = h(2.0).to_vec();
        b.extend(h(1.0));
        b.extend(qh.to_le_bytes());
        b.extend(pack_nibbles(&low));
        let y = dequantize(GgmlType::Q5_1, &b, 32).unwrap();
        for i in 0..32 {
            assert_eq!(y[i], 2.0 * f32::from(q[i]) + 1.0, "element {i}");
        }
    }

    /// Packs eight 6-bit (scale, min) pairs into the 12-byte k-quant layout.
    fn pack_k_scales(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
        let mut out = [0u8; 12];
        for j in 0..4 {
            out[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            out[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
            out[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
        }
        out
    }

    fn k_sub_params(seed: u64) -> ([u8; 8], [u8; 8]) {
        let n = noise(16, seed);
        (
            std::array::from_fn(|i| n[i] % 64),
            std::array::from_fn(|i| n[i + 8] % 64),
        )
    }

    #[test]
    fn k_scale_unpacking_roundtrips() {
        let (sc, m) = k_sub_params(11);
        let packed = pack_k_scales(&sc, &m);
        for j in 0..8 {
            assert_eq!(k_scale_min(&packed, j), (sc[j], m[j]));
        }
    }

    #[test]
    fn q4_k_block() {
        let (sc, m) = k_sub_params(13);
        let qn = noise(256, 17);
        let q: Vec<u8> = qn.iter().map(|x| x % 16).collect();
        let (d, dmin) = (0.5f32, 0.25f32);
        let mut b = h(d).to_vec();
        b.extend(h(dmin));
        b.extend(pack_k_scales(&sc, &m));
        // chunk c (64 elements): byte 32c+l holds element 64c+l (low) and 64c+32+l (high)
        for c in 0..4 {
            for l in 0..32 {
                b.push(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
            }
        }
        let y = dequantize(GgmlType::Q4K, &b, 256).unwrap();
        for i in 0..256 {
            let s = i / 32;
            let want = d * f32::from(sc[s]) * f32::from(q[i]) - dmin * f32::from(m[s]);
            assert_eq!(y[i], want, "element {i}");
        }
    }

    #[test]
    fn q5_k_block() {
        let (sc, m) = k_sub_params(19);
        let q: Vec<u8> = noise(256, 23).iter().map(|x| x % 32).collect();
        let (d, dmin) = (0.25f32, 0.5f32);
        let mut b = h(d).to_vec();
        b.extend(h(dmin));
        b.extend(pack_k_scales(&sc, &m));
        // fifth bit of element 32s+l lives in bit s of qh[l]
        let mut qh = [0u8; 32];
        for (i, &v) in q.iter().enumerate() {
            qh[i % 32] |= (v >> 4) << (i / 32);
        }
        b.extend(qh);
        for c in 0..4 {
            for l in 0..32 {
                b.push((q[64 * c + l] & 0x0f) | ((q[64 * c + 32 + l] & 0x0f) << 4));
            }
        }
        let y = dequantize(GgmlType::Q5K, &b, 256).unwrap();
        for i in 0..256 {
            let s = i / 32;
            let want = d * f32::from(sc[s]) * f32::from(q[i]) - dmin * f32::from(m[s]);
            assert_eq!(y[i], want, "element {i}");
        }
    }

    #[test]
    fn q6_k_block() {
        let q: Vec<u8> = noise(256, 29).iter().map(|x| x % 64).collect();
        let scales: Vec<i8> = noise(16, 31).iter().map(|&x| x as i8 / 4).collect();
        let d = 0.125f32;
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        // element 128h + 32g + l (g = 0..4): low 4 bits in ql[64h + l + 32(g&1)] (nibble
        // g>>1), high 2 bits in qh[32h + l] at bit 2g
        for (i, &v) in q.iter().enumerate() {
            let (hf, g, l) = (i / 128, (i % 128) / 32, i % 32);
            ql[64 * hf + l + 32 * (g & 1)] |= (v & 0x0f) << (4 * (g >> 1));
            qh[32 * hf + l] |= (v >> 4) << (2 * g);
        }
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(scales.iter().map(|&s| s as u8));
        b.extend(h(d));
        let y = dequantize(GgmlType::Q6K, &b, 256).unwrap();
        for i in 0..256 {
            let want = d * f32::from(scales[i / 16]) * (f32::from(q[i]) - 32.0);
            assert_eq!(y[i], want, "element {i}");
        }
    }

    #[test]
    fn q2_k_block() {
        let q: Vec<u8> = noise(256, 37).iter().map(|x| x % 4).collect();
        let scales = noise(16, 41);
        let (d, dmin) = (0.5f32, 0.125f32);
        // element 128h + 32p + l (pass p, l in 0..32) sits at bits 2p of qs[32h + l];
        // its scale byte is 8h + 2p + l/16
        let mut qs = [0u8; 64];
        for (i, &v) in q.iter().enumerate() {
            let (hf, p, l) = (i / 128, (i % 128) / 32, i % 32);
            qs[32 * hf + l] |= v << (2 * p);
        }
        let mut b = scales.clone();
        b.extend(qs);
        b.extend(h(d));
        b.extend(h(dmin));
        let y = dequantize(GgmlType::Q2K, &b, 256).unwrap();
        for i in 0..256 {
            let sc = scales[i / 16];
            let want = d * f32::from(sc & 0x0f) * f32::from(q[i]) - dmin * f32::from(sc >> 4);
            assert_eq!(y[i], want, "element {i}");
        }
    }

    #[test]
    fn q8_k_block() {
        let mut b = 0.75f32.to_le_bytes().to_vec();
        let qs = noise(256, 43);
        b.extend(&qs);
        b.extend([0u8; 32]);
        let y = dequantize(GgmlType::Q8K, &b, 256).unwrap();
        for i in 0..256 {
            assert_eq!(y[i], 0.75 * f32::from(qs[i] as i8));
        }
    }
}
