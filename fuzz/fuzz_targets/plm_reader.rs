//! Arbitrary bytes as a .plm file: open (header, metadata, table validation), view and decode
//! every tensor, verify checksums, load it as a Model and run one tiny forward pass.
#![no_main]

use pocketlm_kernels::DecodeTensor;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use pocketlm_runtime::Model;
use pocketlm_format::PlmFile;
use pocketlm_runtime::model::Logits;

mod common;

/// Recomputes the metadata, table and header CRCs of a .plm image in place (where the header's
/// ranges are in bounds), so mutations reach the table, metadata and model validation instead
/// of stopping at a checksum mismatch.
fn reseal(b: &mut [u8]) {
    if b.len() < 128 {
        return;
    }
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    for (off, len, crc) in [(40, 48, 56), (64, 72, 80)] {
        let (start, n) = (u64_at(b, off), u64_at(b, len));
        if let Some(end) = start.checked_add(n).filter(|&e| e <= b.len() as u64) {
            let sum = crc32fast::hash(&b[start as usize..end as usize]);
            b[crc..crc + 4].copy_from_slice(&sum.to_le_bytes());
        }
    }
    let sum = crc32fast::hash(&b[..124]);
    b[124..128].copy_from_slice(&sum.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut sealed = data.to_vec();
    reseal(&mut sealed);
    if sealed != data {
        check(&sealed);
    }
});

fn check(data: &[u8]) {
    let path = common::scratch_dir().join("input.plm");
    std::fs::write(&path, data).expect("write scratch file");
    let Ok(file) = PlmFile::open(&path) else {
        return;
    };
    let mut total = 0usize;
    for entry in file.tensors() {
        let view = file.view(entry);
        total += view.num_elements();
        let _ = view.as_f32();
        let _ = view.as_f16();
        let _ = view.as_bf16();
        let decoded = view.to_f32_vec();
        assert_eq!(decoded.len(), view.num_elements(), "{}", entry.name);
    }
    let _ = total;
    let _ = file.verify();
    let _ = file.tensor("token_embd.weight");
    let Ok(model) = Model::from_file(Arc::new(file)) else {
        return;
    };
    let vocab = model.config().vocab_size as u32;
    if let Ok(mut cache) = model.new_cache(4) {
        let _ = model.forward(&[0, vocab - 1], &mut cache, Logits::All);
        let _ = model.forward(&[vocab], &mut cache, Logits::Last);
    }
    if let Ok(ids) = model.tokenizer().encode_prompt("Once upon a time") {
        let _ = model.tokenizer().decode(&ids);
    }
}
