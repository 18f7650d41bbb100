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

pub mod reader;
pub mod writer;

pub use reader::{PlmFile, TensorEntry, TensorView};
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
pub const FORMAT_VERSION: u32 = 1;

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
/// [`Encoding::code`]); variants for quantized, low-rank and sparse storage land later
/// under new codes without a format version bump.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// IEEE-754 binary32, little-endian. Code 0.
    F32,
    /// IEEE-754 binary16, little-endian. Code 1.
    F16,
    /// bfloat16 (upper half of an f32), little-endian. Code 2.
    BF16,
}

impl Encoding {
    /// All encodings this build understands.
    pub const ALL: [Encoding; 3] = [Encoding::F32, Encoding::F16, Encoding::BF16];

    /// Lower-case name used in recipes, logs and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::F32 => "f32",
            Encoding::F16 => "f16",
            Encoding::BF16 => "bf16",
        }
    }

    /// Storage cost per weight, including any per-group scales of later encodings.
    pub fn bits_per_weight(self) -> f64 {
        match self {
            Encoding::F32 => 32.0,
            Encoding::F16 | Encoding::BF16 => 16.0,
        }
    }

    /// Exact number of data bytes a tensor of `shape` occupies; `None` on overflow.
    /// An empty shape is a scalar (one element).
    pub fn byte_len(self, shape: &[usize]) -> Option<usize> {
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
        }
    }

    /// Inverse of [`Encoding::code`]; `None` for codes this build does not know.
    pub fn from_code(code: u16) -> Option<Encoding> {
        Encoding::ALL.into_iter().find(|e| e.code() == code)
    }

    /// Bytes per element of the dense encodings.
    fn element_size(self) -> usize {
        match self {
            Encoding::F32 => 4,
            Encoding::F16 | Encoding::BF16 => 2,
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Encoding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Encoding::ALL
            .into_iter()
            .find(|e| e.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown encoding '{s}' (expected one of: f32, f16, bf16)"))
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
    #[error("unsupported .plm format version {version} (this build reads {FORMAT_VERSION})")]
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
    pub(crate) fn corrupt(section: &'static str, message: impl Into<String>) -> Self {
        PlmError::Corrupt {
            section,
            message: message.into(),
        }
    }

    pub(crate) fn tensor(name: &str, message: impl Into<String>) -> Self {
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
        let err = "q4".parse::<Encoding>().unwrap_err();
        assert!(err.contains("'q4'"), "{err}");
        assert_eq!(Encoding::F32.bits_per_weight(), 32.0);
        assert_eq!(Encoding::F16.bits_per_weight(), 16.0);
        assert_eq!(Encoding::BF16.bits_per_weight(), 16.0);
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
