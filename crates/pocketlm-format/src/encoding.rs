//! The weight encodings: how a tensor's elements are stored, the table of quantized kinds
//! that every crate reads (the kernels specialise on it, the layouts derive from it), and the
//! byte layouts of quantized and sparse matrices.

use std::fmt;
use std::str::FromStr;

use crate::TENSOR_ALIGNMENT;

/// How a tensor's elements are stored. Each variant has a stable on-disk code (see
/// [`Encoding::code`]) and up to two u32 parameters in the tensor table; new encodings (low
/// rank, sparse) land under new codes without a format version bump.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// IEEE-754 binary32, little-endian. Code 0.
    F32,
    /// IEEE-754 binary16, little-endian. Code 1.
    F16,
    /// bfloat16 (upper half of an f32), little-endian. Code 2.
    BF16,
    /// Plain signed bytes. Code 3. Not a weight encoding (the model loader refuses it): saved
    /// sessions store the codes of an int8 KV cache this way.
    I8,
    /// Symmetric int8 matrix with one f16 scale per `group` consecutive weights of a row:
    /// `w = q · d`. Code 16, param0 = group. See [`QuantLayout`].
    Q8 { group: u32 },
    /// 4-bit matrix with one f16 scale per `group` weights of a row; symmetric
    /// (`w = (q − 8) · d`) or asymmetric with an f16 minimum (`w = q · d + m`).
    /// Code 17, param0 = group, param1 bit 0 = asymmetric. See [`QuantLayout`].
    Q4 { group: u32, asymmetric: bool },
    /// Symmetric 3-bit matrix with one f16 scale per `group` weights of a row:
    /// `w = (q − 4) · d`, q in 0..=7, stored as a 2-bit plane and a 1-bit plane per block of
    /// 32. Code 18, param0 = group. See [`QuantLayout`].
    Q3 { group: u32 },
    /// 4-bit matrix on a non-uniform grid: `w = GRID4[q] · d`, q in 0..=15, with one f16 scale
    /// per `group` weights of a row and the codes stored like symmetric [`Encoding::Q4`]'s.
    /// The grid ([`GRID4_LEVELS`]) is denser near zero, where most weights lie. Code 19,
    /// param0 = group. See [`QuantLayout`].
    Q4Grid { group: u32 },
    /// 3-bit matrix on a non-uniform grid: `w = GRID3[q] · d`, q in 0..=7, with one f16 scale
    /// per `group` weights of a row and the codes stored like [`Encoding::Q3`]'s
    /// ([`GRID3_LEVELS`]). Code 20, param0 = group. See [`QuantLayout`].
    Q3Grid { group: u32 },
    /// 2:4 sparse matrix with f16 values: of every 4 consecutive weights of a row at most 2
    /// are non-zero; the 2 kept values are stored with their positions. 9 bits per weight.
    /// Code 256, no params. See [`Sparse24Layout`].
    F16Sparse24,
    /// Sparse q8 matrix keeping at most 4 of every 8 consecutive weights of a row (pruned 2:4
    /// or 4:8): four kept i8 codes per 8 weights and a bitmask of their positions, in tiles
    /// like [`Encoding::Q8`]: 5 bits per weight plus the scales. Code 257, param0 = group.
    /// See [`QuantLayout`].
    Q8Sparse48 { group: u32 },
    /// Sparse symmetric q4 matrix (at most 4 of every 8 weights kept), stored like [`Encoding::Q8Sparse48`] with 4-bit codes:
    /// 3 bits per weight plus the scales. Code 258, param0 = group. See [`QuantLayout`].
    Q4Sparse48 { group: u32 },
    /// Unstructured sparse q8 (any pattern): per tile block a one-bit-per-weight mask of the
    /// kept weights, and the kept i8 codes in one stream located by a per-tile offset table,
    /// so each tile stores exactly the codes it keeps. Code 259, param0 = group, param1 =
    /// bytes of the code stream. See [`QuantLayout`].
    Q8Masked { group: u32, code_bytes: u32 },
    /// Unstructured sparse symmetric q4, stored like [`Encoding::Q8Masked`] with the kept
    /// 4-bit codes of each piece packed two to a byte. Code 260, param0 = group, param1 =
    /// bytes of the code stream.
    Q4Masked { group: u32, code_bytes: u32 },
}

/// Bytes after a masked encoding's code stream that the kernels may read (and never use), so
/// a full-width SIMD load at any valid code offset stays inside the tensor.
pub const MASKED_CODE_PADDING: usize = 64;

/// Quantized weights come in blocks of this many values: the activation block of the integer
/// dot products, and the unit of the nibble packing. Groups are multiples of it.
pub const QUANT_BLOCK: usize = 32;

/// Largest group a quantized encoding may declare (one scale per this many weights).
pub const MAX_QUANT_GROUP: u32 = 1 << 16;

/// Quantized matrices are stored in tiles of this many consecutive rows, interleaved so one
/// SIMD register holds the same 8 columns of every row of a tile (see [`QuantLayout`]).
pub const TILE_ROWS: usize = 8;

/// Columns of one row that a tile stores contiguously (a "piece"): the width of one
/// activation broadcast in the integer kernels.
pub const TILE_PIECE: usize = 8;

/// The tiled quantized kinds. The discriminant is the code the SIMD kernels are specialised
/// on (a const generic) and the index of the kind's row in [`QUANT_KINDS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum QuantKind {
    Q8 = 0,
    Q4 = 1,
    Q4Asym = 2,
    Q3 = 3,
    /// q8 keeping at most 4 of every 8 weights (pruned 2:4 or 4:8): kept codes and a
    /// position bitmask.
    Q8Sparse48 = 4,
    /// Symmetric q4 keeping at most 4 of every 8 weights.
    Q4Sparse48 = 5,
    /// q8 keeping any weights (unstructured): a bitmask per tile block and the kept codes in
    /// a stream located by per-tile offsets.
    Q8Masked = 6,
    /// Symmetric q4 keeping any weights, its kept codes two to a byte.
    Q4Masked = 7,
    /// 4-bit codes naming levels of the non-uniform grid [`GRID4_LEVELS`].
    Q4Grid = 8,
    /// 3-bit codes naming levels of the non-uniform grid [`GRID3_LEVELS`].
    Q3Grid = 9,
}

/// The levels of the non-uniform 4-bit grid (q4nl), in code order: the Lloyd–Max codebook
/// for groups of 32 Gaussian weights scaled so the largest magnitude lands on −127 (the
/// encoder gives the scale the sign that puts it there), scaled to int8 so the integer
/// kernels read them as q8 codes. Rotated (incoherence-processed) weights are close to
/// Gaussian. Derived by `scripts/grid-codebook.py 16`.
pub const GRID4_LEVELS: [i8; 16] = [
    -127, -102, -82, -65, -50, -36, -23, -10, 2, 15, 28, 41, 56, 72, 90, 112,
];

/// The levels of the non-uniform 3-bit grid (q3nl), derived like [`GRID4_LEVELS`]
/// (`scripts/grid-codebook.py 8`).
pub const GRID3_LEVELS: [i8; 8] = [-127, -81, -48, -20, 5, 32, 61, 98];

/// Which weights of a tile block a kind stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantStorage {
    /// Every weight's code.
    Dense,
    /// A bitmask and four kept codes of every eight weights, in the tile block.
    Sparse48,
    /// Only a bitmask in the tile block; the kept codes in a separate stream.
    Masked,
}

/// One row of [`QUANT_KINDS`]: what a quantized kind stores and how its codes read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantKindInfo {
    pub kind: QuantKind,
    /// Name in recipes, logs and the CLI.
    pub name: &'static str,
    /// On-disk encoding code (q4 and q4a share 17: bit 0 of param1 tells them apart).
    pub code: u16,
    /// Bits of one stored code.
    pub code_bits: u32,
    /// The stored code that means level 0: `level = code − zero_point`.
    pub zero_point: i32,
    /// The integer products take signed bytes: q8's codes, or a grid's levels.
    pub signed: bool,
    /// A non-uniform grid: `level = grid[code]` instead of `code − zero_point` (one level
    /// per code value, ascending).
    pub grid: Option<&'static [i8]>,
    /// A per-group f16 minimum beside the scale (`w = level · d + m`).
    pub has_min: bool,
    pub storage: QuantStorage,
    /// Bits per weight in the tile blocks, scales aside (sparse: kept codes and mask; masked:
    /// the mask only).
    pub block_bits: usize,
}

impl QuantKindInfo {
    /// Bytes of one tile block: [`TILE_ROWS`] rows × [`QUANT_BLOCK`] columns.
    pub const fn tile_block_bytes(&self) -> usize {
        TILE_ROWS * QUANT_BLOCK * self.block_bits / 8
    }
}

/// Every quantized kind, indexed by its code: the one table the format's layouts, the
/// kernels (byte sizes, zero points, storage) and the converter read. A new quantized
/// encoding adds a row here, its `Encoding` variant, its kernels and the pass that emits it.
pub const QUANT_KINDS: [QuantKindInfo; 10] = {
    const fn row(
        kind: QuantKind,
        name: &'static str,
        code: u16,
        code_bits: u32,
        zero_point: i32,
        storage: QuantStorage,
        block_bits: usize,
    ) -> QuantKindInfo {
        let grid = match kind {
            QuantKind::Q4Grid => Some(&GRID4_LEVELS as &[i8]),
            QuantKind::Q3Grid => Some(&GRID3_LEVELS as &[i8]),
            _ => None,
        };
        QuantKindInfo {
            kind,
            name,
            code,
            code_bits,
            zero_point,
            signed: code_bits == 8 || grid.is_some(),
            grid,
            has_min: matches!(kind, QuantKind::Q4Asym),
            storage,
            block_bits,
        }
    }
    use QuantKind as K;
    use QuantStorage as S;
    [
        row(K::Q8, "q8", 16, 8, 0, S::Dense, 8),
        row(K::Q4, "q4", 17, 4, 8, S::Dense, 4),
        row(K::Q4Asym, "q4a", 17, 4, 0, S::Dense, 4),
        row(K::Q3, "q3", 18, 3, 4, S::Dense, 3),
        row(K::Q8Sparse48, "q8+4:8", 257, 8, 0, S::Sparse48, 5),
        row(K::Q4Sparse48, "q4+4:8", 258, 4, 8, S::Sparse48, 3),
        row(K::Q8Masked, "q8+mask", 259, 8, 0, S::Masked, 1),
        row(K::Q4Masked, "q4+mask", 260, 4, 8, S::Masked, 1),
        row(K::Q4Grid, "q4nl", 19, 4, 0, S::Dense, 4),
        row(K::Q3Grid, "q3nl", 20, 3, 0, S::Dense, 3),
    ]
};

impl QuantKind {
    pub const ALL: [QuantKind; 10] = [
        QuantKind::Q8,
        QuantKind::Q4,
        QuantKind::Q4Asym,
        QuantKind::Q3,
        QuantKind::Q8Sparse48,
        QuantKind::Q4Sparse48,
        QuantKind::Q8Masked,
        QuantKind::Q4Masked,
        QuantKind::Q4Grid,
        QuantKind::Q3Grid,
    ];

    /// This kind's row of [`QUANT_KINDS`].
    pub const fn info(self) -> &'static QuantKindInfo {
        &QUANT_KINDS[self as usize]
    }

    /// Bytes of one tile block: [`TILE_ROWS`] rows × [`QUANT_BLOCK`] columns.
    pub const fn tile_block_bytes(self) -> usize {
        self.info().tile_block_bytes()
    }

    /// Bits stored per weight in the tile blocks, scales aside.
    pub const fn block_bits(self) -> usize {
        self.info().block_bits
    }

    /// The stored code that means level 0: `level = code − zero_point`.
    pub const fn zero_point(self) -> i32 {
        self.info().zero_point
    }

    /// Whether the kind keeps any weights (a bitmask and a code stream).
    pub const fn is_masked(self) -> bool {
        matches!(self.info().storage, QuantStorage::Masked)
    }

    /// Whether the kind keeps four weights of every eight (a mask and kept codes).
    pub const fn is_sparse48(self) -> bool {
        matches!(self.info().storage, QuantStorage::Sparse48)
    }
}

impl Encoding {
    /// The dense (unquantized) encodings.
    pub const ALL: [Encoding; 3] = [Encoding::F32, Encoding::F16, Encoding::BF16];

    /// Lower-case name used in recipes, logs and the CLI.
    pub fn name(self) -> &'static str {
        match self.quant_kind() {
            Some(kind) => kind.info().name,
            None => self.unquantized("f32", "f16", "bf16", "i8", "f16+2:4"),
        }
    }

    /// The value for this encoding among the five that are not in [`QUANT_KINDS`] (f32, f16,
    /// bf16, i8, f16+2:4); the caller has checked [`Encoding::quant_kind`] first.
    fn unquantized<T>(self, f32: T, f16: T, bf16: T, i8: T, f16_sparse24: T) -> T {
        match self {
            Encoding::F32 => f32,
            Encoding::F16 => f16,
            Encoding::BF16 => bf16,
            Encoding::I8 => i8,
            _ => f16_sparse24,
        }
    }

    /// The quantized kind (row of [`QUANT_KINDS`]) of a tiled quantized encoding.
    pub fn quant_kind(self) -> Option<QuantKind> {
        Some(match self {
            Encoding::Q8 { .. } => QuantKind::Q8,
            Encoding::Q4 {
                asymmetric: false, ..
            } => QuantKind::Q4,
            Encoding::Q4 {
                asymmetric: true, ..
            } => QuantKind::Q4Asym,
            Encoding::Q3 { .. } => QuantKind::Q3,
            Encoding::Q4Grid { .. } => QuantKind::Q4Grid,
            Encoding::Q3Grid { .. } => QuantKind::Q3Grid,
            Encoding::Q8Sparse48 { .. } => QuantKind::Q8Sparse48,
            Encoding::Q4Sparse48 { .. } => QuantKind::Q4Sparse48,
            Encoding::Q8Masked { .. } => QuantKind::Q8Masked,
            Encoding::Q4Masked { .. } => QuantKind::Q4Masked,
            Encoding::F32
            | Encoding::F16
            | Encoding::BF16
            | Encoding::I8
            | Encoding::F16Sparse24 => return None,
        })
    }

    /// Name with parameters, e.g. `q4a/g64`.
    pub fn describe(self) -> String {
        match self.group() {
            Some(g) => format!("{}/g{g}", self.name()),
            None => self.name().to_string(),
        }
    }

    pub fn is_quantized(self) -> bool {
        self.group().is_some()
    }

    /// The dense quantized encoding whose grid (levels, scales) a quantized encoding uses:
    /// q8 for q8+4:8, q4 for q4+4:8, itself otherwise.
    pub fn quant_base(self) -> Encoding {
        match self {
            Encoding::Q8Sparse48 { group } => Encoding::Q8 { group },
            Encoding::Q4Sparse48 { group } | Encoding::Q4Masked { group, .. } => Encoding::Q4 {
                group,
                asymmetric: false,
            },
            Encoding::Q8Masked { group, .. } => Encoding::Q8 { group },
            other => other,
        }
    }

    /// The sparse storage of a pruned matrix of this encoding, where one exists: f16+2:4 for
    /// f16 (patterns of 2:4), q8+4:8 and q4+4:8 for q8 and symmetric q4 (at most 4 of every
    /// 8 weights kept: 2:4, 4:8 and sparser N:M patterns).
    pub fn sparse_storage(self) -> Option<Encoding> {
        match self {
            Encoding::Q8 { group } => Some(Encoding::Q8Sparse48 { group }),
            Encoding::Q4 {
                group,
                asymmetric: false,
            } => Some(Encoding::Q4Sparse48 { group }),
            Encoding::F16 => Some(Encoding::F16Sparse24),
            _ => None,
        }
    }

    /// The unstructured sparse storage of a pruned matrix of this encoding (q8+mask, q4+mask
    /// for q8 and symmetric q4), sized for `values` (row-major `[rows, cols]`, pruned weights
    /// exactly zero): `None` for other encodings, shapes the encoding cannot store, or a code
    /// stream beyond 4 GiB.
    pub fn masked_storage(self, values: &[f32], rows: usize, cols: usize) -> Option<Encoding> {
        let nibbles = match self {
            Encoding::Q8 { .. } => false,
            Encoding::Q4 {
                asymmetric: false, ..
            } => true,
            _ => return None,
        };
        let group = self.group()?;
        if values.len() != rows.checked_mul(cols)? || !cols.is_multiple_of(group as usize) {
            return None;
        }
        // Per piece (8 rows × 8 columns of a tile): its kept codes, nibbles rounded up to bytes.
        let mut bytes = 0u64;
        for tile in 0..rows.div_ceil(TILE_ROWS) {
            let tile_rows = tile * TILE_ROWS..((tile + 1) * TILE_ROWS).min(rows);
            for piece in 0..cols / TILE_PIECE {
                let kept: usize = tile_rows
                    .clone()
                    .map(|r| {
                        let at = r * cols + piece * TILE_PIECE;
                        values[at..at + TILE_PIECE]
                            .iter()
                            .filter(|v| **v != 0.0)
                            .count()
                    })
                    .sum();
                bytes += if nibbles { kept.div_ceil(2) } else { kept } as u64;
            }
        }
        let code_bytes = u32::try_from(bytes).ok()?;
        Some(if nibbles {
            Encoding::Q4Masked { group, code_bytes }
        } else {
            Encoding::Q8Masked { group, code_bytes }
        })
    }

    /// Whether the encoding stores an unstructured bitmask and a variable code stream.
    pub fn is_masked(self) -> bool {
        self.quant_kind().is_some_and(QuantKind::is_masked)
    }

    /// One value per element, no side data (f32, f16, bf16).
    pub fn is_dense(self) -> bool {
        matches!(self, Encoding::F32 | Encoding::F16 | Encoding::BF16)
    }

    /// Group size of quantized encodings.
    pub fn group(self) -> Option<u32> {
        match self {
            Encoding::Q8 { group }
            | Encoding::Q4 { group, .. }
            | Encoding::Q3 { group }
            | Encoding::Q4Grid { group }
            | Encoding::Q3Grid { group }
            | Encoding::Q8Sparse48 { group }
            | Encoding::Q4Sparse48 { group }
            | Encoding::Q8Masked { group, .. }
            | Encoding::Q4Masked { group, .. } => Some(group),
            _ => None,
        }
    }

    /// Storage cost per weight, including per-group scales (and minimums). For the masked
    /// encodings, whose kept codes depend on the data, the cost without the codes (mask and
    /// scales): a matrix adds `8 · code_bytes / elements` and 32 bits per tile of 8 rows.
    pub fn bits_per_weight(self) -> f64 {
        if let (Some(kind), Some(group)) = (self.quant_kind(), self.group()) {
            let info = kind.info();
            let per_group = if info.has_min { 32.0 } else { 16.0 };
            return info.block_bits as f64 + per_group / group as f64;
        }
        // f16+2:4: two f16 values and a 4-bit position nibble per four weights.
        self.unquantized(32.0, 16.0, 16.0, 8.0, 9.0)
    }

    /// Exact number of data bytes a tensor of `shape` occupies; `None` on overflow, or when
    /// the shape does not suit the encoding (quantized tensors are matrices whose row length
    /// is a multiple of the group). An empty shape is a scalar (one element).
    pub fn byte_len(self, shape: &[usize]) -> Option<usize> {
        if self.is_quantized() {
            return self.quant_layout(shape).map(|l| l.total);
        }
        if self == Encoding::F16Sparse24 {
            return Sparse24Layout::new(shape).map(|l| l.total);
        }
        let elements = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
        elements.checked_mul(self.element_size())
    }

    /// The on-disk encoding code (u16 in the tensor table).
    pub fn code(self) -> u16 {
        match self.quant_kind() {
            Some(kind) => kind.info().code,
            None => self.unquantized(0, 1, 2, 3, 256),
        }
    }

    /// The two u32 parameters stored beside the code.
    pub fn params(self) -> (u32, u32) {
        match self {
            Encoding::F32
            | Encoding::F16
            | Encoding::BF16
            | Encoding::I8
            | Encoding::F16Sparse24 => (0, 0),
            Encoding::Q8 { group } => (group, 0),
            Encoding::Q4 { group, asymmetric } => (group, asymmetric as u32),
            Encoding::Q3 { group }
            | Encoding::Q4Grid { group }
            | Encoding::Q3Grid { group }
            | Encoding::Q8Sparse48 { group }
            | Encoding::Q4Sparse48 { group } => (group, 0),
            Encoding::Q8Masked { group, code_bytes } | Encoding::Q4Masked { group, code_bytes } => {
                (group, code_bytes)
            }
        }
    }

    /// Inverse of [`Encoding::code`] for parameterless encodings; `None` for codes this build
    /// does not know or that need parameters.
    pub fn from_code(code: u16) -> Option<Encoding> {
        Encoding::ALL
            .into_iter()
            .chain([Encoding::I8])
            .find(|e| e.code() == code)
    }

    /// Decodes a table entry's code and parameters: `Ok(None)` for an unknown code (a newer
    /// file), `Err` with the reason for parameters that make no sense for the code.
    pub fn from_table(
        code: u16,
        param0: u32,
        param1: u32,
    ) -> Result<Option<Encoding>, EncodingError> {
        let encoding = match code {
            16 => Encoding::Q8 { group: param0 },
            256 => Encoding::F16Sparse24,
            17 => Encoding::Q4 {
                group: param0,
                asymmetric: param1 & 1 == 1,
            },
            18 => Encoding::Q3 { group: param0 },
            19 => Encoding::Q4Grid { group: param0 },
            20 => Encoding::Q3Grid { group: param0 },
            257 => Encoding::Q8Sparse48 { group: param0 },
            258 => Encoding::Q4Sparse48 { group: param0 },
            259 => Encoding::Q8Masked {
                group: param0,
                code_bytes: param1,
            },
            260 => Encoding::Q4Masked {
                group: param0,
                code_bytes: param1,
            },
            _ => match Encoding::from_code(code) {
                Some(e) => e,
                None => return Ok(None),
            },
        };
        if encoding.params() != (param0, param1) {
            let params = (param0, param1);
            return Err(if encoding.is_quantized() {
                EncodingError::Parameters {
                    encoding: encoding.name(),
                    params,
                }
            } else {
                EncodingError::UnexpectedParameters {
                    encoding: encoding.name(),
                    params,
                }
            });
        }
        if let Some(group) = encoding.group() {
            encoding_group_ok(group)?;
        }
        Ok(Some(encoding))
    }

    /// Where the quantized values, scales and minimums of a `[rows, cols]` matrix lie inside
    /// its tensor data; `None` for dense encodings or unsuitable shapes.
    pub fn quant_layout(self, shape: &[usize]) -> Option<QuantLayout> {
        let group = self.group()? as usize;
        let &[rows, cols] = shape else { return None };
        if encoding_group_ok(group as u32).is_err() || cols % group != 0 {
            return None;
        }
        let kind = self.quant_kind()?.info();
        let tiles = rows.div_ceil(TILE_ROWS);
        let tile_bytes = (cols / QUANT_BLOCK).checked_mul(kind.tile_block_bytes())?;
        let quant_bytes = tiles.checked_mul(tile_bytes)?;
        // Masked encodings: the per-tile offsets (u32, one more than tiles) and the code
        // stream (with its padding) follow the masks.
        let (offsets, codes, quant_end) = match self {
            Encoding::Q8Masked { code_bytes, .. } | Encoding::Q4Masked { code_bytes, .. } => {
                let offsets_end = quant_bytes.checked_add(tiles.checked_add(1)?.checked_mul(4)?)?;
                let codes_end = offsets_end
                    .checked_add(code_bytes as usize)?
                    .checked_add(MASKED_CODE_PADDING)?;
                (
                    Some(quant_bytes..offsets_end),
                    Some(offsets_end..codes_end),
                    codes_end,
                )
            }
            _ => (None, None, quant_bytes),
        };
        let scales_start =
            quant_end.checked_add(TENSOR_ALIGNMENT - 1)? / TENSOR_ALIGNMENT * TENSOR_ALIGNMENT;
        let scale_bytes = (tiles * TILE_ROWS)
            .checked_mul(cols / group)?
            .checked_mul(2)?;
        let scales_end = scales_start.checked_add(scale_bytes)?;
        let (mins, total) = if kind.has_min {
            (
                Some(scales_end..scales_end + scale_bytes),
                scales_end.checked_add(scale_bytes)?,
            )
        } else {
            (None, scales_end)
        };
        Some(QuantLayout {
            rows,
            cols,
            group,
            tiles,
            quants: 0..quant_bytes,
            offsets,
            codes,
            scales: scales_start..scales_end,
            mins,
            total,
        })
    }

    /// Bytes of one tile block ([`TILE_ROWS`] rows × [`QUANT_BLOCK`] columns) of a quantized
    /// encoding: q8 256, q4 128, q3 96 ([`QUANT_KINDS`]).
    pub fn tile_block_bytes(self) -> Option<usize> {
        self.quant_kind().map(QuantKind::tile_block_bytes)
    }

    /// Bytes per element of the dense encodings.
    pub(crate) fn element_size(self) -> usize {
        match self {
            Encoding::F32 => 4,
            Encoding::F16 | Encoding::BF16 => 2,
            Encoding::I8 => 1,
            // Not used for quantized or sparse encodings (see `quant_layout`,
            // `Sparse24Layout`); one byte is the q8 value.
            Encoding::Q8 { .. }
            | Encoding::Q4 { .. }
            | Encoding::Q3 { .. }
            | Encoding::Q4Grid { .. }
            | Encoding::Q3Grid { .. }
            | Encoding::F16Sparse24
            | Encoding::Q8Sparse48 { .. }
            | Encoding::Q4Sparse48 { .. }
            | Encoding::Q8Masked { .. }
            | Encoding::Q4Masked { .. } => 1,
        }
    }
}

fn encoding_group_ok(group: u32) -> Result<(), EncodingError> {
    if group == 0 || !group.is_multiple_of(QUANT_BLOCK as u32) || group > MAX_QUANT_GROUP {
        return Err(EncodingError::Group(group));
    }
    Ok(())
}

/// Why an encoding name or a tensor table's encoding entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodingError {
    #[error(
        "unknown encoding '{0}' (expected one of: f32, f16, bf16, q8, q4, q4a, q3, \
         optionally with /g32, /g64, /g128)"
    )]
    Unknown(String),
    #[error("bad group size in '{0}'")]
    GroupSyntax(String),
    #[error("encoding {0} takes no group size")]
    NoGroup(String),
    #[error("group size {0} must be a positive multiple of {QUANT_BLOCK} up to {MAX_QUANT_GROUP}")]
    Group(u32),
    #[error("encoding {encoding} has invalid parameters ({}, {})", .params.0, .params.1)]
    Parameters {
        encoding: &'static str,
        params: (u32, u32),
    },
    #[error(
        "encoding {encoding} takes no parameters, but the table has ({}, {})",
        .params.0,
        .params.1
    )]
    UnexpectedParameters {
        encoding: &'static str,
        params: (u32, u32),
    },
}

/// Byte layout of a quantized `[rows, cols]` matrix inside its tensor data, chosen so the
/// kernels read each region with contiguous loads and never repack at load time (the
/// byte-exact spec is in `docs/format.md`):
///
/// - `quants`: rows are grouped in tiles of [`TILE_ROWS`] (the last tile padded with rows
///   whose scales are zero). Tiles follow each other; a tile holds its blocks of
///   [`QUANT_BLOCK`] columns in order; a tile block holds the block's four pieces of
///   [`TILE_PIECE`] columns for all eight rows, so that one 64-byte load (or one 8-byte
///   broadcast of the activations) serves the same columns of every row. Within a tile
///   block, with `k` the piece (0..4), `r` the row in the tile and `j` the column in the piece:
///   - q8 (256 bytes): byte `64k + 8r + j` is the i8 code;
///   - q4 (128 bytes): byte `64(k / 2) + 8r + j` holds the code in its low nibble for even
///     `k`, in its high nibble for odd `k`;
///   - q3 (96 bytes): byte `8r + j` holds the low two bits of the level in bits `2k..2k+2`;
///     bit `j` of byte `64 + 8k + r` is its high bit.
/// - `scales`: starts at the next multiple of 64; per tile, per group, the f16 scales of the
///   tile's eight rows.
/// - `mins` (asymmetric q4 only): right after the scales, same order, f16.
///
/// The sparse encodings (q8+4:8, q4+4:8) keep four codes of every piece of eight columns. A
/// tile block starts with a 32-byte bitmask (bit `8r + j` of the little-endian u64 at byte
/// `8k`: column `j` of piece `k` of row `r` is kept; four bits of every mask byte are set),
/// then the kept codes in column order, row by row: q8+4:8 128 bytes (piece `k` at `32k`, row
/// `r`'s four at `4r`); q4+4:8 64 bytes (byte `32(k / 2) + 4r + i` holds kept code `i` of row
/// `r` in its low nibble for even `k`, high nibble for odd `k`). Pruned weights are zero.
///
/// The masked encodings (q8+mask, q4+mask) keep any number of codes. A tile block is only
/// its 32-byte bitmask (as above, any bits set); `offsets` holds one little-endian u32 per
/// tile plus one, the start of each tile's codes in `codes`; a tile's codes are its blocks'
/// pieces' in order, and a piece's are its kept codes row by row in column order (q8 one byte
/// each; q4 two to a byte, low nibble first, a piece's last byte padded). `codes` ends with
/// [`MASKED_CODE_PADDING`] bytes. A tile whose offsets disagree with its masks reads as zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantLayout {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// Row tiles stored: `rows` rounded up to a multiple of [`TILE_ROWS`], divided by it.
    pub tiles: usize,
    pub quants: std::ops::Range<usize>,
    /// Masked encodings: per tile, the start of its codes (u32), and the end.
    pub offsets: Option<std::ops::Range<usize>>,
    /// Masked encodings: the kept codes, padded.
    pub codes: Option<std::ops::Range<usize>>,
    pub scales: std::ops::Range<usize>,
    pub mins: Option<std::ops::Range<usize>>,
    pub total: usize,
}

/// Where the parts of a 2:4 sparse `[rows, cols]` matrix ([`Encoding::F16Sparse24`]) lie in
/// its tensor data (`cols` a multiple of 8):
///
/// - `values`: `rows × cols / 2` f16, the kept values of each row in column order (two per
///   run of four columns; a run with fewer non-zeros keeps zeros).
/// - `positions`: starts at the next multiple of 64; `rows × cols / 8` bytes. Byte `j` of a
///   row describes runs `2j` (low nibble) and `2j + 1` (high nibble); in each nibble, bits 0–1
///   are the first kept value's position within its run and bits 2–3 the second's, first <
///   second.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sparse24Layout {
    pub rows: usize,
    pub cols: usize,
    pub values: std::ops::Range<usize>,
    pub positions: std::ops::Range<usize>,
    pub total: usize,
}

impl Sparse24Layout {
    /// `None` for shapes that are not matrices with rows a multiple of 8 long, or on overflow.
    pub fn new(shape: &[usize]) -> Option<Sparse24Layout> {
        let &[rows, cols] = shape else { return None };
        if !cols.is_multiple_of(8) {
            return None;
        }
        let value_bytes = rows.checked_mul(cols)?; // cols / 2 values of 2 bytes
        let start =
            value_bytes.checked_add(TENSOR_ALIGNMENT - 1)? / TENSOR_ALIGNMENT * TENSOR_ALIGNMENT;
        let total = start.checked_add(rows.checked_mul(cols / 8)?)?;
        Some(Sparse24Layout {
            rows,
            cols,
            values: 0..value_bytes,
            positions: start..total,
            total,
        })
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl FromStr for Encoding {
    type Err = EncodingError;

    /// Parses `f32`, `f16`, `bf16`, `q8`, `q4`, `q4a`, `q3`, optionally with `/gN` (default group 32).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        let (base, group) = match s.split_once("/g") {
            Some((b, g)) => (
                b.to_string(),
                Some(
                    g.parse::<u32>()
                        .map_err(|_| EncodingError::GroupSyntax(s.clone()))?,
                ),
            ),
            None => (s.clone(), None),
        };
        let group_or_default = group.unwrap_or(QUANT_BLOCK as u32);
        let encoding = match base.as_str() {
            "q8" => Encoding::Q8 {
                group: group_or_default,
            },
            "q4" => Encoding::Q4 {
                group: group_or_default,
                asymmetric: false,
            },
            "q4a" => Encoding::Q4 {
                group: group_or_default,
                asymmetric: true,
            },
            "q3" => Encoding::Q3 {
                group: group_or_default,
            },
            "q4nl" => Encoding::Q4Grid {
                group: group_or_default,
            },
            "q3nl" => Encoding::Q3Grid {
                group: group_or_default,
            },
            "f16+2:4" if group.is_none() => Encoding::F16Sparse24,
            "q8+4:8" => Encoding::Q8Sparse48 {
                group: group_or_default,
            },
            "q4+4:8" => Encoding::Q4Sparse48 {
                group: group_or_default,
            },
            _ => {
                let dense = Encoding::ALL
                    .into_iter()
                    .find(|e| e.name() == base)
                    .ok_or_else(|| EncodingError::Unknown(s.clone()))?;
                if group.is_some() {
                    return Err(EncodingError::NoGroup(base));
                }
                dense
            }
        };
        if let Some(g) = encoding.group() {
            encoding_group_ok(g)?;
        }
        Ok(encoding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An encoding of each kind, with group 32 (masked code streams of 0 bytes).
    fn encoding_of(kind: QuantKind) -> Encoding {
        let group = 32;
        match kind {
            QuantKind::Q8 => Encoding::Q8 { group },
            QuantKind::Q4 => Encoding::Q4 {
                group,
                asymmetric: false,
            },
            QuantKind::Q4Asym => Encoding::Q4 {
                group,
                asymmetric: true,
            },
            QuantKind::Q3 => Encoding::Q3 { group },
            QuantKind::Q4Grid => Encoding::Q4Grid { group },
            QuantKind::Q3Grid => Encoding::Q3Grid { group },
            QuantKind::Q8Sparse48 => Encoding::Q8Sparse48 { group },
            QuantKind::Q4Sparse48 => Encoding::Q4Sparse48 { group },
            QuantKind::Q8Masked => Encoding::Q8Masked {
                group,
                code_bytes: 0,
            },
            QuantKind::Q4Masked => Encoding::Q4Masked {
                group,
                code_bytes: 0,
            },
        }
    }

    #[test]
    fn the_kind_table_agrees_with_the_encodings() {
        for (i, kind) in QuantKind::ALL.into_iter().enumerate() {
            let info = kind.info();
            assert_eq!(info.kind, kind);
            assert_eq!(kind as usize, i, "{kind:?} is not at its own index");
            let e = encoding_of(kind);
            assert_eq!(e.quant_kind(), Some(kind));
            assert_eq!((e.name(), e.code()), (info.name, info.code));
            if let Some(levels) = info.grid {
                // One level per code, ascending (the encoder's nearest-level search needs
                // it), read as signed bytes with no zero point.
                assert_eq!(levels.len(), 1 << info.code_bits, "{kind:?}");
                assert!(levels.windows(2).all(|p| p[0] < p[1]), "{kind:?}");
                assert!(info.signed && info.zero_point == 0, "{kind:?}");
            }
            let (p0, p1) = e.params();
            assert_eq!(Encoding::from_table(e.code(), p0, p1), Ok(Some(e)));
            assert_eq!(e.tile_block_bytes(), Some(info.tile_block_bytes()));
            // A tile block holds whole bytes, and a code is at most a byte.
            assert_eq!(TILE_ROWS * QUANT_BLOCK * info.block_bits % 8, 0);
            assert!(info.code_bits <= 8 && info.zero_point < 1 << info.code_bits);
        }
        let bits = |s: &str| s.parse::<Encoding>().unwrap().bits_per_weight();
        assert_eq!(bits("q8"), 8.5);
        assert_eq!(bits("q4"), 4.5);
        assert_eq!(bits("q4a"), 5.0);
        assert_eq!(bits("q3/g64"), 3.25);
        assert_eq!(bits("q4+4:8"), 3.5);
        assert_eq!(bits("f16+2:4"), 9.0);
        assert_eq!(Encoding::F16Sparse24.code(), 256);
        assert_eq!(Encoding::BF16.name(), "bf16");
    }
}
