//! The recipe JSON written into a .plm's metadata stays byte-for-byte the same for the same
//! options: the files under `tests/golden/` were written by the converter before its passes
//! moved behind the `Pass` trait. Set `POCKETLM_BLESS_RECIPES=1` to rewrite them after a
//! deliberate change of the recipe (and say so in the commit).

use pocketlm_convert::{
    Clipping, ConvertOptions, KeepRule, LowRank, LowRankMethod, Method, PruneMethod, Pruning,
    RankAllocation, RankTarget, Sparsity, SparsitySchedule,
};
use pocketlm_format::{Encoding, PlmFile};

use crate::common;
use common::{calibration, convert};

const Q4: Encoding = Encoding::Q4 {
    group: 32,
    asymmetric: false,
};

fn calibrated(weights: Encoding, method: Method) -> ConvertOptions {
    ConvertOptions {
        method,
        calibration: Some(calibration()),
        ..ConvertOptions::with_weights(weights)
    }
}

/// The recipe `options` write, as stored.
fn recipe_json(options: &ConvertOptions) -> String {
    let (_dir, path) = convert(options);
    let file = PlmFile::open(&path).unwrap();
    serde_json::to_string_pretty(&file.metadata()["recipe"]).unwrap() + "\n"
}

fn check(name: &str, options: ConvertOptions) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.recipe.json"));
    let written = recipe_json(&options);
    if std::env::var_os("POCKETLM_BLESS_RECIPES").is_some() {
        std::fs::write(&path, &written).unwrap();
        return;
    }
    let golden =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Compared as JSON values: key order is not part of the recipe (it follows serde_json's
    // `preserve_order`, which a dependency may switch on), every key and value is.
    let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
    assert_eq!(
        parse(&written),
        parse(&golden),
        "{name}: the recipe changed"
    );
}

#[test]
fn quantization_recipes_are_unchanged() {
    check("f16", ConvertOptions::with_weights(Encoding::F16));
    let mut awq_gptq = calibrated(Q4, Method::AwqGptq);
    awq_gptq.keep = vec!["0=q8".parse::<KeepRule>().unwrap()];
    check("q4-awq-gptq-keep", awq_gptq);
    let mut rtn = ConvertOptions::with_weights(Encoding::Q3 { group: 64 });
    rtn.clipping = Some(Clipping::Search);
    rtn.residual = Some(Q4);
    check("q3-rtn-search-residual", rtn);
}

#[test]
fn pruning_recipes_are_unchanged() {
    let mut owl = calibrated(Encoding::F16, Method::Rtn);
    owl.pruning = Some(Pruning {
        method: PruneMethod::Wanda,
        sparsity: Sparsity::Unstructured(0.5),
    });
    owl.sparsity_schedule = SparsitySchedule::OWL;
    check("f16-wanda-owl", owl);
    let mut sparsegpt = calibrated(Q4, Method::Gptq);
    sparsegpt.pruning = Some(Pruning {
        method: PruneMethod::SparseGpt,
        sparsity: Sparsity::NM { n: 2, m: 4 },
    });
    check("q4-sparsegpt-2-4", sparsegpt);
    let mut masked = calibrated(Encoding::Q8 { group: 32 }, Method::Rtn);
    masked.pruning = Some(Pruning {
        method: PruneMethod::Magnitude,
        sparsity: Sparsity::Unstructured(0.6),
    });
    check("q8-magnitude-masked", masked);
    let mut structured = calibrated(Q4, Method::Gptq);
    structured.mlp_channel_pruning = Some(0.25);
    structured.attention_head_pruning = Some(0.25);
    check("q4-gptq-heads-channels", structured);
}

#[test]
fn low_rank_recipes_are_unchanged() {
    let lowrank = |method, allocation| {
        let mut o = calibrated(Q4, Method::Gptq);
        o.lowrank = Some(LowRank {
            method,
            target: RankTarget::Ratio(0.2),
            allocation,
        });
        o
    };
    check(
        "q4-svdllm-energy",
        lowrank(LowRankMethod::SvdLlm, RankAllocation::Energy),
    );
    check(
        "q4-asvd-global",
        lowrank(LowRankMethod::Asvd, RankAllocation::Global),
    );
}

#[cfg(feature = "recover")]
#[test]
fn recovery_recipes_are_unchanged() {
    use pocketlm_convert::{RecoverMode, Recovery};
    let recovered = |mode| {
        let mut o = calibrated(Encoding::Q3 { group: 32 }, Method::Gptq);
        o.recover = Some(Recovery {
            mode,
            steps: 4,
            samples: mode.distills().then_some(8),
            ..Recovery::default()
        });
        o
    };
    check("q3-blockwise", recovered(RecoverMode::Blockwise));
    check(
        "q3-blockwise-distill",
        recovered(RecoverMode::BlockwiseDistill),
    );
}
