//! `pocketlm chat`: a conversation over one session, so each turn computes only its new
//! tokens. Interactive on a terminal; from a pipe, one user turn per input line.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;
use std::time::Instant;

use pocketlm_runtime::{Conversation, Generation, Session};

use crate::args::ChatArgs;
use crate::commands::CliResult;
use crate::model_options::open_model;

pub fn execute(a: ChatArgs) -> CliResult {
    let model = Arc::new(open_model(&a.model)?);
    let options = a.generation.options()?;
    let session = Session::new(Arc::clone(&model), a.generation.ctx)?;
    let mut conversation = Conversation::new(session, Vec::new());
    if let Some(path) = &a.load_session {
        let started = Instant::now();
        conversation.restore(path)?;
        if a.stats_json {
            let line = serde_json::json!({
                "event": "restore",
                "restore_ms": started.elapsed().as_secs_f64() * 1e3,
                "tokens": conversation.session().history().len(),
                "messages": conversation.messages().len(),
            });
            eprintln!("{line}");
        }
    }
    // The flag wins over the policy saved with a session.
    if a.generation.context_policy.is_some() {
        conversation
            .session_mut()
            .set_context_policy(a.generation.context_policy);
    }
    if let Some(system) = &a.system {
        conversation.set_system(system);
    }

    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let mut stdout = std::io::stdout().lock();
    let mut lines = stdin.lock().lines();
    let mut turn = 0usize;
    loop {
        if interactive {
            write!(stdout, "> ")?;
            stdout.flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let text = line.trim_end_matches(['\r', '\n']);
        if interactive {
            match text.trim() {
                "" => continue,
                "/exit" | "/quit" => break,
                "/reset" => {
                    conversation.reset();
                    continue;
                }
                _ => {}
            }
        }
        turn += 1;
        if a.no_prefix_reuse {
            conversation.session_mut().reset();
        }
        let mut emit = |piece: &str| {
            // A closed pipe (e.g. `| head`) ends the reply instead of failing.
            stdout.write_all(piece.as_bytes()).is_ok() && stdout.flush().is_ok()
        };
        let reply = conversation.send(text, &options, &mut emit)?;
        writeln!(stdout)?;
        if a.stats_json {
            eprintln!("{}", turn_stats(turn, &reply));
        }
    }
    if let Some(path) = &a.save_session {
        conversation.save(path)?;
    }
    Ok(())
}

fn turn_stats(turn: usize, reply: &Generation) -> serde_json::Value {
    let s = &reply.stats;
    serde_json::json!({
        "turn": turn,
        "prompt_tokens": s.prompt_tokens,
        "reused_tokens": s.reused_tokens,
        "dropped_messages": s.dropped,
        "ttft_ms": s.time_to_first_token_ms,
        "prefill_tokens_per_s": s.prefill_tokens_per_second(),
        "decode_tokens_per_s": s.decode_tokens_per_second(),
        "generated_tokens": s.generated_tokens,
        "stop_reason": reply.stop_reason,
    })
}
