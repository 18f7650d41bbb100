//! Round trips and corruption cases for the `.plm` format.
//!
//! The corruption tests edit files at the byte level using only the layout in
//! `docs/format.md` (the `Raw` helper below re-implements it independently of the crate), and
//! re-seal CRCs where a case is about a *semantic* error rather than a checksum.

use pocketlm_kernels::DecodeTensor;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use pocketlm_format::{
    Encoding, FORMAT_VERSION, MAGIC, PlmError, PlmFile, PlmWriter, TENSOR_ALIGNMENT,
};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Spec-level helpers

const HEADER_SIZE: usize = 128;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes the header CRC (bytes 0..124 → 124..128).
fn seal_header(b: &mut [u8]) {
    let crc = crc32fast::hash(&b[..124]);
    put_u32(b, 124, crc);
}

#[derive(Clone, Debug)]
struct RawEntry {
    name: Vec<u8>,
    rank: u8,
    dims: Vec<u64>,
    code: u16,
    params: [u32; 2],
    offset: u64,
    length: u64,
    crc: u32,
}

/// A `.plm` file split into its sections per the spec.
#[derive(Clone)]
struct Raw {
    bytes: Vec<u8>,
}

impl Raw {
    fn load(path: &Path) -> Raw {
        Raw {
            bytes: std::fs::read(path).unwrap(),
        }
    }
    fn data_range(&self) -> (u64, u64) {
        let off = u64_at(&self.bytes, 24);
        (off, off + u64_at(&self.bytes, 32))
    }
    fn meta_range(&self) -> (u64, u64) {
        let off = u64_at(&self.bytes, 40);
        (off, off + u64_at(&self.bytes, 48))
    }
    fn table_range(&self) -> (u64, u64) {
        let off = u64_at(&self.bytes, 64);
        (off, off + u64_at(&self.bytes, 72))
    }
    fn entries(&self) -> Vec<RawEntry> {
        let (start, end) = self.table_range();
        let t = &self.bytes[start as usize..end as usize];
        let count = u32_at(&self.bytes, 60);
        let mut p = 0usize;
        let mut out = Vec::new();
        for _ in 0..count {
            let n = u16::from_le_bytes([t[p], t[p + 1]]) as usize;
            p += 2;
            let name = t[p..p + n].to_vec();
            p += n;
            let rank = t[p];
            p += 1;
            let dims = (0..rank as usize).map(|i| u64_at(t, p + 8 * i)).collect();
            p += 8 * rank as usize;
            let code = u16::from_le_bytes([t[p], t[p + 1]]);
            let params = [u32_at(t, p + 2), u32_at(t, p + 6)];
            let offset = u64_at(t, p + 10);
            let length = u64_at(t, p + 18);
            let crc = u32_at(t, p + 26);
            p += 30;
            out.push(RawEntry {
                name,
                rank,
                dims,
                code,
                params,
                offset,
                length,
                crc,
            });
        }
        assert_eq!(p, t.len(), "test helper disagrees with the table layout");
        out
    }
    /// Replaces the tensor table (which sits at the end of the file) and re-seals the
    /// header: count, table length, table CRC, file length, header CRC.
    fn with_entries(&self, entries: &[RawEntry]) -> Raw {
        let mut t = Vec::new();
        for e in entries {
            t.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            t.extend_from_slice(&e.name);
            t.push(e.rank);
            for d in &e.dims {
                t.extend_from_slice(&d.to_le_bytes());
            }
            t.extend_from_slice(&e.code.to_le_bytes());
            t.extend_from_slice(&e.params[0].to_le_bytes());
            t.extend_from_slice(&e.params[1].to_le_bytes());
            t.extend_from_slice(&e.offset.to_le_bytes());
            t.extend_from_slice(&e.length.to_le_bytes());
            t.extend_from_slice(&e.crc.to_le_bytes());
        }
        let (table_start, table_end) = self.table_range();
        assert_eq!(table_end as usize, self.bytes.len(), "table is last");
        let mut bytes = self.bytes[..table_start as usize].to_vec();
        bytes.extend_from_slice(&t);
        put_u32(&mut bytes, 60, entries.len() as u32);
        put_u64(&mut bytes, 72, t.len() as u64);
        put_u32(&mut bytes, 80, crc32fast::hash(&t));
        let len = bytes.len() as u64;
        put_u64(&mut bytes, 16, len);
        seal_header(&mut bytes);
        Raw { bytes }
    }
    /// Replaces the metadata block, moving the table after it, and re-seals everything.
    fn with_metadata(&self, meta: &[u8]) -> Raw {
        let (meta_start, _) = self.meta_range();
        let (ts, te) = self.table_range();
        let table = self.bytes[ts as usize..te as usize].to_vec();
        let mut bytes = self.bytes[..meta_start as usize].to_vec();
        bytes.extend_from_slice(meta);
        let table_start = bytes.len() as u64;
        bytes.extend_from_slice(&table);
        put_u64(&mut bytes, 48, meta.len() as u64);
        put_u32(&mut bytes, 56, crc32fast::hash(meta));
        put_u64(&mut bytes, 64, table_start);
        let len = bytes.len() as u64;
        put_u64(&mut bytes, 16, len);
        seal_header(&mut bytes);
        Raw { bytes }
    }
    fn edit_header(&self, f: impl FnOnce(&mut [u8])) -> Raw {
        let mut bytes = self.bytes.clone();
        f(&mut bytes);
        seal_header(&mut bytes);
        Raw { bytes }
    }
}

/// A small model file: three tensors of mixed encodings and ranks, plus realistic metadata.
fn sample_file(dir: &Path) -> PathBuf {
    let path = dir.join("sample.plm");
    let mut w = PlmWriter::create(&path).unwrap();
    let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
    w.add_f32("tok_embeddings.weight", &[3, 2], &a, Encoding::F32)
        .unwrap();
    let b: Vec<f32> = (0..40).map(|i| (i as f32).sin()).collect();
    w.add_f32("layers.0.attn.wq.weight", &[5, 8], &b, Encoding::F16)
        .unwrap();
    w.add_f32("norm.weight", &[7], &[1.0; 7], Encoding::BF16)
        .unwrap();
    w.finish(&json!({
        "format": {"name": "pocketlm", "version": 1},
        "config": {"architecture": "llama", "hidden_size": 2},
        "tokenizer": {"json": "{}", "bos_token_id": 1, "eos_token_ids": [2], "add_bos": true,
                      "chat_template": null},
        "recipe": {"default": "f16"},
        "provenance": {"source": "test"}
    }))
    .unwrap();
    path
}

/// Writes `raw` next to the sample and opens it.
fn open_raw(dir: &Path, raw: &Raw) -> Result<PlmFile, PlmError> {
    let path = dir.join("corrupt.plm");
    std::fs::write(&path, &raw.bytes).unwrap();
    PlmFile::open(&path)
}

fn expect_err(dir: &Path, raw: &Raw) -> PlmError {
    match open_raw(dir, raw) {
        Ok(_) => panic!("corrupt file opened without error"),
        Err(e) => e,
    }
}

/// Asserts a `Corrupt` error in `section` whose message contains `needle`.
#[track_caller]
fn assert_corrupt(err: &PlmError, section: &str, needle: &str) {
    match err {
        PlmError::Corrupt {
            section: s,
            message,
        } => {
            assert_eq!(*s, section, "wrong section in: {err}");
            assert!(message.contains(needle), "'{needle}' not in: {err}");
        }
        other => panic!("expected Corrupt({section}), got {other:?}: {other}"),
    }
    assert!(err.to_string().contains(section), "{err}");
}

/// Asserts a `Tensor` error about `name` whose message contains `needle`.
#[track_caller]
fn assert_tensor_err(err: &PlmError, name: &str, needle: &str) {
    match err {
        PlmError::Tensor { name: n, message } => {
            assert_eq!(n, name, "wrong tensor in: {err}");
            assert!(message.contains(needle), "'{needle}' not in: {err}");
        }
        other => panic!("expected Tensor({name}), got {other:?}: {other}"),
    }
    assert!(err.to_string().contains(&format!("'{name}'")), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Round trips

#[test]
fn round_trip_all_encodings_and_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rt.plm");
    let shapes: [&[usize]; 5] = [&[5], &[3, 4], &[2, 3, 5], &[2, 1, 3, 2], &[]];
    let mut expected = Vec::new();
    let mut w = PlmWriter::create(&path).unwrap();
    for (i, shape) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|k| (k as f32 - 3.25) * 1.5 + i as f32).collect();
        for enc in Encoding::ALL {
            let name = format!("t{i}.{enc}");
            w.add_f32(&name, shape, &values, enc).unwrap();
            expected.push((name, shape.to_vec(), enc, values.clone()));
        }
    }
    // add_tensor with pre-encoded bytes.
    let raw: Vec<u16> = [1.0f32, -0.5, 65504.0]
        .iter()
        .map(|&v| f16::from_f32(v).to_bits())
        .collect();
    w.add_tensor("raw_f16", &[3], Encoding::F16, bytemuck::cast_slice(&raw))
        .unwrap();
    let size = w.finish(&json!({})).unwrap();

    let f = PlmFile::open(&path).unwrap();
    assert_eq!(f.file_size(), size);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
    assert_eq!(f.path(), path.as_path());
    assert_eq!(f.metadata(), &json!({}));
    assert_eq!(f.tensors().len(), expected.len() + 1);
    f.verify().unwrap();

    for (name, shape, enc, values) in &expected {
        let v = f.tensor(name).unwrap();
        assert_eq!(
            (v.name, v.shape, v.encoding),
            (name.as_str(), &shape[..], *enc)
        );
        let entry = f.entry(name).unwrap();
        assert_eq!(entry.length as usize, enc.byte_len(shape).unwrap());
        match enc {
            Encoding::F32 => assert_eq!(v.as_f32().unwrap(), &values[..]),
            Encoding::F16 => {
                let want: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
                assert_eq!(v.as_f16().unwrap(), &want[..]);
            }
            Encoding::BF16 => {
                let want: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
                assert_eq!(v.as_bf16().unwrap(), &want[..]);
            }
            quantized => unreachable!("{quantized} is not a dense encoding"),
        }
        let decoded = v.to_f32_vec();
        assert_eq!(decoded.len(), values.len());
        for (d, x) in decoded.iter().zip(values) {
            let tol = match enc {
                Encoding::F32 => 0.0,
                Encoding::F16 => x.abs() * 1e-3,
                Encoding::BF16 => x.abs() * 8e-3,
                quantized => unreachable!("{quantized} is not a dense encoding"),
            };
            assert!((d - x).abs() <= tol, "{name}: {d} vs {x}");
        }
    }
    assert_eq!(
        f.tensor("raw_f16").unwrap().to_f32_vec(),
        vec![1.0, -0.5, 65504.0]
    );
}

#[test]
fn views_are_aligned_and_zero_copy() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_file(dir.path());
    let f = PlmFile::open(&path).unwrap();
    let file_bytes = std::fs::read(&path).unwrap();
    // The map's address range, derived from the first view and its file offset.
    let first = &f.tensors()[0];
    let base = f.view(first).bytes.as_ptr() as usize - first.offset as usize;
    assert_eq!(base % 4096, 0, "map base is page-aligned");
    for entry in f.tensors() {
        let v = f.view(entry);
        let ptr = v.bytes.as_ptr() as usize;
        assert_eq!(ptr % TENSOR_ALIGNMENT, 0, "{} not aligned", entry.name);
        assert_eq!(entry.offset % TENSOR_ALIGNMENT as u64, 0);
        // Zero-copy: the view points into the map at exactly the entry's offset.
        assert_eq!(ptr, base + entry.offset as usize);
        assert!(ptr + v.bytes.len() <= base + f.file_size() as usize);
        let (s, e) = (
            entry.offset as usize,
            (entry.offset + entry.length) as usize,
        );
        assert_eq!(v.bytes, &file_bytes[s..e]);
    }
    let w = f.tensor("tok_embeddings.weight").unwrap().as_f32().unwrap();
    assert_eq!(w.as_ptr() as usize, base + first.offset as usize);
    assert_eq!(w, &[0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
    assert_eq!(f.metadata()["tokenizer"]["bos_token_id"], 1);
    assert_eq!(f.tensor_bytes_total(), 24 + 80 + 14);
}

#[test]
fn many_tensors_round_trip_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.plm");
    let mut w = PlmWriter::create(&path).unwrap();
    for i in 0..2000usize {
        let n = i % 37 + 1;
        let values: Vec<f32> = (0..n).map(|k| (i * 100 + k) as f32).collect();
        let enc = Encoding::ALL[i % 3];
        w.add_f32(&format!("layers.{i}.w"), &[n], &values, enc)
            .unwrap();
    }
    w.finish(&json!({"n": 2000})).unwrap();
    let f = PlmFile::open(&path).unwrap();
    f.verify().unwrap();
    assert_eq!(f.tensors().len(), 2000);
    for (i, e) in f.tensors().iter().enumerate() {
        assert_eq!(e.name, format!("layers.{i}.w"));
        let v = f.view(e).to_f32_vec();
        let first = (i * 100) as f32;
        let want = match e.encoding {
            Encoding::F32 => first,
            Encoding::F16 => f16::from_f32(first).to_f32(),
            Encoding::BF16 => bf16::from_f32(first).to_f32(),
            quantized => unreachable!("{quantized} is not a dense encoding"),
        };
        assert_eq!(v[0], want, "{}", e.name);
        assert_eq!(v.len(), i % 37 + 1);
    }
}

#[test]
fn plm_file_is_shareable_across_threads() {
    let dir = tempfile::tempdir().unwrap();
    let f = std::sync::Arc::new(PlmFile::open(&sample_file(dir.path())).unwrap());
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let f = f.clone();
            std::thread::spawn(move || f.tensor("norm.weight").unwrap().to_f32_vec())
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), vec![1.0; 7]);
    }
}

// ---------------------------------------------------------------------------------------------
// Writer atomicity

#[test]
fn interrupted_writer_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.plm");
    {
        let mut w = PlmWriter::create(&path).unwrap();
        w.add_f32("a", &[4], &[1.0; 4], Encoding::F32).unwrap();
        assert!(dir.path().join("model.plm.tmp").exists());
        assert!(!path.exists(), "nothing at the destination before finish");
        // dropped without finish, as on an error or panic mid-conversion
    }
    assert!(!path.exists());
    assert!(!dir.path().join("model.plm.tmp").exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn panicking_conversion_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.plm");
    let p = path.clone();
    let result = std::panic::catch_unwind(move || {
        let mut w = PlmWriter::create(&p).unwrap();
        w.add_f32("a", &[4], &[1.0; 4], Encoding::F16).unwrap();
        panic!("converter bug");
    });
    assert!(result.is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn finish_replaces_an_existing_file_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.plm");
    std::fs::write(&path, b"old contents").unwrap();
    let mut w = PlmWriter::create(&path).unwrap();
    w.add_f32("a", &[2], &[1.0, 2.0], Encoding::F32).unwrap();
    // The old file is untouched until finish.
    assert_eq!(std::fs::read(&path).unwrap(), b"old contents");
    w.finish(&json!({"v": 2})).unwrap();
    let f = PlmFile::open(&path).unwrap();
    assert_eq!(f.metadata()["v"], 2);
    assert!(!dir.path().join("model.plm.tmp").exists());
}

// ---------------------------------------------------------------------------------------------
// Corruption cases

#[test]
fn truncation_at_every_section_boundary_and_random_points() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let full = raw.bytes.len() as u64;
    let entries = raw.entries();
    let (data_start, data_end) = raw.data_range();
    let (meta_start, meta_end) = raw.meta_range();
    let (table_start, table_end) = raw.table_range();
    assert_eq!(table_end, full);

    let mut cuts: Vec<u64> = vec![
        data_start,
        data_start + 1,
        data_end - 1,
        data_end,
        meta_start + 1,
        meta_end - 1,
        meta_end,
        table_start + 1,
        full - 1,
    ];
    for e in &entries {
        cuts.extend([e.offset, e.offset + e.length]);
    }
    // A few pseudo-random points (fixed LCG, reproducible).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..16 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        cuts.push(HEADER_SIZE as u64 + (state >> 33) % (full - HEADER_SIZE as u64));
    }
    for cut in cuts {
        let t = Raw {
            bytes: raw.bytes[..cut as usize].to_vec(),
        };
        match expect_err(dir.path(), &t) {
            PlmError::Truncated { expected, actual } => {
                assert_eq!((expected, actual), (full, cut));
                let msg = PlmError::Truncated { expected, actual }.to_string();
                assert_eq!(
                    msg,
                    format!("truncated: header says {full} bytes, file has {cut}")
                );
            }
            e => panic!("cut at {cut}: expected Truncated, got {e:?}"),
        }
    }

    // Inside the header: truncated header (the magic matches as far as it goes).
    for cut in [1u64, 7, 8, 64, 127] {
        let t = Raw {
            bytes: raw.bytes[..cut as usize].to_vec(),
        };
        let err = expect_err(dir.path(), &t);
        assert!(
            matches!(err, PlmError::TruncatedHeader { actual } if actual == cut),
            "cut at {cut}: {err:?}"
        );
        assert!(err.to_string().contains("header"), "{err}");
    }
    // Empty file.
    let err = expect_err(dir.path(), &Raw { bytes: vec![] });
    assert!(
        matches!(&err, PlmError::NotPlm { reason } if reason.contains("empty")),
        "{err}"
    );
}

#[test]
fn trailing_bytes_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = Raw::load(&sample_file(dir.path()));
    raw.bytes.extend_from_slice(b"junk");
    let err = expect_err(dir.path(), &raw);
    assert_corrupt(&err, "header", "trailing");
}

#[test]
fn wrong_magic_is_not_plm() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let mut bad = raw.clone();
    bad.bytes[..4].copy_from_slice(b"GGUF");
    let err = expect_err(dir.path(), &bad);
    assert!(
        matches!(&err, PlmError::NotPlm { reason } if reason.contains("magic")),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("not a .plm file"), "{err}");
    // A short non-plm file too.
    let err = expect_err(
        dir.path(),
        &Raw {
            bytes: b"hello".to_vec(),
        },
    );
    assert!(matches!(err, PlmError::NotPlm { .. }), "{err:?}");
}

#[test]
fn other_versions_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    for version in [0u32, FORMAT_VERSION + 1, 0xffff_ffff] {
        // Sealed or not, the version is reported (it is checked before the header CRC).
        let sealed = raw.edit_header(|b| put_u32(b, 8, version));
        let mut unsealed = raw.clone();
        put_u32(&mut unsealed.bytes, 8, version);
        for r in [&sealed, &unsealed] {
            let err = expect_err(dir.path(), r);
            assert!(
                matches!(err, PlmError::UnsupportedVersion { version: v } if v == version),
                "{err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "unsupported .plm format version {version} (this build reads \
                     1-{FORMAT_VERSION}; convert the model again with this version of pocketlm)"
                )
            );
        }
    }
}

/// Version 1 differs from version 2 only in how quantized matrices are laid out: a version 1
/// file without any still opens; one with a quantized matrix is refused, naming the tensor.
#[test]
fn version_1_files_open_unless_they_hold_quantized_matrices() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let v1 = raw.edit_header(|b| put_u32(b, 8, 1));
    let file = open_raw(dir.path(), &v1).unwrap();
    assert_eq!(file.tensors().len(), 3);

    let path = dir.path().join("q.plm");
    let mut w = PlmWriter::create(&path).unwrap();
    let q8 = Encoding::Q8 { group: 32 };
    let values: Vec<f32> = (0..64).map(|i| i as f32 / 64.0).collect();
    let bytes = pocketlm_kernels::quant::quantize_rtn(&values, 2, 32, q8).unwrap();
    w.add_tensor("blk.0.attn_q.weight", &[2, 32], q8, &bytes)
        .unwrap();
    w.finish(&json!({})).unwrap();
    let v1 = Raw::load(&path).edit_header(|b| put_u32(b, 8, 1));
    let err = expect_err(dir.path(), &v1);
    let message = err.to_string();
    assert!(
        message.contains("blk.0.attn_q.weight") && message.contains("convert the model again"),
        "{message}"
    );
}

#[test]
fn flipped_header_byte_fails_the_header_crc() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    // Every header byte except magic (0..8) and version (8..12), which have their own errors.
    for at in 12..HEADER_SIZE {
        let mut bad = raw.clone();
        bad.bytes[at] ^= 0x40;
        let err = expect_err(dir.path(), &bad);
        assert_corrupt(&err, "header", "checksum mismatch");
    }
}

#[test]
fn flipped_metadata_byte_fails_the_metadata_crc() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let (s, e) = raw.meta_range();
    for at in [s, (s + e) / 2, e - 1] {
        let mut bad = raw.clone();
        bad.bytes[at as usize] ^= 0x01;
        let err = expect_err(dir.path(), &bad);
        assert_corrupt(&err, "metadata", "checksum mismatch");
    }
}

#[test]
fn flipped_table_byte_fails_the_table_crc() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let (s, e) = raw.table_range();
    for at in s..e {
        let mut bad = raw.clone();
        bad.bytes[at as usize] ^= 0x10;
        let err = expect_err(dir.path(), &bad);
        assert_corrupt(&err, "tensor table", "checksum mismatch");
    }
}

#[test]
fn flipped_data_byte_opens_but_verify_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    for e in raw.entries() {
        let name = String::from_utf8(e.name.clone()).unwrap();
        for at in [e.offset, e.offset + e.length - 1] {
            let mut bad = raw.clone();
            bad.bytes[at as usize] ^= 0x80;
            let f = open_raw(dir.path(), &bad).expect("data corruption is found by verify()");
            match f.verify().unwrap_err() {
                PlmError::Checksum {
                    name: n,
                    expected,
                    actual,
                } => {
                    assert_eq!(n, name);
                    assert_eq!(expected, e.crc);
                    assert_ne!(actual, expected);
                }
                other => panic!("expected Checksum, got {other:?}"),
            }
        }
    }
    // Padding between tensors is not covered by any CRC: flipping it is harmless.
    let (_, data_end) = raw.data_range();
    let mut bad = raw.clone();
    bad.bytes[data_end as usize - 1] ^= 0xff;
    open_raw(dir.path(), &bad).unwrap().verify().unwrap();
}

#[test]
fn table_entry_pointing_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let (_, data_end) = raw.data_range();
    let full = raw.bytes.len() as u64;
    for offset in [data_end, (full + 64) & !63, u64::MAX - 63] {
        let mut entries = raw.entries();
        entries[1].offset = offset;
        let err = expect_err(dir.path(), &raw.with_entries(&entries));
        assert_tensor_err(
            &err,
            "layers.0.attn.wq.weight",
            "outside the tensor data region",
        );
    }
    // Offset inside the region, but the end runs past it.
    let mut entries = raw.entries();
    entries[2].offset = data_end - 64;
    entries[2].dims = vec![64];
    entries[2].length = 128;
    let err = expect_err(dir.path(), &raw.with_entries(&entries));
    assert_tensor_err(&err, "norm.weight", "outside the tensor data region");
    // Offset into the header.
    let mut entries = raw.entries();
    entries[0].offset = 0;
    let err = expect_err(dir.path(), &raw.with_entries(&entries));
    assert_tensor_err(
        &err,
        "tok_embeddings.weight",
        "outside the tensor data region",
    );
}

#[test]
fn overlapping_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let mut entries = raw.entries();
    entries[2].offset = entries[1].offset; // norm.weight on top of wq
    let err = expect_err(dir.path(), &raw.with_entries(&entries));
    match &err {
        PlmError::Tensor { name, message } => {
            assert!(
                name == "norm.weight" || name == "layers.0.attn.wq.weight",
                "{err}"
            );
            assert!(message.contains("overlap"), "{err}");
        }
        other => panic!("expected Tensor overlap, got {other:?}"),
    }
    // Partial overlap: wq's second cache line is norm's first.
    let mut entries = raw.entries();
    entries[2].offset = entries[1].offset + 64;
    let err = expect_err(dir.path(), &raw.with_entries(&entries));
    assert_tensor_err(
        &err,
        "norm.weight",
        "overlap tensor 'layers.0.attn.wq.weight'",
    );
}

#[test]
fn misaligned_offset() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    for delta in [1u64, 2, 4, 32] {
        let mut entries = raw.entries();
        entries[0].offset += delta;
        let err = expect_err(dir.path(), &raw.with_entries(&entries));
        assert_tensor_err(&err, "tok_embeddings.weight", "not a multiple of 64");
    }
}

#[test]
fn dims_whose_product_overflows() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    for dims in [
        vec![u32::MAX as u64, u32::MAX as u64, 4],
        vec![1 << 62, 2],
        vec![u64::MAX / 2 + 1, 2, 1, 1],
    ] {
        let mut entries = raw.entries();
        entries[0].rank = dims.len() as u8;
        entries[0].dims = dims.clone();
        let err = expect_err(dir.path(), &raw.with_entries(&entries));
        let name = "tok_embeddings.weight";
        match &err {
            PlmError::Tensor { name: n, message } => {
                assert_eq!(n, name);
                assert!(
                    message.contains("overflows") || message.contains("address space"),
                    "{err}"
                );
            }
            other => panic!("expected Tensor overflow, got {other:?}"),
        }
    }
    // A shape that does not overflow but disagrees with the stored length.
    let mut entries = raw.entries();
    entries[0].dims = vec![3, 3];
    let err = expect_err(dir.path(), &raw.with_entries(&entries));
    assert_tensor_err(&err, "tok_embeddings.weight", "does not match shape [3, 3]");
}

#[test]
fn rank_five() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let mut entries = raw.entries();
    entries[1].rank = 5;
    entries[1].dims = vec![5, 8, 1, 1, 1];
    let err = expect_err(dir.path(), &raw.with_entries(&entries));
    assert_tensor_err(
        &err,
        "layers.0.attn.wq.weight",
        "rank 5 exceeds the maximum of 4",
    );
}

#[test]
fn duplicate_names() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let mut entries = raw.entries();
    entries[2].name = entries[0].name.clone();
    let err = expect_err(dir.path(), &raw.with_entries(&entries));
    assert_tensor_err(&err, "tok_embeddings.weight", "duplicate tensor name");
    assert!(err.to_string().contains("#0 and #2"), "{err}");
}

#[test]
fn bad_names() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let mut entries = raw.entries();
    entries[1].name = vec![b'a', 0xff, 0xfe];
    let err = expect_err(dir.path(), &raw.with_entries(&entries));
    assert_corrupt(&err, "tensor table", "entry #1: name is not valid UTF-8");

    let mut entries = raw.entries();
    entries[1].name = vec![b'x'; 5000];
    let err = expect_err(dir.path(), &raw.with_entries(&entries));
    assert_corrupt(&err, "tensor table", "entry #1: name length 5000");

    let mut entries = raw.entries();
    entries[0].name = vec![];
    let err = expect_err(dir.path(), &raw.with_entries(&entries));
    assert_corrupt(&err, "tensor table", "entry #0: name length 0");
}

#[test]
fn unknown_encoding_code() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let mut entries = raw.entries();
    entries[1].code = 0x0105;
    let err = expect_err(dir.path(), &raw.with_entries(&entries));
    assert!(
        matches!(&err, PlmError::UnsupportedEncoding { name, code: 0x0105 }
            if name == "layers.0.attn.wq.weight"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "tensor 'layers.0.attn.wq.weight' uses encoding code 261, which this version of \
         pocketlm does not support (file written by a newer version?)"
    );
}

#[test]
fn nonzero_params_on_a_dense_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let mut entries = raw.entries();
    entries[1].params = [32, 0];
    let err = expect_err(dir.path(), &raw.with_entries(&entries));
    assert_tensor_err(&err, "layers.0.attn.wq.weight", "takes no parameters");
}

#[test]
fn table_structure_errors() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let entries = raw.entries();

    // Count says more entries than the table holds: the last one is cut off.
    let mut bad = raw.with_entries(&entries);
    let count = entries.len() as u32;
    bad = bad.edit_header(|b| put_u32(b, 60, count + 1));
    let err = expect_err(dir.path(), &bad);
    assert_corrupt(&err, "tensor table", "entry #3 is cut off");

    // Count says fewer: bytes left over.
    let bad = raw.edit_header(|b| put_u32(b, 60, count - 1));
    let err = expect_err(dir.path(), &bad);
    assert_corrupt(&err, "tensor table", "left over after 2 entries");

    // Absurd count: rejected before allocating.
    let bad = raw.edit_header(|b| put_u32(b, 60, u32::MAX));
    let err = expect_err(dir.path(), &bad);
    assert_corrupt(&err, "tensor table", "exceeds the limit");
    let bad = raw.edit_header(|b| put_u32(b, 60, 100_000));
    let err = expect_err(dir.path(), &bad);
    assert_corrupt(&err, "tensor table", "cannot hold that many");
}

#[test]
fn huge_metadata_length() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    for len in [1u64 << 40, u64::MAX, (64 << 20) + 1] {
        let bad = raw.edit_header(|b| put_u64(b, 48, len));
        let err = expect_err(dir.path(), &bad);
        assert_corrupt(&err, "metadata", "exceeds the 64 MiB limit");
    }
    // Within the cap but past the end of the file.
    let bad = raw.edit_header(|b| put_u64(b, 48, 1 << 20));
    let err = expect_err(dir.path(), &bad);
    assert_corrupt(&err, "metadata", "outside");
}

#[test]
fn section_ranges_that_overlap_or_escape() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let (data_start, data_end) = raw.data_range();
    let (meta_start, _) = raw.meta_range();

    // Metadata moved into the data region.
    let bad = raw.edit_header(|b| put_u64(b, 40, data_start));
    let err = expect_err(dir.path(), &bad);
    assert_corrupt(&err, "metadata", "overlaps the tensor data region");

    // Data region grown over the metadata.
    let bad = raw.edit_header(|b| put_u64(b, 32, meta_start + 8 - data_start));
    let err = expect_err(dir.path(), &bad);
    assert_corrupt(&err, "metadata", "overlaps the tensor data region");

    // Data region starting inside the header.
    let bad = raw.edit_header(|b| put_u64(b, 24, 64));
    let err = expect_err(dir.path(), &bad);
    assert_corrupt(&err, "tensor data region", "outside");

    // Table offset overflowing u64.
    let bad = raw.edit_header(|b| put_u64(b, 64, u64::MAX - 2));
    let err = expect_err(dir.path(), &bad);
    assert_corrupt(&err, "header", "tensor table range");

    // Data region shrunk so the last tensor falls outside it.
    let bad = raw.edit_header(|b| put_u64(b, 32, data_end - data_start - 64));
    let err = expect_err(dir.path(), &bad);
    assert_tensor_err(&err, "norm.weight", "outside the tensor data region");
}

#[test]
fn metadata_that_is_not_a_json_object() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let err = expect_err(dir.path(), &raw.with_metadata(b"{\"config\": "));
    assert_corrupt(&err, "metadata", "invalid JSON");
    let err = expect_err(dir.path(), &raw.with_metadata(b"[1, 2, 3]"));
    assert_corrupt(&err, "metadata", "not an object");
    let err = expect_err(dir.path(), &raw.with_metadata(b"\xff\xfe"));
    assert_corrupt(&err, "metadata", "invalid JSON");
    // Re-sealed valid metadata of a different size still opens (helper sanity check).
    let f = open_raw(dir.path(), &raw.with_metadata(br#"{"x": [1]}"#)).unwrap();
    assert_eq!(f.metadata()["x"][0], 1);
    f.verify().unwrap();
}

#[test]
fn unknown_required_flags_are_refused_optional_ones_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let err = expect_err(dir.path(), &raw.edit_header(|b| put_u32(b, 12, 0x4)));
    assert!(
        matches!(err, PlmError::UnsupportedFlags { flags: 0x4 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("newer version"), "{err}");
    // High 16 bits are optional hints; reserved bytes are ignored.
    let ok = raw.edit_header(|b| {
        put_u32(b, 12, 0x0001_0000);
        b[100] = 7;
    });
    open_raw(dir.path(), &ok).unwrap().verify().unwrap();
}

#[test]
fn rotated_inputs_flag_follows_the_config_and_must_agree_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    // A known required flag without the config that implies it: refused, not misread.
    let err = expect_err(dir.path(), &raw.edit_header(|b| put_u32(b, 12, 0x1)));
    assert_corrupt(&err, "header", "disagree with the metadata's config");
    // The config that implies it, without the flag: refused too.
    let rotated = raw.with_metadata(br#"{"config": {"incoherence": {"seed": 7}}}"#);
    let err = expect_err(dir.path(), &rotated);
    assert_corrupt(&err, "header", "implies 0x1");
    // Both: opens.
    let both = rotated.edit_header(|b| put_u32(b, 12, 0x1));
    open_raw(dir.path(), &both).unwrap().verify().unwrap();
    // The writer sets the flag from the config.
    let path = dir.path().join("w.plm");
    let mut w = PlmWriter::create(&path).unwrap();
    w.add_f32("x", &[1], &[1.0], Encoding::F32).unwrap();
    w.finish(&serde_json::json!({"config": {"incoherence": {"seed": 7}}}))
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 0x1);
    PlmFile::open(&path).unwrap();
}

#[test]
fn helper_round_trip_is_identity() {
    // The test helper re-encodes the table exactly as the writer does, so the semantic cases
    // above differ from a valid file only in the field they change.
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    assert_eq!(raw.with_entries(&raw.entries()).bytes, raw.bytes);
    assert_eq!(&raw.bytes[..8], &MAGIC);
}

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.plm");
    match PlmFile::open(&path).unwrap_err() {
        PlmError::Io { path: p, source } => {
            assert_eq!(p, path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn random_corruption_never_panics() {
    // Arbitrary single and multi-byte damage anywhere (CRCs not re-sealed, plus re-sealed
    // header variants): open either fails cleanly or yields a file whose every view and
    // verify() work without panicking.
    let dir = tempfile::tempdir().unwrap();
    let raw = Raw::load(&sample_file(dir.path()));
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..1500 {
        let mut bad = raw.clone();
        for _ in 0..(next() % 4 + 1) {
            let at = (next() % bad.bytes.len() as u64) as usize;
            bad.bytes[at] = next() as u8;
        }
        if round % 3 == 0 {
            seal_header(&mut bad.bytes);
        }
        if round % 5 == 1 {
            // Damage only the table, then re-seal it: exercises the entry parser itself.
            bad = raw.clone();
            let (s, e) = raw.table_range();
            for _ in 0..(next() % 3 + 1) {
                let at = s + next() % (e - s);
                bad.bytes[at as usize] = next() as u8;
            }
            let crc = crc32fast::hash(&bad.bytes[s as usize..e as usize]);
            put_u32(&mut bad.bytes, 80, crc);
            seal_header(&mut bad.bytes);
        }
        if round % 7 == 0 {
            let keep = (next() % bad.bytes.len() as u64) as usize;
            bad.bytes.truncate(keep);
        }
        if let Ok(f) = open_raw(dir.path(), &bad) {
            for e in f.tensors() {
                let v = f.view(e);
                let _ = v.to_f32_vec();
                let _ = (v.as_f32(), v.as_f16(), v.as_bf16());
            }
            let _ = f.verify();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quantized encodings

/// A file with one q3/g64 matrix (code 18): the spec's byte length, the values read back, and
/// every way its table entry can be wrong.
#[test]
fn q3_tensor_round_trips_and_bad_entries_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q3.plm");
    let (rows, cols) = (3usize, 128usize);
    let q3 = Encoding::Q3 { group: 64 };
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
        .collect();
    let bytes = pocketlm_kernels::quant::quantize_rtn(&values, rows, cols, q3).unwrap();
    // docs/format.md: rows in tiles of 8 (the 3 rows padded to 8), 96 bytes per tile and 32
    // columns, scales at the next multiple of 64, one f16 per group and row of the tile.
    let expected_len = (8 * cols * 3 / 8).next_multiple_of(64) + 2 * 8 * cols / 64;
    assert_eq!(bytes.len(), expected_len);
    let mut w = PlmWriter::create(&path).unwrap();
    w.add_f32("norm.weight", &[4], &[1.0; 4], Encoding::F32)
        .unwrap();
    w.add_tensor("blk.0.ffn_up.weight", &[rows, cols], q3, &bytes)
        .unwrap();
    // A writer refuses data of the wrong length or a shape the group does not divide.
    assert!(w.add_tensor("bad", &[rows, cols], q3, &bytes[1..]).is_err());
    assert!(w.add_tensor("bad", &[rows, 96], q3, &bytes).is_err());
    w.finish(&json!({})).unwrap();

    let file = PlmFile::open(&path).unwrap();
    let entry = file.entry("blk.0.ffn_up.weight").unwrap();
    assert_eq!(entry.encoding, q3);
    let back = file.view(entry).to_f32_vec();
    // Round to nearest on 8 levels: within one step of the group's scale.
    for (g, (a, b)) in values.chunks(64).zip(back.chunks(64)).enumerate() {
        let amax = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= amax / 4.0 + 1e-3, "group {g}: {x} vs {y}");
        }
    }
    file.verify().unwrap();
    drop(file);

    let raw = Raw::load(&path);
    let entries = raw.entries();
    assert_eq!((entries[1].code, entries[1].params), (18, [64, 0]));
    let name = "blk.0.ffn_up.weight";
    let with = |f: &dyn Fn(&mut RawEntry)| {
        let mut e = entries.clone();
        f(&mut e[1]);
        expect_err(dir.path(), &raw.with_entries(&e))
    };
    // Group not a multiple of 32, zero, or beyond the limit.
    for group in [48, 0, (1 << 16) + 32] {
        let err = with(&|e| e.params = [group, 0]);
        assert_tensor_err(&err, name, "group size");
    }
    // param1 is unused and must be zero.
    let err = with(&|e| e.params = [64, 1]);
    assert_tensor_err(&err, name, "invalid parameters");
    // Length one q3 block too long, or too short.
    let err = with(&|e| e.length += 12);
    assert_tensor_err(&err, name, "does not match");
    let err = with(&|e| e.length -= 2);
    assert_tensor_err(&err, name, "does not match");
    // A row length that is not a whole number of groups.
    let err = with(&|e| e.dims = vec![4, 96]);
    assert_tensor_err(&err, name, "does not fit encoding q3/g64");
    // A vector is not a matrix.
    let err = with(&|e| {
        e.rank = 1;
        e.dims = vec![384];
    });
    assert_tensor_err(&err, name, "does not fit encoding q3/g64");
    // The same group as g128 needs fewer scale bytes: the recorded length no longer matches.
    let err = with(&|e| e.params = [128, 0]);
    assert_tensor_err(&err, name, "does not match");
}
