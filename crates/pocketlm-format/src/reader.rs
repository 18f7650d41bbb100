//! Memory-mapped `.plm` reader with zero-copy tensor views.
//!
//! [`PlmFile::open`] validates the header, metadata block and tensor table completely (every
//! offset, length, shape and name) before handing out anything, so a view can never point
//! outside the file. It does not read tensor data: open stays O(table) for fast start-up, and
//! the data CRCs are checked on demand by [`PlmFile::verify`].

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use super::{Encoding, HEADER_SIZE, PlmError};

mod parse;
use parse::{
    SECTION_HEADER, check_sections, parse_header, parse_metadata, parse_table, short_file_error,
    slice,
};

/// One row of the tensor table. `offset` and `length` are bytes from the start of the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub encoding: Encoding,
    pub offset: u64,
    pub length: u64,
    /// CRC32 (IEEE, as `crc32fast`) of the tensor's data bytes.
    pub checksum: u32,
}

/// A tensor's bytes, borrowed straight from the memory map.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub encoding: Encoding,
    pub bytes: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// The data as `f32`, without copying. [`PlmError::WrongEncoding`] unless stored as f32.
    pub fn as_f32(&self) -> Result<&'a [f32], PlmError> {
        self.cast(Encoding::F32)
    }

    /// The data as `f16`, without copying. [`PlmError::WrongEncoding`] unless stored as f16.
    pub fn as_f16(&self) -> Result<&'a [f16], PlmError> {
        self.cast(Encoding::F16)
    }

    /// The data as `bf16`, without copying. [`PlmError::WrongEncoding`] unless stored as bf16.
    pub fn as_bf16(&self) -> Result<&'a [bf16], PlmError> {
        self.cast(Encoding::BF16)
    }

    /// Number of elements (product of the shape; a scalar has one).
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Decodes an f32, f16 or bf16 tensor to a fresh `Vec<f32>` (for tools and tests; the
    /// runtime uses the zero-copy views); `None` for the other encodings, which
    /// `pocketlm_kernels::DecodeTensor` decodes.
    pub fn dense_to_f32_vec(&self) -> Option<Vec<f32>> {
        // Decoding from little-endian byte pairs/quads needs no alignment at all.
        Some(match self.encoding {
            Encoding::F32 => self
                .bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Encoding::F16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            Encoding::BF16 => self
                .bytes
                .chunks_exact(2)
                .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            _ => return None,
        })
    }

    fn cast<T: bytemuck::AnyBitPattern>(&self, want: Encoding) -> Result<&'a [T], PlmError> {
        if self.encoding != want {
            return Err(PlmError::WrongEncoding {
                name: self.name.to_string(),
                expected: want,
                actual: self.encoding,
            });
        }
        // Cannot fail for views of a validated file (64-aligned offsets, exact lengths), but a
        // hand-built view might be misaligned: report instead of panicking.
        bytemuck::try_cast_slice(self.bytes)
            .map_err(|e| PlmError::tensor(self.name, format!("cannot view data as {want}: {e:?}")))
    }
}

/// An open, validated `.plm` file. Owns the read-only memory map; views borrow from it.
/// `Send + Sync`: share it between threads behind an `Arc`.
pub struct PlmFile {
    path: PathBuf,
    mmap: Mmap,
    metadata: serde_json::Value,
    tensors: Vec<TensorEntry>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for PlmFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlmFile")
            .field("path", &self.path)
            .field("file_size", &self.mmap.len())
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

impl PlmFile {
    /// Maps and validates `path`. Checks magic, version, header CRC, file length, section
    /// ranges, metadata (CRC, size cap, JSON object) and every table entry (CRC, names,
    /// shapes, encodings, lengths, alignment, bounds, overlaps). Tensor data CRCs are left
    /// to [`verify`](Self::verify).
    pub fn open(path: &Path) -> Result<PlmFile, PlmError> {
        let io = |source| PlmError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let actual_len = file.metadata().map_err(io)?.len();
        if actual_len < HEADER_SIZE as u64 {
            // Too short to map meaningfully; read what is there to tell "not ours" from "cut".
            let mut prefix = Vec::with_capacity(HEADER_SIZE);
            file.by_ref()
                .take(HEADER_SIZE as u64)
                .read_to_end(&mut prefix)
                .map_err(io)?;
            return Err(short_file_error(&prefix));
        }
        // SAFETY: a read-only map of a file we just opened. We never write through it, and
        // every slice we take is bounds-checked against its length. Another process
        // truncating or rewriting the file while it is mapped is outside our contract
        // (documented in docs/format.md): that can fault (SIGBUS) or change bytes under us,
        // as with any mmap-based loader; writers avoid it by renaming a new file into place.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let bytes: &[u8] = &mmap;
        let size = bytes.len() as u64;

        let hdr = parse_header(bytes)?;
        if hdr.file_len > size {
            return Err(PlmError::Truncated {
                expected: hdr.file_len,
                actual: size,
            });
        }
        if hdr.file_len < size {
            return Err(PlmError::corrupt(
                SECTION_HEADER,
                format!(
                    "header says the file is {} bytes, but it has {size} (trailing data)",
                    hdr.file_len
                ),
            ));
        }
        check_sections(&hdr)?;
        let metadata = parse_metadata(slice(bytes, &hdr.meta), hdr.meta_crc)?;
        // The flags follow from the config; a file where they disagree was not written by
        // PlmWriter (or was edited), and its tensors cannot be trusted to mean what it says.
        let implied = crate::required_flags(&metadata);
        if implied != hdr.required_flags {
            return Err(PlmError::corrupt(
                SECTION_HEADER,
                format!(
                    "required flags {:#x} disagree with the metadata's config, which implies {implied:#x}",
                    hdr.required_flags
                ),
            ));
        }
        let tensors = parse_table(slice(bytes, &hdr.table), &hdr)?;
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();

        Ok(PlmFile {
            path: path.to_path_buf(),
            mmap,
            metadata,
            tensors,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file (and the map) in bytes.
    pub fn file_size(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// How the file was converted (`metadata.recipe`), typed; `None` when the file records
    /// no recipe or one this build cannot read.
    pub fn recipe(&self) -> Option<crate::Recipe> {
        serde_json::from_value(self.metadata.get("recipe")?.clone()).ok()
    }

    /// The metadata block: a JSON object (`format`, `config`, `tokenizer`, `recipe`,
    /// `provenance`; see `docs/format.md`).
    pub fn metadata(&self) -> &serde_json::Value {
        &self.metadata
    }

    /// All tensors in table (= file) order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Zero-copy view of a tensor; [`PlmError::MissingTensor`] if there is none by that name.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, PlmError> {
        let entry = self
            .entry(name)
            .ok_or_else(|| PlmError::MissingTensor(name.to_string()))?;
        Ok(self.view(entry))
    }

    /// Zero-copy view of `entry`, which must come from this file's [`tensors`](Self::tensors)
    /// (or be an equal copy of one: the view always borrows from this file's own table).
    ///
    /// # Panics
    /// If `entry` is not an entry of this file (e.g. one from another file). This is a
    /// programming error, never caused by file contents, and never reads out of bounds.
    pub fn view(&self, entry: &TensorEntry) -> TensorView<'_> {
        let own = self.own_entry(entry).unwrap_or_else(|| {
            panic!(
                "tensor '{}' (bytes {}+{}) is not an entry of {}",
                entry.name,
                entry.offset,
                entry.length,
                self.path.display()
            )
        });
        // In bounds: open() checked every entry against the data region inside the map.
        let start = own.offset as usize;
        let bytes = &self.mmap[start..start + own.length as usize];
        TensorView {
            name: &own.name,
            shape: &own.shape,
            encoding: own.encoding,
            bytes,
        }
    }

    /// This file's own copy of `entry`: by address when `entry` points into our table (the
    /// common case, O(1) with no hashing), else by name if the entries are equal.
    fn own_entry(&self, entry: &TensorEntry) -> Option<&TensorEntry> {
        let table = self.tensors.as_ptr_range();
        let addr = entry as *const TensorEntry as usize;
        let (lo, hi) = (table.start as usize, table.end as usize);
        let size = std::mem::size_of::<TensorEntry>();
        if (lo..hi).contains(&addr) && (addr - lo).is_multiple_of(size) {
            return self.tensors.get((addr - lo) / size);
        }
        self.entry(&entry.name).filter(|own| *own == entry)
    }

    /// Checks every tensor's data against its CRC32, in file order. Reads the whole file
    /// (O(size)); the error names the first bad tensor.
    pub fn verify(&self) -> Result<(), PlmError> {
        for entry in &self.tensors {
            let actual = crc32fast::hash(self.view(entry).bytes);
            if actual != entry.checksum {
                return Err(PlmError::Checksum {
                    name: entry.name.clone(),
                    expected: entry.checksum,
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Total bytes of tensor data (excluding padding), for bits-per-weight reports.
    pub fn tensor_bytes_total(&self) -> u64 {
        self.tensors.iter().map(|t| t.length).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PlmWriter;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn plm_file_is_send_and_sync() {
        assert_send_sync::<PlmFile>();
        assert_send_sync::<TensorView<'static>>();
    }

    #[test]
    fn short_files_are_classified() {
        assert!(matches!(short_file_error(b""), PlmError::NotPlm { .. }));
        assert!(matches!(
            short_file_error(b"POCK"),
            PlmError::TruncatedHeader { actual: 4 }
        ));
        assert!(matches!(
            short_file_error(b"POCKETLM\x01\0\0\0"),
            PlmError::TruncatedHeader { actual: 12 }
        ));
        assert!(matches!(
            short_file_error(b"GGUF\x03\0\0\0"),
            PlmError::NotPlm { .. }
        ));
    }

    #[test]
    fn views_wrong_encoding_and_missing_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.plm");
        let mut w = PlmWriter::create(&path).unwrap();
        w.add_f32("w", &[2, 2], &[1.0, -2.0, 0.5, 4.0], Encoding::BF16)
            .unwrap();
        w.add_f32("s", &[], &[3.0], Encoding::F32).unwrap();
        w.add_f32("z", &[0, 8], &[], Encoding::F16).unwrap();
        w.finish(&serde_json::json!({"config": {"vocab_size": 4}}))
            .unwrap();

        let f = PlmFile::open(&path).unwrap();
        f.verify().unwrap();
        let v = f.tensor("w").unwrap();
        assert_eq!(v.num_elements(), 4);
        assert_eq!(v.dense_to_f32_vec().unwrap(), vec![1.0, -2.0, 0.5, 4.0]);
        assert_eq!(v.as_bf16().unwrap()[1], bf16::from_f32(-2.0));
        match v.as_f32().unwrap_err() {
            PlmError::WrongEncoding {
                name,
                expected,
                actual,
            } => {
                assert_eq!(
                    (name.as_str(), expected, actual),
                    ("w", Encoding::F32, Encoding::BF16)
                )
            }
            e => panic!("unexpected {e}"),
        }
        assert_eq!(f.tensor("s").unwrap().as_f32().unwrap(), &[3.0]);
        assert!(f.tensor("z").unwrap().as_f16().unwrap().is_empty());
        let missing = f.tensor("nope").unwrap_err();
        assert!(matches!(&missing, PlmError::MissingTensor(n) if n == "nope"));
        assert!(missing.to_string().contains("'nope'"));
        assert_eq!(f.tensor_bytes_total(), 8 + 4);
        assert_eq!(f.metadata()["config"]["vocab_size"], 4);
    }

    #[test]
    fn view_accepts_table_entries_and_equal_copies_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.plm");
        let mut w = PlmWriter::create(&path).unwrap();
        w.add_f32("a", &[2], &[1.0, 2.0], Encoding::F32).unwrap();
        w.add_f32("b", &[1], &[5.0], Encoding::F32).unwrap();
        w.finish(&serde_json::json!({})).unwrap();
        let f = PlmFile::open(&path).unwrap();

        let by_ref = f.view(&f.tensors()[1]);
        assert_eq!(by_ref.as_f32().unwrap(), &[5.0]);
        // A copy: the view borrows from the file, not from the temporary.
        let view = {
            let copy = f.tensors()[0].clone();
            f.view(&copy)
        };
        assert_eq!(view.as_f32().unwrap(), &[1.0, 2.0]);
        assert!(std::ptr::eq(view.name, f.tensors()[0].name.as_str()));

        let mut foreign = f.tensors()[0].clone();
        foreign.offset += 64;
        let panicked = std::panic::catch_unwind(|| f.view(&foreign).bytes.len());
        assert!(panicked.is_err());
    }

    #[test]
    fn misaligned_hand_built_view_is_an_error_not_a_panic() {
        let buf = [0u8; 12];
        let v = TensorView {
            name: "t",
            shape: &[2],
            encoding: Encoding::F32,
            bytes: &buf[1..9],
        };
        // Might be aligned by luck on some allocators; only assert "no panic" plus a sane
        // result either way.
        match v.as_f32() {
            Ok(s) => assert_eq!(s.len(), 2),
            Err(e) => assert!(matches!(e, PlmError::Tensor { .. })),
        }
        assert_eq!(v.dense_to_f32_vec().unwrap(), vec![0.0, 0.0]);
    }
}
