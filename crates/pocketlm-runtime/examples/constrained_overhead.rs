//! Per-token cost of constrained decoding next to the decode step it rides on.
//!
//! ```text
//! RAYON_NUM_THREADS=1 cargo run --release -p pocketlm-runtime --example constrained_overhead -- MODEL.plm [TOKENS]
//! ```
//!
//! Greedy decoding of a JSON object under a schema (after a chat prompt asking for it):
//! times `Model::forward` for each generated token, and separately
//! `Constraint::mask_logits` + `Constraint::commit`; prints both means and the ratio. Also
//! prints the one-off costs: building the vocabulary trie (per model) and compiling the
//! schema (per generation).

use std::time::{Duration, Instant};

use pocketlm_runtime::Model;
use pocketlm_runtime::constrain::{Constraint, ConstraintVocabulary, OutputConstraint};
use pocketlm_runtime::model::Logits;
use pocketlm_runtime::tokenizer::ChatMessage;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: constrained_overhead MODEL.plm [TOKENS]")?;
    let max_tokens: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(128);
    let model = Model::open(std::path::Path::new(&path))?;
    let tokenizer = model.tokenizer();

    let start = Instant::now();
    let vocabulary = ConstraintVocabulary::new(tokenizer)?;
    let trie_time = start.elapsed();

    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "city": {"type": "string"},
            "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            "pet": {"$ref": "#/$defs/pet"}
        },
        "required": ["name", "age", "city", "hobbies", "pet"],
        "additionalProperties": false,
        "$defs": {"pet": {
            "type": "object",
            "properties": {"kind": {"enum": ["cat", "dog", "fish"]}, "name": {"type": "string"}},
            "required": ["kind", "name"], "additionalProperties": false
        }}
    });
    let start = Instant::now();
    let mut constraint = Constraint::new(&vocabulary, &OutputConstraint::JsonSchema(schema))?;
    let compile_time = start.elapsed();

    let prompt = tokenizer.apply_chat_template(
        &[ChatMessage::new(
            "user",
            "Describe a fictional person as JSON with name, age, city, hobbies and pet.",
        )],
        true,
    )?;
    let prompt_ids = tokenizer.encode_prompt(&prompt)?;
    let mut cache = model.new_cache(prompt_ids.len() + max_tokens + 1)?;
    let mut logits = model.forward(&prompt_ids, &mut cache, Logits::Last)?;

    let (mut decode, mut constrain) = (Duration::ZERO, Duration::ZERO);
    let mut generated = Vec::new();
    for _ in 0..max_tokens {
        let start = Instant::now();
        constraint.mask_logits(&mut logits)?;
        let token = pocketlm_runtime::sampler::argmax(&logits) as u32;
        constraint.commit(token)?;
        constrain += start.elapsed();
        if tokenizer.is_eos(token) {
            break;
        }
        generated.push(token);
        if constraint.is_finished() {
            break;
        }
        let start = Instant::now();
        logits = model.forward(&[token], &mut cache, Logits::Last)?;
        decode += start.elapsed();
    }
    let n = generated.len().max(1) as f64;
    let text = tokenizer.decode(&generated)?;
    println!(
        "output ({} tokens, complete: {}): {text}",
        generated.len(),
        constraint.can_stop()
    );
    println!(
        "vocabulary trie: {:.1} ms once per model ({} tokens); schema compile: {:.2} ms per generation",
        trie_time.as_secs_f64() * 1e3,
        vocabulary.tokenizer_vocab_size(),
        compile_time.as_secs_f64() * 1e3
    );
    let decode_ms = decode.as_secs_f64() * 1e3 / n;
    let constrain_ms = constrain.as_secs_f64() * 1e3 / n;
    println!(
        "per token: decode {decode_ms:.3} ms, mask+commit {constrain_ms:.3} ms ({:.1}% of decode)",
        100.0 * constrain_ms / decode_ms
    );
    Ok(())
}
