//! `convert --budget`, `--bits-per-weight` or `--min-tokens-per-s`: the planner's run and its
//! table of costs and choices.

use std::path::Path;

use pocketlm_convert::plan::PlanOptions;
use pocketlm_convert::{self as convert, ConvertOptions};

use super::print_written;
use super::refusal::cli_error;
use crate::commands::{CliResult, read_text};
use crate::progress::Progress;

/// `--plan-from`: the costs an earlier `--plan-json` run measured.
pub fn read_costs(path: &Path) -> Result<convert::plan::Sensitivities, String> {
    let json: serde_json::Value =
        serde_json::from_str(&read_text(path)?).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_value(json["sensitivities"].clone())
        .map_err(|e| format!("{}: not a --plan-json file: {e}", path.display()))
}

/// `convert --budget`: measure, plan, convert, verify, and print the plan.
pub fn convert_planned(
    src: &Path,
    output: &Path,
    options: &ConvertOptions,
    plan: &PlanOptions,
    known: Option<convert::plan::Sensitivities>,
    json: Option<&Path>,
) -> CliResult {
    let started = std::time::Instant::now();
    let model = pocketlm_convert::import::open(src)?;
    let progress = Progress::new("{elapsed_precise} {bar:40} {pos}/{len} {msg}");
    let (report, convert_report) = convert::plan::convert_with_plan(
        &model,
        output,
        options,
        plan,
        known,
        &mut |done, total, what| {
            progress.update_with(done, total, what.to_string());
        },
    )
    .map_err(cli_error)?;
    progress.finish();
    let s = &report.sensitivities;
    println!(
        "plan for {} over {} candidates, costs measured on {} tokens (KL, nats/token):",
        report.plan.budget,
        s.candidates.len(),
        s.tokens
    );
    let widths: Vec<usize> = s.candidates.iter().map(|c| c.len().max(9)).collect();
    print!("{:>5}", "block");
    for (c, w) in s.candidates.iter().zip(&widths) {
        print!("  {c:>w$}");
    }
    println!("  chosen");
    for (b, &chosen) in report.plan.choice.iter().enumerate() {
        print!("{b:>5}");
        for (c, (kl, w)) in s.kl[b].iter().zip(&widths).enumerate() {
            let mark = if c == chosen { '*' } else { ' ' };
            print!(" {kl:>w$.5}{mark}");
        }
        println!("  {}", s.candidates[chosen]);
    }
    for (c, &n) in s.candidates.iter().zip(&s.fallbacks) {
        if n > 0 {
            println!("note: {c} keeps up to {n} matrices per block in f16 (it cannot encode them)");
        }
    }
    println!(
        "embedding/output: {:.2} MB, KL {:.5}",
        s.fixed_bytes as f64 / 1e6,
        s.fixed_kl
    );
    println!(
        "predicted: {:.2} MB ({:.3} bits per weight in tensors), KL {:.5}; measured: {:.2} MB, KL {:.5}",
        report.plan.predicted_file_bytes as f64 / 1e6,
        report.plan.predicted_bits_per_weight,
        report.plan.predicted_kl,
        report.file_bytes as f64 / 1e6,
        report.measured_kl
    );
    if let (Some(predicted), Some(measured)) = (
        report.plan.predicted_tokens_per_s,
        report.measured_tokens_per_s,
    ) {
        println!(
            "decode: predicted {predicted:.1} tokens/s (bandwidth / bytes per token); measured \
             here {measured:.1} tokens/s"
        );
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    print_written(output, &convert_report, started);
    Ok(())
}
