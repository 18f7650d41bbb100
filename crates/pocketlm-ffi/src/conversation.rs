//! [`Conversation`]: a session that keeps its own transcript, so an app sends one user
//! message at a time and can save and restore the whole chat.

use std::sync::{Arc, Mutex};

use crate::generation::{ChatMessage, GenerationConfig, GenerationResult, TokenCallback};
use crate::session::{Input, Session, lock};
use crate::{PocketLmError, guard};

/// A chat with its transcript: `send` adds the user's message, generates the reply (reusing
/// every earlier turn from the cache) and adds the reply. When the context fills up, the
/// oldest turns leave the prompt and the transcript alike (unless the engine's context
/// policy is `Error`). Thread-safe; calls wait for each other.
#[derive(uniffi::Object)]
pub struct Conversation {
    session: Session,
    messages: Mutex<Vec<ChatMessage>>,
}

impl std::fmt::Debug for Conversation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conversation")
            .field("messages", &lock(&self.messages).len())
            .finish_non_exhaustive()
    }
}

impl Conversation {
    pub(crate) fn new(session: Session, messages: Vec<ChatMessage>) -> Conversation {
        Conversation {
            session,
            messages: Mutex::new(messages),
        }
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
        guard(|| {
            let mut messages = lock(&self.messages).clone();
            messages.push(ChatMessage {
                role: "user".into(),
                content: text,
            });
            let input = Input::Chat(messages.iter().cloned().map(Into::into).collect());
            let result = self.session.run(input, &config, callback)?;
            let dropped = result.stats.dropped as usize;
            if dropped > 0 {
                let system = messages.iter().take_while(|m| m.role == "system").count();
                messages.drain(system..(system + dropped).min(messages.len()));
            }
            messages.push(ChatMessage {
                role: "assistant".into(),
                content: result.text.trim().to_string(),
            });
            *lock(&self.messages) = messages;
            Ok(result)
        })
    }

    /// The transcript: system message, user messages and replies, oldest first.
    pub fn messages(&self) -> Vec<ChatMessage> {
        lock(&self.messages).clone()
    }

    /// Saves the transcript and the KV cache to `path` (restore with
    /// `Engine::restore_conversation`). Returns the file size in bytes.
    pub fn save(&self, path: String) -> Result<u64, PocketLmError> {
        self.session.save(path, self.messages())
    }

    /// Asks a running `send` to stop (its reply ends with `Cancelled`).
    pub fn cancel(&self) {
        self.session.cancel();
    }

    /// Forgets everything but the system message.
    pub fn reset(&self) -> Result<(), PocketLmError> {
        lock(&self.messages).retain(|m| m.role == "system");
        self.session.reset()
    }

    /// Tokens the conversation holds in the context, and the context's size.
    pub fn context_used(&self) -> Result<u32, PocketLmError> {
        self.session.context_used()
    }

    pub fn context_length(&self) -> u32 {
        self.session.context_length()
    }
}
