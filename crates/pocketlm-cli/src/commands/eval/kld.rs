//! `pocketlm eval kld`.

use pocketlm_eval as eval;

use crate::args::KldArgs;
use crate::commands::{CliResult, read_text};
use crate::model_options::open_model;
use crate::progress::Progress;

pub fn execute(args: KldArgs) -> CliResult {
    let model = open_model(&args.model)?;
    let base = open_model(&args.base)?;
    let text = read_text(&args.text)?;
    let progress = Progress::new("{bar:40} {pos}/{len} chunks, KLD {msg}");
    let r = eval::kl_divergence(
        &model,
        &base,
        &text,
        &args.chunking.perplexity_options(),
        |done, total, kld| {
            progress.update_with(done, total, format!("{kld:.6}"));
        },
    )?;
    progress.finish();
    if args.output.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "KLD             {:.6} ± {:.6} (median {:.6}, p99 {:.6}, max {:.6})",
        r.kld, r.kld_stderr, r.kld_median, r.kld_p99, r.kld_max
    );
    println!(
        "top-1 agreement {:.2}% ± {:.2}%",
        r.top1_agreement * 100.0,
        r.top1_agreement_stderr * 100.0
    );
    println!(
        "ppl             {:.4} (base {:.4}), ratio {:.4}, delta {:+.4}, ln ratio {:.5} ± {:.5}",
        r.ppl, r.ppl_base, r.ppl_ratio, r.ppl_delta, r.ln_ppl_ratio, r.ln_ppl_ratio_stderr
    );
    println!(
        "scored          {} tokens in {} chunks of {} in {:.1} s",
        r.tokens_scored, r.chunks, r.context, r.seconds
    );
    Ok(())
}
