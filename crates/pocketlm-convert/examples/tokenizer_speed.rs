//! Load, encode and decode speed of the runtime's tokenizer beside Hugging Face `tokenizers`
//! on the same tokenizer.json and text (BENCHMARKS.md, "Tokenizer").
//!
//! cargo run --release -p pocketlm-convert --example tokenizer_speed -- MODEL.gguf TEXT_FILE

use std::str::FromStr;
use std::time::Instant;

use pocketlm_convert::import::gguf::GgufFile;
use pocketlm_convert::import::gguf_tokenizer::tokenizer_json;
use pocketlm_runtime::tokenizer::TextTokenizer;

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..runs {
        let start = Instant::now();
        let value = f();
        best = best.min(start.elapsed().as_secs_f64());
        out = Some(value);
    }
    (best, out.expect("at least one run"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, text] = args.as_slice() else {
        eprintln!("usage: tokenizer_speed MODEL.gguf TEXT_FILE");
        std::process::exit(2);
    };
    let gguf = GgufFile::open(std::path::Path::new(model)).expect("GGUF");
    let json = tokenizer_json(&gguf).expect("tokenizer");
    let text = std::fs::read_to_string(text).expect("text file");
    let mb = text.len() as f64 / 1e6;

    let (load_ours, ours) = best_of(3, || TextTokenizer::from_json(&json).unwrap());
    let (load_hf, hf) = best_of(3, || tokenizers::Tokenizer::from_str(&json).unwrap());
    // Fresh tokenizers each run would measure cold caches; both keep their word caches, as in
    // a running app.
    let (enc_ours, ids) = best_of(3, || ours.encode(&text).unwrap());
    let (enc_hf, encoding) = best_of(3, || hf.encode(text.as_str(), false).unwrap());
    assert_eq!(ids, encoding.get_ids(), "the two tokenizers disagree");
    let (dec_ours, decoded) = best_of(3, || ours.decode(&ids, false));
    let (dec_hf, reference) = best_of(3, || hf.decode(&ids, false).unwrap());
    assert_eq!(decoded, reference);

    println!("text: {:.2} MB, {} tokens", mb, ids.len());
    println!("| step | pocketlm | tokenizers 0.22 |");
    println!("|---|---:|---:|");
    println!(
        "| load tokenizer.json | {:.1} ms | {:.1} ms |",
        load_ours * 1e3,
        load_hf * 1e3
    );
    println!(
        "| encode | {:.1} MB/s | {:.1} MB/s |",
        mb / enc_ours,
        mb / enc_hf
    );
    println!(
        "| decode | {:.1} MB/s | {:.1} MB/s |",
        mb / dec_ours,
        mb / dec_hf
    );
}
