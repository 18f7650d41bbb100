//! `pocketlm convert`: the flags become `ConvertOptions`, step by step in the order their
//! errors are reported; a size, bits-per-weight or speed target goes through the planner
//! (`planned`).

mod planned;
mod refusal;

use std::path::{Path, PathBuf};

use pocketlm_convert::plan::{Budget, PlanOptions};
use pocketlm_convert::{
    self as convert, Calibration, Clipping, ConvertOptions, GptqOptions, LowRank, Pruning,
    RankTarget, Recovery,
};
use pocketlm_format::Encoding;

use crate::args::{ClipArg, ConvertArgs};
use crate::commands::CliResult;
use crate::progress::Progress;

/// Where calibrated methods look for calibration text when `--calib` is not given.
const DEFAULT_CALIBRATION: &str = "data/calib/default.txt";

pub fn execute(a: ConvertArgs) -> CliResult {
    let plan = plan_options(&a)?;
    let mut options = convert_options(&a, plan.as_ref())?;
    options.calibration = calibration(&a, plan.is_some() || options.needs_calibration())?;
    let started = std::time::Instant::now();
    if let Some(plan) = plan {
        let known = a
            .plan_from
            .as_deref()
            .map(planned::read_costs)
            .transpose()?;
        return planned::convert_planned(
            &a.src,
            &a.output,
            &options,
            &plan,
            known,
            a.plan_json.as_deref(),
        );
    }
    let progress = Progress::new("{elapsed_precise} {bar:40} {pos}/{len} tensors {msg}");
    let report = convert::convert_path(&a.src, &a.output, &options, &mut |done, total, name| {
        progress.update_with(done, total, name.to_string());
    })
    .map_err(refusal::cli_error)?;
    progress.finish();
    print_written(&a.output, &report, started);
    Ok(())
}

/// The planner's target from `--budget`, `--bits-per-weight` or `--min-tokens-per-s`, if one
/// is given.
fn plan_options(a: &ConvertArgs) -> Result<Option<PlanOptions>, String> {
    let Some(budget) = budget(a)? else {
        return Ok(None);
    };
    Ok(Some(PlanOptions {
        budget,
        candidates: convert::plan::parse_candidates(&a.candidates)
            .map_err(|e| format!("--candidates: {e}"))?,
        samples: a.plan_samples,
        seq_len: a.plan_len,
    }))
}

/// A speed target becomes bytes per token through the read bandwidth: `--bandwidth`, or
/// this machine's, measured.
fn budget(a: &ConvertArgs) -> Result<Option<Budget>, String> {
    Ok(match (a.budget, a.bits_per_weight, a.min_tokens_per_s) {
        (Some(bytes), _, _) => Some(Budget::FileBytes(bytes)),
        (None, Some(bpw), _) if bpw.is_finite() && bpw > 0.0 => Some(Budget::BitsPerWeight(bpw)),
        (None, Some(bpw), _) => {
            return Err(format!("--bits-per-weight {bpw} must be positive"));
        }
        (None, None, Some(t)) if t.is_finite() && t > 0.0 => {
            let bandwidth = match a.bandwidth {
                Some(gb) if gb.is_finite() && gb > 0.0 => gb * 1e9,
                Some(gb) => return Err(format!("--bandwidth {gb} must be positive")),
                None => {
                    let gb = pocketlm_eval::bench::measure_read_bandwidth();
                    eprintln!("read bandwidth here: {gb:.1} GB/s (--bandwidth sets the target's)");
                    gb * 1e9
                }
            };
            Some(Budget::TokensPerSecond {
                tokens_per_s: t,
                bandwidth,
            })
        }
        (None, None, Some(t)) => {
            return Err(format!("--min-tokens-per-s {t} must be positive"));
        }
        (None, None, None) => None,
    })
}

/// Everything but the calibration text, which depends on what these options need.
fn convert_options(a: &ConvertArgs, plan: Option<&PlanOptions>) -> Result<ConvertOptions, String> {
    if let Some(preset) = a.preset {
        // The recipe flags conflict with --preset (clap refuses them); these only place it.
        let mut options = preset.options();
        options.embedding = a.embedding.or(options.embedding);
        options.output = a.output_weights;
        options.residual = a.residual;
        options.gptq.damp = a.damp;
        options.gptq.act_order = !a.no_act_order;
        // --recover replaces the preset's own recovery (q3 distils), if it has one.
        if a.recover.is_some() {
            options.recover = recovery(a);
        }
        return Ok(options);
    }
    let weights = weight_encoding(a, plan)?;
    let pruning = pruning(a)?;
    let lowrank = low_rank(a)?;
    Ok(ConvertOptions {
        weights,
        embedding: a.embedding,
        output: a.output_weights,
        method: a.method,
        clipping: a.clip.map(|c| match c {
            ClipArg::Minmax => Clipping::MinMax,
            ClipArg::Search => Clipping::Search,
        }),
        gptq: GptqOptions {
            damp: a.damp,
            act_order: !a.no_act_order,
            ..GptqOptions::default()
        },
        calibration: None,
        keep: a.keep.clone(),
        pruning,
        sparsity_schedule: a.sparsity_schedule,
        mlp_channel_pruning: a.prune_channels,
        attention_head_pruning: a.prune_heads,
        residual: a.residual,
        rotate: a.rotate,
        preset: None,
        lowrank,
        sparse_storage: !a.dense_storage,
        blocks: Vec::new(),
        recover: recovery(a),
    })
}

/// `--recover` and its settings.
fn recovery(a: &ConvertArgs) -> Option<Recovery> {
    a.recover.map(|mode| Recovery {
        mode,
        steps: a.recover_steps,
        batch: a.recover_batch,
        learning_rate: a.recover_lr,
        codes: a.recover_codes,
        samples: a.recover_samples,
    })
}

/// `--weights` (f16 by default; with a plan, its first quantized candidate), regrouped by
/// `--group`.
fn weight_encoding(a: &ConvertArgs, plan: Option<&PlanOptions>) -> Result<Encoding, String> {
    let default_weights = plan
        .and_then(|p| {
            p.candidates
                .iter()
                .map(|c| c.weights)
                .find(|w| w.is_quantized())
        })
        .unwrap_or(Encoding::F16);
    Ok(match (a.weights.unwrap_or(default_weights), a.group) {
        (Encoding::Q8 { .. }, Some(group)) => Encoding::Q8 { group },
        (Encoding::Q4 { asymmetric, .. }, Some(group)) => Encoding::Q4 { group, asymmetric },
        (Encoding::Q3 { .. }, Some(group)) => Encoding::Q3 { group },
        (w, Some(_)) => {
            return Err(format!("--group applies to q8/q4/q3 weights, not {w}"));
        }
        (w, None) => w,
    })
}

fn pruning(a: &ConvertArgs) -> Result<Option<Pruning>, String> {
    match (a.prune, a.sparsity.or(a.nm)) {
        (Some(method), Some(sparsity)) => Ok(Some(Pruning { method, sparsity })),
        (Some(_), None) => Err("--prune needs --sparsity F or --nm N:M".into()),
        (None, Some(_)) => Err("--sparsity/--nm need --prune METHOD".into()),
        (None, None) => Ok(None),
    }
}

fn low_rank(a: &ConvertArgs) -> Result<Option<LowRank>, String> {
    let (method, target) = match (a.lowrank, a.ratio, a.rank) {
        (Some(method), Some(ratio), None) => (method, RankTarget::Ratio(ratio)),
        (Some(method), None, Some(rank)) => (method, RankTarget::Rank(rank)),
        (Some(_), None, None) => return Err("--lowrank needs --ratio F or --rank N".into()),
        (None, Some(_), _) | (None, _, Some(_)) => {
            return Err("--ratio/--rank need --lowrank METHOD".into());
        }
        (Some(_), Some(_), Some(_)) => return Err("choose one of --ratio and --rank".into()),
        (None, None, None) => return Ok(None),
    };
    Ok(Some(LowRank {
        method,
        target,
        allocation: a.rank_alloc,
    }))
}

/// The calibration text when `needed` (`--calib`, else DEFAULT_CALIBRATION); otherwise a
/// note that `--calib` is ignored.
fn calibration(a: &ConvertArgs, needed: bool) -> Result<Option<Calibration>, String> {
    if !needed {
        if a.calib.is_some() {
            eprintln!("note: --calib is ignored: nothing in this recipe is calibrated");
        }
        return Ok(None);
    }
    let path = a
        .calib
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CALIBRATION));
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if a.calib.is_none() {
            format!(
                "this recipe needs calibration text: {} ({e}); pass --calib FILE or run \
                 scripts/fetch-calib.sh",
                path.display()
            )
        } else {
            format!("--calib {}: {e}", path.display())
        }
    })?;
    Ok(Some(Calibration {
        text: text.into(),
        source: path.display().to_string(),
        samples: a.calib_samples,
        seq_len: a.calib_len,
    }))
}

/// The converter's closing lines: fallbacks, then what was written and how long it took.
fn print_written(output: &Path, report: &convert::ConvertReport, started: std::time::Instant) {
    for (name, reason) in &report.fallbacks {
        eprintln!("note: {name} kept in f16: {reason}");
    }
    if !report.recovery.is_empty() {
        let kept = report.recovery.iter().filter(|b| b.kept).count();
        let mean = |f: fn(&convert::BlockRecovery) -> f64| {
            report.recovery.iter().map(f).sum::<f64>() / report.recovery.len() as f64
        };
        eprintln!(
            "recovery: block output error {:.3e} -> {:.3e} on average; {kept} of {} blocks improved",
            mean(|b| b.loss_before),
            mean(|b| if b.kept { b.loss_after } else { b.loss_before }),
            report.recovery.len()
        );
    }
    if let Some(kd) = &report.distillation {
        eprintln!(
            "distillation: KL {:.4} -> {:.4} on {} held-out sequences ({:.4} -> {:.4} on {} \
             training ones); {}",
            kd.kl_before,
            kd.kl_after,
            kd.held_out,
            kd.train_kl_before,
            kd.train_kl_after,
            kd.train_scored,
            if kd.kept {
                format!("kept the values of step {}", kd.best_step)
            } else {
                "not better, left as compressed".to_string()
            }
        );
    }
    eprintln!(
        "wrote {} ({} tensors, {:.1} M parameters, {:.1} MB) in {:.1} s",
        output.display(),
        report.tensors,
        report.parameters as f64 / 1e6,
        report.file_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
}
