//! `pocketlm eval sweep`: many files measured alike, their Pareto front, table, JSON and
//! charts.

use std::path::PathBuf;

use pocketlm_eval::PerplexityOptions;
use pocketlm_eval::sweep::{self, Axis, SweepPoint};

use crate::args::SweepArgs;
use crate::commands::{CliResult, read_text};
use crate::model_options::open_model;
use crate::progress::Progress;

pub fn execute(args: SweepArgs) -> CliResult {
    let SweepArgs {
        models,
        text,
        chunking,
        mut references,
        load,
        bench,
        svg,
        json,
    } = args;
    let options = chunking.perplexity_options();
    for path in &load {
        let points: Vec<SweepPoint> = serde_json::from_str(&read_text(path)?)
            .map_err(|e| format!("{}: not a sweep --json file: {e}", path.display()))?;
        references.extend(points);
    }
    let text = match (&text, models.is_empty()) {
        (Some(path), _) => read_text(path)?,
        (None, true) => String::new(),
        (None, false) => return Err("--text FILE is needed to measure files".into()),
    };
    sweep_files(&models, &text, &options, references, bench, svg, json)
}

/// Measures `models`, adds them to `points` (the references), and writes the results.
fn sweep_files(
    models: &[PathBuf],
    text: &str,
    options: &PerplexityOptions,
    mut points: Vec<SweepPoint>,
    bench: bool,
    svg: Option<PathBuf>,
    json: Option<PathBuf>,
) -> CliResult {
    let speed = bench.then(pocketlm_eval::bench::BenchOptions::default);
    let progress = Progress::with_length(
        models.len() as u64,
        "{elapsed_precise} {bar:40} {pos}/{len} files {msg}",
    );
    for path in models {
        progress.set_message(path.display().to_string());
        let model = open_model(path)?;
        points.push(sweep::measure_file(
            path,
            &model,
            text,
            options,
            speed.as_ref(),
        )?);
        progress.inc();
    }
    progress.finish();
    if points.is_empty() {
        return Err("nothing to sweep: give .plm files (and/or --reference points)".into());
    }
    sweep::mark_pareto(&mut points);
    print!("{}", sweep::render_markdown(&points));
    if let Some(path) = &svg {
        sweep::render_svg(&points, Axis::Size, path)?;
        if points.iter().any(|p| p.decode_tokens_per_s.is_some()) {
            let stem = path
                .file_stem()
                .map_or("sweep".into(), |s| s.to_string_lossy());
            let speed_path = path.with_file_name(format!("{stem}-speed.svg"));
            sweep::render_svg(&points, Axis::DecodeSpeed, &speed_path)?;
        }
    }
    if let Some(path) = &json {
        std::fs::write(path, serde_json::to_string_pretty(&points)?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
