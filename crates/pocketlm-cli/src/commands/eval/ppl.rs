//! `pocketlm eval ppl`.

use pocketlm_eval as eval;

use crate::args::PplArgs;
use crate::commands::{CliResult, read_text};
use crate::model_options::open_model;
use crate::progress::Progress;

pub fn execute(args: PplArgs) -> CliResult {
    let model = open_model(&args.model)?;
    let text = read_text(&args.text)?;
    let progress = Progress::new("{bar:40} {pos}/{len} chunks, ppl {msg}");
    let result = eval::perplexity(
        &model,
        &text,
        &args.chunking.perplexity_options(),
        |done, total, ppl| {
            progress.update_with(done, total, format!("{ppl:.4}"));
        },
    )?;
    progress.finish();
    if args.output.json {
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
