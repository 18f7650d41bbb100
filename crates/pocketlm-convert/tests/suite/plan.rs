//! The compression planner on stories260K: measured costs, budgets, the converted file.

use crate::common;

use common::{calibration, fixture};
use pocketlm_convert::import::{self, ImportedModel};
use pocketlm_convert::plan::{
    BlockRecipe, Budget, PlanOptions, choose_plan, convert_with_plan, measure, parse_candidates,
};
use pocketlm_convert::refusal::Calibrated;
use pocketlm_convert::{ConvertError, ConvertOptions, Method, Refusal};
use pocketlm_format::{Encoding, PlmFile};

fn options() -> ConvertOptions {
    ConvertOptions {
        method: Method::Gptq,
        calibration: Some(calibration()),
        ..ConvertOptions::with_weights(Encoding::Q4 {
            group: 32,
            asymmetric: false,
        })
    }
}

fn plan_options(budget: Budget) -> PlanOptions {
    with_candidates(budget, "q8/g32,q4/g32,q3/g32")
}

fn with_candidates(budget: Budget, candidates: &str) -> PlanOptions {
    PlanOptions {
        budget,
        candidates: parse_candidates(candidates).unwrap(),
        samples: 8,
        seq_len: 64,
    }
}

fn model() -> ImportedModel {
    import::open(&fixture("hf")).unwrap()
}

#[test]
fn costs_grow_as_bits_shrink_and_bigger_budgets_never_predict_more() {
    let model = model();
    let (s, _) = measure(
        &model,
        &options(),
        &plan_options(Budget::BitsPerWeight(8.0)),
        None,
        &mut |_, _, _| {},
    )
    .unwrap();
    assert_eq!(s.kl.len(), model.config.num_layers);
    for (b, (kl, bytes)) in s.kl.iter().zip(&s.bytes).enumerate() {
        // q8, q4, q3: fewer bytes, more KL, in every block.
        assert!(
            bytes[0] > bytes[1] && bytes[1] > bytes[2],
            "blk.{b}: {bytes:?}"
        );
        assert!(kl[0] < kl[1] && kl[1] < kl[2], "blk.{b}: {kl:?}");
        assert!(kl[0] >= 0.0 && kl[2].is_finite());
    }
    assert!(s.fixed_bytes > 0 && s.fixed_kl >= 0.0);

    let size = |c: usize| -> u64 {
        s.bytes.iter().map(|b| b[c]).sum::<u64>() + s.fixed_bytes + s.metadata_bytes
    };
    let (smallest, largest) = (size(2), size(0));
    let mut last = f64::INFINITY;
    let mut planned = 0;
    for step in 0..=10u64 {
        let budget = smallest - 1000 + step * (largest + 2000 - smallest) / 10;
        match choose_plan(&s, Budget::FileBytes(budget)) {
            Ok(plan) => {
                assert!(plan.predicted_kl <= last + 1e-12, "{budget}: {plan:?}");
                assert!(plan.predicted_file_bytes <= budget);
                last = plan.predicted_kl;
                planned += 1;
            }
            Err(e) => {
                assert!(
                    matches!(e, ConvertError::Refused(Refusal::BudgetTooSmall { .. })),
                    "{e}"
                );
                assert!(e.to_string().contains("too small"), "{e}");
                assert!(
                    planned == 0,
                    "a larger budget failed after a smaller one fit"
                );
            }
        }
    }
    assert_eq!(planned, 10, "every budget from all-q3 up fits");

    // A speed budget is a byte budget per token (bandwidth / tokens per second) on the
    // tensors, which decode reads once per token; metadata is not read.
    let tensors_q4 = size(1) - s.metadata_bytes;
    let bandwidth = 2e9;
    let target = bandwidth / (tensors_q4 as f64 + 0.5);
    let speed = |tokens_per_s: f64| {
        choose_plan(
            &s,
            Budget::TokensPerSecond {
                tokens_per_s,
                bandwidth,
            },
        )
    };
    let fast = speed(target).unwrap();
    let sized = choose_plan(&s, Budget::FileBytes(size(1))).unwrap();
    assert_eq!(fast.choice, sized.choice);
    assert!(fast.predicted_tokens_per_s.unwrap() >= target, "{fast:?}");
    assert!(sized.predicted_tokens_per_s.is_none());
    let err = speed(bandwidth / s.fixed_bytes as f64).unwrap_err();
    assert!(err.to_string().contains("tokens/s"), "{err}");
    let all_q8: f64 = s.kl.iter().map(|k| k[0]).sum::<f64>() + s.fixed_kl;
    assert!(
        (last - all_q8).abs() < 1e-12,
        "an ample budget takes q8 everywhere"
    );
}

#[test]
fn planned_file_fits_its_budget_and_the_verified_kl_follows_the_prediction() {
    let model = model();
    let dir = tempfile::tempdir().unwrap();
    let candidates = "q8/g32,q4/g32~v=q8/g32,q3/g32";
    let measure_with = |budget| with_candidates(budget, candidates);
    let (s, _) = measure(
        &model,
        &options(),
        &measure_with(Budget::BitsPerWeight(8.0)),
        None,
        &mut |_, _, _| {},
    )
    .unwrap();
    // Halfway between every block in q3 and every block in q8.
    let size = |c: usize| -> u64 {
        s.bytes.iter().map(|b| b[c]).sum::<u64>() + s.fixed_bytes + s.metadata_bytes
    };
    let budget = (size(0) + size(2)) / 2;
    let out = dir.path().join("planned.plm");
    let (report, converted) = convert_with_plan(
        &model,
        &out,
        &options(),
        &measure_with(Budget::FileBytes(budget)),
        Some(s.clone()),
        &mut |_, _, _| {},
    )
    .unwrap();
    assert!(
        report.file_bytes <= budget,
        "{} > {budget}",
        report.file_bytes
    );
    assert_eq!(report.file_bytes, converted.file_bytes);
    let mut kinds = report.plan.recipes.clone();
    kinds.sort();
    kinds.dedup();
    assert!(kinds.len() >= 2, "a mid budget mixes recipes: {kinds:?}");

    // Each block's matrices are stored as its recipe says.
    let file = PlmFile::open(&out).unwrap();
    let encoding = |name: String| file.tensor(&name).unwrap().encoding.describe();
    for (b, recipe) in report.plan.recipes.iter().enumerate() {
        let recipe: BlockRecipe = recipe.parse().unwrap();
        let v = recipe.matrices[2].unwrap_or(recipe.weights);
        assert_eq!(
            encoding(format!("blk.{b}.attn_q.weight")),
            recipe.weights.describe()
        );
        assert_eq!(encoding(format!("blk.{b}.attn_v.weight")), v.describe());
    }
    let recipe = &file.metadata()["recipe"]["blocks"];
    assert_eq!(recipe.as_array().unwrap().len(), model.config.num_layers);

    // Costs measured once plan any budget; other candidates are refused.
    let other = convert_with_plan(
        &model,
        &out,
        &options(),
        &plan_options(Budget::FileBytes(budget)),
        Some(s.clone()),
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(other.to_string().contains("saved costs"), "{other}");

    // A speed budget converts too, and measures the file's decode speed here.
    let (fast, _) = convert_with_plan(
        &model,
        &out,
        &options(),
        &measure_with(Budget::TokensPerSecond {
            tokens_per_s: 1.0,
            bandwidth: (budget - s.metadata_bytes) as f64,
        }),
        Some(s.clone()),
        &mut |_, _, _| {},
    )
    .unwrap();
    assert_eq!(
        fast.plan.choice, report.plan.choice,
        "the same bytes allowed"
    );
    let measured = fast.measured_tokens_per_s.expect("decode measured");
    assert!(measured > 0.0 && measured.is_finite());
    assert!(report.measured_tokens_per_s.is_none());

    // The file's real KL is of the predicted size (effects add up for small errors).
    let (predicted, measured) = (report.plan.predicted_kl, report.measured_kl);
    assert!(
        measured > 0.3 * predicted && measured < 3.0 * predicted,
        "predicted {predicted}, measured {measured}"
    );
}

#[test]
fn planner_errors_say_what_to_change() {
    let model = model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.plm");
    let run = |options: &ConvertOptions, budget: Budget| {
        convert_with_plan(
            &model,
            &out,
            options,
            &plan_options(budget),
            None,
            &mut |_, _, _| {},
        )
        .unwrap_err()
    };
    let err = run(&options(), Budget::FileBytes(1000));
    assert!(err.to_string().contains("too small"), "{err}");
    let mut uncalibrated = options();
    uncalibrated.method = Method::Rtn;
    uncalibrated.calibration = None;
    let err = run(&uncalibrated, Budget::BitsPerWeight(5.0));
    assert!(
        matches!(
            err,
            ConvertError::Refused(Refusal::NeedsCalibration {
                by: Calibrated::Planner
            })
        ),
        "{err}"
    );
    assert!(!out.exists(), "no file is left behind");
}
