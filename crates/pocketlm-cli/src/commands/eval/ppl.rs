//! `pocketlm eval ppl`.

use pocketlm_eval::{self as eval, PerplexityOptions};

use crate::args::PplArgs;
use crate::commands::{CliResult, read_text};
use crate::model_options::open_model;
use crate::progress::Progress;

pub fn execute(args: PplArgs) -> CliResult {
    let PplArgs {
        model: path,
        text,
        ctx,
        chunks,
        json,
    } = args;
    let model = open_model(&path)?;
    let text = read_text(&text)?;
    let progress = Progress::new("{bar:40} {pos}/{len} chunks, ppl {msg}");
    let result = eval::perplexity(
        &model,
        &text,
        &PerplexityOptions {
            context: ctx,
            max_chunks: chunks,
        },
        |done, total, ppl| {
            progress.update_with(done, total, format!("{ppl:.4}"));
        },
    )?;
    progress.finish();
    if json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "ppl {:.4} ± {:.4} over {} chunks of {} tokens ({} scored) in {:.1} s",
            result.ppl,
            result.ppl * result.nll_stderr,
            result.chunks,
            result.context,
            result.tokens_scored,
            result.seconds
        );
    }
    Ok(())
}
