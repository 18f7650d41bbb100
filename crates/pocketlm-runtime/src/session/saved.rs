//! Saved sessions: a session's KV cache and token history in a file, so a conversation
//! survives an app restart without being computed again.
//!
//! The file is a `.plm` container, read through the same validating memory-mapped reader as
//! models (and fuzzed with it): the metadata block holds `{"session": {...}}` (version, the
//! model's identity, cache geometry and kind, the tokens), and each layer's keys and values
//! for the cached positions are tensors, stored as the cache holds them (f32, or int8 codes
//! with f32 scales). Every tensor's CRC is checked on restore. A file is bound to its model
//! by [`model_identity`], a hash of the model's metadata and tensor table (which carries
//! every tensor's CRC): a file saved with another model is refused by name.

use std::path::{Path, PathBuf};

use pocketlm_format::{Encoding, PlmError, PlmFile, PlmWriter};
use serde::{Deserialize, Serialize};

use super::{ContextPolicy, Session};
use crate::model::{KvType, Model, StoredRows};
use crate::tokenizer::ChatMessage;

/// Version of the `session` metadata written by this build.
pub const SESSION_FILE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SessionFileError {
    #[error("session file {path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: PlmError,
    },
    #[error("{path} is not a saved session (its metadata has no 'session' entry)")]
    NotASession { path: PathBuf },
    #[error(
        "session file {path} has version {found}; this build reads version \
         {SESSION_FILE_VERSION} (save the session again with this version)"
    )]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error(
        "session file {path} was saved with another model (model id {saved}, this model is \
         {current}); sessions only restore into the model file that made them"
    )]
    OtherModel {
        path: PathBuf,
        saved: String,
        current: String,
    },
    #[error("session file {path}: {message}")]
    Mismatch { path: PathBuf, message: String },
    #[error(
        "session file {path} holds {tokens} tokens, more than this session's context of \
         {capacity}"
    )]
    TooLong {
        path: PathBuf,
        tokens: usize,
        capacity: usize,
    },
    #[error("session file {path}: invalid session metadata: {message}")]
    InvalidMetadata { path: PathBuf, message: String },
}

/// The `session` entry of a saved session's metadata.
#[derive(Debug, Serialize, Deserialize)]
struct SessionHeader {
    version: u32,
    /// [`model_identity`] of the model that computed the cache.
    model_id: String,
    kv_type: String,
    num_layers: usize,
    kv_dim: usize,
    head_dim: usize,
    #[serde(default)]
    context_policy: Option<ContextPolicy>,
    tokens: Vec<u32>,
    /// The conversation the tokens render (empty for raw text), so an app or the CLI can
    /// go on chatting with prefix reuse after a restore.
    #[serde(default)]
    messages: Vec<ChatMessage>,
}

/// A stable 64-bit FNV-1a hash of the model's metadata and tensor table (names, shapes,
/// encodings, offsets, lengths and data CRCs), as 16 hex digits. Two files share it only if
/// they hold the same tensors with the same configuration, tokenizer and recipe. The
/// metadata's `provenance` (conversion time, source path) is left out: converting the same
/// checkpoint with the same recipe again gives the same model, and its sessions stay valid.
pub fn model_identity(model: &Model) -> String {
    let file = model.file();
    let mut hash = Fnv64::new();
    match file.metadata().as_object() {
        Some(fields) => {
            let mut fields: Vec<_> = fields
                .iter()
                .filter(|(key, _)| *key != "provenance")
                .collect();
            fields.sort_by_key(|(key, _)| *key);
            for (key, value) in fields {
                hash.update(key.as_bytes());
                hash.update(&[0]);
                hash.update(value.to_string().as_bytes());
                hash.update(&[0]);
            }
        }
        None => hash.update(file.metadata().to_string().as_bytes()),
    }
    for t in file.tensors() {
        hash.update(t.name.as_bytes());
        hash.update(&[0]);
        for &d in &t.shape {
            hash.update(&(d as u64).to_le_bytes());
        }
        let (p0, p1) = t.encoding.params();
        hash.update(&t.encoding.code().to_le_bytes());
        hash.update(&p0.to_le_bytes());
        hash.update(&p1.to_le_bytes());
        hash.update(&t.offset.to_le_bytes());
        hash.update(&t.length.to_le_bytes());
        hash.update(&t.checksum.to_le_bytes());
    }
    format!("{:016x}", hash.0)
}

struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn tensor_name(layer: usize, values: bool, part: &str) -> String {
    let kv = if values { "v" } else { "k" };
    format!("session.{layer}.{kv}{part}")
}

impl Session {
    /// Writes the KV cache (as stored: f32 or int8), the token history, the context policy
    /// and `messages` (the conversation so far; empty for raw text) to `path` (atomically: a
    /// temporary file renamed into place). Returns the file size in bytes.
    pub fn save(&self, path: &Path, messages: &[ChatMessage]) -> Result<u64, SessionFileError> {
        let format = |source| SessionFileError::Format {
            path: path.to_path_buf(),
            source,
        };
        let cache = self.cache();
        let len = cache.len();
        let kv_dim = cache.kv_dim();
        let kv_heads = kv_dim / cache.head_dim();
        let mut writer = PlmWriter::create(path).map_err(format)?;
        if len > 0 {
            for layer in 0..cache.num_layers() {
                // A sliding-window ring layer stores only its window, in slot order.
                let rows = cache.rows_held(layer, len);
                for values in [false, true] {
                    match cache.stored_rows(layer, values) {
                        StoredRows::F32(data) => writer
                            .add_tensor(
                                &tensor_name(layer, values, ""),
                                &[rows, kv_dim],
                                Encoding::F32,
                                bytemuck::cast_slice(data),
                            )
                            .map_err(format)?,
                        StoredRows::Q8 { codes, scales } => {
                            writer
                                .add_tensor(
                                    &tensor_name(layer, values, ".codes"),
                                    &[rows, kv_dim],
                                    Encoding::I8,
                                    bytemuck::cast_slice(codes),
                                )
                                .map_err(format)?;
                            writer
                                .add_tensor(
                                    &tensor_name(layer, values, ".scales"),
                                    &[rows, kv_heads],
                                    Encoding::F32,
                                    bytemuck::cast_slice(scales),
                                )
                                .map_err(format)?;
                        }
                    }
                }
            }
        }
        let header = SessionHeader {
            version: SESSION_FILE_VERSION,
            model_id: model_identity(self.model()),
            kv_type: cache.kind().name().to_string(),
            num_layers: cache.num_layers(),
            kv_dim,
            head_dim: cache.head_dim(),
            context_policy: self.context_policy(),
            tokens: self.history().to_vec(),
            messages: messages.to_vec(),
        };
        let metadata = serde_json::json!({ "session": header });
        writer.finish(&metadata).map_err(format)
    }

    /// Replaces this session's cache and history with a saved session's (and its context
    /// policy), and returns the conversation saved with it. Checks the file completely first
    /// (structure, every CRC, the model identity, geometry, kind and length), so a refused
    /// file leaves the session as it was.
    pub fn restore(&mut self, path: &Path) -> Result<Vec<ChatMessage>, SessionFileError> {
        let format = |source| SessionFileError::Format {
            path: path.to_path_buf(),
            source,
        };
        let mismatch = |message: String| SessionFileError::Mismatch {
            path: path.to_path_buf(),
            message,
        };
        let file = PlmFile::open(path).map_err(format)?;
        let Some(entry) = file.metadata().get("session") else {
            return Err(SessionFileError::NotASession {
                path: path.to_path_buf(),
            });
        };
        let version = entry.get("version").and_then(|v| v.as_u64());
        if version != Some(u64::from(SESSION_FILE_VERSION)) {
            return Err(SessionFileError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version.map_or(0, |v| v.min(u64::from(u32::MAX)) as u32),
            });
        }
        let header: SessionHeader = serde_json::from_value(entry.clone()).map_err(|e| {
            SessionFileError::InvalidMetadata {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })?;
        let current = model_identity(self.model());
        if header.model_id != current {
            return Err(SessionFileError::OtherModel {
                path: path.to_path_buf(),
                saved: header.model_id,
                current,
            });
        }
        let mut cache = self
            .model()
            .new_cache(self.context_len())
            .map_err(|e| mismatch(format!("cannot allocate the cache to restore into: {e}")))?;
        let geometry = (cache.num_layers(), cache.kv_dim(), cache.head_dim());
        if (header.num_layers, header.kv_dim, header.head_dim) != geometry {
            return Err(mismatch(format!(
                "cache geometry (layers, kv_dim, head_dim) is {:?}, the model's is {geometry:?}",
                (header.num_layers, header.kv_dim, header.head_dim)
            )));
        }
        if KvType::parse(&header.kv_type) != Some(cache.kind()) {
            return Err(mismatch(format!(
                "the cache was saved as {}, this session's KV cache is {} (open the model \
                 with the same KV cache type)",
                header.kv_type,
                cache.kind().name()
            )));
        }
        let len = header.tokens.len();
        if len > cache.capacity() {
            return Err(SessionFileError::TooLong {
                path: path.to_path_buf(),
                tokens: len,
                capacity: cache.capacity(),
            });
        }
        let vocab = self.model().config().vocab_size;
        if let Some(&bad) = header.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(SessionFileError::InvalidMetadata {
                path: path.to_path_buf(),
                message: format!("token id {bad} is outside the vocabulary (size {vocab})"),
            });
        }
        file.verify().map_err(format)?;
        let expected_tensors = if len == 0 {
            0
        } else {
            let per_layer = if cache.kind() == KvType::F32 { 2 } else { 4 };
            per_layer * cache.num_layers()
        };
        if file.tensors().len() != expected_tensors {
            return Err(mismatch(format!(
                "{} tensors, expected {expected_tensors} for {len} tokens",
                file.tensors().len()
            )));
        }
        let kv_dim = cache.kv_dim();
        let kv_heads = kv_dim / cache.head_dim();
        if len > 0 {
            for layer in 0..cache.num_layers() {
                let rows = cache.rows_held(layer, len);
                for values in [false, true] {
                    let saved = match cache.kind() {
                        KvType::F32 => StoredRows::F32(
                            tensor(&file, &tensor_name(layer, values, ""), [rows, kv_dim])
                                .and_then(|t| t.as_f32())
                                .map_err(format)?,
                        ),
                        KvType::Q8 => {
                            let codes = tensor(
                                &file,
                                &tensor_name(layer, values, ".codes"),
                                [rows, kv_dim],
                            )
                            .map_err(format)?;
                            if codes.encoding != Encoding::I8 {
                                return Err(mismatch(format!(
                                    "tensor '{}' is {}, expected i8",
                                    codes.name, codes.encoding
                                )));
                            }
                            let scales = tensor(
                                &file,
                                &tensor_name(layer, values, ".scales"),
                                [rows, kv_heads],
                            )
                            .and_then(|t| t.as_f32())
                            .map_err(format)?;
                            StoredRows::Q8 {
                                codes: bytemuck::cast_slice(codes.bytes),
                                scales,
                            }
                        }
                    };
                    cache.restore_rows(layer, values, saved);
                }
            }
        }
        cache.set_len(len);
        self.replace_state(cache, header.tokens);
        self.set_context_policy(header.context_policy);
        Ok(header.messages)
    }
}

/// The tensor `name`, which must have `shape`.
fn tensor<'f>(
    file: &'f PlmFile,
    name: &str,
    shape: [usize; 2],
) -> Result<pocketlm_format::TensorView<'f>, PlmError> {
    let view = file.tensor(name)?;
    if view.shape != shape {
        return Err(PlmError::tensor(
            name,
            format!("shape {:?}, expected {shape:?}", view.shape),
        ));
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_the_reference_vectors() {
        // FNV-1a 64 test vectors (Fowler/Noll/Vo).
        let hash = |s: &str| {
            let mut h = Fnv64::new();
            h.update(s.as_bytes());
            h.0
        };
        assert_eq!(hash(""), 0xcbf29ce484222325);
        assert_eq!(hash("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(hash("foobar"), 0x85944171f73967e8);
    }
}
