//! The evaluation suite on the stories260K fixture: KL divergence against a base, zero-shot
//! scoring checked against a direct forward pass, and the model report (the CLI's `--json` is
//! tested in `crates/pocketlm-cli/tests/cli.rs`).

use std::path::{Path, PathBuf};

use pocketlm_convert::{ConvertOptions, convert_path};
use pocketlm_eval::report::{ReportOptions, build_report, summarize};
use pocketlm_eval::zeroshot::{self, Task};
use pocketlm_eval::{EvalError, PerplexityOptions, kl_divergence, perplexity};
use pocketlm_format::config::names;
use pocketlm_format::{Encoding, PlmFile, PlmWriter};
use pocketlm_runtime::Model;
use pocketlm_runtime::model::Logits;
use serde_json::Value;

use crate::common;
use common::{STORY, ZEROSHOT_ARC, fixture};

const CTX: usize = 64;

fn convert(dir: &Path, weights: Encoding) -> PathBuf {
    let out = dir.join(format!("stories-{}.plm", weights.name()));
    convert_path(
        &fixture("hf"),
        &out,
        &ConvertOptions::with_weights(weights),
        &mut |_, _, _| {},
    )
    .unwrap();
    out
}

fn options(chunks: Option<usize>) -> PerplexityOptions {
    PerplexityOptions {
        context: CTX,
        max_chunks: chunks,
    }
}

/// Copies `src` to `dst` tensor by tensor, letting `edit` change the metadata and
/// `truncate_embd` cut the (f32) embedding to its first rows.
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut Value), truncate_embd: Option<usize>) {
    let file = PlmFile::open(src).unwrap();
    let mut w = PlmWriter::create(dst).unwrap();
    for entry in file.tensors() {
        let view = file.view(entry);
        match truncate_embd {
            Some(rows) if entry.name == names::TOKEN_EMBD => {
                assert_eq!(entry.encoding, Encoding::F32);
                let cols = entry.shape[1];
                w.add_tensor(
                    &entry.name,
                    &[rows, cols],
                    entry.encoding,
                    &view.bytes[..rows * cols * 4],
                )
                .unwrap();
            }
            _ => w
                .add_tensor(&entry.name, &entry.shape, entry.encoding, view.bytes)
                .unwrap(),
        }
    }
    let mut meta = file.metadata().clone();
    edit(&mut meta);
    w.finish(&meta).unwrap();
}

#[test]
fn kld_of_a_model_against_itself_is_zero() {
    let dir = tempfile::tempdir().unwrap();
    let f32_path = convert(dir.path(), Encoding::F32);
    let model = Model::open(&f32_path).unwrap();
    let base = Model::open(&f32_path).unwrap();
    let mut calls = 0;
    let r = kl_divergence(&model, &base, STORY, &options(None), |done, total, kld| {
        calls += 1;
        assert_eq!(done, calls);
        assert!(done <= total && kld.is_finite());
    })
    .unwrap();
    assert!(r.chunks >= 4, "{} chunks: the story is too short", r.chunks);
    assert_eq!(calls, r.chunks);
    assert_eq!(r.tokens_scored, r.chunks * (CTX - 1 - CTX / 2));
    assert!(r.kld.abs() < 1e-9 && r.kld_max < 1e-9, "{r:?}");
    assert_eq!(r.top1_agreement, 1.0);
    assert_eq!(r.ppl, r.ppl_base);
    assert_eq!(r.ppl_ratio, 1.0);
    // The model's perplexity is the one `eval ppl` reports over the same chunks.
    let p = perplexity(&model, STORY, &options(None), |_, _, _| {}).unwrap();
    assert!(
        (p.ppl - r.ppl).abs() < 1e-9 * p.ppl,
        "{} vs {}",
        p.ppl,
        r.ppl
    );
    assert!(r.ppl > 1.0 && r.ppl < 100.0, "story ppl {}", r.ppl);
    // --chunks limits the work.
    let r2 = kl_divergence(&model, &base, STORY, &options(Some(2)), |_, _, _| {}).unwrap();
    assert_eq!(r2.chunks, 2);
}

#[test]
fn kld_grows_as_weights_lose_precision() {
    let dir = tempfile::tempdir().unwrap();
    let base = Model::open(&convert(dir.path(), Encoding::F32)).unwrap();
    let kld = |e: Encoding| {
        let model = Model::open(&convert(dir.path(), e)).unwrap();
        kl_divergence(&model, &base, STORY, &options(None), |_, _, _| {}).unwrap()
    };
    let f16 = kld(Encoding::F16);
    let q8 = kld(Encoding::Q8 { group: 32 });
    let q4 = kld(Encoding::Q4 {
        group: 32,
        asymmetric: false,
    });
    assert!(f16.kld > 0.0 && f16.kld < q8.kld, "f16 {f16:?}\nq8 {q8:?}");
    assert!(q8.kld > 0.0 && q8.kld < q4.kld, "q8 {q8:?}\nq4 {q4:?}");
    assert!(q4.kld_max >= q4.kld_p99 && q4.kld_p99 >= q4.kld_median);
    assert!(q4.kld_stderr > 0.0 && q4.kld_stderr < q4.kld);
    assert!(
        q8.top1_agreement > 0.8 && q8.top1_agreement <= 1.0,
        "{q8:?}"
    );
    assert!(q4.top1_agreement < 1.0, "{q4:?}");
    assert_eq!(q4.tokens_scored, q8.tokens_scored);
    assert_eq!(q4.ppl_base, q8.ppl_base);
    assert!((q4.ppl_ratio - q4.ppl / q4.ppl_base).abs() < 1e-12);
    assert!((q4.ln_ppl_ratio - q4.ppl_ratio.ln()).abs() < 1e-9);
}

#[test]
fn kld_rejects_models_that_cannot_be_compared() {
    let dir = tempfile::tempdir().unwrap();
    let f32_path = convert(dir.path(), Encoding::F32);
    let base = Model::open(&f32_path).unwrap();

    // Another vocabulary size (the embedding cut to 500 rows).
    let small = dir.path().join("vocab500.plm");
    rewrite(
        &f32_path,
        &small,
        |m| m["config"]["vocab_size"] = 500.into(),
        Some(500),
    );
    let model = Model::open(&small).unwrap();
    let err = kl_divergence(&model, &base, STORY, &options(None), |_, _, _| {}).unwrap_err();
    assert!(matches!(err, EvalError::Incompatible(_)), "{err}");
    assert!(
        err.to_string()
            .contains("vocabulary sizes differ: model 500, base 512"),
        "{err}"
    );

    // Same vocabulary, but a tokenizer spec that gives other token ids (no BOS).
    let no_bos = dir.path().join("nobos.plm");
    rewrite(
        &f32_path,
        &no_bos,
        |m| m["tokenizer"]["add_bos"] = false.into(),
        None,
    );
    let model = Model::open(&no_bos).unwrap();
    let err = kl_divergence(&model, &base, STORY, &options(None), |_, _, _| {}).unwrap_err();
    assert!(err.to_string().contains("the tokenizers differ"), "{err}");

    // Too short a text for one chunk.
    let err = kl_divergence(
        &base,
        &base,
        "Once upon a time",
        &options(None),
        |_, _, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, EvalError::TextTooShort { .. }), "{err}");
}

const ZEROSHOT_PIQA: &str = r#"{"goal": "To get the ball out of the pond", "sol1": "use a long stick.", "sol2": "eat a cookie.", "label": 0}
{"goal": "Make the dog happy", "sol1": "give it bread", "sol2": "shout", "label": "1"}
"#;

/// `Σ log p(continuation | context)` computed directly: tokenize as lm-eval (context alone,
/// then context + continuation whole), one forward pass over context + continuation.
fn direct_loglik(model: &Model, context: &str, continuation: &str) -> f64 {
    let tok = model.tokenizer();
    let add_bos = model.tokenizer_spec().add_bos;
    let ctx = tok.encode(context, add_bos).unwrap();
    let whole = tok
        .encode(&format!("{context}{continuation}"), add_bos)
        .unwrap();
    let cont = &whole[ctx.len()..];
    assert!(!cont.is_empty());
    let mut input = ctx.clone();
    input.extend_from_slice(&cont[..cont.len() - 1]);
    let mut cache = model.new_cache(input.len()).unwrap();
    let logits = model.forward(&input, &mut cache, Logits::All).unwrap();
    let vocab = model.config().vocab_size;
    cont.iter()
        .enumerate()
        .map(|(j, &t)| {
            let row = &logits[(ctx.len() - 1 + j) * vocab..(ctx.len() + j) * vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            row[t as usize] as f64 - lse
        })
        .sum()
}

fn first_argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

#[test]
fn zeroshot_scores_match_a_direct_forward_pass() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::open(&convert(dir.path(), Encoding::F32)).unwrap();
    for (task, data, golds) in [
        (Task::ArcEasy, ZEROSHOT_ARC, vec![0, 0, 1]),
        (Task::Piqa, ZEROSHOT_PIQA, vec![0, 1]),
    ] {
        let examples = zeroshot::parse_examples(task, data, "inline", None).unwrap();
        assert_eq!(examples.iter().map(|e| e.gold).collect::<Vec<_>>(), golds);
        let r = zeroshot::evaluate(&model, task, &examples, |_, _, _| {}).unwrap();
        assert_eq!(r.examples, examples.len());
        let (mut correct, mut correct_norm) = (0, 0);
        for (ex, got) in examples.iter().zip(&r.details) {
            assert_eq!(ex.context, {
                let q = data.lines().nth(ex.line - 1).unwrap();
                let v: Value = serde_json::from_str(q).unwrap();
                let question = v.get("question").or(v.get("goal")).unwrap();
                format!("Question: {}\nAnswer:", question.as_str().unwrap())
            });
            let expected: Vec<f64> = ex
                .choices
                .iter()
                .map(|c| direct_loglik(&model, &ex.context, &format!(" {c}")))
                .collect();
            for (g, e) in got.logliks.iter().zip(&expected) {
                assert!(
                    (g - e).abs() < 1e-3,
                    "line {}: loglik {g} vs direct {e}",
                    ex.line
                );
                assert!(*e < 0.0);
            }
            let pred = first_argmax(&expected);
            let normed: Vec<f64> = expected
                .iter()
                .zip(&ex.choices)
                .map(|(ll, c)| ll / c.len() as f64)
                .collect();
            let pred_norm = first_argmax(&normed);
            assert_eq!((got.pred, got.pred_norm), (pred, pred_norm));
            correct += usize::from(pred == ex.gold);
            correct_norm += usize::from(pred_norm == ex.gold);
        }
        let n = examples.len() as f64;
        assert_eq!(r.correct, correct);
        assert_eq!(r.correct_norm, correct_norm);
        assert_eq!(r.accuracy, correct as f64 / n);
        assert_eq!(r.accuracy_norm, correct_norm as f64 / n);
        let p = r.accuracy;
        assert!((r.accuracy_stderr - (p * (1.0 - p) / (n - 1.0)).sqrt()).abs() < 1e-12);
    }
}

#[test]
fn zeroshot_names_the_malformed_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("arc.jsonl");
    let mut data = ZEROSHOT_ARC.to_string();
    data.push_str(r#"{"question": "No key?", "choices": {"text": ["a"], "label": ["A"]}}"#);
    std::fs::write(&path, &data).unwrap();
    let err = zeroshot::load_examples(Task::ArcChallenge, &path, None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EvalError::Data { line: 5, .. }), "{msg}");
    assert!(
        msg.contains("arc.jsonl:5:") && msg.contains("missing field 'answerKey'"),
        "{msg}"
    );
    std::fs::write(&path, "{\"question\": \"unterminated\n").unwrap();
    let err = zeroshot::load_examples(Task::ArcEasy, &path, None).unwrap_err();
    assert!(
        err.to_string().contains("arc.jsonl:1: not a JSON object"),
        "{err}"
    );
    let err =
        zeroshot::load_examples(Task::Piqa, &dir.path().join("nope.jsonl"), None).unwrap_err();
    assert!(err.to_string().contains("nope.jsonl"), "{err}");
}

#[test]
fn report_counts_parameters_bits_and_quality() {
    let dir = tempfile::tempdir().unwrap();
    let f32_path = convert(dir.path(), Encoding::F32);
    let q8_path = convert(dir.path(), Encoding::Q8 { group: 32 });
    let f32_model = Model::open(&f32_path).unwrap();
    let q8 = Model::open(&q8_path).unwrap();

    let s = summarize(&f32_model, 512);
    assert_eq!(s.parameters, f32_model.config().parameter_count());
    assert_eq!(s.bits_per_weight, 32.0);
    assert_eq!(s.matrix_bits_per_weight, 32.0);
    assert_eq!(s.compression_vs_f16, 0.5);
    assert_eq!(s.file_bytes, std::fs::metadata(&f32_path).unwrap().len());
    let c = f32_model.config();
    let (d, l) = (c.hidden_size as u64, c.num_layers as u64);
    assert_eq!(
        s.matrix_parameters,
        l * (2 * d * c.q_dim() as u64
            + 2 * d * c.kv_dim() as u64
            + 3 * d * c.intermediate_size as u64)
    );
    // 2 × MACs of every matrix incl. the (tied) output layer, + 4·(ctx/2)·q per layer.
    let macs = s.matrix_parameters + c.vocab_size as u64 * d;
    assert_eq!(s.flops_per_token, 2 * macs + l * 4 * 256 * c.q_dim() as u64);
    assert_eq!(s.recipe.as_ref().unwrap()["weights"], "f32");

    let s8 = summarize(&q8, 512);
    assert_eq!(s8.parameters, s.parameters);
    // ffn_down rows (172) are no multiple of 32: kept in f16, the other matrices are q8.
    let file = q8.file();
    let (mut bits, mut n) = (0.0, 0.0);
    for t in file.tensors() {
        if t.name.starts_with("blk.") && t.shape.len() == 2 {
            let e = (t.shape[0] * t.shape[1]) as f64;
            let expected = if t.name.ends_with("ffn_down.weight") {
                Encoding::F16
            } else {
                Encoding::Q8 { group: 32 }
            };
            assert_eq!(t.encoding, expected, "{}", t.name);
            // Stored bytes: q8 pads gate/up (172 rows) to whole tiles of 8 rows.
            bits += 8.0 * t.encoding.byte_len(&t.shape).unwrap() as f64;
            n += e;
        }
    }
    assert!((s8.matrix_bits_per_weight - bits / n).abs() < 1e-9);
    assert!(
        s8.bits_per_weight > 8.5 && s8.bits_per_weight < 16.0,
        "{s8:?}"
    );

    let options = ReportOptions {
        perplexity: options(Some(3)),
        bench: None,
    };
    let r = build_report(&q8, Some(&f32_model), Some(STORY), &options, |_, _, _| {}).unwrap();
    let k = r.kl_divergence.as_ref().unwrap();
    assert_eq!(r.kld, Some(k.kld));
    assert!(k.kld > 0.0 && k.chunks == 3);
    let base = r.base.as_ref().unwrap();
    let size = |p: &Path| std::fs::metadata(p).unwrap().len() as f64;
    assert_eq!(base.compression_vs_base, size(&f32_path) / size(&q8_path));
    assert!(base.compression_vs_base > 2.5, "{base:?}");
    let json = serde_json::to_value(&r).unwrap();
    for key in [
        "ppl",
        "ppl_base",
        "kld",
        "top1_agreement",
        "parameters",
        "bits_per_weight",
    ] {
        assert!(json[key].is_number(), "{key} in {json}");
    }
    let table = r.render_table();
    assert!(
        table.contains("KL divergence") && table.contains("top-1 agreement"),
        "{table}"
    );

    // Without a base: perplexity only.
    let r = build_report(&q8, None, Some(STORY), &options, |_, _, _| {}).unwrap();
    assert!(r.kld.is_none() && r.ppl.is_some() && r.perplexity.is_some());
}
