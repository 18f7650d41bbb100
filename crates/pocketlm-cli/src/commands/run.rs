//! `pocketlm run`: generation streamed to stdout, speed on stderr.

use std::io::Write;
use std::sync::Arc;

use pocketlm_runtime::tokenizer::ChatMessage;
use pocketlm_runtime::{Session, StopReason};

use crate::args::RunArgs;
use crate::commands::CliResult;
use crate::model_options::open_model;

pub fn execute(a: RunArgs) -> CliResult {
    let load_started = std::time::Instant::now();
    let model = Arc::new(open_model(&a.model)?);
    let load_ms = load_started.elapsed().as_secs_f64() * 1e3;
    let options = a.generation.options()?;
    let mut session = Session::new(Arc::clone(&model), a.generation.ctx)?;
    session.set_context_policy(a.generation.context_policy);
    let mut stdout = std::io::stdout().lock();
    let mut emit = |piece: &str| {
        // A closed pipe (e.g. `| head`) ends generation instead of failing.
        stdout.write_all(piece.as_bytes()).is_ok() && stdout.flush().is_ok()
    };
    let generation = if a.chat {
        let mut messages = Vec::new();
        if let Some(system) = a.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", a.prompt));
        session.chat(&messages, &options, &mut emit)?
    } else {
        // Constrained output is printed alone, so that it can be piped into a parser.
        if !a.prompt.is_empty() && options.constraint.is_none() {
            emit(&a.prompt);
        }
        session.generate(&a.prompt, &options, &mut emit)?
    };
    emit("\n");
    let s = &generation.stats;
    eprintln!(
        "load {:.0} ms | prompt {} tokens, prefill {:.1} tok/s | time to first token {:.0} ms | \
         generated {} tokens, decode {:.1} tok/s | stop: {:?} | threads {} | kernels {}",
        load_ms,
        s.prompt_tokens,
        s.prefill_tokens_per_second(),
        s.time_to_first_token_ms,
        s.generated_tokens,
        s.decode_tokens_per_second(),
        generation.stop_reason,
        rayon::current_num_threads(),
        pocketlm_kernels::active_path().name(),
    );
    if generation.stop_reason == StopReason::ConstraintIncomplete {
        return Err(format!(
            "the output was cut short before it matched its constraint ({} tokens; raise -n)",
            generation.tokens.len()
        )
        .into());
    }
    Ok(())
}
