//! `pocketlm serve`: opens the model, starts the slots and serves until SIGINT/SIGTERM.

use std::sync::Arc;

use pocketlm_server::{EngineThreads, Server, ServerConfig, shutdown_signal};

use crate::args::ServeArgs;
use crate::commands::CliResult;
use crate::model_options::{THREAD_PLACEMENT, decode_team, open_model};

pub fn execute(a: ServeArgs) -> CliResult {
    // The batching engine gets a pool and decode team of its own, placed as `main` placed the
    // one this runs in. Thread-per-slot mode runs the model outside any pool, so its products
    // go to rayon's global pool: only that mode needs it, with the command's thread count.
    let threads = rayon::current_num_threads();
    let engine_threads = match THREAD_PLACEMENT.get() {
        Some(placement) if !a.no_batching => EngineThreads {
            pool: Some(Arc::new(
                placement.build_pool(|i| format!("pocketlm-engine-{i}"))?,
            )),
            team: decode_team(placement).map(Arc::new),
        },
        _ => EngineThreads::default(),
    };
    if engine_threads.pool.is_none()
        && let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
    {
        log::warn!("rayon's global pool was already set up: {e}");
    }
    let model = Arc::new(open_model(&a.model)?);
    let model_id = a.alias.clone().unwrap_or_else(|| {
        a.model.file_stem().map_or_else(
            || "pocketlm".to_string(),
            |s| s.to_string_lossy().into_owned(),
        )
    });
    let config = ServerConfig {
        model_id,
        parallel: a.parallel,
        context_len: a.ctx,
        max_queue: a.queue,
        max_body_bytes: a.max_body_bytes,
        api_key: a.api_key.clone(),
        batching: !a.no_batching,
        step_prompt_tokens: a.step_prompt_tokens,
        engine_threads,
    };
    let server = Server::new(model, config)?;
    let context = server.context_len();
    // The async side only parses, routes and streams; two workers are plenty and leave the
    // cores to inference.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.clamp(1, 2))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port)).await?;
        let address = listener.local_addr()?;
        // Scripts wait for this line (and read the port from it with --port 0).
        eprintln!(
            "pocketlm serve: listening on http://{address} ({} slots of {context} positions, {threads} threads, {})",
            a.parallel,
            if a.no_batching { "a thread per slot" } else { "continuous batching" }
        );
        server.serve(listener, shutdown_signal()).await?;
        eprintln!("pocketlm serve: stopped");
        Ok(())
    })
}
