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

use std::path::PathBuf;

pub mod config;
mod encoding;
pub mod reader;
pub mod recipe;
mod size;
mod tokenizer_spec;
pub mod writer;

pub use config::{Architecture, ConfigError, ModelConfig};
pub use encoding::{
    Encoding, EncodingError, GRID3_LEVELS, GRID4_LEVELS, MASKED_CODE_PADDING, MAX_QUANT_GROUP,
    QUANT_BLOCK, QUANT_KINDS, QuantKind, QuantKindInfo, QuantLayout, QuantStorage, Sparse24Layout,
    TILE_PIECE, TILE_ROWS,
};
pub use reader::{PlmFile, TensorEntry, TensorView};
pub use recipe::Recipe;
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
/// Required flag: the block matrices are stored rotated ([`config::Incoherence`]); a reader
/// that does not rotate their inputs would compute garbage, so it must refuse the file.
pub const ROTATED_INPUTS: u32 = 0x0000_0001;
/// Required flags this build understands.
pub(crate) const KNOWN_REQUIRED_FLAGS: u32 = ROTATED_INPUTS;

/// The required flags a file with `metadata` sets: each follows from what the metadata's
/// model config says, so a writer cannot forget one.
pub(crate) fn required_flags(metadata: &serde_json::Value) -> u32 {
    let rotated = metadata
        .pointer("/config/incoherence")
        .is_some_and(|v| !v.is_null());
    if rotated { ROTATED_INPUTS } else { 0 }
}

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
        // i8 (saved KV caches) has a code but is not a weight encoding the CLI accepts.
        assert_eq!(Encoding::from_code(3), Some(Encoding::I8));
        assert_eq!(Encoding::I8.byte_len(&[3, 5]), Some(15));
        assert!(!Encoding::I8.is_dense() && !Encoding::I8.is_quantized());
        assert!("i8".parse::<Encoding>().is_err());
        assert_eq!(Encoding::from_code(4), None);
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
        assert_eq!(
            "q4nl/g64".parse::<Encoding>(),
            Ok(Encoding::Q4Grid { group: 64 })
        );
        assert_eq!(Encoding::Q4Grid { group: 32 }.describe(), "q4nl/g32");
        assert_eq!(Encoding::Q4Grid { group: 32 }.bits_per_weight(), 4.5);
        assert_eq!(
            Encoding::from_table(19, 64, 0),
            Ok(Some(Encoding::Q4Grid { group: 64 }))
        );
        assert!(Encoding::from_table(19, 64, 1).is_err());
        assert_eq!(
            "q3nl/g64".parse::<Encoding>(),
            Ok(Encoding::Q3Grid { group: 64 })
        );
        assert_eq!(Encoding::Q3Grid { group: 64 }.bits_per_weight(), 3.25);
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
