//! [`Conversation`]: a session that keeps its transcript, for apps that send one user
//! message at a time.

use std::path::Path;

use super::{ChatTools, GenerateOptions, Generation, Session, SessionFileError};
use crate::model::ModelError;
use crate::tokenizer::ChatMessage;

/// A chat with its transcript. [`Conversation::send`] adds the user's message, generates the
/// reply over the whole conversation (reusing every earlier turn from the session's cache)
/// and adds the reply. Turns the context policy drops leave the transcript too, so the next
/// turn renders the same conversation the cache holds.
pub struct Conversation {
    session: Session,
    messages: Vec<ChatMessage>,
}

impl Conversation {
    /// A conversation over `session` (usually fresh), starting with `messages` (e.g. a
    /// system message, or a transcript restored with the session).
    pub fn new(session: Session, messages: Vec<ChatMessage>) -> Conversation {
        Conversation { session, messages }
    }

    /// Replaces this conversation with one saved by [`Conversation::save`] (transcript and
    /// cache). A refused file changes nothing.
    pub fn restore(&mut self, path: &Path) -> Result<(), SessionFileError> {
        self.messages = self.session.restore(path)?;
        Ok(())
    }

    /// Sends the user's `text` and generates the reply, streaming it to `on_text`. On an
    /// error the transcript is left as it was.
    pub fn send(
        &mut self,
        text: &str,
        options: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        self.send_with_tools(text, &ChatTools::default(), options, on_text)
    }

    /// [`Conversation::send`] offering `tools`; the reply's calls are in
    /// [`Generation::tool_calls`]. Answer them with [`Conversation::push`] (role `tool`) and
    /// [`Conversation::reply`].
    pub fn send_with_tools(
        &mut self,
        text: &str,
        tools: &ChatTools,
        options: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        self.messages.push(ChatMessage::new("user", text));
        let reply = self.reply(tools, options, on_text);
        if reply.is_err() {
            self.messages.pop();
        }
        reply
    }

    /// Adds a message without generating (a tool's result, or a turn written elsewhere).
    pub fn push(&mut self, message: ChatMessage) {
        self.messages.push(message);
    }

    /// Generates the assistant's next message for the transcript as it stands (e.g. after
    /// tool results were pushed) and adds it. On an error the transcript is unchanged.
    pub fn reply(
        &mut self,
        tools: &ChatTools,
        options: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        let reply = self
            .session
            .chat_with_tools(&self.messages, tools, options, on_text)?;
        if reply.stats.dropped > 0 {
            let system = self.system_len();
            let end = (system + reply.stats.dropped).min(self.messages.len() - 1);
            self.messages.drain(system..end);
        }
        // A reply with tool calls keeps its call markers (decoded with the special tokens),
        // so the template renders the same turn next time and its tokens are reused.
        let content = if reply.tool_calls.is_empty() {
            reply.text.trim().to_string()
        } else {
            self.session
                .model()
                .tokenizer()
                .decode_with_special(&reply.tokens)?
        };
        self.messages.push(ChatMessage::new("assistant", content));
        Ok(reply)
    }

    fn system_len(&self) -> usize {
        self.messages
            .iter()
            .take_while(|m| m.role == "system")
            .count()
    }

    /// The transcript, oldest first.
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// Sets the leading system message (replacing one that is there).
    pub fn set_system(&mut self, content: &str) {
        match self.messages.first_mut() {
            Some(first) if first.role == "system" => first.content = content.to_string(),
            _ => self.messages.insert(0, ChatMessage::new("system", content)),
        }
    }

    /// Forgets every message but the system messages, and the cache.
    pub fn reset(&mut self) {
        let system = self.system_len();
        self.messages.truncate(system);
        self.session.reset();
    }

    /// Saves the transcript with the session's cache. Returns the file size in bytes.
    pub fn save(&self, path: &Path) -> Result<u64, SessionFileError> {
        self.session.save(path, &self.messages)
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }
}
