//! `pocketlm eval report`.

use pocketlm_eval::PerplexityOptions;
use pocketlm_eval::report::{ReportOptions, build_report};

use crate::args::{JsonOutput, ReportArgs};
use crate::commands::{CliResult, read_text};
use crate::model_options::open_model;
use crate::progress::Progress;

pub fn execute(args: ReportArgs) -> CliResult {
    let ReportArgs {
        model: path,
        base,
        text,
        ctx,
        chunks,
        bench: run_bench,
        output: JsonOutput { json },
    } = args;
    let model = open_model(&path)?;
    let base = base.map(|b| open_model(&b)).transpose()?;
    let text = text.map(|t| read_text(&t)).transpose()?;
    let options = ReportOptions {
        perplexity: PerplexityOptions {
            context: ctx,
            max_chunks: chunks,
        },
        bench: run_bench.then(pocketlm_eval::bench::BenchOptions::default),
    };
    let progress = Progress::new("{bar:40} {pos}/{len} chunks ({msg})");
    let report = build_report(
        &model,
        base.as_ref(),
        text.as_deref(),
        &options,
        |stage, done, total| {
            progress.update_with(done, total, stage);
        },
    )?;
    progress.finish();
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.render_table());
    }
    Ok(())
}
