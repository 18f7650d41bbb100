//! `pocketlm eval sensitivity`: one block at a time quantized, blocks ranked by the
//! perplexity they cost.

use pocketlm_convert::sensitivity::{self, SensitivityOptions};
use pocketlm_eval::PerplexityOptions;

use crate::args::{JsonOutput, SensitivityArgs};
use crate::commands::{CliResult, read_text};
use crate::progress::Progress;

pub fn execute(args: SensitivityArgs) -> CliResult {
    let SensitivityArgs {
        src,
        weights,
        base_weights,
        text,
        ctx,
        chunks,
        output: JsonOutput { json },
    } = args;
    let options = SensitivityOptions {
        encoding: weights,
        base: base_weights,
        text: read_text(&text)?,
        perplexity: PerplexityOptions {
            context: ctx,
            max_chunks: Some(chunks),
        },
    };
    let model = pocketlm_convert::import::open(&src)?;
    let progress = Progress::new("{elapsed_precise} {bar:40} {pos}/{len} conversions");
    let report = sensitivity::scan(&model, &options, &mut |done, total| {
        progress.update(done, total)
    })?;
    progress.finish();
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "base ({}) ppl {:.4}; one block at {} each, most sensitive first:",
        options.base, report.base_ppl, report.encoding
    );
    println!("{:>6} {:>10} {:>10}", "block", "ppl", "increase");
    for l in &report.layers {
        println!("{:>6} {:>10.4} {:>+10.4}", l.layer, l.ppl, l.ppl_increase);
    }
    Ok(())
}
