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

/// Bounds-checked little-endian cursor; errors describe what was being read and where.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                needed: n,
                at: self.pos,
                file_len: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        self.array().map(u64::from_le_bytes)
    }

    /// A u64 count of items each at least `min_size` bytes, checked against what is left.
    fn count(&mut self, min_size: usize, what: &'static str) -> Result<usize, GgufError> {
        let at = self.pos;
        let n = self.u64()?;
        let room = (self.remaining() / min_size.max(1)) as u64;
        if n > room {
            return Err(GgufError::CountTooLarge {
                what,
                count: n,
                at,
                left: self.remaining(),
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, max_len: u64) -> Result<String, GgufError> {
        let at = self.pos;
        let len = self.u64()?;
        if len > max_len {
            return Err(GgufError::StringOverLimit {
                len,
                at,
                limit: max_len,
            });
        }
        if len > self.remaining() as u64 {
            return Err(GgufError::StringPastEnd {
                len,
                at,
                left: self.remaining(),
            });
        }
        let bytes = self.take(len as usize)?;
        // Invalid UTF-8 is not a safety problem; keep going with replacement characters.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn typed_value(&mut self) -> Result<GgufValue, GgufError> {
        let ty = self.u32()?;
        self.value(ty)
    }

    fn value(&mut self, ty: u32) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>()?[0]),
            1 => GgufValue::I8(self.array::<1>()?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => GgufValue::Bool(self.bool()?),
            8 => GgufValue::String(self.string(u64::MAX)?),
            9 => GgufValue::Array(self.array_value(1)?),
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(GgufError::UnknownValueType {
                    type_id: other,
                    at: self.pos - 4,
                });
            }
        })
    }

    fn bool(&mut self) -> Result<bool, GgufError> {
        let at = self.pos;
        match self.array::<1>()?[0] {
            0 => Ok(false),
            1 => Ok(true),
            byte => Err(GgufError::InvalidBool { byte, at }),
        }
    }

    fn array_value(&mut self, depth: usize) -> Result<GgufArray, GgufError> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(GgufError::ArrayTooDeep { at: self.pos });
        }
        let ty = self.u32()?;
        macro_rules! items {
            ($variant:ident, $size:expr, $read:expr) => {{
                let n = self.count($size, "array")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push($read(&mut *self)?);
                }
                GgufArray::$variant(v)
            }};
        }
        Ok(match ty {
            0 => items!(U8, 1, |r: &mut Self| r.array::<1>().map(|b| b[0])),
            1 => items!(I8, 1, |r: &mut Self| r.array::<1>().map(|b| b[0] as i8)),
            2 => items!(U16, 2, |r: &mut Self| r.array().map(u16::from_le_bytes)),
            3 => items!(I16, 2, |r: &mut Self| r.array().map(i16::from_le_bytes)),
            4 => items!(U32, 4, |r: &mut Self| r.u32()),
            5 => items!(I32, 4, |r: &mut Self| r.array().map(i32::from_le_bytes)),
            6 => items!(F32, 4, |r: &mut Self| r.array().map(f32::from_le_bytes)),
            7 => items!(Bool, 1, |r: &mut Self| r.bool()),
            8 => items!(String, 8, |r: &mut Self| r.string(u64::MAX)),
            9 => items!(Array, 12, |r: &mut Self| r.array_value(depth + 1)),
            10 => items!(U64, 8, |r: &mut Self| r.u64()),
            11 => items!(I64, 8, |r: &mut Self| r.array().map(i64::from_le_bytes)),
            12 => items!(F64, 8, |r: &mut Self| r.array().map(f64::from_le_bytes)),
            other => {
                return Err(GgufError::UnknownArrayType {
                    type_id: other,
                    at: self.pos - 4,
                });
            }
        })
    }

    /// The rest of a tensor descriptor, after its `name`.
    fn tensor_info(&mut self, name: &str) -> Result<GgufTensorInfo, GgufError> {
        let n_dims = self.u32()?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(GgufError::Rank { n_dims });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut n_elements: usize = 1;
        for _ in 0..n_dims {
            let d = self.u64()?;
            // ggml stores dims as int64; anything that does not fit usize cannot be mapped.
            let du = usize::try_from(d)
                .ok()
                .filter(|_| d <= i64::MAX as u64)
                .ok_or(GgufError::DimensionTooLarge { dim: d })?;
            n_elements = n_elements
                .checked_mul(du)
                .ok_or(GgufError::ElementCountOverflow)?;
            dims.push(d);
        }
        let type_id = self.u32()?;
        let ggml_type = GgmlType::from_id(type_id);
        let offset = self.u64()?;
        if ggml_type.geometry().is_none() {
            return Err(GgufError::UnknownGgmlType { type_id });
        }
        let row = ggml_type.row_bytes(dims[0] as usize)?;
        let rows = if dims[0] == 0 {
            0
        } else {
            n_elements / dims[0] as usize
        };
        let n_bytes = row.checked_mul(rows).ok_or(GgufError::ByteSizeOverflow)?;
        Ok(GgufTensorInfo {
            name: name.to_string(),
            dims,
            ggml_type,
            offset,
            n_elements,
            n_bytes,
        })
    }
}

/// llama.cpp stores Llama 3 rope scaling as precomputed per-frequency divisors; the runtime
/// derives them from [`Llama3RopeScaling`], so the tensor is not exposed.
const ROPE_FREQS: &str = "rope_freqs.weight";
/// Phi-3's LongRoPE divisors, which llama.cpp stores as tensors.
const ROPE_FACTORS_LONG: &str = "rope_factors_long.weight";
const ROPE_FACTORS_SHORT: &str = "rope_factors_short.weight";
/// Tensors that configure RoPE rather than being weights.
const ROPE_TENSORS: [&str; 3] = [ROPE_FREQS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT];

/// Token types of `tokenizer.ggml.token_type` (llama.cpp's llama_token_type).
pub mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const UNUSED: i64 = 5;
    pub const BYTE: i64 = 6;
}

/// Opens a GGUF checkpoint of a supported architecture as an [`ImportedModel`].
pub fn open(path: &Path) -> Result<ImportedModel, ImportError> {
    import_file(GgufFile::open(path)?)
}

/// Builds an [`ImportedModel`] from an already parsed file.
pub fn import_file(file: GgufFile) -> Result<ImportedModel, ImportError> {
    let config = model_config(&file)?;
    let tokenizer = tokenizer_spec(&file, config.vocab_size)?;
    let provenance = provenance(&file);
    let source = GgufTensorSource::new(Arc::new(file), &config)?;
    Ok(ImportedModel {
        config,
        tokenizer,
        source: Box::new(source),
        provenance,
    })
}

/// Builds the model hyper-parameters from `{arch}.*` metadata and tensor shapes.
pub fn model_config(file: &GgufFile) -> Result<ModelConfig, ImportError> {
    let path = file.path();
    let invalid = |msg: String| ImportError::invalid(path, msg);
    let arch_name = file
        .get_str("general.architecture")?
        .ok_or_else(|| invalid("missing metadata 'general.architecture'".into()))?;
    let architecture = match arch_name {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        "gemma2" => Architecture::Gemma2,
        "gemma3" => Architecture::Gemma3,
        "smollm3" => Architecture::Smollm3,
        "phi3" => Architecture::Phi3,
        other => {
            return Err(ImportError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: other.to_string(),
            });
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");

    let num_layers = file.require_usize(&key("block_count"))?;
    let hidden_size = file.require_usize(&key("embedding_length"))?;
    let intermediate_size = match file.get(&key("feed_forward_length")) {
        // some writers store one value per layer; the runtime needs them all equal
        Some(GgufValue::Array(a)) => {
            let first = a.int_at(0);
            if first.is_none() || (1..a.len()).any(|i| a.int_at(i) != first) {
                return Err(invalid(format!(
                    "{} varies per layer, which is not supported",
                    key("feed_forward_length")
                )));
            }
            first.and_then(|v| usize::try_from(v).ok()).unwrap_or(0)
        }
        _ => file.require_usize(&key("feed_forward_length"))?,
    };
    let num_heads = file.require_usize(&key("attention.head_count"))?;
    let num_kv_heads = file
        .get_usize(&key("attention.head_count_kv"))?
        .unwrap_or(num_heads);
    if num_heads == 0 {
        return Err(invalid(format!("{} is 0", key("attention.head_count"))));
    }
    let head_dim = match file.get_usize(&key("attention.key_length"))? {
        Some(k) => k,
        None => hidden_size / num_heads,
    };
    let rotary_dim = file.get_usize(&key("rope.dimension_count"))?;
    if let Some(rot) = rotary_dim
        && rot != head_dim
        && architecture != Architecture::Phi3
    {
        return Err(invalid(format!(
            "partial rotary embeddings (rope.dimension_count {rot} != head_dim {head_dim}) are not supported for {arch_name}"
        )));
    }
    let rms_norm_eps = file
        .get_f64(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            invalid(format!(
                "missing metadata '{}'",
                key("attention.layer_norm_rms_epsilon")
            ))
        })? as f32;
    let rope_theta = file.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32;
    let max_position_embeddings = file.require_usize(&key("context_length"))?;

    let embd = file
        .tensor_info(names::TOKEN_EMBD)
        .ok_or_else(|| ImportError::MissingTensor {
            path: path.to_path_buf(),
            name: names::TOKEN_EMBD.into(),
        })?;
    if embd.dims.len() != 2 || embd.dims[0] != hidden_size as u64 {
        return Err(ImportError::tensor(
            path,
            names::TOKEN_EMBD,
            format!(
                "shape {:?} does not match embedding_length {hidden_size}",
                embd.shape()
            ),
        ));
    }
    let vocab_size = embd.dims[1] as usize;
    if let Some(v) = file.get_usize(&key("vocab_size"))?
        && v != vocab_size
    {
        log::warn!(
            "{}: {} = {v} but {} has {vocab_size} rows; using the tensor",
            path.display(),
            key("vocab_size"),
            names::TOKEN_EMBD
        );
    }

    let tie_word_embeddings = file.tensor_info(names::OUTPUT).is_none();
    let attention_bias =
        architecture == Architecture::Qwen2 || file.tensor_info(&names::attn_q_bias(0)).is_some();
    let (rope_scaling, features) = if architecture.is_llama_like() {
        let scaling = rope_scaling(file, arch_name, rope_theta, head_dim)?;
        // Mistral GGUFs are written as `llama`; their window is the only difference.
        let features = FamilyFeatures {
            sliding_window: file.get_usize(&key("attention.sliding_window"))?,
            ..FamilyFeatures::default()
        };
        (scaling, features)
    } else {
        let features = family_features(
            file,
            architecture,
            num_layers,
            hidden_size,
            head_dim,
            rotary_dim,
            max_position_embeddings,
        )?;
        (None, features)
    };

    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings,
        attention_bias,
        features,
    };
    config
        .validate()
        .map_err(|e| invalid(format!("model config: {e}")))?;

    // Check the attention projections agree with the head geometry now, so a mismatch is
    // reported once at open rather than as a failed unpermutation later.
    for (name, heads) in [
        (names::attn_q(0), config.num_heads),
        (names::attn_k(0), config.num_kv_heads),
    ] {
        if let Some(t) = file.tensor_info(&name) {
            let want = [
                heads as u64 * config.head_dim as u64,
                config.hidden_size as u64,
            ];
            if t.dims.len() != 2 || t.dims[1] != want[0] {
                return Err(ImportError::tensor(
                    path,
                    &name,
                    format!(
                        "shape {:?}, expected {} rows ({heads} heads × {})",
                        t.shape(),
                        want[0],
                        config.head_dim
                    ),
                ));
            }
        }
    }
    Ok(config)
}

/// What the newer families do differently, from llama.cpp's metadata keys; where llama.cpp
/// hard-codes a value per architecture instead of storing it (Gemma's window pattern and
/// local RoPE base, its attention scale, SmolLM3's RoPE-less layers), the same value.
fn family_features(
    file: &GgufFile,
    arch: Architecture,
    num_layers: usize,
    hidden_size: usize,
    head_dim: usize,
    rotary_dim: Option<usize>,
    max_position_embeddings: usize,
) -> Result<FamilyFeatures, ImportError> {
    let path = file.path();
    let name = arch.name();
    let key = |k: &str| format!("{name}.{k}");
    let f32_key = |k: &str| -> Result<Option<f32>, ImportError> {
        Ok(file.get_f64(&key(k))?.map(|x| x as f32))
    };
    let mut f = FamilyFeatures::default();
    let window = file.get_usize(&key("attention.sliding_window"))?;
    let scaling_type = file.get_str(&key("rope.scaling.type"))?;
    let scaling_factor = file.get_f64(&key("rope.scaling.factor"))?;
    let linear = match (scaling_type, scaling_factor) {
        (Some("linear"), Some(factor)) if factor != 1.0 => Some(RopeScaling::Linear {
            factor: factor as f32,
        }),
        (None | Some("none") | Some("linear"), _) => None,
        (Some(_), Some(1.0)) => None,
        (Some(other), _) if arch != Architecture::Phi3 => {
            return Err(ImportError::invalid(
                path,
                format!("rope scaling type '{other}' is not supported for {name}"),
            ));
        }
        _ => None,
    };
    match arch {
        Architecture::Qwen3 => f.qk_norm = true,
        Architecture::Gemma2 | Architecture::Gemma3 => {
            f.post_norms = true;
            f.activation = Activation::GeluTanh;
            f.embedding_scale = Some((hidden_size as f32).sqrt());
            // llama.cpp: query_pre_attn_scalar is hidden/heads for the 27B models (62 and
            // 46 layers), head_dim otherwise; the converter does not store it.
            let heads = file
                .get_usize(&key("attention.head_count"))?
                .unwrap_or(1)
                .max(1);
            let scalar = match (arch, num_layers) {
                (Architecture::Gemma3, 62) | (Architecture::Gemma2, 46) => hidden_size / heads,
                _ => head_dim,
            };
            f.attention_scale = Some(1.0 / (scalar as f32).sqrt());
            f.attn_logit_softcap = f32_key("attn_logit_softcapping")?;
            f.final_logit_softcap = f32_key("final_logit_softcapping")?;
            f.sliding_window = window;
            let pattern = file
                .get_usize(&key("attention.sliding_window_pattern"))?
                .unwrap_or(if arch == Architecture::Gemma3 { 6 } else { 2 })
                .max(1);
            // The last layer of each `pattern` is global.
            f.sliding_window_layers = (0..num_layers).map(|l| (l + 1) % pattern != 0).collect();
            if arch == Architecture::Gemma3 {
                f.qk_norm = true;
                f.local_rope_theta = Some(f32_key("rope.freq_base_swa")?.unwrap_or(10000.0));
            }
            f.rope_scaling = linear;
        }
        Architecture::Smollm3 => {
            // llama.cpp: every 4th layer has no RoPE (the checkpoints' no_rope_layer_interval).
            f.no_rope_layers = (0..num_layers).filter(|l| (l + 1) % 4 == 0).collect();
        }
        Architecture::Phi3 => {
            if let Some(r) = rotary_dim.filter(|&r| r != head_dim) {
                f.rotary_dim = Some(r);
            }
            f.sliding_window = window;
            let (long, short) = (
                file.tensor_info(ROPE_FACTORS_LONG),
                file.tensor_info(ROPE_FACTORS_SHORT),
            );
            if let (Some(long), Some(short)) = (long, short) {
                let original = file
                    .get_usize(&key("rope.scaling.original_context_length"))?
                    .unwrap_or(max_position_embeddings);
                let factor = max_position_embeddings as f64 / original.max(1) as f64;
                let attention_factor = match f32_key("rope.scaling.attn_factor")? {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt() as f32,
                };
                f.rope_scaling = Some(RopeScaling::LongRope {
                    short_factor: file.dequantize(short)?,
                    long_factor: file.dequantize(long)?,
                    original_max_position_embeddings: original,
                    attention_factor,
                });
            }
        }
        Architecture::Llama | Architecture::Qwen2 | Architecture::Mistral => {}
    }
    Ok(f)
}

/// Llama 3 frequency scaling from `{arch}.rope.scaling.*` metadata or a `rope_freqs` tensor.
fn rope_scaling(
    file: &GgufFile,
    arch: &str,
    rope_theta: f32,
    head_dim: usize,
) -> Result<Option<Llama3RopeScaling>, ImportError> {
    let path = file.path();
    let kind = file.get_str(&format!("{arch}.rope.scaling.type"))?;
    let factor = file.get_f64(&format!("{arch}.rope.scaling.factor"))?;
    let original = file.get_usize(&format!("{arch}.rope.scaling.original_context_length"))?;
    let freqs = file.tensor_info(ROPE_FREQS);
    match kind {
        None | Some("none") => {}
        Some("llama3") => {}
        // A factor of 1 is a no-op whatever the type says.
        Some(_) if factor.is_none_or(|f| f == 1.0) => {}
        Some(other) => {
            return Err(ImportError::invalid(
                path,
                format!("rope scaling type '{other}' is not supported"),
            ));
        }
    }
    if kind != Some("llama3") && freqs.is_none() {
        return Ok(None);
    }

    let stored = match freqs {
        Some(info) => Some(file.dequantize(info)?),
        None => None,
    };
    // llama.cpp's converter writes the factors but not the parameters; the largest divisor
    // is the scaling factor (applied to the lowest frequencies).
    let factor = match (factor, &stored) {
        (Some(f), _) => f as f32,
        (None, Some(v)) => v.iter().copied().fold(1.0f32, f32::max),
        (None, None) => {
            return Err(ImportError::invalid(
                path,
                "llama3 rope scaling without a factor or rope_freqs tensor",
            ));
        }
    };
    let original_max_position_embeddings = original.unwrap_or_else(|| {
        log::warn!(
            "{}: llama3 rope scaling without original_context_length; assuming 8192 (Llama 3.1/3.2)",
            path.display()
        );
        8192
    });
    let scaling = Llama3RopeScaling {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings,
    };
    if let Some(stored) = stored {
        // Verify the assumed parameters reproduce what the converter stored.
        let derived = llama3_rope_divisors(rope_theta, head_dim, &scaling);
        let max_diff = if derived.len() == stored.len() {
            derived
                .iter()
                .zip(&stored)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                .fold(0.0f32, f32::max)
        } else {
            f32::INFINITY
        };
        if max_diff > 1e-3 {
            log::warn!(
                "{}: {ROPE_FREQS} does not match llama3 scaling {scaling:?} (max relative difference {max_diff}); long-context outputs may differ",
                path.display()
            );
        }
    }
    Ok(Some(scaling))
}

/// Per-frequency divisors llama3 scaling applies (what llama.cpp stores as `rope_freqs`).
pub fn llama3_rope_divisors(theta: f32, head_dim: usize, s: &Llama3RopeScaling) -> Vec<f32> {
    let old_ctx = s.original_max_position_embeddings as f64;
    let low_wavelen = old_ctx / f64::from(s.low_freq_factor);
    let high_wavelen = old_ctx / f64::from(s.high_freq_factor);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / f64::from(theta).powf(2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let factor = f64::from(s.factor);
            let div = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_ctx / wavelen - f64::from(s.low_freq_factor))
                    / f64::from(s.high_freq_factor - s.low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            div as f32
        })
        .collect()
}

/// Special tokens, BOS policy and chat template from `tokenizer.*` metadata.
pub fn tokenizer_spec(file: &GgufFile, vocab_size: usize) -> Result<TokenizerSpec, ImportError> {
    let path = file.path();
    let tokenizer_json = super::gguf_tokenizer::tokenizer_json(file)?;
    let tokens = file
        .get_array("tokenizer.ggml.tokens")?
        .and_then(GgufArray::as_strings)
        .unwrap_or(&[]);
    let types = file.get_array("tokenizer.ggml.token_type")?;
    let id = |key: &str| -> Result<Option<u32>, ImportError> {
        match file.get_usize(key)? {
            None => Ok(None),
            Some(v) if v < vocab_size.max(tokens.len()) => Ok(u32::try_from(v).ok()),
            Some(v) => {
                log::warn!(
                    "{}: {key} = {v} is outside the vocabulary; ignoring it",
                    path.display()
                );
                Ok(None)
            }
        }
    };
    let bos_token_id = id("tokenizer.ggml.bos_token_id")?;
    let mut eos_token_ids = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(t) = id(key)?
            && !eos_token_ids.contains(&t)
        {
            eos_token_ids.push(t);
        }
    }
    // Chat models end turns with these; llama.cpp also treats them as end-of-generation.
    for (i, text) in tokens.iter().enumerate() {
        let is_control = types.and_then(|t| t.int_at(i)) == Some(token_type::CONTROL);
        if is_control
            && matches!(text.as_str(), "<|im_end|>" | "<|eot_id|>" | "<|endoftext|>")
            && let Ok(t) = u32::try_from(i)
            && !eos_token_ids.contains(&t)
        {
            eos_token_ids.push(t);
        }
    }
    let model = file.get_str("tokenizer.ggml.model")?.unwrap_or("llama");
    let add_bos = file
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(model == "llama");
    let chat_template = file.get_str("tokenizer.chat_template")?.map(str::to_string);
    Ok(TokenizerSpec {
        tokenizer_json,
        bos_token_id,
        eos_token_ids,
        add_bos,
        chat_template,
    })
}

fn provenance(file: &GgufFile) -> serde_json::Value {
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for t in file.tensor_infos() {
        *types.entry(t.ggml_type.name()).or_default() += 1;
    }
    json!({
        "source": "gguf",
        "path": file.path().display().to_string(),
        "gguf_version": file.version(),
        "general.name": file.get("general.name").and_then(GgufValue::as_str),
        "general.file_type": file.get("general.file_type").and_then(GgufValue::as_u64),
        "tensor_types": types,
    })
}

/// The canonical tensors a fused Phi-3 tensor holds, as row ranges (empty: not fused).
fn fused_parts(
    config: &ModelConfig,
    name: &str,
    shape: &[usize],
) -> Vec<(String, std::ops::Range<usize>)> {
    if config.architecture != Architecture::Phi3 {
        return Vec::new();
    }
    let Some((layer, short)) = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(l, s)| Some((l.parse::<usize>().ok()?, s)))
    else {
        return Vec::new();
    };
    let (q, kv, f) = (config.q_dim(), config.kv_dim(), config.intermediate_size);
    match short {
        "attn_qkv.weight" if shape.first() == Some(&(q + 2 * kv)) => vec![
            (names::attn_q(layer), 0..q),
            (names::attn_k(layer), q..q + kv),
            (names::attn_v(layer), q + kv..q + 2 * kv),
        ],
        "ffn_up.weight" if shape.first() == Some(&(2 * f)) => vec![
            (names::ffn_gate(layer), 0..f),
            (names::ffn_up(layer), f..2 * f),
        ],
        _ => Vec::new(),
    }
}

/// Tensors of a GGUF file under their (already canonical) GGUF names, in HF layout.
pub struct GgufTensorSource {
    file: Arc<GgufFile>,
    tensors: Vec<SourceTensor>,
    /// Canonical tensors stored as rows of a fused one (Phi-3's `attn_qkv`, and `ffn_up`
    /// holding gate and up): the stored name and the rows.
    parts: HashMap<String, (String, std::ops::Range<usize>)>,
    /// Tensors whose rows llama.cpp interleaved for rotary embeddings, with their head count.
    interleaved: HashMap<String, usize>,
    head_dim: usize,
}

impl GgufTensorSource {
    pub fn new(file: Arc<GgufFile>, config: &ModelConfig) -> Result<Self, ImportError> {
        let mut tensors = Vec::new();
        let mut parts = HashMap::new();
        for t in file.tensor_infos() {
            if ROPE_TENSORS.contains(&t.name.as_str()) {
                continue;
            }
            let shape = t.shape();
            let split = fused_parts(config, &t.name, &shape);
            if split.is_empty() {
                tensors.push(SourceTensor {
                    name: t.name.clone(),
                    shape: shape.clone(),
                    source_type: t.ggml_type.name(),
                });
            }
            for (name, rows) in split {
                let mut part = shape.clone();
                part[0] = rows.len();
                tensors.push(SourceTensor {
                    name: name.clone(),
                    shape: part,
                    source_type: t.ggml_type.name(),
                });
                parts.insert(name, (t.name.clone(), rows));
            }
        }
        let mut interleaved = HashMap::new();
        // llama.cpp's converter permutes q/k (weights and biases) only for `llama` and the
        // families it converts as Llama (SmolLM3); the others keep the HF rotate-half order.
        if matches!(
            config.architecture,
            Architecture::Llama | Architecture::Mistral | Architecture::Smollm3
        ) {
            for l in 0..config.num_layers {
                interleaved.insert(names::attn_q(l), config.num_heads);
                interleaved.insert(names::attn_k(l), config.num_kv_heads);
                interleaved.insert(names::attn_q_bias(l), config.num_heads);
                interleaved.insert(names::attn_k_bias(l), config.num_kv_heads);
            }
        }
        Ok(GgufTensorSource {
            file,
            tensors,
            parts,
            interleaved,
            head_dim: config.head_dim,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

impl TensorSource for GgufTensorSource {
    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    fn load_f32(&self, name: &str) -> Result<Vec<f32>, ImportError> {
        let path = self.file.path();
        if let Some((stored, rows)) = self.parts.get(name) {
            let info = self
                .file
                .tensor_info(stored)
                .ok_or_else(|| ImportError::MissingTensor {
                    path: path.to_path_buf(),
                    name: stored.clone(),
                })?;
            let cols = info.dims.first().copied().unwrap_or(1) as usize;
            let data = self.file.dequantize(info)?;
            return data
                .get(rows.start * cols..rows.end * cols)
                .map(<[f32]>::to_vec)
                .ok_or_else(|| ImportError::tensor(path, stored, "shorter than its shape says"));
        }
        let info = self
            .file
            .tensor_info(name)
            .filter(|t| !ROPE_TENSORS.contains(&t.name.as_str()))
            .ok_or_else(|| ImportError::MissingTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
            })?;
        let data = self.file.dequantize(info)?;
        let Some(&heads) = self.interleaved.get(name) else {
            return Ok(data);
        };
        let rows = info.shape()[0];
        let cols = if info.dims.len() == 1 {
            1
        } else {
            info.dims[0] as usize
        };
        let rows_expected = heads * self.head_dim;
        if info.dims.len() > 2
            || rows != rows_expected
            || rows.checked_mul(cols) != Some(data.len())
        {
            return Err(ImportError::tensor(
                path,
                name,
                format!(
                    "shape {:?} does not match {heads} heads × head_dim {}",
                    info.shape(),
                    self.head_dim
                ),
            ));
        }
        Ok(unpermute_interleaved_rope_rows(
            &data,
            heads,
            self.head_dim,
            cols,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes GGUF images for tests.
    struct Builder {
        version: u32,
        kvs: Vec<u8>,
        n_kv: u64,
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
        alignment: u64,
    }

    fn gstr(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                version: 3,
                kvs: Vec::new(),
                n_kv: 0,
                tensors: Vec::new(),
                alignment: DEFAULT_ALIGNMENT,
            }
        }

        /// A key with a raw value of type `ty`.
        fn kv(mut self, key: &str, ty: u32, payload: &[u8]) -> Self {
            gstr(&mut self.kvs, key);
            self.kvs.extend(ty.to_le_bytes());
            self.kvs.extend(payload);
            self.n_kv += 1;
            self
        }

        fn u32(self, key: &str, v: u32) -> Self {
            self.kv(key, 4, &v.to_le_bytes())
        }

        fn f32(self, key: &str, v: f32) -> Self {
            self.kv(key, 6, &v.to_le_bytes())
        }

        fn string(self, key: &str, v: &str) -> Self {
            let mut p = Vec::new();
            gstr(&mut p, v);
            self.kv(key, 8, &p)
        }

        fn strings(self, key: &str, v: &[&str]) -> Self {
            let mut p = 8u32.to_le_bytes().to_vec();
            p.extend((v.len() as u64).to_le_bytes());
            for s in v {
                gstr(&mut p, s);
            }
            self.kv(key, 9, &p)
        }

        fn i32s(self, key: &str, v: &[i32]) -> Self {
            let mut p = 5u32.to_le_bytes().to_vec();
            p.extend((v.len() as u64).to_le_bytes());
            p.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            self.kv(key, 9, &p)
        }

        /// An F32 tensor (ggml dims) filled with 0, 1, 2, ...
        fn tensor(mut self, name: &str, dims: &[u64]) -> Self {
            let n: u64 = dims.iter().product();
            let data = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
            self.tensors.push((name.into(), dims.to_vec(), 0, data));
            self
        }

        fn build(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(self.version.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend(self.n_kv.to_le_bytes());
            out.extend(&self.kvs);
            let mut offset = 0u64;
            let mut data = Vec::new();
            for (name, dims, ty, bytes) in &self.tensors {
                gstr(&mut out, name);
                out.extend((dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend(d.to_le_bytes());
                }
                out.extend(ty.to_le_bytes());
                out.extend(offset.to_le_bytes());
                data.extend(bytes);
                data.resize(data.len().next_multiple_of(self.alignment as usize), 0);
                offset = data.len() as u64;
            }
            out.resize(out.len().next_multiple_of(self.alignment as usize), 0);
            out.extend(data);
            out
        }
    }

    fn parse(bytes: Vec<u8>) -> Result<GgufFile, ImportError> {
        GgufFile::from_bytes(Path::new("mem.gguf"), bytes)
    }

    #[test]
    fn parses_every_value_type_and_nested_arrays() {
        let mut nested = 9u32.to_le_bytes().to_vec(); // array of arrays
        nested.extend(2u64.to_le_bytes());
        for row in [[1u16, 2], [3, 4]] {
            nested.extend(2u32.to_le_bytes());
            nested.extend(2u64.to_le_bytes());
            nested.extend(row.iter().flat_map(|x| x.to_le_bytes()));
        }
        let b = Builder::new()
            .kv("u8", 0, &[200])
            .kv("i8", 1, &[0xfe])
            .kv("u16", 2, &500u16.to_le_bytes())
            .kv("i16", 3, &(-500i16).to_le_bytes())
            .u32("u32", 70000)
            .kv("i32", 5, &(-7i32).to_le_bytes())
            .f32("f32", 1.5)
            .kv("bool", 7, &[1])
            .string("str", "héllo")
            .kv("u64", 10, &u64::MAX.to_le_bytes())
            .kv("i64", 11, &(-1i64).to_le_bytes())
            .kv("f64", 12, &0.25f64.to_le_bytes())
            .kv("nested", 9, &nested)
            .strings("strs", &["a", "", "c"])
            .tensor("t", &[3, 2]);
        let f = parse(b.build()).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.metadata().len(), 14);
        assert_eq!(f.get("u8"), Some(&GgufValue::U8(200)));
        assert_eq!(f.get("i8"), Some(&GgufValue::I8(-2)));
        assert_eq!(f.get("i16").and_then(GgufValue::as_f64), Some(-500.0));
        assert_eq!(f.get("i32").and_then(GgufValue::as_u64), None);
        assert_eq!(f.get_usize("u32").unwrap(), Some(70000));
        assert_eq!(f.get_f64("f32").unwrap(), Some(1.5));
        assert_eq!(f.get_bool("bool").unwrap(), Some(true));
        assert_eq!(f.get_str("str").unwrap(), Some("héllo"));
        assert_eq!(f.get("u64").and_then(GgufValue::as_u64), Some(u64::MAX));
        assert_eq!(f.get("i64"), Some(&GgufValue::I64(-1)));
        assert_eq!(f.get("f64"), Some(&GgufValue::F64(0.25)));
        assert_eq!(
            f.get("nested"),
            Some(&GgufValue::Array(GgufArray::Array(vec![
                GgufArray::U16(vec![1, 2]),
                GgufArray::U16(vec![3, 4])
            ])))
        );
        let strs = f.get_array("strs").unwrap().unwrap();
        assert_eq!(strs.as_strings().unwrap(), ["a", "", "c"]);
        // wrong type is an error naming the key, missing is None
        assert!(f.get_str("u8").unwrap_err().to_string().contains("'u8'"));
        assert_eq!(f.get_str("missing").unwrap(), None);

        let t = f.tensor_info("t").unwrap();
        assert_eq!((t.shape(), t.n_elements, t.n_bytes), (vec![2, 3], 6, 24));
        assert_eq!(f.data_offset() % DEFAULT_ALIGNMENT, 0);
        assert_eq!(f.dequantize(t).unwrap(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn alignment_and_tensor_ranges_are_checked() {
        let mut b = Builder::new()
            .kv("general.alignment", 4, &64u32.to_le_bytes())
            .tensor("a", &[5])
            .tensor("b", &[7]);
        b.alignment = 64;
        let f = parse(b.build()).unwrap();
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.data_offset() % 64, 0);
        assert_eq!(f.tensor_info("b").unwrap().offset, 64);
        assert_eq!(f.dequantize(f.tensor_info("b").unwrap()).unwrap()[6], 6.0);

        let bad = Builder::new().kv("general.alignment", 4, &24u32.to_le_bytes());
        assert!(
            parse(bad.build())
                .unwrap_err()
                .to_string()
                .contains("general.alignment")
        );

        // data cut short: the error names the tensor and the range
        let bytes = Builder::new()
            .tensor("a", &[4])
            .tensor("blk.3.ffn_up.weight", &[16])
            .build();
        let e = parse(bytes[..bytes.len() - 8].to_vec())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor 'blk.3.ffn_up.weight': data range"),
            "{e}"
        );
        assert!(e.contains("exceeds file size"), "{e}");
    }

    /// A valid image with one tensor whose info bytes follow the header (offset 24).
    fn tensor_image(dims: &[u64], ty: u32) -> Vec<u8> {
        let mut b = Builder::new();
        b.tensors.push(("w".into(), dims.to_vec(), ty, vec![0; 64]));
        b.build()
    }

    #[test]
    fn hostile_headers_are_errors() {
        let expect = |bytes: Vec<u8>, what: &str| {
            let e = parse(bytes).unwrap_err().to_string();
            assert!(e.contains(what), "expected {what:?} in {e:?}");
            assert!(e.starts_with("mem.gguf: "), "{e}");
        };
        let header = |version: u32, tensors: u64, kvs: u64| {
            let mut v = b"GGUF".to_vec();
            v.extend(version.to_le_bytes());
            v.extend(tensors.to_le_bytes());
            v.extend(kvs.to_le_bytes());
            v
        };
        expect(b"GGU".to_vec(), "header");
        expect(b"GGML\x03\0\0\0".to_vec(), "not a GGUF");
        expect(header(1, 0, 0), "version 1");
        expect(header(3u32.swap_bytes(), 0, 0), "big-endian");
        expect(header(99, 0, 0), "version 99");
        expect(header(3, u64::MAX, 0), "tensors");
        expect(header(3, 0, 1 << 40), "metadata entries");
        // key length far beyond the file
        let mut v = header(3, 0, 1);
        v.extend(u64::MAX.to_le_bytes());
        v.extend([0u8; 64]);
        expect(v, "exceeds the limit 65535");
        // string value length beyond the file
        let mut p = (1u64 << 50).to_le_bytes().to_vec();
        p.extend(b"abc");
        expect(Builder::new().kv("k", 8, &p).build(), "string length");
        // array count beyond the file
        let mut p = 6u32.to_le_bytes().to_vec();
        p.extend((1u64 << 40).to_le_bytes());
        expect(Builder::new().kv("k", 9, &p).build(), "array count");
        // arrays nested too deep
        let mut p = Vec::new();
        for _ in 0..6 {
            p.extend(9u32.to_le_bytes());
            p.extend(1u64.to_le_bytes());
        }
        p.extend(0u32.to_le_bytes());
        p.extend(0u64.to_le_bytes());
        expect(Builder::new().kv("k", 9, &p[12..]).build(), "nested");
        expect(
            Builder::new().kv("k", 13, &[0; 8]).build(),
            "unknown value type",
        );
        expect(Builder::new().kv("k", 7, &[2]).build(), "invalid bool");
        expect(
            Builder::new().u32("k", 1).u32("k", 2).build(),
            "duplicate metadata key",
        );
        // tensor infos
        expect(tensor_image(&[1, 1, 1, 1, 1], 0), "dimensions");
        let e = parse(tensor_image(&[1, 1, 1, 1, 1], 0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mem.gguf: tensor info #0 (at byte 24): 'w': 5 dimensions (must be 1..=4)"
        );
        assert!(
            matches!(
                &e,
                ImportError::Gguf {
                    section: GgufSection::TensorInfo { name: Some(name), .. },
                    source: GgufError::Rank { n_dims: 5 },
                    ..
                } if name == "w"
            ),
            "{e:?}"
        );
        expect(tensor_image(&[], 0), "dimensions");
        expect(tensor_image(&[1 << 40, 1 << 40], 0), "overflows");
        expect(tensor_image(&[u64::MAX], 0), "too large");
        expect(tensor_image(&[16], 4), "unknown ggml type");
        expect(tensor_image(&[16], 2), "block size");
        expect(tensor_image(&[1 << 62], 0), "overflow");
        expect(tensor_image(&[1 << 40], 0), "exceeds file size");
        let dup = Builder::new().tensor("x", &[1]).tensor("x", &[1]).build();
        expect(dup, "duplicate tensor name");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = tiny_model("llama").build();
        assert!(import_file(parse_ok(bytes.clone())).is_ok());
        for cut in 0..bytes.len() {
            let f = GgufFile::from_bytes(Path::new("mem.gguf"), bytes[..cut].to_vec());
            assert!(f.is_err(), "truncation at {cut} parsed");
        }
    }

    fn parse_ok(bytes: Vec<u8>) -> GgufFile {
        GgufFile::from_bytes(Path::new("mem.gguf"), bytes).unwrap()
    }

    /// A 1-layer model: hidden 8, 2 heads of 4, 1 kv head, ffn 16, a 9-token gpt2 vocab.
    fn tiny_model(arch: &str) -> Builder {
        let k = |s: &str| format!("{arch}.{s}");
        let mut b = Builder::new()
            .string("general.architecture", arch)
            .string("general.name", "tiny")
            .u32(&k("block_count"), 1)
            .u32(&k("embedding_length"), 8)
            .u32(&k("feed_forward_length"), 16)
            .u32(&k("attention.head_count"), 2)
            .u32(&k("attention.head_count_kv"), 1)
            .f32(&k("attention.layer_norm_rms_epsilon"), 1e-6)
            .u32(&k("context_length"), 128)
            .string("tokenizer.ggml.model", "gpt2")
            .string("tokenizer.ggml.pre", "qwen2")
            .strings(
                "tokenizer.ggml.tokens",
                &[
                    "<|endoftext|>",
                    "<|im_end|>",
                    "a",
                    "b",
                    "ab",
                    "Ġ",
                    "Ġa",
                    "1",
                    "<tool>",
                ],
            )
            .i32s("tokenizer.ggml.token_type", &[3, 3, 1, 1, 1, 1, 1, 1, 4])
            .strings("tokenizer.ggml.merges", &["a b", "Ġ a"])
            .u32("tokenizer.ggml.eos_token_id", 0)
            .tensor(names::TOKEN_EMBD, &[8, 9])
            .tensor(&names::attn_norm(0), &[8])
            .tensor(&names::attn_q(0), &[8, 8])
            .tensor(&names::attn_k(0), &[8, 4])
            .tensor(&names::attn_v(0), &[8, 4])
            .tensor(&names::attn_output(0), &[8, 8])
            .tensor(&names::ffn_norm(0), &[8])
            .tensor(&names::ffn_gate(0), &[8, 16])
            .tensor(&names::ffn_up(0), &[8, 16])
            .tensor(&names::ffn_down(0), &[16, 8])
            .tensor(names::OUTPUT_NORM, &[8]);
        if arch == "qwen2" {
            b = b
                .tensor(&names::attn_q_bias(0), &[8])
                .tensor(&names::attn_k_bias(0), &[4])
                .tensor(&names::attn_v_bias(0), &[4]);
        }
        b
    }

    #[test]
    fn llama_q_k_are_unpermuted_qwen2_are_not() {
        let m = import_file(parse_ok(tiny_model("llama").build())).unwrap();
        let c = &m.config;
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (2, 1, 4));
        assert!(c.tie_word_embeddings && !c.attention_bias);
        let q = m.source.load_f32(&names::attn_q(0)).unwrap();
        let raw: Vec<f32> = (0..64).map(|i| i as f32).collect();
        assert_eq!(q, unpermute_interleaved_rope_rows(&raw, 2, 4, 8));
        // row 1 of head 0 (HF order) is stored row 2 (the second pair's first element)
        assert_eq!(q[8], 16.0);
        let k = m.source.load_f32(&names::attn_k(0)).unwrap();
        assert_eq!(k, unpermute_interleaved_rope_rows(&raw[..32], 1, 4, 8));
        let v = m.source.load_f32(&names::attn_v(0)).unwrap();
        assert_eq!(v, raw[..32]);
        assert_eq!(m.source.find(&names::ffn_down(0)).unwrap().shape, [8, 16]);

        let m = import_file(parse_ok(tiny_model("qwen2").build())).unwrap();
        assert_eq!(m.config.architecture, Architecture::Qwen2);
        assert!(m.config.attention_bias);
        assert_eq!(m.source.load_f32(&names::attn_q(0)).unwrap(), raw);
        assert_eq!(m.source.load_f32(&names::attn_q_bias(0)).unwrap(), raw[..8]);
    }

    #[test]
    fn tokenizer_spec_from_gpt2_metadata() {
        let m = import_file(parse_ok(tiny_model("qwen2").build())).unwrap();
        let t = &m.tokenizer;
        assert_eq!(t.eos_token_ids, [0, 1]);
        assert_eq!(t.bos_token_id, None);
        assert!(!t.add_bos);
        assert_eq!(m.provenance["tensor_types"]["F32"], 14);
        assert_eq!(m.provenance["general.name"], "tiny");
        let tok = tokenizers::Tokenizer::from_str(&t.tokenizer_json).unwrap();
        let ids = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
        assert_eq!(ids("ab a"), [4, 6]);
        assert_eq!(ids("11"), [7, 7]);
        assert_eq!(ids("a<tool><|im_end|>"), [2, 8, 1]);
        assert_eq!(tok.decode(&[4, 6], false).unwrap(), "ab a");
    }

    #[test]
    fn unsupported_architecture_and_bad_geometry() {
        let e = import_file(parse_ok(tiny_model("gemma").build()))
            .err()
            .unwrap();
        assert!(
            matches!(e, ImportError::UnsupportedArchitecture { ref arch, .. } if arch == "gemma")
        );
        // 3 heads do not divide the 8 q rows
        let b = tiny_model("llama").u32("llama.attention.key_length", 3);
        assert!(import_file(parse_ok(b.build())).is_err());
        let b = tiny_model("llama").u32("llama.rope.dimension_count", 2);
        let e = import_file(parse_ok(b.build())).err().unwrap().to_string();
        assert!(e.contains("partial rotary"), "{e}");
    }

    #[test]
    fn llama3_rope_scaling_from_rope_freqs() {
        let want = Llama3RopeScaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let freqs = llama3_rope_divisors(500000.0, 4, &want);
        let mut b = tiny_model("llama").f32("llama.rope.freq_base", 500000.0);
        let data = freqs.iter().flat_map(|x| x.to_le_bytes()).collect();
        b.tensors.push((ROPE_FREQS.into(), vec![2], 0, data));
        let m = import_file(parse_ok(b.build())).unwrap();
        let got = m.config.rope_scaling.unwrap();
        assert_eq!(got.original_max_position_embeddings, 8192);
        assert_eq!((got.low_freq_factor, got.high_freq_factor), (1.0, 4.0));
        assert!(m.source.find(ROPE_FREQS).is_none());
        assert!(m.source.load_f32(ROPE_FREQS).is_err());
        // explicit metadata wins over the tensor's maximum
        let b = tiny_model("llama")
            .string("llama.rope.scaling.type", "llama3")
            .f32("llama.rope.scaling.factor", 8.0)
            .u32("llama.rope.scaling.original_context_length", 4096);
        let s = import_file(parse_ok(b.build()))
            .unwrap()
            .config
            .rope_scaling
            .unwrap();
        assert_eq!((s.factor, s.original_max_position_embeddings), (8.0, 4096));
        let b = tiny_model("llama")
            .string("llama.rope.scaling.type", "yarn")
            .f32("llama.rope.scaling.factor", 4.0);
        assert!(import_file(parse_ok(b.build())).is_err());
    }
}
