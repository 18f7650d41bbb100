//! Low-rank factorization end to end on stories260K: activation-aware methods lose far less
//! perplexity than plain SVD at the same parameter budget, files store rank-ordered factors
//! that load and run, the recipe says what was done, low rank composes with quantization, and
//! a file whose factors do not fit together is rejected with a clear message.

use std::path::Path;

use pocketlm_convert::lowrank::LowRankOptionError;
use pocketlm_convert::refusal::Calibrated;
use pocketlm_convert::{
    ConvertError, ConvertOptions, LowRank, LowRankMethod, Method, RankAllocation, RankTarget,
    Refusal, convert_path,
};
use pocketlm_format::{Encoding, PlmFile};
use pocketlm_runtime::model::{Model, ModelOptions};

use crate::common;
use common::{calibration, convert, fixture, ppl};

fn lowrank_options(weights: Encoding, method: LowRankMethod, ratio: f64) -> ConvertOptions {
    ConvertOptions {
        calibration: Some(calibration()),
        lowrank: Some(LowRank {
            method,
            target: RankTarget::Ratio(ratio),
            allocation: RankAllocation::Uniform,
        }),
        embedding: Some(Encoding::F32),
        ..ConvertOptions::with_weights(weights)
    }
}

/// Plain SVD at rank 32 with f32 factors: factor prefixes are exactly lower-rank SVDs.
fn svd_rank_32_f32() -> ConvertOptions {
    ConvertOptions {
        lowrank: Some(LowRank {
            method: LowRankMethod::Svd,
            target: RankTarget::Rank(32),
            allocation: RankAllocation::Uniform,
        }),
        ..ConvertOptions::with_weights(Encoding::F32)
    }
}

fn recipe(path: &Path) -> serde_json::Value {
    PlmFile::open(path).unwrap().metadata()["recipe"].clone()
}

#[test]
fn the_recipe_reads_back_typed_as_written() {
    let (_d, path) = convert(&svd_rank_32_f32());
    let typed = PlmFile::open(&path)
        .unwrap()
        .recipe()
        .expect("a typed recipe");
    assert_eq!(serde_json::to_value(&typed).unwrap(), recipe(&path));
    let lowrank = typed.lowrank.expect("a low-rank entry");
    assert_eq!(lowrank.method, LowRankMethod::Svd.name());
    assert!(!lowrank.ranks.is_empty());
    assert!(
        lowrank.ranks.values().all(|&r| (1..=32).contains(&r)),
        "{:?}",
        lowrank.ranks
    );
    assert!(typed.prune.is_none() && typed.recover.is_none());
}

#[test]
fn activation_aware_factorization_loses_far_less_than_plain_svd() {
    let (_d0, base) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let base = ppl(&base);
    let mut results = Vec::new();
    for method in [
        LowRankMethod::Svd,
        LowRankMethod::Asvd,
        LowRankMethod::SvdLlm,
    ] {
        let (_d, path) = convert(&lowrank_options(Encoding::F32, method, 0.2));
        let r = recipe(&path)["lowrank"].clone();
        let (before, after) = (
            r["weights_before"].as_f64().unwrap(),
            r["weights_after"].as_f64().unwrap(),
        );
        assert!(before > 0.0 && after <= 0.8 * before, "{method:?}: {r}");
        results.push((method, ppl(&path)));
    }
    eprintln!("ppl: base {base:.3}, {results:?}");
    let increase = |i: usize| results[i].1 - base;
    assert!(increase(0) > 0.0, "factorizing costs something");
    assert!(increase(1) < increase(0), "asvd beats svd: {results:?}");
    assert!(
        increase(2) < 0.5 * increase(0),
        "svdllm's increase is a fraction of svd's: {results:?}"
    );
}

#[test]
fn factors_are_stored_rank_ordered_and_the_model_runs() {
    // Plain SVD: each component's ‖U column‖·‖V row‖ is its singular value.
    let (_d, path) = convert(&lowrank_options(Encoding::F16, LowRankMethod::Svd, 0.3));
    let file = PlmFile::open(&path).unwrap();
    let ranks = recipe(&path)["lowrank"]["ranks"].clone();
    let ranks = ranks.as_object().unwrap();
    assert!(!ranks.is_empty());
    for (name, rank) in ranks {
        let rank = rank.as_u64().unwrap() as usize;
        assert!(file.entry(name).is_none(), "{name} replaced by its factors");
        let v = file.entry(&format!("{name}#v")).unwrap();
        let u = file.entry(&format!("{name}#u")).unwrap();
        assert_eq!((v.shape[0], u.shape[1]), (rank, rank));
        assert_eq!(v.encoding, Encoding::F16);
        // Rank-ordered: component k's singular value decreases with k.
        let v_rows = file.view(v).as_f16().unwrap();
        let u_cols = file.view(u).as_f16().unwrap();
        let norm = |k: usize| {
            let vn: f32 = (0..v.shape[1])
                .map(|j| v_rows[k * v.shape[1] + j].to_f32().powi(2))
                .sum();
            let un: f32 = (0..u.shape[0])
                .map(|i| u_cols[i * rank + k].to_f32().powi(2))
                .sum();
            vn.sqrt() * un.sqrt()
        };
        for k in 1..rank {
            assert!(norm(k) <= norm(k - 1) * 1.01, "{name}: component {k}");
        }
    }
    let model = Model::open(&path).unwrap();
    let mut cache = model.new_cache(16).unwrap();
    let logits = model
        .forward(
            &[1, 400, 42],
            &mut cache,
            pocketlm_runtime::model::Logits::Last,
        )
        .unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
    assert!(ppl(&path).is_finite());
}

#[test]
fn low_rank_composes_with_quantization() {
    let q8 = Encoding::Q8 { group: 32 };
    let dense = ConvertOptions {
        calibration: Some(calibration()),
        method: Method::Gptq,
        embedding: Some(Encoding::F32),
        ..ConvertOptions::with_weights(q8)
    };
    let (_d0, dense) = convert(&dense);
    let both = ConvertOptions {
        method: Method::Gptq,
        ..lowrank_options(q8, LowRankMethod::SvdLlm, 0.3)
    };
    let (_d1, both) = convert(&both);
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(
        size(&both) < size(&dense),
        "factors in q8 are smaller than dense q8"
    );
    let file = PlmFile::open(&both).unwrap();
    let factors: Vec<_> = file
        .tensors()
        .iter()
        .filter(|t| t.name.ends_with("#u") || t.name.ends_with("#v"))
        .collect();
    assert!(!factors.is_empty());
    for t in &factors {
        // stories260K's MLP width (172) is not a whole number of groups: f16 there.
        let want = if t.shape[1] % 32 == 0 {
            q8
        } else {
            Encoding::F16
        };
        assert_eq!(t.encoding, want, "{}", t.name);
        let rank = if t.name.ends_with("#v") {
            t.shape[0]
        } else {
            t.shape[1]
        };
        assert_eq!(rank % 32, 0, "{}: rank in whole groups", t.name);
    }
    let (dense_ppl, both_ppl) = (ppl(&dense), ppl(&both));
    eprintln!("ppl: q8 gptq {dense_ppl:.3}, svdllm 30% + q8 gptq {both_ppl:.3}");
    assert!(both_ppl.is_finite() && both_ppl > dense_ppl);
}

#[test]
fn bad_low_rank_options_are_rejected_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.plm");
    let run = |options: ConvertOptions| {
        convert_path(&fixture("hf"), &out, &options, &mut |_, _, _| {}).unwrap_err()
    };
    let mut needs_calib = lowrank_options(Encoding::F16, LowRankMethod::SvdLlm, 0.2);
    needs_calib.calibration = None;
    let err = run(needs_calib);
    assert!(
        matches!(
            &err,
            ConvertError::Refused(Refusal::NeedsCalibration {
                by: Calibrated::LowRank(LowRankMethod::SvdLlm)
            })
        ),
        "{err}"
    );
    let err = run(lowrank_options(Encoding::F16, LowRankMethod::Svd, 1.5));
    assert!(
        matches!(
            &err,
            ConvertError::Refused(Refusal::LowRankTarget(LowRankOptionError::Ratio { .. }))
        ) && err.to_string().contains("(0, 1)"),
        "{err}"
    );
}

#[test]
fn mismatched_factors_are_rejected_at_load() {
    let (dir, path) = convert(&lowrank_options(Encoding::F32, LowRankMethod::Svd, 0.3));
    let file = PlmFile::open(&path).unwrap();
    let meta = file.metadata().clone();
    // Rewrite the file with one U factor cut to a different rank than its V.
    let bad = dir.path().join("bad.plm");
    let mut writer = pocketlm_format::PlmWriter::create(&bad).unwrap();
    let mut cut = None;
    for t in file.tensors() {
        let values = file.view(t).as_f32().unwrap();
        if cut.is_none() && t.name.ends_with("#u") {
            let (rows, rank) = (t.shape[0], t.shape[1]);
            let narrower: Vec<f32> = (0..rows)
                .flat_map(|r| values[r * rank..r * rank + rank - 1].to_vec())
                .collect();
            writer
                .add_f32(&t.name, &[rows, rank - 1], &narrower, Encoding::F32)
                .unwrap();
            cut = Some(t.name.clone());
        } else {
            writer
                .add_f32(&t.name, &t.shape, values, Encoding::F32)
                .unwrap();
        }
    }
    writer.finish(&meta).unwrap();
    let cut = cut.expect("a factorized matrix");
    let err = Model::open(&bad).err().expect("rejected").to_string();
    assert!(err.contains(&cut) && err.contains("shape"), "{err}");
}

#[test]
fn low_rank_composes_with_pruning_of_the_factors() {
    use pocketlm_convert::{PruneMethod, Pruning, Sparsity};
    let options = ConvertOptions {
        pruning: Some(Pruning {
            method: PruneMethod::SparseGpt,
            sparsity: Sparsity::Unstructured(0.5),
        }),
        ..lowrank_options(Encoding::F32, LowRankMethod::SvdLlm, 0.2)
    };
    let (_d, path) = convert(&options);
    let file = PlmFile::open(&path).unwrap();
    let (mut zeros, mut total) = (0usize, 0usize);
    for t in file.tensors().iter().filter(|t| t.name.contains('#')) {
        let values = file.view(t).as_f32().unwrap();
        zeros += values.iter().filter(|v| **v == 0.0).count();
        total += values.len();
    }
    assert!(total > 0);
    let share = zeros as f64 / total as f64;
    assert!((0.45..=0.55).contains(&share), "factors {share:.3} zero");
    assert!(ppl(&path).is_finite());
}

#[test]
fn a_file_served_at_a_lower_rank_equals_one_with_the_factors_cut() {
    let options = svd_rank_32_f32();
    let (dir, path) = convert(&options);
    let file = PlmFile::open(&path).unwrap();
    // The same file with every factor cut to its first 16 components.
    let cut_path = dir.path().join("cut.plm");
    let mut writer = pocketlm_format::PlmWriter::create(&cut_path).unwrap();
    let mut factorized = 0;
    for t in file.tensors() {
        let values = file.view(t).as_f32().unwrap();
        if t.name.ends_with("#v") {
            writer
                .add_f32(
                    &t.name,
                    &[16, t.shape[1]],
                    &values[..16 * t.shape[1]],
                    Encoding::F32,
                )
                .unwrap();
            factorized += 1;
        } else if t.name.ends_with("#u") {
            let (rows, rank) = (t.shape[0], t.shape[1]);
            let cut: Vec<f32> = (0..rows)
                .flat_map(|r| values[r * rank..r * rank + 16].to_vec())
                .collect();
            writer
                .add_f32(&t.name, &[rows, 16], &cut, Encoding::F32)
                .unwrap();
        } else {
            writer
                .add_f32(&t.name, &t.shape, values, Encoding::F32)
                .unwrap();
        }
    }
    writer.finish(file.metadata()).unwrap();
    assert!(factorized > 0);

    let logits = |path: &Path, low_rank_percent| {
        let options = ModelOptions {
            low_rank_percent,
            ..ModelOptions::default()
        };
        let model = Model::open_with(path, options).unwrap();
        let mut cache = model.new_cache(16).unwrap();
        model
            .forward(
                &[1, 300, 7, 42],
                &mut cache,
                pocketlm_runtime::model::Logits::All,
            )
            .unwrap()
    };
    let full = logits(&path, 100);
    let served = logits(&path, 50);
    // The bandwidth figure of `bench` counts what is served: at full rank every stored byte
    // (f32 has no padding), at 50% half of each factor.
    let bytes = |percent| {
        let options = ModelOptions {
            low_rank_percent: percent,
            ..ModelOptions::default()
        };
        let model = Model::open_with(&path, options).unwrap();
        pocketlm_eval::bench::decode_bytes_per_token(&model)
    };
    let config = Model::open(&path).unwrap().config().clone();
    let stored: u64 = file
        .tensors()
        .iter()
        .map(|t| match t.name.as_str() {
            "token_embd.weight" => {
                t.length / config.vocab_size as u64
                    + if config.tie_word_embeddings {
                        t.length
                    } else {
                        0
                    }
            }
            _ => t.length,
        })
        .sum();
    let factor_bytes: u64 = file
        .tensors()
        .iter()
        .filter(|t| t.name.contains('#'))
        .map(|t| t.length)
        .sum();
    assert_eq!(bytes(100), stored);
    assert_eq!(bytes(50), stored - factor_bytes / 2);
    assert_ne!(full, served, "serving fewer components changes the output");
    assert_eq!(served, logits(&cut_path, 100));
}

/// Kept weights of each block's matrices (dense or factorized) and their original count.
fn block_weights_kept(path: &Path) -> Vec<(usize, usize)> {
    let file = PlmFile::open(path).unwrap();
    let layers = file.metadata()["config"]["num_layers"].as_u64().unwrap() as usize;
    let matrices = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    (0..layers)
        .map(|l| {
            let (mut kept, mut original) = (0, 0);
            for m in matrices {
                let name = format!("blk.{l}.{m}.weight");
                match file.entry(&name) {
                    Some(e) => {
                        kept += e.shape[0] * e.shape[1];
                        original += e.shape[0] * e.shape[1];
                    }
                    None => {
                        let v = file.entry(&format!("{name}#v")).unwrap();
                        let u = file.entry(&format!("{name}#u")).unwrap();
                        kept += v.shape[0] * v.shape[1] + u.shape[0] * u.shape[1];
                        original += u.shape[0] * v.shape[1];
                    }
                }
            }
            (kept, original)
        })
        .collect()
}

#[test]
fn global_allocation_shares_one_budget_across_blocks() {
    let ratio = 0.2;
    let keep = 1.0 - ratio;
    let mut options = lowrank_options(Encoding::F32, LowRankMethod::SvdLlm, ratio);
    options.lowrank.as_mut().unwrap().allocation = RankAllocation::Energy;
    let (_d0, per_block) = convert(&options);
    options.lowrank.as_mut().unwrap().allocation = RankAllocation::Global;
    let (_d1, global) = convert(&options);
    assert_eq!(recipe(&global)["lowrank"]["allocation"], "global");

    let blocks = block_weights_kept(&global);
    let (kept, original) = blocks
        .iter()
        .fold((0, 0), |(k, o), &(bk, bo)| (k + bk, o + bo));
    assert!(
        kept as f64 <= keep * original as f64,
        "the model's budget holds: {kept} of {original}"
    );
    assert!(
        kept as f64 >= (keep - 0.1) * original as f64,
        "and is spent: {kept} of {original}"
    );
    // One budget for the model: blocks keep different shares of their weights (with
    // per-block budgets every block keeps at most `keep`).
    let shares: Vec<f64> = blocks.iter().map(|&(k, o)| k as f64 / o as f64).collect();
    eprintln!("kept share per block: {shares:.3?}");
    assert!(
        shares.iter().any(|&s| s > keep),
        "some block keeps more than the uniform share: {shares:.3?}"
    );
    for (k, o) in block_weights_kept(&per_block) {
        assert!(
            k as f64 <= keep * o as f64,
            "per-block budgets hold: {k} of {o}"
        );
    }
    let (ppl_block, ppl_global) = (ppl(&per_block), ppl(&global));
    eprintln!("svdllm 20%: per-block energy ppl {ppl_block:.3}, global {ppl_global:.3}");
    // Measured 15.9 and 13.0: blocks that turn the residual stream more keep more rank.
    assert!(ppl_global < ppl_block, "{ppl_global} vs {ppl_block}");
}

#[test]
fn global_allocation_refuses_what_it_cannot_serve() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.plm");
    let mut options = lowrank_options(Encoding::F16, LowRankMethod::SvdLlm, 0.2);
    options.lowrank.as_mut().unwrap().allocation = RankAllocation::Global;
    options.mlp_channel_pruning = Some(0.25);
    let err = convert_path(&fixture("hf"), &out, &options, &mut |_, _, _| {}).unwrap_err();
    assert!(
        matches!(
            &err,
            ConvertError::Refused(Refusal::GlobalRanksWithStructuredPruning)
        ),
        "{err}"
    );
    assert!(
        "q4/g32+lr20%/svdllm/global"
            .parse::<pocketlm_convert::BlockRecipe>()
            .is_err()
    );
}
