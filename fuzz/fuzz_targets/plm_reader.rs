//! Arbitrary bytes as a .plm file: open (header, metadata, table validation), view and decode
//! every tensor, verify checksums, load it as a Model and run one tiny forward pass.
#![no_main]

use pocketlm_kernels::DecodeTensor;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use pocketlm_format::PlmFile;
use pocketlm_runtime::Model;
use pocketlm_runtime::model::Logits;

mod common;

fuzz_target!(init: common::report_stack_overflows(), |data: &[u8]| {
    check(data);
    let mut sealed = data.to_vec();
    common::reseal(&mut sealed);
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
