//! GGUF (v2/v3) reader and importer for llama.cpp checkpoints.
//!
//! The file is memory-mapped; metadata and tensor descriptors are parsed eagerly and
//! validated so that later tensor reads are plain in-bounds slices. Files are untrusted:
//! every count, length and offset is checked before it is used to allocate or index.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
#[cfg(test)]
use std::str::FromStr;
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::json;

use super::ggml_quants::{self, GgmlError, GgmlType};
use super::{
    ImportError, ImportedModel, SourceTensor, TensorSource, TokenizerSpec,
    unpermute_interleaved_rope_rows,
};
use pocketlm_format::config::{
    Activation, Architecture, FamilyFeatures, Llama3RopeScaling, ModelConfig, RopeScaling, names,
};

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml's limit on tensor rank.
const MAX_DIMS: usize = 4;
/// Arrays of arrays deeper than this are not used by any known writer.
const MAX_ARRAY_DEPTH: usize = 4;
/// GGUF keys are at most 65535 bytes by spec.
const MAX_KEY_LEN: u64 = 65535;
/// ggml names are at most 63 bytes; leave room for other writers.
const MAX_TENSOR_NAME_LEN: u64 = 1024;
/// Smallest encodings, used to bound counts by the bytes left before allocating:
/// a kv pair is key length (8) + value type (4) + a 1-byte value; a tensor info is name
/// length (8) + n_dims (4) + type (4) + offset (8).
const MIN_KV_BYTES: usize = 13;
const MIN_TENSOR_INFO_BYTES: usize = 24;

/// Why a value could not be read from a GGUF file's header, metadata or tensor descriptors
/// (where in the file is named by [`ImportError::Gguf`]'s [`GgufSection`]). `at` is a byte
/// offset in the file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    #[error("need {needed} bytes at byte {at} but the file ends at {file_len}")]
    Truncated {
        needed: usize,
        at: usize,
        file_len: usize,
    },
    /// A count of items that cannot fit in the bytes left.
    #[error("{what} count {count} at byte {at} exceeds the {left} bytes left in the file")]
    CountTooLarge {
        what: &'static str,
        count: u64,
        at: usize,
        left: usize,
    },
    #[error("string length {len} at byte {at} exceeds the limit {limit}")]
    StringOverLimit { len: u64, at: usize, limit: u64 },
    #[error("string length {len} at byte {at} exceeds the {left} bytes left in the file")]
    StringPastEnd { len: u64, at: usize, left: usize },
    #[error("unknown value type {type_id} at byte {at}")]
    UnknownValueType { type_id: u32, at: usize },
    #[error("invalid bool byte {byte} at byte {at}")]
    InvalidBool { byte: u8, at: usize },
    #[error("arrays nested deeper than {max} at byte {at}", max = MAX_ARRAY_DEPTH)]
    ArrayTooDeep { at: usize },
    #[error("unknown array element type {type_id} at byte {at}")]
    UnknownArrayType { type_id: u32, at: usize },
    #[error("{n_dims} dimensions (must be 1..={max})", max = MAX_DIMS)]
    Rank { n_dims: u32 },
    #[error("dimension {dim} is too large")]
    DimensionTooLarge { dim: u64 },
    #[error("element count overflows")]
    ElementCountOverflow,
    #[error("unknown ggml type id {type_id}")]
    UnknownGgmlType { type_id: u32 },
    /// The tensor's rows do not fit its type's blocks.
    #[error(transparent)]
    Layout(#[from] GgmlError),
    #[error("byte size overflows")]
    ByteSizeOverflow,
}

/// The part of a GGUF file a [`GgufError`] was met in; `entry` counts from 0 and `at` is the
/// byte offset where the part starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GgufSection {
    Header,
    MetadataKey {
        entry: u64,
        at: usize,
    },
    MetadataValue {
        key: String,
        entry: u64,
    },
    /// `name` once the tensor's name was read.
    TensorInfo {
        entry: u64,
        at: usize,
        name: Option<String>,
    },
}

impl std::fmt::Display for GgufSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GgufSection::Header => f.write_str("header"),
            GgufSection::MetadataKey { entry, at } => {
                write!(f, "metadata entry #{entry} key (at byte {at})")
            }
            GgufSection::MetadataValue { key, entry } => {
                write!(f, "metadata '{key}' (entry #{entry})")
            }
            GgufSection::TensorInfo { entry, at, name } => {
                write!(f, "tensor info #{entry} (at byte {at})")?;
                match name {
                    Some(name) => write!(f, ": '{name}'"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(GgufArray),
}

/// A metadata array; typed so that large token tables stay compact in memory.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
    Array(Vec<GgufArray>),
}

impl GgufValue {
    /// Any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Floats, and integers (some writers store e.g. rope bases as integers).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
            GgufValue::Array(_) => "array",
        }
    }
}

impl GgufArray {
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
            GgufArray::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as an i64 if this is an integer array (token types are i32 in practice).
    pub fn int_at(&self, i: usize) -> Option<i64> {
        Some(match self {
            GgufArray::U8(v) => (*v.get(i)?).into(),
            GgufArray::I8(v) => (*v.get(i)?).into(),
            GgufArray::U16(v) => (*v.get(i)?).into(),
            GgufArray::I16(v) => (*v.get(i)?).into(),
            GgufArray::U32(v) => (*v.get(i)?).into(),
            GgufArray::I32(v) => (*v.get(i)?).into(),
            GgufArray::U64(v) => i64::try_from(*v.get(i)?).ok()?,
            GgufArray::I64(v) => *v.get(i)?,
            _ => return None,
        })
    }

    /// Element `i` as an f64 if this is a numeric array.
    pub fn float_at(&self, i: usize) -> Option<f64> {
        match self {
            GgufArray::F32(v) => v.get(i).map(|&x| x.into()),
            GgufArray::F64(v) => v.get(i).copied(),
            _ => self.int_at(i).map(|x| x as f64),
        }
    }

    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            GgufArray::String(v) => Some(v),
            _ => None,
        }
    }
}

/// A tensor descriptor. `dims` are in ggml order (`dims[0]` varies fastest).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    pub n_elements: usize,
    pub n_bytes: usize,
}

impl GgufTensorInfo {
    /// Row-major shape, outermost first (ggml dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        // dims were checked to fit in usize when parsed
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

enum Backing {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file whose tensor data stays in the mapping until read.
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, GgufValue)>,
    index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    data: Backing,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Whether `path` starts with the GGUF magic.
pub fn has_magic(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == GGUF_MAGIC
}

impl GgufFile {
    /// Maps and parses `path`, validating all metadata and tensor ranges.
    pub fn open(path: &Path) -> Result<GgufFile, ImportError> {
        let io = |source| ImportError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 24 {
            return Err(ImportError::invalid(
                path,
                format!("file is {len} bytes, too short for a GGUF header"),
            ));
        }
        // SAFETY: the file is opened read-only and mapped as a private, read-only view; we
        // never write through it. If another process truncates or rewrites the file while
        // it is mapped, reads may fault or see new bytes — that is outside our contract
        // (model files are treated as immutable while converting).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Backing::Mmap(mmap))
    }

    /// Parses an in-memory GGUF image (tests, or files already read); `path` names it in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<GgufFile, ImportError> {
        Self::parse(path, Backing::Owned(bytes))
    }

    fn parse(path: &Path, data: Backing) -> Result<GgufFile, ImportError> {
        let bytes = data.bytes();
        let file_len = bytes.len() as u64;
        let mut r = Reader { buf: bytes, pos: 0 };
        let err = |msg: String| ImportError::invalid(path, msg);
        let read = |section: GgufSection, source: GgufError| ImportError::Gguf {
            path: path.to_path_buf(),
            section,
            source,
        };
        let header = |source| read(GgufSection::Header, source);

        let magic = r.take(4).map_err(header)?;
        if magic != GGUF_MAGIC {
            return Err(err(format!(
                "not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
            )));
        }
        let version = r.u32().map_err(header)?;
        match version {
            2 | 3 => {}
            1 => return Err(err("GGUF version 1 is not supported (only 2 and 3)".into())),
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(err("big-endian GGUF files are not supported".into()));
            }
            v => return Err(err(format!("unsupported GGUF version {v} (only 2 and 3)"))),
        }
        let tensor_count = r.u64().map_err(header)?;
        let kv_count = r.u64().map_err(header)?;
        // Counts are bounded by the bytes left so a hostile header cannot make us allocate.
        let remaining = r.remaining() as u64;
        if kv_count > remaining / MIN_KV_BYTES as u64 {
            return Err(err(format!(
                "header claims {kv_count} metadata entries but only {remaining} bytes follow"
            )));
        }
        if tensor_count > remaining / MIN_TENSOR_INFO_BYTES as u64 {
            return Err(err(format!(
                "header claims {tensor_count} tensors but only {remaining} bytes follow"
            )));
        }

        let mut metadata = Vec::with_capacity(kv_count as usize);
        let mut index = HashMap::with_capacity(kv_count as usize);
        for i in 0..kv_count {
            let start = r.pos;
            let key = r.string(MAX_KEY_LEN).map_err(|e| {
                read(
                    GgufSection::MetadataKey {
                        entry: i,
                        at: start,
                    },
                    e,
                )
            })?;
            let value = r.typed_value().map_err(|e| {
                read(
                    GgufSection::MetadataValue {
                        key: key.clone(),
                        entry: i,
                    },
                    e,
                )
            })?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(err(format!("duplicate metadata key '{key}'")));
            }
            metadata.push((key, value));
        }

        let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(err(format!(
                        "general.alignment must be a power of two up to 1 MiB, got {v:?}"
                    )));
                }
            },
        };

        let mut tensors = Vec::with_capacity(tensor_count as usize);
        let mut tensor_index = HashMap::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let start = r.pos;
            let section = |name: Option<&str>| GgufSection::TensorInfo {
                entry: i,
                at: start,
                name: name.map(str::to_string),
            };
            let name = r
                .string(MAX_TENSOR_NAME_LEN)
                .map_err(|e| read(section(None), e))?;
            let info = r
                .tensor_info(&name)
                .map_err(|e| read(section(Some(&name)), e))?;
            if tensor_index
                .insert(info.name.clone(), tensors.len())
                .is_some()
            {
                return Err(ImportError::tensor(
                    path,
                    &info.name,
                    "duplicate tensor name",
                ));
            }
            tensors.push(info);
        }

        let data_offset = (r.pos as u64)
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| err("data section offset overflows".into()))?;
        for t in &tensors {
            if !t.offset.is_multiple_of(alignment) {
                return Err(ImportError::tensor(
                    path,
                    &t.name,
                    format!(
                        "data offset {} is not a multiple of the alignment {alignment}",
                        t.offset
                    ),
                ));
            }
            let range = data_offset
                .checked_add(t.offset)
                .and_then(|s| Some((s, s.checked_add(t.n_bytes as u64)?)));
            match range {
                Some((_, e)) if e <= file_len => {}
                Some((s, e)) => {
                    return Err(ImportError::tensor(
                        path,
                        &t.name,
                        format!("data range {s}..{e} exceeds file size {file_len}"),
                    ));
                }
                None => {
                    return Err(ImportError::tensor(
                        path,
                        &t.name,
                        format!("data offset {} overflows", t.offset),
                    ));
                }
            }
        }

        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            alignment,
            data_offset,
            metadata,
            index,
            tensors,
            tensor_index,
            data,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Tensor descriptors in file order.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw stored bytes of a tensor.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8], ImportError> {
        // Ranges were validated at open; this re-check only guards against an `info` that
        // did not come from this file.
        let start = self.data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(info.n_bytes as u64));
        let bytes = self.data.bytes();
        match (start, end) {
            (Some(s), Some(e)) if e <= bytes.len() as u64 => Ok(&bytes[s as usize..e as usize]),
            _ => Err(ImportError::tensor(
                &self.path,
                &info.name,
                "data range lies outside the file",
            )),
        }
    }

    /// Dequantizes a tensor as stored (ggml layout, no reordering).
    pub fn dequantize(&self, info: &GgufTensorInfo) -> Result<Vec<f32>, ImportError> {
        let bytes = self.tensor_bytes(info)?;
        ggml_quants::dequantize(info.ggml_type, bytes, info.n_elements).map_err(|source| {
            ImportError::Dequantize {
                path: self.path.clone(),
                name: info.name.clone(),
                source,
            }
        })
    }

    /// A string value, erroring if the key exists with another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, ImportError> {
        self.typed(key, "a string", GgufValue::as_str)
    }

    /// A non-negative integer value that fits `usize`.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>, ImportError> {
        self.typed(key, "a non-negative integer", |v| {
            v.as_u64().and_then(|x| usize::try_from(x).ok())
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, ImportError> {
        self.typed(key, "a number", GgufValue::as_f64)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, ImportError> {
        self.typed(key, "a bool", GgufValue::as_bool)
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&GgufArray>, ImportError> {
        self.typed(key, "an array", GgufValue::as_array)
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        want: &str,
        f: impl Fn(&'a GgufValue) -> Option<T>,
    ) -> Result<Option<T>, ImportError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| {
                ImportError::invalid(
                    &self.path,
                    format!("metadata '{key}' should be {want}, found {}", v.type_name()),
                )
            }),
        }
    }

    fn require_usize(&self, key: &str) -> Result<usize, ImportError> {
        self.get_usize(key)?
            .ok_or_else(|| ImportError::invalid(&self.path, format!("missing metadata '{key}'")))
    }
}

mod model;
mod reader;
mod source;
#[cfg(test)]
mod tests;

pub use model::{
    import_file, llama3_rope_divisors, model_config, open, token_type, tokenizer_spec,
};
use reader::Reader;
pub use source::GgufTensorSource;
