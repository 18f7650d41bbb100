//! Issue #11: recovery after compression (block-wise and distillation), on the stories260K
//! fixture.
#![cfg(feature = "recover")]

use pocketlm_convert::Refusal;
use pocketlm_convert::recover::RecoveryOptionError;
use pocketlm_convert::refusal::Calibrated;
use pocketlm_convert::{
    Calibration, Clipping, ConvertError, ConvertOptions, LowRank, LowRankMethod, Method,
    PruneMethod, Pruning, RankAllocation, RankTarget, RecoverMode, Recovery, Sparsity,
    convert_path,
};
use pocketlm_format::{Encoding, PlmFile};

use crate::common;
use common::{calibration, convert, fixture, ppl};

const Q3: Encoding = Encoding::Q3 { group: 32 };

fn recovered(mut options: ConvertOptions) -> ConvertOptions {
    options.recover = Some(Recovery::default());
    options
}

fn q3_gptq() -> ConvertOptions {
    ConvertOptions {
        method: Method::Gptq,
        calibration: Some(calibration()),
        embedding: Some(Encoding::F32),
        ..ConvertOptions::with_weights(Q3)
    }
}

/// Converts `options` plainly and with `recovery`, and checks that recovery closes more
/// than `share` of the perplexity gap to the f32 base; returns the plain and recovered files.
fn closes_the_gap(
    what: &str,
    options: ConvertOptions,
    recovery: Recovery,
    share: f64,
) -> [(tempfile::TempDir, std::path::PathBuf); 2] {
    let (_d, base) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let (d0, plain) = convert(&options);
    let (dir, tuned) = convert(&ConvertOptions {
        recover: Some(recovery),
        ..options
    });
    let (base, p_plain, p_tuned) = (ppl(&base), ppl(&plain), ppl(&tuned));
    eprintln!("f32 {base:.4}, {what} {p_plain:.4}, recovered {p_tuned:.4}");
    assert!(
        p_tuned - base < (1.0 - share) * (p_plain - base),
        "{what}: recovered {p_tuned} vs {p_plain} (base {base})"
    );
    [(d0, plain), (dir, tuned)]
}

/// The recipe's `recover.kd` says distillation kept its values and lowered the held-out KL
/// divergence by more than 10%.
fn assert_distillation_kept_a_lower_kl(kd: &serde_json::Value) {
    let (before, after) = (
        kd["kl_before"].as_f64().unwrap(),
        kd["kl_after"].as_f64().unwrap(),
    );
    assert!(
        kd["kept"].as_bool().unwrap() && after < 0.9 * before,
        "{kd}"
    );
}

/// Each tensor's name, encoding and byte length: what recovery must leave unchanged.
fn tensor_layout(f: &PlmFile) -> Vec<(String, Encoding, u64)> {
    f.tensors()
        .iter()
        .map(|t| (t.name.clone(), t.encoding, t.length))
        .collect()
}

/// Measured on this fixture (f32 3.147): q3/g32 GPTQ 3.92, recovered 3.64.
#[test]
fn recovery_lowers_the_perplexity_of_a_3_bit_model_and_keeps_its_encodings() {
    let (_d0, plain) = convert(&q3_gptq());
    let (_d1, tuned) = convert(&recovered(q3_gptq()));
    let (p_plain, p_tuned) = (ppl(&plain), ppl(&tuned));
    eprintln!("q3 gptq {p_plain:.4}, recovered {p_tuned:.4}");
    assert!(p_tuned < p_plain - 0.05, "recovered {p_tuned} vs {p_plain}");

    // Same tensors, encodings and size: recovery changes values, not the layout.
    let (a, b) = (
        PlmFile::open(&plain).unwrap(),
        PlmFile::open(&tuned).unwrap(),
    );
    let recipe = |f: &PlmFile| f.metadata()["recipe"].clone();
    assert_eq!(
        recipe(&a)["tensor_encodings"],
        recipe(&b)["tensor_encodings"]
    );
    assert_eq!(a.tensor_bytes_total(), b.tensor_bytes_total());
    assert_eq!(tensor_layout(&a), tensor_layout(&b));
    b.verify().unwrap();
    assert!(recipe(&a)["recover"].is_null());
    let r = &recipe(&b)["recover"];
    assert_eq!(r["mode"], "blockwise");
    assert_eq!(r["steps"], Recovery::default().steps);
    let before = r["loss_before"].as_array().unwrap();
    let after = r["loss_after"].as_array().unwrap();
    assert_eq!(before.len(), 5);
    let kept = r["kept"].as_array().unwrap();
    for ((b, a), k) in before.iter().zip(after).zip(kept) {
        let (b, a) = (b.as_f64().unwrap(), a.as_f64().unwrap());
        assert_eq!(k.as_bool().unwrap(), a < b, "{b} -> {a}");
    }
    assert!(kept.iter().filter(|k| k.as_bool().unwrap()).count() >= 3);
}

/// Distillation after block-wise recovery: the scales, norms and final norm tuned on the
/// whole model's KL divergence lower the perplexity further, with every tensor's layout
/// unchanged. Measured: q3/g32 GPTQ 3.920, block-wise 3.639, block-wise + kd 3.584 (kd
/// alone 3.676); KL 0.209, 0.125, 0.114.
#[test]
fn distillation_after_blockwise_recovery_lowers_the_perplexity_further() {
    let (_d0, blockwise) = convert(&recovered(q3_gptq()));
    let both = ConvertOptions {
        recover: Some(Recovery {
            mode: RecoverMode::BlockwiseDistill,
            ..Recovery::default()
        }),
        ..q3_gptq()
    };
    let (_d1, distilled) = convert(&both);
    let (p_block, p_both) = (ppl(&blockwise), ppl(&distilled));
    eprintln!("q3 gptq block-wise {p_block:.4}, + kd {p_both:.4}");
    assert!(p_both < p_block, "block-wise + kd {p_both} vs {p_block}");

    let (a, b) = (
        PlmFile::open(&blockwise).unwrap(),
        PlmFile::open(&distilled).unwrap(),
    );
    assert_eq!(tensor_layout(&a), tensor_layout(&b));
    b.verify().unwrap();
    let r = &b.metadata()["recipe"]["recover"];
    assert_eq!(r["mode"], "blockwise+kd");
    assert_eq!(r["loss_before"].as_array().unwrap().len(), 5);
    let kd = &r["kd"];
    let (before, after) = (
        kd["kl_before"].as_f64().unwrap(),
        kd["kl_after"].as_f64().unwrap(),
    );
    assert!(kd["kept"].as_bool().unwrap() && after < before, "{kd}");
    assert_eq!(kd["held_out_sequences"], 6);
    assert!(a.metadata()["recipe"]["recover"]["kd"].is_null());
}

/// Quantization-aware distillation (`--recover kd --recover-codes`) of a round-to-nearest
/// 3-bit model closes more than half of the gap to the base: the 3-bit path to issue #11's
/// target (from GPTQ's codes it closes less; that codes move is checked in the unit tests).
/// Measured: f32 3.147, q3/g32 RTN 4.277, recovered 3.526 (66%; GPTQ unrecovered 3.920).
#[test]
fn distillation_that_moves_codes_closes_half_the_3_bit_gap() {
    let rtn = ConvertOptions {
        calibration: Some(calibration()),
        embedding: Some(Encoding::F32),
        clipping: Some(Clipping::Search),
        ..ConvertOptions::with_weights(Q3)
    };
    let qat = Recovery {
        mode: RecoverMode::Distill,
        codes: true,
        ..Recovery::default()
    };
    let [(_d0, plain), (_d1, tuned)] = closes_the_gap("q3 rtn, kd with codes", rtn, qat, 0.5);
    let (a, b) = (
        PlmFile::open(&plain).unwrap(),
        PlmFile::open(&tuned).unwrap(),
    );
    assert_eq!(tensor_layout(&a), tensor_layout(&b));
    b.verify().unwrap();
    let r = &b.metadata()["recipe"]["recover"];
    assert_eq!(r["codes"], true);
    assert!(r["kd"]["best_step"].as_u64().unwrap() > 0, "{r}");
}

/// `--recover-samples`: distillation trains on more sequences than the quantizer calibrated
/// on (16 here, 48 for distillation), with or without block-wise recovery on the 16 first.
/// Its teacher runs on the distillation sequences, so the KL falls and the file improves.
#[test]
fn distillation_trains_on_its_own_sequences() {
    let few = ConvertOptions {
        calibration: Some(Calibration {
            samples: 16,
            ..calibration()
        }),
        ..q3_gptq()
    };
    let (_d0, plain) = convert(&few);
    let p_plain = ppl(&plain);
    for mode in [RecoverMode::Distill, RecoverMode::BlockwiseDistill] {
        let (_d1, tuned) = convert(&ConvertOptions {
            recover: Some(Recovery {
                mode,
                samples: Some(48),
                ..Recovery::default()
            }),
            ..few.clone()
        });
        let p_tuned = ppl(&tuned);
        eprintln!("{mode:?}: q3 gptq on 16 sequences {p_plain:.4}, kd on 48 {p_tuned:.4}");
        assert!(p_tuned < p_plain - 0.05, "{mode:?}: {p_tuned} vs {p_plain}");
        let r = PlmFile::open(&tuned).unwrap().metadata()["recipe"]["recover"].clone();
        assert_eq!(r["samples"], 48);
        let kd = &r["kd"];
        assert_eq!(kd["held_out_sequences"], 6, "{kd}");
        assert_distillation_kept_a_lower_kl(kd);
    }
}

/// 2:4 pruning keeps its sparse storage and mask through recovery, and tuning the surviving
/// weights closes at least half of the gap to the base (issue #11's target). Measured: f32
/// 3.147, Wanda 2:4 f16 58.5, recovered 7.30.
#[test]
fn recovery_tunes_the_survivors_of_a_pruned_model() {
    let pruned = ConvertOptions {
        calibration: Some(calibration()),
        embedding: Some(Encoding::F32),
        pruning: Some(Pruning {
            method: PruneMethod::Wanda,
            sparsity: Sparsity::NM { n: 2, m: 4 },
        }),
        ..ConvertOptions::with_weights(Encoding::F16)
    };
    let [_, (_d, tuned)] = closes_the_gap("wanda 2:4", pruned, Recovery::default(), 0.5);
    let file = PlmFile::open(&tuned).unwrap();
    assert_eq!(
        file.entry("blk.2.ffn_gate.weight").unwrap().encoding,
        Encoding::F16Sparse24
    );
}

/// Low-rank factors are tuned too (both factors of each pair, through their product).
/// Measured: f32 3.147, SVD-LLM 20% fewer weights 35.3, recovered 9.07.
#[test]
fn recovery_tunes_low_rank_factors() {
    let factored = ConvertOptions {
        calibration: Some(calibration()),
        embedding: Some(Encoding::F32),
        lowrank: Some(LowRank {
            method: LowRankMethod::SvdLlm,
            target: RankTarget::Ratio(0.2),
            allocation: RankAllocation::Uniform,
        }),
        ..ConvertOptions::with_weights(Encoding::F16)
    };
    let [_, (_d, tuned)] = closes_the_gap("svdllm 20%", factored, Recovery::default(), 0.5);
    let file = PlmFile::open(&tuned).unwrap();
    assert!(file.entry("blk.1.ffn_up.weight#u").is_some());
    assert!(file.entry("blk.1.ffn_up.weight").is_none());
}

/// Structured pruning (a narrower MLP) recovers too: the student's blocks have the pruned
/// shapes, the teacher's the original ones. Measured: f32 3.147, 25% of the MLP channels
/// 5.00, recovered 4.27 (43% of the gap closed).
#[test]
fn recovery_tunes_a_narrower_mlp() {
    let narrow = ConvertOptions {
        calibration: Some(calibration()),
        mlp_channel_pruning: Some(0.25),
        ..ConvertOptions::with_weights(Encoding::F32)
    };
    let [_, (_d, tuned)] = closes_the_gap("25% MLP channels", narrow, Recovery::default(), 0.25);
    let file = PlmFile::open(&tuned).unwrap();
    assert_eq!(
        file.entry("blk.4.ffn_down.weight").unwrap().shape,
        [64, 128]
    );
}

#[test]
fn recovery_needs_calibration() {
    let options = recovered(ConvertOptions::with_weights(Q3));
    let dir = tempfile::tempdir().unwrap();
    let err = convert_path(
        &fixture("hf"),
        &dir.path().join("m.plm"),
        &options,
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ConvertError::Refused(Refusal::NeedsCalibration {
                by: Calibrated::Recover
            })
        ),
        "{err}"
    );
    let bad = ConvertOptions {
        recover: Some(Recovery {
            steps: 0,
            ..Recovery::default()
        }),
        ..q3_gptq()
    };
    let err = convert_path(
        &fixture("hf"),
        &dir.path().join("m.plm"),
        &bad,
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ConvertError::Refused(Refusal::Recovery(RecoveryOptionError::ZeroSteps { .. }))
        ),
        "{err}"
    );
    assert!(err.to_string().contains("at least 1"), "{err}");
}

/// Distillation of a file stored rotated on the non-uniform 3-bit grid (`--preset q3`'s
/// recipe, at groups of 32 since this fixture's 172-wide ffn_down has no group of 64): the
/// student runs rotated inputs as the runtime does, and tuning the grids' scales lowers the
/// perplexity with every code, encoding and size kept.
#[test]
fn distillation_tunes_a_rotated_non_uniform_3_bit_model() {
    let q3nl = ConvertOptions {
        method: Method::Gptq,
        rotate: true,
        calibration: Some(calibration()),
        embedding: Some(Encoding::F32),
        ..ConvertOptions::with_weights(Encoding::Q3Grid { group: 32 })
    };
    let (_d0, plain) = convert(&q3nl);
    let (_d1, tuned) = convert(&ConvertOptions {
        recover: Some(Recovery {
            mode: RecoverMode::Distill,
            ..Recovery::default()
        }),
        ..q3nl.clone()
    });
    let (p_plain, p_tuned) = (ppl(&plain), ppl(&tuned));
    eprintln!("q3nl rotated gptq {p_plain:.4}, kd {p_tuned:.4}");
    assert!(p_tuned < p_plain - 0.02, "kd {p_tuned} vs {p_plain}");
    let (a, b) = (
        PlmFile::open(&plain).unwrap(),
        PlmFile::open(&tuned).unwrap(),
    );
    assert_eq!(tensor_layout(&a), tensor_layout(&b));
    assert_eq!(
        b.entry("blk.1.ffn_up.weight").unwrap().encoding,
        Encoding::Q3Grid { group: 32 }
    );
    assert!(!b.metadata()["recipe"]["incoherence"].is_null());
    let kd = &b.metadata()["recipe"]["recover"]["kd"];
    assert_distillation_kept_a_lower_kl(kd);
}
