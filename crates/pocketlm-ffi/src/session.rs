//! [`Session`]: one KV cache over an engine's weights, serialised calls, cancellation.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;

use crate::engine::Engine;
use crate::generation::{
    ChatMessage, ContextPolicy, GenerationConfig, GenerationResult, GenerationStats, TokenCallback,
    ToolCall,
};
use crate::{PocketLmError, guard, panic_message};

/// One conversation: a KV cache over an [`Engine`]'s weights. Each `generate` continues from
/// what the session already holds (call `reset` to start over); `chat` reuses the cached
/// prefix of the conversation it is given.
/// Safe to use from any thread; concurrent calls on one session wait for each other.
#[derive(uniffi::Object)]
pub struct Session {
    engine: Arc<Engine>,
    /// The runtime session inside a conversation: [`Session`]'s calls use the session, a
    /// [`crate::Conversation`]'s `send` the transcript too.
    inner: Mutex<pocketlm_runtime::Conversation>,
    cancel: AtomicBool,
    /// The worker thread running this session's generation, to refuse (instead of
    /// deadlocking on) calls made from inside its own callback.
    busy_thread: Mutex<Option<ThreadId>>,
    last_stats: Mutex<Option<GenerationStats>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock is caught by `guard` and reported; the data it protects
    // (stats, a thread id) stays usable, and the session's KV cache is reset below.
    m.lock().unwrap_or_else(|poisoned| {
        m.clear_poison();
        poisoned.into_inner()
    })
}

/// Records the current thread as the one generating for a session, until dropped (also
/// on unwind).
struct BusyMark<'a>(&'a Mutex<Option<ThreadId>>);

impl<'a> BusyMark<'a> {
    fn set(slot: &'a Mutex<Option<ThreadId>>) -> Self {
        *lock(slot) = Some(std::thread::current().id());
        BusyMark(slot)
    }
}

impl Drop for BusyMark<'_> {
    fn drop(&mut self) {
        *lock(self.0) = None;
    }
}

pub(crate) enum Input {
    Text(String),
    Chat(Vec<pocketlm_runtime::tokenizer::ChatMessage>),
    /// A user message for the transcript (a [`crate::Conversation`] turn), with tools.
    Send(String, pocketlm_runtime::ChatTools),
    /// The next assistant message for the transcript as it stands (after tool results).
    Reply(pocketlm_runtime::ChatTools),
}

impl Session {
    /// A session over `engine` with an empty cache and the engine's context policy.
    pub(crate) fn new(engine: Arc<Engine>) -> Result<Session, PocketLmError> {
        let mut inner =
            pocketlm_runtime::Session::new(Arc::clone(&engine.model), engine.context_length)?;
        inner.set_context_policy(engine.context_policy.map(Into::into));
        Ok(Session {
            inner: Mutex::new(pocketlm_runtime::Conversation::new(inner, Vec::new())),
            engine,
            cancel: AtomicBool::new(false),
            busy_thread: Mutex::new(None),
            last_stats: Mutex::new(None),
        })
    }

    fn check_reentry(&self) -> Result<(), PocketLmError> {
        if *lock(&self.busy_thread) == Some(std::thread::current().id()) {
            return Err(PocketLmError::Internal {
                reason: "a session was called from its own token callback".into(),
            });
        }
        Ok(())
    }

    pub(crate) fn lock_session(
        &self,
    ) -> Result<MutexGuard<'_, pocketlm_runtime::Conversation>, PocketLmError> {
        self.check_reentry()?;
        Ok(match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                // A previous call panicked mid-generation: the cache may be half written.
                // (The transcript is whole: a turn is added only once its reply is done.)
                self.inner.clear_poison();
                let mut g = poisoned.into_inner();
                g.reset();
                g
            }
        })
    }

    pub(crate) fn run(
        &self,
        input: Input,
        config: &GenerationConfig,
        callback: Option<Arc<dyn TokenCallback>>,
    ) -> Result<GenerationResult, PocketLmError> {
        guard(|| {
            let options = config.to_options()?;
            // Lock on the caller's thread, never on a pool worker, so that a pool thread
            // never blocks waiting for another session.
            let mut locked = self.lock_session()?;
            let conversation: &mut pocketlm_runtime::Conversation = &mut locked;
            self.cancel.store(false, Ordering::SeqCst);
            let mut callback_error: Option<String> = None;
            let generation = self.engine.pool.install(|| {
                let _busy = BusyMark::set(&self.busy_thread);
                let on_text = |piece: &str| -> bool {
                    if callback_error.is_some() || self.cancel.load(Ordering::SeqCst) {
                        return false;
                    }
                    let Some(cb) = &callback else { return true };
                    // A foreign exception surfaces as a panic in uniffi's generated code
                    // (the callback returns a plain bool): catch it here, stop, report.
                    match catch_unwind(AssertUnwindSafe(|| cb.on_token(piece.to_string()))) {
                        Ok(keep_going) => keep_going && !self.cancel.load(Ordering::SeqCst),
                        Err(payload) => {
                            callback_error = Some(panic_message(payload.as_ref()));
                            false
                        }
                    }
                };
                let run = || match &input {
                    Input::Text(prompt) => conversation
                        .session_mut()
                        .generate(prompt, &options, on_text),
                    Input::Chat(messages) => {
                        conversation.session_mut().chat(messages, &options, on_text)
                    }
                    Input::Send(text, tools) => {
                        conversation.send_with_tools(text, tools, &options, on_text)
                    }
                    Input::Reply(tools) => conversation.reply(tools, &options, on_text),
                };
                pocketlm_kernels::pool::on_team(self.engine.team.as_deref(), run)
            })?;
            if let Some(message) = callback_error {
                return Err(PocketLmError::CallbackFailed { reason: message });
            }
            let stats = GenerationStats::from(&generation.stats);
            *lock(&self.last_stats) = Some(stats.clone());
            Ok(GenerationResult {
                text: generation.text,
                tokens: generation.tokens,
                stop_reason: generation.stop_reason.into(),
                stats,
                tool_calls: generation
                    .tool_calls
                    .into_iter()
                    .map(|c| ToolCall {
                        name: c.name,
                        arguments_json: c.arguments.to_string(),
                    })
                    .collect(),
                tool_call_error: generation.tool_call_error.map(|e| e.to_string()),
            })
        })
    }
}

#[uniffi::export]
impl Session {
    /// Continues the session with `prompt` (BOS is added when the session is empty and the
    /// model wants one), streaming each new piece of text to `callback`.
    pub fn generate(
        &self,
        prompt: String,
        config: GenerationConfig,
        callback: Arc<dyn TokenCallback>,
    ) -> Result<GenerationResult, PocketLmError> {
        self.run(Input::Text(prompt), &config, Some(callback))
    }

    /// Like [`generate`](Self::generate), without streaming: blocks until done.
    pub fn complete(
        &self,
        prompt: String,
        config: GenerationConfig,
    ) -> Result<GenerationResult, PocketLmError> {
        self.run(Input::Text(prompt), &config, None)
    }

    /// Renders `messages` with the model's chat template and generates the assistant's
    /// reply. What the rendered conversation shares with the session's cache (usually every
    /// earlier turn) is reused, so a turn computes only its new tokens
    /// (`GenerationStats::reused_tokens`). A conversation too long for the context loses its
    /// oldest turns unless the context policy says otherwise (`GenerationStats::dropped`).
    pub fn chat(
        &self,
        messages: Vec<ChatMessage>,
        config: GenerationConfig,
        callback: Option<Arc<dyn TokenCallback>>,
    ) -> Result<GenerationResult, PocketLmError> {
        let messages = messages
            .into_iter()
            .map(|m| pocketlm_runtime::tokenizer::ChatMessage::new(m.role, m.content))
            .collect();
        self.run(Input::Chat(messages), &config, callback)
    }

    /// What this session does when a prompt does not fit; None = drop the oldest turns for
    /// chat, fail for raw text.
    pub fn set_context_policy(&self, policy: Option<ContextPolicy>) -> Result<(), PocketLmError> {
        guard(|| {
            self.lock_session()?
                .session_mut()
                .set_context_policy(policy.map(Into::into));
            Ok(())
        })
    }

    /// Saves the KV cache, the tokens and `messages` (the conversation they render; may be
    /// empty) to `path`. Returns the file size in bytes.
    pub fn save(&self, path: String, messages: Vec<ChatMessage>) -> Result<u64, PocketLmError> {
        guard(|| {
            let messages: Vec<_> = messages.into_iter().map(Into::into).collect();
            Ok(self
                .lock_session()?
                .session()
                .save(std::path::Path::new(&path), &messages)?)
        })
    }

    /// Replaces this session's state with one saved by [`Session::save`] with the same model
    /// file and KV cache type; returns the saved messages. A file from another model, a
    /// truncated or corrupt one is refused with `InvalidSession` and changes nothing.
    pub fn restore(&self, path: String) -> Result<Vec<ChatMessage>, PocketLmError> {
        guard(|| {
            let messages = self
                .lock_session()?
                .session_mut()
                .restore(std::path::Path::new(&path))?;
            Ok(messages.into_iter().map(Into::into).collect())
        })
    }

    /// Asks a running generation on this session to stop (it ends with `Cancelled`). Safe
    /// from any thread; no effect when nothing is running.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Number of tokens `text` encodes to (without BOS). Does not wait for a running
    /// generation.
    pub fn count_tokens(&self, text: String) -> Result<u32, PocketLmError> {
        self.engine.count_tokens(text)
    }

    /// Forgets the conversation (empties the KV cache).
    pub fn reset(&self) -> Result<(), PocketLmError> {
        guard(|| {
            self.lock_session()?.session_mut().reset();
            Ok(())
        })
    }

    /// Tokens currently held in the session's context.
    pub fn context_used(&self) -> Result<u32, PocketLmError> {
        guard(|| Ok(self.lock_session()?.session().history().len() as u32))
    }

    /// KV-cache positions of this session.
    pub fn context_length(&self) -> u32 {
        self.engine.context_length as u32
    }

    /// Statistics of the last successful generation, if any.
    pub fn stats(&self) -> Option<GenerationStats> {
        lock(&self.last_stats).clone()
    }
}
