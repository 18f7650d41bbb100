//! The `.plm` file format: one memory-mappable file holding a converted model.
//!
//! Layout (all integers little-endian; byte-exact spec in `docs/format.md`):
//!
//! ```text
//! 0      header (128 bytes, fixed, CRC32-protected)
//! 128    tensor data region: tensors back to back, each starting at a multiple of 64
//! ...    metadata block: one JSON object (config, tokenizer, recipe, provenance)
//! ...    tensor table: one binary entry per tensor (name, shape, encoding, offset, length, CRC)
//! EOF
//! ```
//!
//! Data comes first and the table last so the [`PlmWriter`] can stream tensors one at a time
//! (layer-by-layer conversion never holds the model in memory) and patch the header at the
//! end, like a zip central directory. The [`PlmFile`] reader maps the file with `memmap2` and
//! hands out zero-copy typed views; it validates the header, metadata and table at open
//! (O(table), no tensor data touched) and tensor checksums only in [`PlmFile::verify`].

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub mod config;
pub mod reader;
mod size;
mod tokenizer_spec;
pub mod writer;

pub use config::{Architecture, ConfigError, ModelConfig};
pub use reader::{PlmFile, TensorEntry, TensorView};
pub use size::{SizeError, parse_size};
pub use tokenizer_spec::TokenizerSpec;
pub use writer::PlmWriter;

// Tensor views reinterpret the little-endian bytes of the map in place.
#[cfg(target_endian = "big")]
compile_error!(
    "pocketlm's .plm reader maps little-endian tensor data in place; big-endian targets are not supported"
);

/// First eight bytes of every `.plm` file.
pub const MAGIC: [u8; 8] = *b"POCKETLM";

/// The (major) format version this build reads and writes. Readers reject any other value;
/// new tensor encodings add encoding codes instead of bumping it (see `docs/format.md`).
/// Version 2 stores quantized matrices in tiles of [`TILE_ROWS`] interleaved rows.
pub const FORMAT_VERSION: u32 = 2;

/// The oldest version readers accept: version 1 files differ from version 2 only in the
/// layout of quantized matrices, so a version 1 file without any opens as it is.
pub const OLDEST_READ_VERSION: u32 = 1;

/// Every tensor's data starts at a file offset that is a multiple of this.
///
/// Why 64: it is the cache-line size on x86-64 and on the ARM cores we target (Cortex-A5x/
/// A7x, Apple), so a tensor never shares its first line with its neighbour; it is the width of
/// the widest SIMD load (AVX-512, 64 B), so kernels may use aligned loads from the first row;
/// and every element type's alignment (f32: 4, f16/bf16: 2, future u8/u32 packings) divides
/// it, so `bytemuck` casts of the mapped bytes always succeed. The map base is page-aligned
/// (4 KiB or 16 KiB), so file-offset alignment is address alignment.
pub const TENSOR_ALIGNMENT: usize = 64;

/// Size of the fixed header at offset 0. Also where the tensor data region starts.
pub const HEADER_SIZE: usize = 128;

/// The metadata JSON may not exceed this many bytes (a Llama 3 tokenizer.json is ~9 MiB).
pub const MAX_METADATA_LEN: u64 = 64 << 20;

/// Maximum number of tensors in one file (a 70B Llama has ~720).
pub const MAX_TENSORS: u32 = 1 << 20;

/// Maximum length of a tensor name in bytes (UTF-8).
pub const MAX_NAME_LEN: usize = 1024;

/// Maximum tensor rank.
pub const MAX_RANK: usize = 4;

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

impl Encoding {
    /// The dense (unquantized) encodings.
    pub const ALL: [Encoding; 3] = [Encoding::F32, Encoding::F16, Encoding::BF16];

    /// Lower-case name used in recipes, logs and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::F32 => "f32",
            Encoding::F16 => "f16",
            Encoding::BF16 => "bf16",
            Encoding::Q8 { .. } => "q8",
            Encoding::Q4 {
                asymmetric: false, ..
            } => "q4",
            Encoding::Q4 {
                asymmetric: true, ..
            } => "q4a",
            Encoding::Q3 { .. } => "q3",
            Encoding::F16Sparse24 => "f16+2:4",
            Encoding::Q8Sparse48 { .. } => "q8+4:8",
            Encoding::Q4Sparse48 { .. } => "q4+4:8",
            Encoding::Q8Masked { .. } => "q8+mask",
            Encoding::Q4Masked { .. } => "q4+mask",
        }
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
        matches!(self, Encoding::Q8Masked { .. } | Encoding::Q4Masked { .. })
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
        match self {
            Encoding::F32 => 32.0,
            Encoding::F16 | Encoding::BF16 => 16.0,
            Encoding::Q8 { group } => 8.0 + 16.0 / group as f64,
            Encoding::Q4 { group, asymmetric } => {
                4.0 + if asymmetric { 32.0 } else { 16.0 } / group as f64
            }
            Encoding::Q3 { group } => 3.0 + 16.0 / group as f64,
            Encoding::F16Sparse24 => 9.0,
            Encoding::Q8Sparse48 { group } => 5.0 + 16.0 / group as f64,
            Encoding::Q4Sparse48 { group } => 3.0 + 16.0 / group as f64,
            Encoding::Q8Masked { group, .. } | Encoding::Q4Masked { group, .. } => {
                1.0 + 16.0 / group as f64
            }
        }
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
        match self {
            Encoding::F32 => 0,
            Encoding::F16 => 1,
            Encoding::BF16 => 2,
            Encoding::Q8 { .. } => 16,
            Encoding::Q4 { .. } => 17,
            Encoding::Q3 { .. } => 18,
            Encoding::F16Sparse24 => 256,
            Encoding::Q8Sparse48 { .. } => 257,
            Encoding::Q4Sparse48 { .. } => 258,
            Encoding::Q8Masked { .. } => 259,
            Encoding::Q4Masked { .. } => 260,
        }
    }

    /// The two u32 parameters stored beside the code.
    pub fn params(self) -> (u32, u32) {
        match self {
            Encoding::F32 | Encoding::F16 | Encoding::BF16 | Encoding::F16Sparse24 => (0, 0),
            Encoding::Q8 { group } => (group, 0),
            Encoding::Q4 { group, asymmetric } => (group, asymmetric as u32),
            Encoding::Q3 { group }
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
        Encoding::ALL.into_iter().find(|e| e.code() == code)
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
            return Err(EncodingError::Parameters {
                encoding: encoding.name(),
                quantized: encoding.is_quantized(),
                params: (param0, param1),
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
        let tiles = rows.div_ceil(TILE_ROWS);
        let tile_bytes = (cols / QUANT_BLOCK).checked_mul(self.tile_block_bytes()?)?;
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
        let (mins, total) = match self {
            Encoding::Q4 {
                asymmetric: true, ..
            } => (
                Some(scales_end..scales_end + scale_bytes),
                scales_end.checked_add(scale_bytes)?,
            ),
            _ => (None, scales_end),
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
    /// encoding: q8 256, q4 128, q3 96.
    pub fn tile_block_bytes(self) -> Option<usize> {
        match self {
            Encoding::Q8 { .. } => Some(TILE_ROWS * QUANT_BLOCK),
            Encoding::Q4 { .. } => Some(TILE_ROWS * QUANT_BLOCK / 2),
            Encoding::Q3 { .. } => Some(TILE_ROWS * QUANT_BLOCK * 3 / 8),
            // Kept codes (half the weights) and a one-bit-per-weight mask.
            Encoding::Q8Sparse48 { .. } => Some(TILE_ROWS * QUANT_BLOCK * 5 / 8),
            Encoding::Q4Sparse48 { .. } => Some(TILE_ROWS * QUANT_BLOCK * 3 / 8),
            // The mask only; the codes live in the stream after the offsets.
            Encoding::Q8Masked { .. } | Encoding::Q4Masked { .. } => {
                Some(TILE_ROWS * QUANT_BLOCK / 8)
            }
            _ => None,
        }
    }

    /// Bytes per element of the dense encodings.
    fn element_size(self) -> usize {
        match self {
            Encoding::F32 => 4,
            Encoding::F16 | Encoding::BF16 => 2,
            // Not used for quantized or sparse encodings (see `quant_layout`,
            // `Sparse24Layout`); one byte is the q8 value.
            Encoding::Q8 { .. }
            | Encoding::Q4 { .. }
            | Encoding::Q3 { .. }
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
    #[error("{}", parameters_message(encoding, *quantized, *params))]
    Parameters {
        encoding: &'static str,
        quantized: bool,
        params: (u32, u32),
    },
}

fn parameters_message(encoding: &str, quantized: bool, (p0, p1): (u32, u32)) -> String {
    if quantized {
        format!("encoding {encoding} has invalid parameters ({p0}, {p1})")
    } else {
        format!("encoding {encoding} takes no parameters, but the table has ({p0}, {p1})")
    }
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

/// Everything that can go wrong reading or writing a `.plm` file. Messages name the file
/// section or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum PlmError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a .plm file: {reason}")]
    NotPlm { reason: String },
    #[error(
        "unsupported .plm format version {version} (this build reads \
         {OLDEST_READ_VERSION}-{FORMAT_VERSION}; convert the model again with this version of \
         pocketlm)"
    )]
    UnsupportedVersion { version: u32 },
    #[error(
        "header: file uses feature flags {flags:#x} that this version of pocketlm does not \
         support (file written by a newer version?)"
    )]
    UnsupportedFlags { flags: u32 },
    #[error("truncated: file has {actual} bytes, less than the {HEADER_SIZE}-byte header")]
    TruncatedHeader { actual: u64 },
    #[error("truncated: header says {expected} bytes, file has {actual}")]
    Truncated { expected: u64, actual: u64 },
    #[error("corrupt {section}: {message}")]
    Corrupt {
        section: &'static str,
        message: String,
    },
    #[error(
        "tensor '{name}' uses encoding code {code}, which this version of pocketlm does not \
         support (file written by a newer version?)"
    )]
    UnsupportedEncoding { name: String, code: u16 },
    #[error("tensor '{name}': {message}")]
    Tensor { name: String, message: String },
    #[error("tensor '{0}' not found in the file")]
    MissingTensor(String),
    #[error(
        "tensor '{name}': checksum mismatch (table says {expected:#010x}, data hashes to \
         {actual:#010x}); the file is corrupted"
    )]
    Checksum {
        name: String,
        expected: u32,
        actual: u32,
    },
    #[error("tensor '{name}' is stored as {actual}, but {expected} was requested")]
    WrongEncoding {
        name: String,
        expected: Encoding,
        actual: Encoding,
    },
    #[error("invalid metadata: {0}")]
    InvalidMetadata(String),
}

impl PlmError {
    pub fn corrupt(section: &'static str, message: impl Into<String>) -> Self {
        PlmError::Corrupt {
            section,
            message: message.into(),
        }
    }

    pub fn tensor(name: &str, message: impl Into<String>) -> Self {
        PlmError::Tensor {
            name: name.to_string(),
            message: message.into(),
        }
    }
}

/// Header field offsets (bytes from the start of the file). Shared by reader and writer so
/// the two cannot disagree; `docs/format.md` documents the same table.
pub(crate) mod header {
    pub const MAGIC: usize = 0; // [u8; 8]
    pub const VERSION: usize = 8; // u32
    pub const FLAGS: usize = 12; // u32
    pub const FILE_LEN: usize = 16; // u64
    pub const DATA_OFFSET: usize = 24; // u64
    pub const DATA_LEN: usize = 32; // u64
    pub const META_OFFSET: usize = 40; // u64
    pub const META_LEN: usize = 48; // u64
    pub const META_CRC: usize = 56; // u32
    pub const TENSOR_COUNT: usize = 60; // u32
    pub const TABLE_OFFSET: usize = 64; // u64
    pub const TABLE_LEN: usize = 72; // u64
    pub const TABLE_CRC: usize = 80; // u32
    // 84..124: reserved, written as zero, ignored by readers (covered by the CRC).
    pub const HEADER_CRC: usize = 124; // u32, CRC32 of bytes 0..124
}

/// Feature flags whose low 16 bits are "required": a reader that does not know a set bit
/// must refuse the file. The high 16 bits are optional hints a reader may ignore.
pub(crate) const REQUIRED_FLAGS_MASK: u32 = 0x0000_ffff;
/// Required flags this build understands (none yet).
pub(crate) const KNOWN_REQUIRED_FLAGS: u32 = 0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_names_codes_and_sizes() {
        for e in Encoding::ALL {
            assert_eq!(e.name().parse::<Encoding>().unwrap(), e);
            assert_eq!(Encoding::from_code(e.code()), Some(e));
            assert_eq!(e.to_string(), e.name());
        }
        assert_eq!(
            (
                Encoding::F32.code(),
                Encoding::F16.code(),
                Encoding::BF16.code()
            ),
            (0, 1, 2)
        );
        assert_eq!(Encoding::from_code(3), None);
        assert_eq!("BF16".parse::<Encoding>().unwrap(), Encoding::BF16);
        let err = "q5".parse::<Encoding>().unwrap_err().to_string();
        assert!(err.contains("'q5'"), "{err}");
        assert_eq!(Encoding::F32.bits_per_weight(), 32.0);
        assert_eq!(Encoding::F16.bits_per_weight(), 16.0);
        assert_eq!(Encoding::BF16.bits_per_weight(), 16.0);
    }

    #[test]
    fn quantized_encodings_parse_and_round_trip_through_the_table() {
        let q4 = "q4/g64".parse::<Encoding>().unwrap();
        assert_eq!(
            q4,
            Encoding::Q4 {
                group: 64,
                asymmetric: false
            }
        );
        assert_eq!(
            "Q8".parse::<Encoding>().unwrap(),
            Encoding::Q8 { group: 32 }
        );
        let q4a = "q4a/g128".parse::<Encoding>().unwrap();
        assert_eq!(q4a.to_string(), "q4a/g128");
        for e in [q4, q4a, Encoding::Q8 { group: 32 }] {
            let (p0, p1) = e.params();
            assert_eq!(Encoding::from_table(e.code(), p0, p1), Ok(Some(e)));
        }
        assert!("q4/g48".parse::<Encoding>().is_err());
        assert!("f16/g32".parse::<Encoding>().is_err());
        assert!(Encoding::from_table(17, 0, 0).is_err());
        assert!(Encoding::from_table(16, 32, 1).is_err());
        assert!(Encoding::from_table(0, 32, 0).is_err());
        assert_eq!(Encoding::from_table(99, 0, 0), Ok(None));
        assert_eq!(q4.bits_per_weight(), 4.25);
        assert_eq!(q4a.bits_per_weight(), 4.25);
        assert_eq!(Encoding::Q8 { group: 32 }.bits_per_weight(), 8.5);
    }

    #[test]
    fn quant_layout_aligns_scales_and_rejects_ragged_rows() {
        let q4a = Encoding::Q4 {
            group: 32,
            asymmetric: true,
        };
        // 3 rows fill one tile of 8 (padded): 3 blocks of 128 bytes, then 8 rows × 3 groups
        // of f16 scales and as many minimums.
        let l = q4a.quant_layout(&[3, 96]).unwrap();
        assert_eq!(l.tiles, 1);
        assert_eq!(l.quants, 0..384);
        assert_eq!(l.scales, 384..384 + 48);
        assert_eq!(l.mins, Some(432..480));
        assert_eq!(q4a.byte_len(&[3, 96]), Some(480));
        // 17 rows: three tiles; q8 blocks are 256 bytes, scales start at a multiple of 64.
        let l = Encoding::Q8 { group: 64 }.quant_layout(&[17, 64]).unwrap();
        assert_eq!((l.tiles, l.quants.clone()), (3, 0..1536));
        assert_eq!(l.scales, 1536..1536 + 3 * 8 * 2);
        assert_eq!(q4a.byte_len(&[3, 100]), None);
        assert_eq!(q4a.byte_len(&[96]), None);
        assert_eq!(
            Encoding::Q8 { group: 32 }.byte_len(&[usize::MAX / 2, 64]),
            None
        );
    }

    #[test]
    fn q3_parses_round_trips_and_lays_out_bit_planes() {
        assert_eq!("q3".parse::<Encoding>(), Ok(Encoding::Q3 { group: 32 }));
        assert_eq!("Q3/g64".parse::<Encoding>(), Ok(Encoding::Q3 { group: 64 }));
        let q3 = "q3/g128".parse::<Encoding>().unwrap();
        assert_eq!(q3, Encoding::Q3 { group: 128 });
        assert_eq!(q3.to_string(), "q3/g128");
        assert_eq!((q3.code(), q3.params()), (18, (128, 0)));
        assert_eq!(Encoding::from_table(18, 128, 0), Ok(Some(q3)));
        assert!(q3.is_quantized());
        assert!("q3/g48".parse::<Encoding>().is_err());
        assert!("q3/g0".parse::<Encoding>().is_err());
        // param1 is unused (must be 0); the group must be a positive multiple of 32.
        assert!(Encoding::from_table(18, 64, 1).is_err());
        assert!(Encoding::from_table(18, 0, 0).is_err());
        assert!(Encoding::from_table(18, 48, 0).is_err());
        assert!(Encoding::from_table(18, MAX_QUANT_GROUP + 32, 0).is_err());
        assert_eq!(Encoding::Q3 { group: 32 }.bits_per_weight(), 3.5);
        assert_eq!(Encoding::Q3 { group: 64 }.bits_per_weight(), 3.25);
        assert_eq!(q3.bits_per_weight(), 3.125);
        // 3 rows × 128: one tile of 4 blocks of 96 bytes; scales (8 rows × 2 groups) at the
        // next multiple of 64.
        let l = Encoding::Q3 { group: 64 }.quant_layout(&[3, 128]).unwrap();
        assert_eq!(l.quants, 0..384);
        assert_eq!(l.scales, 384..384 + 32);
        assert_eq!(l.mins, None);
        assert_eq!(l.total, 416);
        assert_eq!(Encoding::Q3 { group: 64 }.byte_len(&[3, 96]), None);
        assert_eq!(Encoding::Q3 { group: 32 }.byte_len(&[32]), None);
        assert_eq!(
            Encoding::Q3 { group: 32 }.byte_len(&[usize::MAX / 16, 64]),
            None
        );
        // Storage matches the advertised bits per weight (up to the scale alignment).
        let (rows, cols) = (64, 4096);
        for group in [32, 64, 128] {
            let e = Encoding::Q3 { group };
            let bytes = e.byte_len(&[rows, cols]).unwrap();
            let want = (rows * cols) as f64 * e.bits_per_weight() / 8.0;
            assert!((bytes as f64 - want).abs() < 64.0, "{e}: {bytes} vs {want}");
        }
    }

    #[test]
    fn sparse_quantized_encodings_parse_round_trip_and_lay_out() {
        let q4s = "q4+4:8/g64".parse::<Encoding>().unwrap();
        assert_eq!(q4s, Encoding::Q4Sparse48 { group: 64 });
        assert_eq!(q4s.to_string(), "q4+4:8/g64");
        assert_eq!("q8+4:8".parse(), Ok(Encoding::Q8Sparse48 { group: 32 }));
        assert_eq!((q4s.code(), q4s.params()), (258, (64, 0)));
        assert_eq!(
            Encoding::from_table(257, 32, 0),
            Ok(Some(Encoding::Q8Sparse48 { group: 32 }))
        );
        assert!(Encoding::from_table(258, 48, 0).is_err());
        assert!(Encoding::from_table(257, 32, 1).is_err());
        assert!(q4s.is_quantized() && !q4s.is_dense());
        assert_eq!(
            q4s.quant_base(),
            Encoding::Q4 {
                group: 64,
                asymmetric: false
            }
        );
        assert_eq!(
            Encoding::Q8 { group: 32 }.sparse_storage(),
            Some(Encoding::Q8Sparse48 { group: 32 })
        );
        assert_eq!(
            Encoding::Q4 {
                group: 32,
                asymmetric: true
            }
            .sparse_storage(),
            None
        );
        assert_eq!(Encoding::Q8Sparse48 { group: 32 }.bits_per_weight(), 5.5);
        assert_eq!(Encoding::Q4Sparse48 { group: 32 }.bits_per_weight(), 3.5);
        // One tile of 4 blocks: 160 (q8) or 96 (q4) bytes each, scales at a multiple of 64.
        let l = Encoding::Q8Sparse48 { group: 32 }
            .quant_layout(&[5, 128])
            .unwrap();
        assert_eq!((l.quants, l.scales.clone()), (0..640, 640..640 + 64));
        let l = q4s.quant_layout(&[9, 128]).unwrap();
        assert_eq!((l.tiles, l.quants, l.scales), (2, 0..768, 768..768 + 64));
        // Storage matches the advertised bits per weight (up to the scale alignment).
        for e in [q4s, Encoding::Q8Sparse48 { group: 32 }] {
            let bytes = e.byte_len(&[64, 4096]).unwrap();
            let want = (64 * 4096) as f64 * e.bits_per_weight() / 8.0;
            assert!((bytes as f64 - want).abs() < 64.0, "{e}: {bytes} vs {want}");
        }
    }

    #[test]
    fn byte_len_checks_overflow() {
        assert_eq!(Encoding::F32.byte_len(&[2, 3]), Some(24));
        assert_eq!(Encoding::BF16.byte_len(&[7]), Some(14));
        assert_eq!(Encoding::F16.byte_len(&[]), Some(2));
        assert_eq!(Encoding::F16.byte_len(&[5, 0, 3]), Some(0));
        assert_eq!(Encoding::F32.byte_len(&[usize::MAX, 2]), None);
        assert_eq!(Encoding::F32.byte_len(&[usize::MAX / 2]), None);
    }

    #[test]
    fn alignment_is_a_multiple_of_every_element_alignment() {
        assert_eq!(HEADER_SIZE % TENSOR_ALIGNMENT, 0);
        assert_eq!(TENSOR_ALIGNMENT % std::mem::align_of::<f32>(), 0);
        assert_eq!(TENSOR_ALIGNMENT % std::mem::align_of::<half::f16>(), 0);
        assert_eq!(TENSOR_ALIGNMENT % std::mem::align_of::<half::bf16>(), 0);
        assert_eq!(TENSOR_ALIGNMENT % std::mem::align_of::<u64>(), 0);
    }
}
