//! Elastic files on stories260K: a q4 file with stored residuals serves three operating
//! points from one file. `small` reads the base alone and equals the plain q4 file, `best`
//! adds every residual back and comes far closer to the float model, `balanced` sits between
//! in bytes; a weight-memory limit picks the best point that fits, and the converter refuses
//! residuals where they mean nothing.

use std::path::Path;

use pocketlm_convert::refusal::ResidualConflict;
use pocketlm_convert::{ConvertError, ConvertOptions, Refusal, convert_path};
use pocketlm_eval::report::summarize;
use pocketlm_eval::{PerplexityOptions, kl_divergence};
use pocketlm_format::{Encoding, PlmFile};
use pocketlm_runtime::model::{Model, ModelError, ModelOptions, Profile};

use crate::common;
use common::{convert, fixture};

const Q4: Encoding = Encoding::Q4 {
    group: 32,
    asymmetric: false,
};

fn q4_options(residual: Option<Encoding>) -> ConvertOptions {
    ConvertOptions {
        embedding: Some(Encoding::F32),
        residual,
        ..ConvertOptions::with_weights(Q4)
    }
}

fn open(path: &Path, profile: Profile, max_weight_bytes: u64) -> Result<Model, ModelError> {
    Model::open_with(
        path,
        ModelOptions {
            profile,
            max_weight_bytes,
            ..ModelOptions::default()
        },
    )
}

/// Mean KL divergence of `model` from `base` over the fixture's evaluation text.
fn kld(model: &Model, base: &Model) -> f64 {
    let text = std::fs::read_to_string(fixture("eval.txt")).unwrap();
    let options = PerplexityOptions {
        context: 128,
        max_chunks: None,
    };
    kl_divergence(model, base, &text, &options, |_, _, _| {})
        .unwrap()
        .kld
}

#[test]
fn one_file_serves_three_operating_points() {
    let (_d0, float) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let (_d1, plain) = convert(&q4_options(None));
    let (_d2, elastic) = convert(&q4_options(Some(Q4)));
    let float = open(&float, Profile::Best, u64::MAX).unwrap();
    let plain_model = open(&plain, Profile::Best, u64::MAX).unwrap();

    let file = PlmFile::open(&elastic).unwrap();
    let recipe = &file.metadata()["recipe"]["residual"];
    assert_eq!(recipe["encoding"], "q4/g32", "{recipe}");
    // One residual per quantized block matrix (matrices whose rows do not split into whole
    // groups stay f16, with nothing lost to correct), in the residual encoding.
    let quantized: Vec<&str> = file
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with("blk.") && t.encoding == Q4 && !t.name.ends_with("#r"))
        .map(|t| t.name.as_str())
        .collect();
    assert!(!quantized.is_empty());
    assert_eq!(
        recipe["tensors"].as_u64().unwrap() as usize,
        quantized.len()
    );
    for name in &quantized {
        let r = file.entry(&format!("{name}#r")).expect("residual stored");
        assert_eq!(r.encoding, Q4);
    }

    let points: Vec<(Profile, Model)> = Profile::DESCENDING
        .into_iter()
        .map(|p| (p, open(&elastic, p, u64::MAX).unwrap()))
        .collect();
    let bytes: Vec<u64> = points.iter().map(|(_, m)| m.weight_bytes()).collect();
    let klds: Vec<f64> = points.iter().map(|(_, m)| kld(m, &float)).collect();
    eprintln!("best, balanced, small: bytes {bytes:?}, KL from f32 {klds:.5?}");

    // small reads exactly the plain q4 file's weights, and computes the same logits.
    let (_, small) = &points[2];
    assert_eq!(small.weight_bytes(), plain_model.weight_bytes());
    let tokens = [1u32, 400, 42, 7, 300];
    let logits = |m: &Model| {
        let mut cache = m.new_cache(8).unwrap();
        m.forward(&tokens, &mut cache, pocketlm_runtime::model::Logits::All)
            .unwrap()
    };
    assert_eq!(logits(small), logits(&plain_model));

    // More bytes, less divergence from the float model.
    assert!(bytes[0] > bytes[1] && bytes[1] > bytes[2], "{bytes:?}");
    assert!(klds[0] < 0.25 * klds[2], "best vs small: {klds:?}");
    assert!(klds[1] < klds[2], "balanced vs small: {klds:?}");

    // Residuals correct weights, they are not parameters of their own.
    let (s_plain, s_best) = (summarize(&plain_model, 128), summarize(&points[0].1, 128));
    assert_eq!(s_plain.parameters, s_best.parameters);
    assert!(s_best.bits_per_weight > s_plain.bits_per_weight + 3.0);
    // Each residual adds its matrix's multiply-adds.
    let residual_weights: u64 = file
        .tensors()
        .iter()
        .filter(|t| t.name.ends_with("#r"))
        .map(|t| (t.shape[0] * t.shape[1]) as u64)
        .sum();
    assert_eq!(
        points[0].1.flops_per_token(0) - small.flops_per_token(0),
        2 * residual_weights
    );
}

#[test]
fn a_weight_limit_picks_the_best_point_that_fits() {
    let (_d, elastic) = convert(&q4_options(Some(Q4)));
    let best = open(&elastic, Profile::Best, u64::MAX).unwrap();
    let balanced = open(&elastic, Profile::Balanced, u64::MAX).unwrap();
    let small = open(&elastic, Profile::Small, u64::MAX).unwrap();

    let fitted = open(&elastic, Profile::Best, balanced.weight_bytes()).unwrap();
    assert_eq!(fitted.profile(), Profile::Balanced);
    let fitted = open(&elastic, Profile::Best, best.weight_bytes() - 1).unwrap();
    assert_eq!(fitted.profile(), Profile::Balanced);
    let fitted = open(&elastic, Profile::Balanced, small.weight_bytes()).unwrap();
    assert_eq!(fitted.profile(), Profile::Small);
    // A limit never raises the profile asked for.
    let fitted = open(&elastic, Profile::Small, u64::MAX).unwrap();
    assert_eq!(fitted.profile(), Profile::Small);

    let err = open(&elastic, Profile::Best, small.weight_bytes() - 1)
        .err()
        .expect("nothing fits");
    assert!(
        matches!(
            err,
            ModelError::WeightsOverLimit {
                profile: "small",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("smallest operating point"),
        "{err}"
    );
}

#[test]
fn residuals_are_refused_where_they_mean_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.plm");
    let run = |options: ConvertOptions| {
        convert_path(&fixture("hf"), &out, &options, &mut |_, _, _| {}).unwrap_err()
    };
    let refused = |options: ConvertOptions, conflict: ResidualConflict| {
        let err = run(options);
        assert!(
            matches!(&err, ConvertError::Refused(Refusal::Residual(c)) if *c == conflict),
            "{conflict:?}: {err}"
        );
    };
    refused(
        ConvertOptions {
            residual: Some(Q4),
            ..ConvertOptions::with_weights(Encoding::F16)
        },
        ResidualConflict::FloatWeights(Encoding::F16),
    );
    refused(
        ConvertOptions {
            residual: Some(Encoding::F16),
            ..q4_options(None)
        },
        ResidualConflict::Encoding(Encoding::F16),
    );
    refused(
        ConvertOptions {
            pruning: Some(pocketlm_convert::Pruning {
                method: pocketlm_convert::PruneMethod::Magnitude,
                sparsity: pocketlm_convert::Sparsity::Unstructured(0.5),
            }),
            ..q4_options(Some(Q4))
        },
        ResidualConflict::Pruning,
    );
}
