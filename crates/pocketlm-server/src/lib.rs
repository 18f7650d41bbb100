//! `pocketlm serve`: an OpenAI-compatible HTTP server over [`pocketlm_runtime`] sessions.
//!
//! [`routes`] (axum handlers, API key, metrics and body-limit middleware) → [`scheduler`]
//! (admission, bounded queue, slot choice by shared prompt prefix) → [`engine`] (one thread
//! that owns a [`pocketlm_runtime::Session`] per slot, each with its own KV cache and prefix
//! reuse, and runs all busy slots in batched forward passes; or with `batching` off, a
//! [`slot`] thread per session). Inference never runs on the async runtime's workers. The
//! mobile library does not depend on this crate.

pub mod api;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod routes;
pub mod scheduler;
pub mod slot;

use std::future::Future;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use pocketlm_kernels::pool::Team;
use pocketlm_runtime::model::KvCache;
use pocketlm_runtime::{ContextPolicy, Model, Session};

pub use error::{ApiError, ServerError};
use metrics::Metrics;
use routes::AppState;
use scheduler::Scheduler;

/// Where the batching engine runs its forward passes. A pool makes each parallel product
/// start from inside the pool instead of waking it from outside (a futex round trip per
/// matrix, ~150 a token: about 2 ms a step on a 135M model at 2 threads); a team takes the
/// one-token products with spinning helpers. Both `None`: rayon's global pool, no team.
#[derive(Clone, Default)]
pub struct EngineThreads {
    pub pool: Option<Arc<rayon::ThreadPool>>,
    pub team: Option<Arc<Team>>,
}

impl std::fmt::Debug for EngineThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineThreads")
            .field(
                "pool_threads",
                &self.pool.as_ref().map(|p| p.current_num_threads()),
            )
            .field("team", &self.team.is_some())
            .finish()
    }
}

/// How a [`Server`] runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The name `/v1/models` lists and responses carry.
    pub model_id: String,
    /// Slots: requests that run at once, each with its own KV cache.
    pub parallel: usize,
    /// KV cache positions per slot (clamped to the model's trained context).
    pub context_len: usize,
    /// Requests that may wait for a slot; beyond that, 503.
    pub max_queue: usize,
    /// Largest request body; beyond that, 413.
    pub max_body_bytes: usize,
    /// When set, requests need `Authorization: Bearer KEY` (401 otherwise; `/health` is open).
    pub api_key: Option<String>,
    /// Continuous batching: all busy slots share each forward pass. Off: a thread per slot.
    pub batching: bool,
    /// Prompt tokens one batched step reads (across requests still reading their prompts).
    pub step_prompt_tokens: usize,
    /// The batching engine's thread pool and decode team.
    pub engine_threads: EngineThreads,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model_id: "pocketlm".to_string(),
            parallel: 1,
            context_len: 2048,
            max_queue: 16,
            max_body_bytes: 1 << 20,
            api_key: None,
            batching: true,
            step_prompt_tokens: pocketlm_runtime::session::DEFAULT_STEP_PROMPT_TOKENS,
            engine_threads: EngineThreads::default(),
        }
    }
}

/// The server: slots started (their KV caches allocated), ready to [`Server::serve`].
pub struct Server {
    state: Arc<AppState>,
    slot_threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Allocates a session per slot and starts their threads.
    pub fn new(model: Arc<Model>, config: ServerConfig) -> Result<Server, ServerError> {
        if config.parallel == 0 {
            return Err(ServerError::Config("parallel must be at least 1"));
        }
        if config.max_body_bytes == 0 {
            return Err(ServerError::Config("the body size limit must be positive"));
        }
        let mut sessions = Vec::with_capacity(config.parallel);
        for slot in 0..config.parallel {
            let mut session = Session::new(Arc::clone(&model), config.context_len)
                .map_err(|source| ServerError::Slot { slot, source })?;
            // Requests that do not fit are refused up front (400), never cut silently.
            session.set_context_policy(Some(ContextPolicy::Error));
            sessions.push(session);
        }
        let context_len = sessions[0].context_len();
        let model_config = model.config();
        let kv_bytes_per_position = KvCache::required_bytes(
            model.options().kv_cache,
            model_config.num_layers,
            model_config.kv_dim(),
            model_config.head_dim,
            1,
        )
        .unwrap_or(0) as u64;

        let metrics = Arc::new(Metrics::default());
        let mut slot_threads = Vec::new();
        let scheduler;
        if config.batching {
            let (inbox, received) = mpsc::channel();
            scheduler = Arc::new(Scheduler::new(
                vec![inbox; config.parallel],
                config.max_queue,
                kv_bytes_per_position,
                context_len,
            ));
            let thread = engine::spawn(
                Arc::clone(&model),
                sessions,
                received,
                Arc::clone(&scheduler),
                Arc::clone(&metrics),
                config.step_prompt_tokens.max(1),
                config.engine_threads.clone(),
            )
            .map_err(|source| ServerError::Thread { slot: 0, source })?;
            slot_threads.push(thread);
        } else {
            let (inboxes, receivers): (Vec<_>, Vec<_>) =
                (0..config.parallel).map(|_| mpsc::channel()).unzip();
            scheduler = Arc::new(Scheduler::new(
                inboxes,
                config.max_queue,
                kv_bytes_per_position,
                context_len,
            ));
            for (slot, (session, inbox)) in sessions.into_iter().zip(receivers).enumerate() {
                let thread = slot::spawn(
                    slot,
                    session,
                    inbox,
                    Arc::clone(&scheduler),
                    Arc::clone(&metrics),
                )
                .map_err(|source| ServerError::Thread { slot, source })?;
                slot_threads.push(thread);
            }
        }
        let state = Arc::new(AppState {
            model,
            scheduler,
            metrics,
            model_id: config.model_id,
            context_len,
            max_body_bytes: config.max_body_bytes,
            api_key: config.api_key,
        });
        Ok(Server {
            state,
            slot_threads,
        })
    }

    /// KV cache positions each slot holds (the configured context, clamped to the model's).
    pub fn context_len(&self) -> usize {
        self.state.context_len
    }

    /// Serves on `listener` until `shutdown` completes; then admits nothing more, cancels
    /// running generations at their next token (their streams end with a last chunk),
    /// waits for open responses to finish and stops the slot threads.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let scheduler = Arc::clone(&self.state.scheduler);
        let app = routes::router(Arc::clone(&self.state));
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                scheduler.begin_shutdown();
            })
            .await;
        self.state.scheduler.begin_shutdown();
        self.state.scheduler.close();
        let threads = self.slot_threads;
        // Joining blocks; the slots stop within a token once cancelled.
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
        result.map_err(ServerError::Io)
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
