//! Streaming `.plm` writer: tensors go to disk as they are added, the metadata and tensor
//! table are appended by [`PlmWriter::finish`], which then patches the header, fsyncs and
//! atomically renames `<path>.tmp` to `<path>`.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use super::{
    Encoding, FORMAT_VERSION, HEADER_SIZE, MAGIC, MAX_METADATA_LEN, MAX_NAME_LEN, MAX_RANK,
    MAX_TENSORS, PlmError, TENSOR_ALIGNMENT, header,
};

const ZEROS: [u8; TENSOR_ALIGNMENT] = [0; TENSOR_ALIGNMENT];
/// Elements converted per chunk by [`PlmWriter::add_f32`] (bounded scratch memory).
const CONVERT_CHUNK: usize = 1 << 16;

/// One tensor already written, as recorded in the table.
struct WrittenTensor {
    name: String,
    shape: Vec<usize>,
    encoding: Encoding,
    offset: u64,
    length: u64,
    checksum: u32,
}

/// Writes a `.plm` file one tensor at a time. Memory use is the table (names and shapes),
/// never the tensor data.
///
/// Everything goes to `<path>.tmp`; only a successful [`finish`](PlmWriter::finish) renames it
/// to `<path>`. Dropping an unfinished writer (error or panic unwinding) deletes the
/// temporary file. A crash or kill can leave a stale `<path>.tmp` (its header stays zeroed,
/// i.e. unreadable, until the last step of `finish`), but never a partial file at `<path>`.
pub struct PlmWriter {
    path: PathBuf,
    tmp_path: PathBuf,
    out: Option<BufWriter<File>>,
    /// Bytes written so far (= current end of file).
    pos: u64,
    tensors: Vec<WrittenTensor>,
    names: HashSet<String>,
    /// Set when a write failed: the file's contents are unknown, so refuse to go on.
    failed: bool,
}

impl PlmWriter {
    /// Starts writing a `.plm` file that will appear at `path` when [`finish`](Self::finish)
    /// succeeds. An existing `<path>.tmp` is overwritten.
    pub fn create(path: &Path) -> Result<PlmWriter, PlmError> {
        let tmp_path = tmp_path_for(path);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp_path)
            .map_err(|source| PlmError::Io {
                path: tmp_path.clone(),
                source,
            })?;
        let mut writer = PlmWriter {
            path: path.to_path_buf(),
            tmp_path,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            pos: 0,
            tensors: Vec::new(),
            names: HashSet::new(),
            failed: false,
        };
        // Placeholder header: all zeros (bad magic) until finish() patches it.
        writer.write(&[0u8; HEADER_SIZE])?;
        Ok(writer)
    }

    /// Appends one tensor whose bytes are already in `encoding` (little-endian).
    /// Checks that `data.len()` equals `encoding.byte_len(shape)` and that the name is new.
    pub fn add_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        encoding: Encoding,
        data: &[u8],
    ) -> Result<(), PlmError> {
        let length = self.check_new_tensor(name, shape, encoding)?;
        if data.len() != length {
            return Err(PlmError::tensor(
                name,
                format!(
                    "{} bytes of data given, but shape {shape:?} in {encoding} needs {length}",
                    data.len()
                ),
            ));
        }
        let offset = self.begin_tensor()?;
        self.write(data)?;
        let checksum = crc32fast::hash(data);
        self.end_tensor(name, shape, encoding, offset, length as u64, checksum);
        Ok(())
    }

    /// Appends one tensor given as f32 values, converting to `encoding` (f16/bf16 use
    /// round-to-nearest-even, via `half`). Converts in bounded chunks, so no full-size copy.
    pub fn add_f32(
        &mut self,
        name: &str,
        shape: &[usize],
        values: &[f32],
        encoding: Encoding,
    ) -> Result<(), PlmError> {
        if !encoding.is_dense() {
            return Err(PlmError::tensor(
                name,
                format!(
                    "add_f32 writes dense encodings; encode to {encoding} first and use add_tensor"
                ),
            ));
        }
        let length = self.check_new_tensor(name, shape, encoding)?;
        let expected_elements = length / encoding.element_size();
        if values.len() != expected_elements {
            return Err(PlmError::tensor(
                name,
                format!(
                    "{} values given, but shape {shape:?} has {expected_elements} elements",
                    values.len()
                ),
            ));
        }
        let offset = self.begin_tensor()?;
        let mut hasher = crc32fast::Hasher::new();
        match encoding {
            Encoding::F32 => {
                let bytes: &[u8] = bytemuck::cast_slice(values);
                hasher.update(bytes);
                self.write(bytes)?;
            }
            // F16 or BF16 (quantized encodings were rejected above).
            _ => {
                let mut scratch: Vec<u16> = Vec::with_capacity(values.len().min(CONVERT_CHUNK));
                for chunk in values.chunks(CONVERT_CHUNK) {
                    scratch.clear();
                    if encoding == Encoding::F16 {
                        scratch.extend(chunk.iter().map(|&v| f16::from_f32(v).to_bits()));
                    } else {
                        scratch.extend(chunk.iter().map(|&v| bf16::from_f32(v).to_bits()));
                    }
                    let bytes: &[u8] = bytemuck::cast_slice(&scratch);
                    hasher.update(bytes);
                    self.write(bytes)?;
                }
            }
        }
        self.end_tensor(
            name,
            shape,
            encoding,
            offset,
            length as u64,
            hasher.finalize(),
        );
        Ok(())
    }

    /// Writes the metadata block (must be a JSON object) and the tensor table, patches the
    /// header, fsyncs, and renames `<path>.tmp` to `<path>`. Returns the file size in bytes.
    pub fn finish(mut self, metadata: &serde_json::Value) -> Result<u64, PlmError> {
        if !metadata.is_object() {
            return Err(PlmError::InvalidMetadata(
                "the metadata block must be a JSON object".into(),
            ));
        }
        let meta = serde_json::to_vec(metadata)
            .map_err(|e| PlmError::InvalidMetadata(format!("cannot serialize: {e}")))?;
        if meta.len() as u64 > MAX_METADATA_LEN {
            return Err(PlmError::InvalidMetadata(format!(
                "{} bytes of JSON, more than the {} MiB limit",
                meta.len(),
                MAX_METADATA_LEN >> 20
            )));
        }
        let table = encode_table(&self.tensors);

        // Data region: from the header to the padded end of the last tensor.
        self.pad_to_alignment()?;
        let data_offset = HEADER_SIZE as u64;
        let data_len = self.pos - data_offset;
        let meta_offset = self.pos;
        self.write(&meta)?;
        let table_offset = self.pos;
        self.write(&table)?;
        let file_len = self.pos;

        let mut h = [0u8; HEADER_SIZE];
        h[header::MAGIC..header::MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(&mut h, header::VERSION, FORMAT_VERSION);
        put_u32(&mut h, header::FLAGS, crate::required_flags(metadata));
        put_u64(&mut h, header::FILE_LEN, file_len);
        put_u64(&mut h, header::DATA_OFFSET, data_offset);
        put_u64(&mut h, header::DATA_LEN, data_len);
        put_u64(&mut h, header::META_OFFSET, meta_offset);
        put_u64(&mut h, header::META_LEN, meta.len() as u64);
        put_u32(&mut h, header::META_CRC, crc32fast::hash(&meta));
        put_u32(&mut h, header::TENSOR_COUNT, self.tensors.len() as u32);
        put_u64(&mut h, header::TABLE_OFFSET, table_offset);
        put_u64(&mut h, header::TABLE_LEN, table.len() as u64);
        put_u32(&mut h, header::TABLE_CRC, crc32fast::hash(&table));
        let header_crc = crc32fast::hash(&h[..header::HEADER_CRC]);
        put_u32(&mut h, header::HEADER_CRC, header_crc);

        let out = self.out.take().expect("writer output present until finish");
        let tmp = self.tmp_path.clone();
        let io = |source| PlmError::Io {
            path: tmp.clone(),
            source,
        };
        let mut file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&h).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);

        std::fs::rename(&self.tmp_path, &self.path).map_err(|source| PlmError::Io {
            path: self.path.clone(),
            source,
        })?;
        // The rename is durable only once the directory entry is; best effort, since some
        // file systems refuse to fsync directories.
        let parent = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Ok(dir) = File::open(parent) {
            let _ = dir.sync_all();
        }
        self.tmp_path = PathBuf::new(); // renamed: nothing for Drop to remove
        Ok(file_len)
    }

    /// Validates a new tensor's name and shape; returns its data length in bytes.
    fn check_new_tensor(
        &self,
        name: &str,
        shape: &[usize],
        encoding: Encoding,
    ) -> Result<usize, PlmError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(PlmError::tensor(
                name,
                format!("name must be 1..={MAX_NAME_LEN} bytes, got {}", name.len()),
            ));
        }
        if self.names.contains(name) {
            return Err(PlmError::tensor(name, "duplicate tensor name"));
        }
        if self.tensors.len() >= MAX_TENSORS as usize {
            return Err(PlmError::tensor(
                name,
                format!("too many tensors (limit {MAX_TENSORS})"),
            ));
        }
        if shape.len() > MAX_RANK {
            return Err(PlmError::tensor(
                name,
                format!("rank {} exceeds the maximum of {MAX_RANK}", shape.len()),
            ));
        }
        encoding.byte_len(shape).ok_or_else(|| {
            PlmError::tensor(name, format!("byte length of shape {shape:?} overflows"))
        })
    }

    fn begin_tensor(&mut self) -> Result<u64, PlmError> {
        self.pad_to_alignment()?;
        Ok(self.pos)
    }

    fn end_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        encoding: Encoding,
        offset: u64,
        length: u64,
        checksum: u32,
    ) {
        self.names.insert(name.to_string());
        self.tensors.push(WrittenTensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            encoding,
            offset,
            length,
            checksum,
        });
    }

    fn pad_to_alignment(&mut self) -> Result<(), PlmError> {
        let rem = (self.pos % TENSOR_ALIGNMENT as u64) as usize;
        if rem != 0 {
            self.write(&ZEROS[..TENSOR_ALIGNMENT - rem])?;
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), PlmError> {
        let out = match (&mut self.out, self.failed) {
            (Some(out), false) => out,
            _ => {
                return Err(PlmError::Io {
                    path: self.tmp_path.clone(),
                    source: std::io::Error::other("an earlier write to this file failed"),
                });
            }
        };
        if let Err(source) = out.write_all(bytes) {
            self.failed = true;
            return Err(PlmError::Io {
                path: self.tmp_path.clone(),
                source,
            });
        }
        self.pos += bytes.len() as u64;
        Ok(())
    }
}

impl Drop for PlmWriter {
    fn drop(&mut self) {
        // Not finished (or finish failed before the rename): remove the partial file.
        drop(self.out.take());
        if !self.tmp_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// `<path>.tmp`, next to the destination so the final rename stays on one file system.
pub(crate) fn tmp_path_for(path: &Path) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Serializes the tensor table (layout in `docs/format.md`).
fn encode_table(tensors: &[WrittenTensor]) -> Vec<u8> {
    let mut t = Vec::with_capacity(tensors.len() * 96);
    for w in tensors {
        t.extend_from_slice(&(w.name.len() as u16).to_le_bytes());
        t.extend_from_slice(w.name.as_bytes());
        t.push(w.shape.len() as u8);
        for &d in &w.shape {
            t.extend_from_slice(&(d as u64).to_le_bytes());
        }
        t.extend_from_slice(&w.encoding.code().to_le_bytes());
        let (param0, param1) = w.encoding.params();
        t.extend_from_slice(&param0.to_le_bytes()); // e.g. group size; 0 for dense
        t.extend_from_slice(&param1.to_le_bytes()); // encoding flags; 0 for dense
        t.extend_from_slice(&w.offset.to_le_bytes());
        t.extend_from_slice(&w.length.to_le_bytes());
        t.extend_from_slice(&w.checksum.to_le_bytes());
    }
    t
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_tensors_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.plm");
        let mut w = PlmWriter::create(&path).unwrap();
        w.add_f32("a", &[2], &[1.0, 2.0], Encoding::F32).unwrap();
        let dup = w.add_f32("a", &[1], &[1.0], Encoding::F32).unwrap_err();
        assert!(
            matches!(&dup, PlmError::Tensor { name, .. } if name == "a"),
            "{dup}"
        );
        assert!(dup.to_string().contains("duplicate"), "{dup}");
        let short = w
            .add_tensor("b", &[3], Encoding::F16, &[0u8; 4])
            .unwrap_err();
        assert!(short.to_string().contains("needs 6"), "{short}");
        let rank = w
            .add_f32("c", &[1, 1, 1, 1, 1], &[1.0], Encoding::F32)
            .unwrap_err();
        assert!(rank.to_string().contains("rank 5"), "{rank}");
        let count = w.add_f32("d", &[3], &[1.0], Encoding::BF16).unwrap_err();
        assert!(count.to_string().contains("3 elements"), "{count}");
        let huge = w
            .add_tensor("e", &[usize::MAX, 2], Encoding::F32, &[])
            .unwrap_err();
        assert!(huge.to_string().contains("overflows"), "{huge}");
        let empty = w.add_tensor("", &[1], Encoding::F32, &[0; 4]).unwrap_err();
        assert!(matches!(empty, PlmError::Tensor { .. }));
        // Only "a" was recorded; the writer is still usable.
        assert_eq!(w.tensors.len(), 1);
        w.add_f32("b", &[3], &[1.0, 2.0, 3.0], Encoding::F16)
            .unwrap();
        let size = w.finish(&serde_json::json!({})).unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        assert!(!tmp_path_for(&path).exists());
    }

    #[test]
    fn metadata_must_be_an_object_and_failed_finish_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.plm");
        let w = PlmWriter::create(&path).unwrap();
        assert!(tmp_path_for(&path).exists());
        let err = w.finish(&serde_json::json!([1, 2])).unwrap_err();
        assert!(matches!(err, PlmError::InvalidMetadata(_)), "{err}");
        assert!(!path.exists());
        assert!(!tmp_path_for(&path).exists());
    }

    #[test]
    fn tensors_start_aligned_and_conversion_rounds_to_nearest_even() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.plm");
        let mut w = PlmWriter::create(&path).unwrap();
        w.add_f32("x", &[3], &[1.0, 2.0, 3.0], Encoding::F32)
            .unwrap();
        // 1 + 2^-11 is exactly halfway between two f16 values: ties to even (1.0).
        let halfway = 1.0 + f32::powi(2.0, -11);
        w.add_f32("y", &[2], &[halfway, 0.1], Encoding::F16)
            .unwrap();
        for t in &w.tensors {
            assert_eq!(t.offset % TENSOR_ALIGNMENT as u64, 0);
        }
        assert_eq!(w.tensors[0].offset, HEADER_SIZE as u64);
        assert_eq!(w.tensors[1].offset, HEADER_SIZE as u64 + 64);
        let expected = [
            f16::from_f32(halfway).to_bits(),
            f16::from_f32(0.1).to_bits(),
        ];
        assert_eq!(f16::from_bits(expected[0]), f16::ONE);
        assert_eq!(
            w.tensors[1].checksum,
            crc32fast::hash(bytemuck::cast_slice(&expected))
        );
    }
}
