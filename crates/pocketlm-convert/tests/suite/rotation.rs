//! Incoherence processing (`rotate`): rotated files compute the same function as unrotated
//! ones (exactly, up to float rounding, before quantization), compose with the calibrated
//! methods, record what they did, and refuse what they cannot combine with.

use pocketlm_convert::{ConvertOptions, Method, convert_path};
use pocketlm_format::{Encoding, PlmFile};
use pocketlm_runtime::model::{Logits, Model};

use crate::common::{calibration, convert, fixture, ppl};

fn rotated(options: ConvertOptions) -> ConvertOptions {
    ConvertOptions {
        rotate: true,
        ..options
    }
}

/// Logits of every position of a fixed prompt.
fn logits(path: &std::path::Path) -> Vec<f32> {
    let model = Model::open(path).unwrap();
    let tokens = [1u32, 400, 42, 7, 300, 12, 99, 250];
    let mut cache = model.new_cache(16).unwrap();
    model.forward(&tokens, &mut cache, Logits::All).unwrap()
}

#[test]
fn rotated_float_weights_compute_the_same_logits() {
    let (_d0, plain) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let (_d1, turned) = convert(&rotated(ConvertOptions::with_weights(Encoding::F32)));
    let (a, b) = (logits(&plain), logits(&turned));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "largest logit difference {worst}");

    // The weights themselves differ (they are stored rotated), the vectors do not.
    let (fp, ft) = (
        PlmFile::open(&plain).unwrap(),
        PlmFile::open(&turned).unwrap(),
    );
    let q = "blk.0.attn_q.weight";
    assert_ne!(
        fp.tensor(q).unwrap().as_f32().unwrap(),
        ft.tensor(q).unwrap().as_f32().unwrap()
    );
    let norm = "blk.0.attn_norm.weight";
    assert_eq!(
        fp.tensor(norm).unwrap().as_f32().unwrap(),
        ft.tensor(norm).unwrap().as_f32().unwrap()
    );
    // The config tells the runtime, the recipe tells the reader.
    assert!(ft.metadata()["config"]["incoherence"]["seed"].is_u64());
    assert!(fp.metadata()["config"].get("incoherence").is_none());
    assert_eq!(
        ft.metadata()["recipe"]["incoherence"]["transform"],
        "block-hadamard"
    );
}

#[test]
fn rotation_composes_with_gptq_and_pruning() {
    let q4 = Encoding::Q4 {
        group: 32,
        asymmetric: false,
    };
    let base = ConvertOptions {
        method: Method::Gptq,
        calibration: Some(calibration()),
        embedding: Some(Encoding::F32),
        ..ConvertOptions::with_weights(q4)
    };
    let (_d0, float) = convert(&ConvertOptions::with_weights(Encoding::F32));
    let (_d1, gptq) = convert(&base);
    let (_d2, turned) = convert(&rotated(base.clone()));
    let (float, gptq, turned) = (ppl(&float), ppl(&gptq), ppl(&turned));
    eprintln!("ppl: f32 {float:.4}, gptq {gptq:.4}, rotated gptq {turned:.4}");
    // Rotation does not change what GPTQ can reach by much on this model (its weights have no
    // outlier channels); a wrong basis anywhere (weights, Hessian, activations) costs far more.
    assert!(
        turned < float * 1.15,
        "rotated gptq {turned} vs f32 {float}"
    );
    assert!(turned < gptq * 1.05, "rotated gptq {turned} vs gptq {gptq}");

    let pruned = rotated(ConvertOptions {
        pruning: Some(pocketlm_convert::Pruning {
            method: pocketlm_convert::PruneMethod::Wanda,
            sparsity: pocketlm_convert::Sparsity::Unstructured(0.25),
        }),
        ..base
    });
    let (_d3, path) = convert(&pruned);
    let p = ppl(&path);
    assert!(p.is_finite() && p < float * 1.6, "rotated wanda+gptq {p}");
}

#[test]
fn rotation_refuses_low_rank_and_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let options = rotated(ConvertOptions {
        lowrank: Some(pocketlm_convert::LowRank {
            method: pocketlm_convert::LowRankMethod::Svd,
            target: pocketlm_convert::RankTarget::Ratio(0.2),
            allocation: Default::default(),
        }),
        ..ConvertOptions::with_weights(Encoding::F16)
    });
    let err = convert_path(
        &fixture("hf"),
        &dir.path().join("x.plm"),
        &options,
        &mut |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("rotate does not work with lowrank"), "{err}");
}
