//! Post-training quantization end to end on stories260K: calibrated methods (GPTQ, AWQ)
//! produce valid files whose perplexity beats round-to-nearest at the same encoding, the
//! recipe records what was done, and bad options are rejected with a clear message.
//!
//! The calibration and evaluation texts in the fixture were sampled from the f32 model
//! (different prompts and seeds), so they are in the model's own domain.

use pocketlm_kernels::DecodeTensor;
use std::path::Path;

use pocketlm_convert::refusal::{Calibrated, Field, PrunedStorage};
use pocketlm_convert::{
    Calibration, Clipping, ConvertError, ConvertOptions, KeepRule, Method, PruneMethod, Pruning,
    Refusal, Sparsity, SparsitySchedule, convert_path,
};
use pocketlm_eval::PerplexityOptions;
use pocketlm_format::{Encoding, PlmFile};
use pocketlm_runtime::model::{Model, ModelOptions};

use crate::common;
use common::{calibration, convert, fixture, ppl};

fn options(weights: Encoding, method: Method) -> ConvertOptions {
    ConvertOptions {
        method,
        calibration: method.needs_calibration().then(calibration),
        // Keep the (tied) embedding exact so the comparison is about the block matrices.
        embedding: Some(Encoding::F32),
        // The methods themselves, not the grid search (compared separately).
        clipping: Some(Clipping::MinMax),
        ..ConvertOptions::with_weights(weights)
    }
}

/// The error converting the fixture with `options` gives (the conversion must fail).
fn refused(options: &ConvertOptions) -> ConvertError {
    let dir = tempfile::tempdir().unwrap();
    convert_path(
        &fixture("hf"),
        &dir.path().join("x.plm"),
        options,
        &mut |_, _, _| {},
    )
    .unwrap_err()
}

/// Its message.
fn refusal(options: &ConvertOptions) -> String {
    refused(options).to_string()
}

/// Whether `options` are refused for want of calibration text, by `by`.
fn needs_calibration(options: &ConvertOptions, by: Calibrated) -> bool {
    matches!(
        refused(options),
        ConvertError::Refused(Refusal::NeedsCalibration { by: b }) if b == by
    )
}

const Q4: Encoding = Encoding::Q4 {
    group: 32,
    asymmetric: false,
};

#[test]
fn calibrated_methods_beat_round_to_nearest() {
    let (_d0, base) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let (_d1, rtn) = convert(&options(Q4, Method::Rtn));
    let (_d2, gptq) = convert(&options(Q4, Method::Gptq));
    let (_d3, awq) = convert(&options(Q4, Method::Awq));
    let (_d4, both) = convert(&options(Q4, Method::AwqGptq));
    let (base, rtn, gptq, awq) = (ppl(&base), ppl(&rtn), ppl(&gptq), ppl(&awq));
    let both = ppl(&both);
    eprintln!("ppl: f32 {base:.4}, rtn {rtn:.4}, gptq {gptq:.4}, awq {awq:.4}, awq+gptq {both:.4}");
    assert!(
        rtn > base,
        "quantization costs something: rtn {rtn} vs f32 {base}"
    );
    assert!(gptq < rtn, "gptq {gptq} vs rtn {rtn}");
    assert!(awq < rtn, "awq {awq} vs rtn {rtn}");
    assert!(both < rtn, "awq+gptq {both} vs rtn {rtn}");
}

/// Issue #5: at 3 bits (group 64) the calibrated methods must beat round-to-nearest, with
/// and without the clipping search, and the clipping search must help RTN.
///
/// Measured on this fixture (f32 3.147): min/max RTN 5.10, GPTQ 4.11, AWQ 4.98; search RTN
/// 4.71, GPTQ 3.95, AWQ 4.57. GPTQ recovers about half of RTN's loss; AWQ gains less here
/// (hidden size 64 makes a g64 group a whole row, and `ffn_down` stays f16 because 172 is not
/// a multiple of 64), so its bound is a plain 1% of RTN's perplexity.
#[test]
fn calibrated_methods_beat_round_to_nearest_at_3_bits() {
    const Q3: Encoding = Encoding::Q3 { group: 64 };
    let (_d0, base) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let base = ppl(&base);
    let mut rtn_by_clipping = Vec::new();
    for clipping in [Clipping::MinMax, Clipping::Search] {
        let with = |method| {
            let mut o = options(Q3, method);
            o.clipping = Some(clipping);
            convert(&o)
        };
        let (_d1, rtn) = with(Method::Rtn);
        let (_d2, gptq) = with(Method::Gptq);
        let (_d3, awq) = with(Method::Awq);
        let file = PlmFile::open(&gptq).unwrap();
        assert_eq!(file.entry("blk.1.ffn_up.weight").unwrap().encoding, Q3);
        assert_eq!(file.metadata()["recipe"]["weights"], "q3/g64");
        drop(file);
        let (rtn, gptq, awq) = (ppl(&rtn), ppl(&gptq), ppl(&awq));
        eprintln!("q3/g64 {clipping:?}: f32 {base:.4}, rtn {rtn:.4}, gptq {gptq:.4}, awq {awq:.4}");
        assert!(rtn > base, "3 bits cost something: rtn {rtn} vs f32 {base}");
        // GPTQ: at least a fifth of RTN's perplexity increase recovered.
        let margin = 0.2 * (rtn - base);
        assert!(gptq < rtn - margin, "gptq {gptq} vs rtn {rtn} (f32 {base})");
        assert!(awq < 0.99 * rtn, "awq {awq} vs rtn {rtn} (f32 {base})");
        rtn_by_clipping.push(rtn);
    }
    assert!(
        rtn_by_clipping[1] < rtn_by_clipping[0],
        "clipping search {} vs min/max {}",
        rtn_by_clipping[1],
        rtn_by_clipping[0]
    );
}

#[test]
fn recipe_records_the_method_and_calibration() {
    let mut opts = options(Q4, Method::AwqGptq);
    opts.clipping = None; // calibrated methods default to the clipping search
    opts.keep = vec!["0=q8".parse().unwrap()];
    let (_d, path) = convert(&opts);
    let file = PlmFile::open(&path).unwrap();
    let recipe = &file.metadata()["recipe"];
    assert_eq!(recipe["method"], "awq+gptq");
    assert_eq!(recipe["clipping"], "search");
    assert_eq!(recipe["calibration"]["seq_len"], 128);
    assert!(recipe["calibration"]["sequences"].as_u64().unwrap() > 10);
    assert!(recipe["gptq"]["act_order"].as_bool().unwrap());
    assert_eq!(recipe["keep"][0], "0=q8/g32");
    let enc = |name: &str| file.entry(name).unwrap().encoding;
    assert_eq!(enc("blk.0.attn_q.weight"), Encoding::Q8 { group: 32 });
    assert_eq!(enc("blk.1.attn_q.weight"), Q4);
    // the file works
    assert!(ppl(&path).is_finite());
}

#[test]
fn bad_options_are_rejected_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.plm");
    let run = |o: &ConvertOptions| convert_path(&fixture("hf"), &out, o, &mut |_, _, _| {});

    let mut no_calib = options(Q4, Method::Gptq);
    no_calib.calibration = None;
    let err = run(&no_calib).unwrap_err();
    assert!(
        matches!(
            err,
            ConvertError::Refused(Refusal::NeedsCalibration {
                by: Calibrated::Method(Method::Gptq)
            })
        ),
        "{err}"
    );

    let float = options(Encoding::F16, Method::Awq);
    assert!(run(&float).unwrap_err().to_string().contains("quantized"));

    let mut short = options(Q4, Method::Gptq);
    short.calibration = Some(Calibration {
        text: "too short".into(),
        source: "tiny.txt".into(),
        samples: 4,
        seq_len: 128,
    });
    let err = run(&short).unwrap_err();
    assert!(matches!(err, ConvertError::Calibration(_)), "{err}");
    assert!(err.to_string().contains("tiny.txt"), "{err}");
    assert!(!out.exists(), "nothing left behind on failure");
}

#[test]
fn rtn_clipping_search_is_recorded_and_changes_the_weights() {
    let mut a = options(Q4, Method::Rtn);
    a.clipping = Some(Clipping::Search);
    let (_d1, clipped) = convert(&a);
    let mut b = options(Q4, Method::Rtn);
    b.clipping = None; // RTN defaults to min/max
    let (_d2, plain) = convert(&b);
    let (fc, fp) = (
        PlmFile::open(&clipped).unwrap(),
        PlmFile::open(&plain).unwrap(),
    );
    assert_eq!(fc.metadata()["recipe"]["clipping"], "search");
    assert_eq!(fp.metadata()["recipe"]["clipping"], "minmax");
    let name = "blk.2.ffn_up.weight";
    let (vc, vp) = (
        fc.view(fc.entry(name).unwrap()),
        fp.view(fp.entry(name).unwrap()),
    );
    assert_ne!(vc.bytes, vp.bytes);
}

#[test]
fn keep_rules_parse_and_match() {
    let rule: KeepRule = "blk.*.ffn_down.weight=q8/g64".parse().unwrap();
    assert_eq!(rule.encoding, Encoding::Q8 { group: 64 });
    assert!(rule.matches("blk.12.ffn_down.weight"));
    assert!(!rule.matches("blk.12.ffn_up.weight"));
    let range: KeepRule = "2-3=f16".parse().unwrap();
    assert!(range.matches("blk.2.attn_v.weight") && range.matches("blk.3.ffn_up.weight"));
    assert!(!range.matches("blk.4.attn_v.weight") && !range.matches("token_embd.weight"));
    let single: KeepRule = "1=q8".parse().unwrap();
    assert!(single.matches("blk.1.attn_q.weight") && !single.matches("blk.11.attn_q.weight"));
    let infix: KeepRule = "*attn_v*=q8".parse().unwrap();
    assert!(infix.matches("blk.0.attn_v.weight") && !infix.matches("blk.0.attn_q.weight"));
    assert!("noequals".parse::<KeepRule>().is_err());
    assert!("=q8".parse::<KeepRule>().is_err());
    assert!("0=q5".parse::<KeepRule>().is_err());
    assert_eq!("awq+gptq".parse::<Method>(), Ok(Method::AwqGptq));
    assert!("smoothquant".parse::<Method>().is_err());
}

#[test]
fn sensitivity_scan_ranks_every_block() {
    use pocketlm_convert::sensitivity::{SensitivityOptions, scan};
    let model = pocketlm_convert::import::open(&fixture("hf")).unwrap();
    let options = SensitivityOptions {
        encoding: Encoding::Q4 {
            group: 32,
            asymmetric: false,
        },
        base: Encoding::F32,
        text: std::fs::read_to_string(fixture("eval.txt")).unwrap(),
        perplexity: PerplexityOptions {
            context: 128,
            max_chunks: Some(8),
        },
    };
    let mut calls = 0;
    let report = scan(&model, &options, &mut |_, _| calls += 1).unwrap();
    assert_eq!(calls, model.config.num_layers + 1);
    assert_eq!(report.layers.len(), model.config.num_layers);
    let mut seen: Vec<usize> = report.layers.iter().map(|l| l.layer).collect();
    seen.sort();
    assert_eq!(seen, (0..model.config.num_layers).collect::<Vec<_>>());
    assert!(
        report
            .layers
            .windows(2)
            .all(|w| w[0].ppl_increase >= w[1].ppl_increase)
    );
    // Quantizing the most sensitive block alone must cost perplexity.
    assert!(report.layers[0].ppl > report.base_ppl);
}

/// The fraction of zeros among the f32 matrices whose names start with `prefix`.
fn zero_fraction(path: &Path, prefix: &str) -> f64 {
    let file = PlmFile::open(path).unwrap();
    let (mut zeros, mut total) = (0usize, 0usize);
    for t in file
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with(prefix) && t.shape.len() == 2)
    {
        let v = file.view(t);
        let values = v.as_f32().unwrap();
        zeros += values.iter().filter(|x| **x == 0.0).count();
        total += values.len();
    }
    zeros as f64 / total as f64
}

#[test]
fn calibrated_pruning_beats_magnitude_pruning() {
    let prune = |method, sparsity| {
        let mut o = options(Encoding::F32, Method::Rtn);
        o.calibration = Some(calibration());
        o.pruning = Some(Pruning { method, sparsity });
        convert(&o)
    };
    for sparsity in [Sparsity::Unstructured(0.5), Sparsity::NM { n: 2, m: 4 }] {
        let (_d1, magnitude) = prune(PruneMethod::Magnitude, sparsity);
        let (_d2, wanda) = prune(PruneMethod::Wanda, sparsity);
        let (_d3, sparsegpt) = prune(PruneMethod::SparseGpt, sparsity);
        for path in [&magnitude, &wanda, &sparsegpt] {
            let z = zero_fraction(path, "blk.");
            assert!(
                (0.5..0.51).contains(&z),
                "{sparsity:?}: {z} of the block weights are zero"
            );
        }
        let (m, w, s) = (ppl(&magnitude), ppl(&wanda), ppl(&sparsegpt));
        eprintln!("{sparsity:?}: magnitude {m:.3}, wanda {w:.3}, sparsegpt {s:.3}");
        assert!(w < m, "wanda {w} vs magnitude {m}");
        assert!(s < m, "sparsegpt {s} vs magnitude {m}");
        let recipe = PlmFile::open(&sparsegpt).unwrap().metadata()["recipe"]["prune"].clone();
        assert_eq!(recipe["method"], "sparsegpt");
        assert_eq!(recipe["achieved"], 0.5);
    }
}

/// Issue #6: OWL spreads unstructured sparsity over the blocks by their outlier ratios; the
/// recipe lists each block's sparsity, the file's blocks hold it, and the total is kept.
#[test]
fn owl_schedule_spreads_sparsity_over_blocks() {
    let mut o = options(Encoding::F32, Method::Rtn);
    o.calibration = Some(calibration());
    o.pruning = Some(Pruning {
        method: PruneMethod::Wanda,
        sparsity: Sparsity::Unstructured(0.5),
    });
    o.sparsity_schedule = SparsitySchedule::Owl {
        spread: 0.08,
        threshold: 5.0,
    };
    let (_d, path) = convert(&o);
    let file = PlmFile::open(&path).unwrap();
    let recipe = file.metadata()["recipe"]["prune"].clone();
    assert_eq!(recipe["schedule"], "owl:0.08:5");
    let numbers = |key: &str| -> Vec<f64> {
        recipe[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} in {recipe}"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let (sparsity, outliers) = (numbers("block_sparsity"), numbers("block_outlier_ratio"));
    assert_eq!(sparsity.len(), 5);
    let mean = sparsity.iter().sum::<f64>() / 5.0;
    assert!((mean - 0.5).abs() < 1e-4, "{sparsity:?}");
    let span =
        sparsity.iter().cloned().fold(0.0, f64::max) - sparsity.iter().cloned().fold(1.0, f64::min);
    assert!(
        (span - 0.16).abs() < 1e-4,
        "blocks span 2·spread: {sparsity:?}"
    );
    for a in 0..5 {
        for b in 0..5 {
            if outliers[a] > outliers[b] {
                assert!(sparsity[a] < sparsity[b], "{outliers:?} {sparsity:?}");
            }
        }
    }
    // Each block holds its own sparsity (rows round to whole weights).
    for (l, want) in sparsity.iter().enumerate() {
        let got = zero_fraction(&path, &format!("blk.{l}."));
        assert!(
            (got - want).abs() < 0.01,
            "blk.{l}: {got} zero, {want} asked"
        );
    }
    let achieved = recipe["achieved"].as_f64().unwrap();
    assert!((achieved - 0.5).abs() < 0.005, "{achieved}");
    let uniform = {
        let mut u = o.clone();
        u.sparsity_schedule = SparsitySchedule::Uniform;
        convert(&u)
    };
    eprintln!(
        "wanda 50%: uniform ppl {:.3}, owl {:.3}; block sparsity {sparsity:?}",
        ppl(&uniform.1),
        ppl(&path)
    );

    // Only unstructured pruning of every block can be scheduled.
    let mut nm = o.clone();
    nm.pruning = Some(Pruning {
        method: PruneMethod::Wanda,
        sparsity: Sparsity::NM { n: 2, m: 4 },
    });
    assert!(refusal(&nm).contains("2:4"), "{}", refusal(&nm));
    let mut unpruned = o.clone();
    unpruned.pruning = None;
    assert!(
        matches!(
            refused(&unpruned),
            ConvertError::Refused(Refusal::ScheduleWithoutPruning { .. })
        ),
        "{}",
        refusal(&unpruned)
    );
    let mut uncalibrated = o.clone();
    uncalibrated.calibration = None;
    uncalibrated.pruning = Some(Pruning {
        method: PruneMethod::Magnitude,
        sparsity: Sparsity::Unstructured(0.5),
    });
    assert!(
        needs_calibration(
            &uncalibrated,
            Calibrated::SparsitySchedule(uncalibrated.sparsity_schedule.describe())
        ),
        "{}",
        refusal(&uncalibrated)
    );
}

/// Issue #6: structured pruning of MLP channels narrows every block's MLP (a smaller dense
/// shape for every kernel) and composes with quantization.
#[test]
fn mlp_channel_pruning_narrows_the_model() {
    let (_d0, base) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let mut o = options(Encoding::F32, Method::Rtn);
    o.calibration = Some(calibration());
    o.mlp_channel_pruning = Some(0.25);
    let (_d1, path) = convert(&o);
    let file = PlmFile::open(&path).unwrap();
    let meta = file.metadata();
    // 172 channels less 25% is 129, rounded to whole groups of 32.
    assert_eq!(meta["config"]["intermediate_size"], 128);
    let recipe = &meta["recipe"]["prune_channels"];
    assert_eq!(recipe["intermediate_size_before"], 172);
    assert_eq!(recipe["intermediate_size_after"], 128);
    assert!(recipe["loss"].as_f64().unwrap() > 0.0, "{recipe}");
    assert_eq!(
        file.entry("blk.2.ffn_gate.weight").unwrap().shape,
        [128, 64]
    );
    assert_eq!(file.entry("blk.2.ffn_up.weight").unwrap().shape, [128, 64]);
    assert_eq!(
        file.entry("blk.2.ffn_down.weight").unwrap().shape,
        [64, 128]
    );

    // Measured: f32 3.147, 25% of the MLP channels 5.00 (the same number of weights removed
    // unstructured by magnitude: 3.59; whole channels cost more, and buy dense speed).
    // Choice and compensation are checked against plain removal in prune.rs's unit test.
    let (base_ppl, narrow_ppl) = (ppl(&base), ppl(&path));
    assert!(
        narrow_ppl > base_ppl && narrow_ppl < 2.0 * base_ppl,
        "{narrow_ppl} vs {base_ppl}"
    );

    // With GPTQ int4 the narrower matrices are quantized as usual.
    let mut q = options(Q4, Method::Gptq);
    q.mlp_channel_pruning = Some(0.25);
    let (_d3, quantized) = convert(&q);
    let file = PlmFile::open(&quantized).unwrap();
    let down = file.entry("blk.0.ffn_down.weight").unwrap();
    assert_eq!(
        (down.encoding, down.shape.as_slice()),
        (Q4, [64, 128].as_slice())
    );
    assert!(ppl(&quantized).is_finite());

    let mut uncalibrated = ConvertOptions::with_weights(Encoding::F32);
    uncalibrated.mlp_channel_pruning = Some(0.25);
    assert!(
        needs_calibration(&uncalibrated, Calibrated::MlpChannelPruning),
        "{}",
        refusal(&uncalibrated)
    );
}

/// Issue #6: structured pruning of attention heads removes whole key/value heads with their
/// query heads in every block (fewer heads for the runtime, a smaller KV cache) and composes
/// with MLP channel pruning.
#[test]
fn attention_head_pruning_removes_whole_heads() {
    let (_d0, base) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let mut o = options(Encoding::F32, Method::Rtn);
    o.calibration = Some(calibration());
    o.attention_head_pruning = Some(0.25);
    let (_d1, path) = convert(&o);
    let file = PlmFile::open(&path).unwrap();
    let meta = file.metadata();
    // stories260K: 8 query heads over 4 key/value heads of 8 dimensions; a quarter of the
    // key/value heads is one, with its two query heads.
    assert_eq!(meta["config"]["num_kv_heads"], 3);
    assert_eq!(meta["config"]["num_heads"], 6);
    let recipe = &meta["recipe"]["prune_heads"];
    assert_eq!(
        (
            recipe["kv_heads_before"].clone(),
            recipe["kv_heads_after"].clone()
        ),
        (4.into(), 3.into())
    );
    assert!(recipe["loss"].as_f64().unwrap() > 0.0, "{recipe}");
    let shape = |name: &str| file.entry(name).unwrap().shape.clone();
    assert_eq!(shape("blk.3.attn_q.weight"), [48, 64]);
    assert_eq!(shape("blk.3.attn_k.weight"), [24, 64]);
    assert_eq!(shape("blk.3.attn_v.weight"), [24, 64]);
    assert_eq!(shape("blk.3.attn_output.weight"), [64, 48]);

    // Measured: f32 3.147, a quarter of the heads 3.81. Choice and compensation are checked
    // against plain removal in prune.rs's unit test.
    let (base_ppl, pruned_ppl) = (ppl(&base), ppl(&path));
    assert!(
        pruned_ppl > base_ppl && pruned_ppl < 1.5 * base_ppl,
        "{pruned_ppl} vs {base_ppl}"
    );

    // With MLP channels too, both shrink.
    o.mlp_channel_pruning = Some(0.25);
    let (_d2, both) = convert(&o);
    let file = PlmFile::open(&both).unwrap();
    assert_eq!(file.metadata()["config"]["num_kv_heads"], 3);
    assert_eq!(file.metadata()["config"]["intermediate_size"], 128);
    assert!(ppl(&both).is_finite());

    let mut uncalibrated = ConvertOptions::with_weights(Encoding::F32);
    uncalibrated.attention_head_pruning = Some(0.25);
    assert!(
        needs_calibration(&uncalibrated, Calibrated::AttentionHeadPruning),
        "{}",
        refusal(&uncalibrated)
    );
}

#[test]
fn sparsegpt_with_quantized_weights_prunes_and_quantizes_in_one_pass() {
    let mut o = options(Q4, Method::Gptq);
    o.pruning = Some(Pruning {
        method: PruneMethod::SparseGpt,
        sparsity: Sparsity::NM { n: 2, m: 4 },
    });
    let (_d, path) = convert(&o);
    let file = PlmFile::open(&path).unwrap();
    let entry = file.entry("blk.1.ffn_up.weight").unwrap();
    // Stored as kept codes and a mask (q4+4:8).
    assert_eq!(entry.encoding, Encoding::Q4Sparse48 { group: 32 });
    let model = Model::open_with(&path, ModelOptions::default()).unwrap();
    drop(model);
    // Symmetric q4 holds zero exactly: every run of 4 keeps at most 2 non-zeros.
    let q = pocketlm_kernels::MatRef::from_view(&file.view(entry)).unwrap();
    let mut row = vec![0.0f32; entry.shape[1]];
    for r in 0..entry.shape[0] {
        q.row_to_f32(r, &mut row);
        for run in row.chunks(4) {
            assert!(run.iter().filter(|v| **v != 0.0).count() <= 2);
        }
    }
    assert!(ppl(&path).is_finite());

    let mut missing = options(Encoding::F16, Method::Rtn);
    missing.pruning = Some(Pruning {
        method: PruneMethod::Wanda,
        sparsity: Sparsity::Unstructured(0.5),
    });
    assert!(
        needs_calibration(&missing, Calibrated::Pruning(PruneMethod::Wanda)),
        "{}",
        refusal(&missing)
    );
}

#[test]
fn f16_matrices_pruned_2_4_are_stored_sparse_and_compute_the_same() {
    let prune = |sparse_storage| {
        let mut o = options(Encoding::F16, Method::Rtn);
        o.calibration = Some(calibration());
        o.pruning = Some(Pruning {
            method: PruneMethod::Wanda,
            sparsity: Sparsity::NM { n: 2, m: 4 },
        });
        o.sparse_storage = sparse_storage;
        convert(&o)
    };
    let (_d1, sparse) = prune(true);
    let (_d2, dense) = prune(false);
    let file = PlmFile::open(&sparse).unwrap();
    let sparse_entry = file.entry("blk.0.attn_q.weight").unwrap();
    assert_eq!(sparse_entry.encoding, Encoding::F16Sparse24);
    // stories260K's MLP width (172) is not a multiple of 8: `down` stays dense, and says why.
    assert_eq!(
        file.entry("blk.0.ffn_down.weight").unwrap().encoding,
        Encoding::F16
    );
    let recipe = file.metadata()["recipe"]["prune"].clone();
    assert_eq!(recipe["sparse_tensors"], 5 * 6);
    let reasons = recipe["dense_storage"].as_array().unwrap();
    assert_eq!(reasons.len(), 5);
    assert!(
        reasons[0]["reason"]
            .as_str()
            .unwrap()
            .contains("multiple of 8")
    );

    // The same values: the sparse file decodes to the dense file's matrices.
    let dense_file = PlmFile::open(&dense).unwrap();
    let dense_entry = dense_file.entry("blk.0.attn_q.weight").unwrap();
    assert_eq!(
        file.view(sparse_entry).to_f32_vec(),
        dense_file.view(dense_entry).to_f32_vec()
    );
    assert!(
        sparse_entry.length * 16 < dense_entry.length * 10,
        "9 of 16 bits"
    );
    let (s, d) = (ppl(&sparse), ppl(&dense));
    assert!((s - d).abs() < 1e-3 * d, "sparse {s} vs dense {d}");
}

/// q4 and q8 matrices pruned 2:4 or 4:8 are stored as kept codes and a mask (q4+4:8,
/// q8+4:8): the same values as dense storage, fewer bytes, the same perplexity.
#[test]
fn quantized_matrices_pruned_n_m_are_stored_sparse_and_compute_the_same() {
    let q4 = Encoding::Q4 {
        group: 32,
        asymmetric: false,
    };
    for (weights, (n, m), sparse_encoding, bits) in [
        (q4, (2, 4), Encoding::Q4Sparse48 { group: 32 }, (3.5, 4.5)),
        (q4, (4, 8), Encoding::Q4Sparse48 { group: 32 }, (3.5, 4.5)),
        (
            Encoding::Q8 { group: 32 },
            (2, 4),
            Encoding::Q8Sparse48 { group: 32 },
            (5.5, 8.5),
        ),
    ] {
        let prune = |sparse_storage| {
            let mut o = options(weights, Method::Gptq);
            o.calibration = Some(calibration());
            o.pruning = Some(Pruning {
                method: PruneMethod::SparseGpt,
                sparsity: Sparsity::NM { n, m },
            });
            o.sparse_storage = sparse_storage;
            convert(&o)
        };
        let (_d1, sparse) = prune(true);
        let (_d2, dense) = prune(false);
        let (file, dense_file) = (
            PlmFile::open(&sparse).unwrap(),
            PlmFile::open(&dense).unwrap(),
        );
        for name in ["blk.0.attn_q.weight", "blk.4.ffn_up.weight"] {
            let (s, d) = (file.entry(name).unwrap(), dense_file.entry(name).unwrap());
            assert_eq!(
                (s.encoding, d.encoding),
                (sparse_encoding, weights),
                "{name}"
            );
            assert_eq!(
                file.view(s).to_f32_vec(),
                dense_file.view(d).to_f32_vec(),
                "{name}: same values"
            );
            // Stored bytes per weight (tiles of 8 rows: ffn_up's 172 rows are padded to 176).
            let rows = s.shape[0].next_multiple_of(8) as f64;
            let per_weight = |len: u64| 8.0 * len as f64 / (rows * s.shape[1] as f64);
            assert!(
                (per_weight(s.length) - bits.0).abs() < 0.3,
                "{name}: {}",
                per_weight(s.length)
            );
            assert!(
                (per_weight(d.length) - bits.1).abs() < 0.3,
                "{name}: {}",
                per_weight(d.length)
            );
        }
        for entry in file.tensors() {
            let dense_entry = dense_file.entry(&entry.name).unwrap();
            assert_eq!(
                file.view(entry).to_f32_vec(),
                dense_file.view(dense_entry).to_f32_vec(),
                "{}: same values",
                entry.name
            );
        }
        // Equal weights; the kernels differ in the order of their float arithmetic (q4's zero
        // point comes back from the activations' block sums, which cancel most of a block's
        // sum), which moves this tiny model's perplexity by up to about 0.1%.
        let (s, d) = (ppl(&sparse), ppl(&dense));
        assert!(
            (s - d).abs() < 2e-3 * d,
            "{weights}: sparse {s} vs dense {d}"
        );
    }
    // Asking for the sparse storage directly is refused with the way to get it.
    // (The CLI's message names the flags: tests/cli.rs.)
    let err = refused(&options(Encoding::Q4Sparse48 { group: 32 }, Method::Rtn));
    assert!(
        matches!(
            err,
            ConvertError::Refused(Refusal::StorageEncoding {
                field: Field::Weights,
                base: Q4,
                pruned: PrunedStorage::NM,
                ..
            })
        ),
        "{err}"
    );
}

/// q4 and q8 matrices pruned without a pattern are stored as a bitmask and their kept codes
/// (q4+mask, q8+mask) when that saves enough bytes: the same values as dense storage, fewer
/// bytes, the same perplexity; at low sparsity they stay dense and the recipe says why.
#[test]
fn quantized_matrices_pruned_unstructured_are_stored_masked_and_compute_the_same() {
    let q4 = Encoding::Q4 {
        group: 32,
        asymmetric: false,
    };
    let convert_pruned = |weights, method, sparsity, sparse_storage| {
        let mut o = options(weights, Method::Gptq);
        o.calibration = Some(calibration());
        o.pruning = Some(Pruning {
            method,
            sparsity: Sparsity::Unstructured(sparsity),
        });
        o.sparse_storage = sparse_storage;
        convert(&o)
    };
    for (weights, method, sparsity) in [
        (q4, PruneMethod::Wanda, 0.6),
        (Encoding::Q8 { group: 32 }, PruneMethod::SparseGpt, 0.5),
    ] {
        let (_d1, sparse) = convert_pruned(weights, method, sparsity, true);
        let (_d2, dense) = convert_pruned(weights, method, sparsity, false);
        let (file, dense_file) = (
            PlmFile::open(&sparse).unwrap(),
            PlmFile::open(&dense).unwrap(),
        );
        for name in ["blk.0.attn_q.weight", "blk.4.ffn_up.weight"] {
            let (s, d) = (file.entry(name).unwrap(), dense_file.entry(name).unwrap());
            assert!(s.encoding.is_masked(), "{name}: {}", s.encoding);
            assert_eq!(s.encoding.quant_base(), weights, "{name}");
            assert_eq!(d.encoding, weights, "{name}");
            assert_eq!(
                file.view(s).to_f32_vec(),
                dense_file.view(d).to_f32_vec(),
                "{name}: same values"
            );
            // Kept codes, a bit of mask per weight and the scales: well under dense.
            let limit = pocketlm_convert::MASKED_MAX_SHARE * d.length as f64;
            assert!(
                (s.length as f64) < limit,
                "{name}: {} vs {}",
                s.length,
                d.length
            );
        }
        // The same integer products; a prompt's masked q4 tiles are multiplied as expanded q8
        // tiles, which rounds the float sums in another order (on SIMD paths: ~0.1%).
        let (s, d) = (ppl(&sparse), ppl(&dense));
        assert!(
            (s - d).abs() < 3e-3 * d,
            "{weights}: sparse {s} vs dense {d}"
        );
    }
    // At 30% a q4 mask would save too little: dense, with the reason in the recipe.
    let (_d3, light) = convert_pruned(q4, PruneMethod::Wanda, 0.3, true);
    let file = PlmFile::open(&light).unwrap();
    assert_eq!(file.entry("blk.0.attn_q.weight").unwrap().encoding, q4);
    let recipe = file.metadata()["recipe"]["prune"].clone();
    let reasons = recipe["dense_storage"].as_array().unwrap();
    assert!(
        reasons
            .iter()
            .any(|r| r["reason"].as_str().unwrap().contains("of the dense bytes")),
        "{reasons:?}"
    );
}

/// The non-uniform grids: files load and run, store `q4nl`/`q3nl` codes, GPTQ beats
/// round-to-nearest on them, and the passes that need evenly spaced levels or a zero level
/// (recovery, pruning) refuse them.
#[test]
fn non_uniform_grids_convert_and_gptq_beats_round_to_nearest() {
    const Q4NL: Encoding = Encoding::Q4Grid { group: 32 };
    let (_d0, base) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let base = ppl(&base);
    // q3nl/g32: at g64 stories260K's ffn_down (172 wide) would stay f16.
    for grid in [Q4NL, Encoding::Q3Grid { group: 32 }] {
        let (_d1, rtn) = convert(&options(grid, Method::Rtn));
        let (_d2, gptq) = convert(&options(grid, Method::Gptq));
        let file = PlmFile::open(&gptq).unwrap();
        assert_eq!(file.entry("blk.1.ffn_up.weight").unwrap().encoding, grid);
        assert_eq!(file.metadata()["recipe"]["weights"], grid.describe());
        drop(file);
        let (rtn, gptq) = (ppl(&rtn), ppl(&gptq));
        eprintln!("ppl: f32 {base:.4}, {grid} rtn {rtn:.4}, gptq {gptq:.4}");
        assert!(rtn > base, "{grid}: rtn {rtn} vs f32 {base}");
        assert!(gptq < rtn, "{grid}: gptq {gptq} vs rtn {rtn}");
    }

    let mut pruned = options(Q4NL, Method::Rtn);
    pruned.pruning = Some(Pruning {
        method: PruneMethod::Magnitude,
        sparsity: Sparsity::Unstructured(0.5),
    });
    // Block-wise recovery rounds on evenly spaced levels (distilling the grids alone does not).
    let mut recovered = options(Q4NL, Method::Rtn);
    recovered.calibration = Some(calibration());
    recovered.recover = Some(pocketlm_convert::Recovery::default());
    // A keep rule's grid counts too.
    let mut kept = options(Q4, Method::Rtn);
    kept.keep = vec![KeepRule {
        pattern: "*ffn_down*".into(),
        encoding: Q4NL,
    }];
    kept.pruning = pruned.pruning;
    for (o, field) in [
        (pruned, Field::Pruning),
        (recovered, Field::Recover),
        (kept, Field::Pruning),
    ] {
        match refused(&o) {
            ConvertError::Refused(Refusal::NonUniformGrid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other}"),
        }
    }
}
