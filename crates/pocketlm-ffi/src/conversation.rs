//! [`Conversation`]: a session that keeps its own transcript, so an app sends one user
//! message at a time and can save and restore the whole chat.

use std::path::Path;
use std::sync::Arc;

use crate::generation::{ChatMessage, GenerationConfig, GenerationResult, TokenCallback, Tools};
use crate::session::{Input, Session};
use crate::{PocketLmError, guard};

/// A chat with its transcript: `send` adds the user's message, generates the reply (reusing
/// every earlier turn from the cache) and adds the reply. When the context fills up, the
/// oldest turns leave the prompt and the transcript alike (unless the engine's context
/// policy is `Error`). Thread-safe; calls wait for each other.
#[derive(Debug, uniffi::Object)]
pub struct Conversation {
    session: Session,
}

impl Conversation {
    /// A conversation over a fresh `session`, starting with `system` when given.
    pub(crate) fn new(
        session: Session,
        system: Option<&str>,
    ) -> Result<Conversation, PocketLmError> {
        if let Some(system) = system {
            session.lock_session()?.set_system(system);
        }
        Ok(Conversation { session })
    }

    /// A conversation over a fresh `session`, restored from `path`.
    pub(crate) fn restored(session: Session, path: &str) -> Result<Conversation, PocketLmError> {
        session.lock_session()?.restore(Path::new(path))?;
        Ok(Conversation { session })
    }
}

#[uniffi::export]
impl Conversation {
    /// Sends the user's `text` and generates the reply, streaming it to `callback` when one
    /// is given. On an error the transcript is left as it was.
    pub fn send(
        &self,
        text: String,
        config: GenerationConfig,
        callback: Option<Arc<dyn TokenCallback>>,
    ) -> Result<GenerationResult, PocketLmError> {
        self.session
            .run(Input::Send(text, Default::default()), &config, callback)
    }

    /// [`Conversation::send`] offering `tools`; the calls the reply makes are in
    /// `GenerationResult::tool_calls`. Answer them with `add_message` (role `tool`) and
    /// `reply`.
    pub fn send_with_tools(
        &self,
        text: String,
        tools: Tools,
        config: GenerationConfig,
        callback: Option<Arc<dyn TokenCallback>>,
    ) -> Result<GenerationResult, PocketLmError> {
        let tools = tools.to_runtime()?;
        self.session
            .run(Input::Send(text, tools), &config, callback)
    }

    /// Adds a message to the transcript without generating (a tool's result: role `tool`).
    pub fn add_message(&self, message: ChatMessage) -> Result<(), PocketLmError> {
        guard(|| {
            self.session.lock_session()?.push(message.into());
            Ok(())
        })
    }

    /// Generates the assistant's next message for the transcript as it stands (e.g. after
    /// tool results) and adds it; `tools` may be offered again.
    pub fn reply(
        &self,
        tools: Option<Tools>,
        config: GenerationConfig,
        callback: Option<Arc<dyn TokenCallback>>,
    ) -> Result<GenerationResult, PocketLmError> {
        let tools = tools
            .map(|t| t.to_runtime())
            .transpose()?
            .unwrap_or_default();
        self.session.run(Input::Reply(tools), &config, callback)
    }

    /// The transcript: system message, user messages and replies, oldest first.
    pub fn messages(&self) -> Result<Vec<ChatMessage>, PocketLmError> {
        guard(|| {
            let inner = self.session.lock_session()?;
            Ok(inner.messages().iter().cloned().map(Into::into).collect())
        })
    }

    /// Saves the transcript and the KV cache to `path` (restore with
    /// `Engine::restore_conversation`). Returns the file size in bytes.
    pub fn save(&self, path: String) -> Result<u64, PocketLmError> {
        guard(|| Ok(self.session.lock_session()?.save(Path::new(&path))?))
    }

    /// Asks a running `send` to stop (its reply ends with `Cancelled`).
    pub fn cancel(&self) {
        self.session.cancel();
    }

    /// Forgets everything but the system message.
    pub fn reset(&self) -> Result<(), PocketLmError> {
        guard(|| {
            self.session.lock_session()?.reset();
            Ok(())
        })
    }

    /// Tokens the conversation holds in the context.
    pub fn context_used(&self) -> Result<u32, PocketLmError> {
        self.session.context_used()
    }

    /// KV-cache positions of the conversation's session.
    pub fn context_length(&self) -> u32 {
        self.session.context_length()
    }
}
