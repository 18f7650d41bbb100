//! Continuous batching: generations of several sessions advanced together, one forward pass
//! per step ([`Model::forward_batch`]). Each step runs the last sampled token of every
//! decoding generation plus chunks of prompts still being read, up to a budget of prompt
//! tokens, so a long prompt is read over several steps while the others keep decoding.
//!
//! A [`BatchJob`] is started on its session ([`Session::start_chat`],
//! [`Session::start_completion`]) exactly as [`Session::chat_with_tools`] and
//! [`Session::complete`] would run it (context policy, prefix reuse, output constraint,
//! tool calls), and finished with [`BatchJob::finish`] once it stops.

use std::time::Instant;

use super::decoding::{Decoding, Next, OutputGuard};
use super::{ChatTools, FittedPrompt, GenerateOptions, Generation, GenerationStats, Session};
use super::{StopReason, ToolCallFormat};
use crate::model::{BatchInput, Model, ModelError};
use crate::tokenizer::ChatMessage;

/// Prompt tokens one step reads across all jobs, when the caller has no other figure: large
/// enough for the matrix kernels, small enough that decoding jobs wait one short pass.
pub const DEFAULT_STEP_PROMPT_TOKENS: usize = 128;

/// One session's generation, advanced by [`step_batch`].
pub struct BatchJob<'m> {
    model: &'m Model,
    /// Prompt tokens not yet in the cache.
    pending: Vec<u32>,
    /// The token sampled last, to run in the next step.
    next_token: Option<u32>,
    decoding: Decoding<'m>,
    tool_format: Option<ToolCallFormat>,
    on_text: Box<dyn FnMut(&str) -> bool + 'm>,
    outcome: Option<Result<StopReason, ModelError>>,
}

impl<'m> BatchJob<'m> {
    /// Whether it has stopped (or failed): [`BatchJob::finish`] gives its result.
    pub fn is_done(&self) -> bool {
        self.outcome.is_some()
    }

    /// Prompt tokens still to read (0 once decoding).
    pub fn pending_prompt_tokens(&self) -> usize {
        self.pending.len()
    }

    /// Stops it before its next step (the client went away); it ends as
    /// [`StopReason::Cancelled`].
    pub fn cancel(&mut self) {
        if self.outcome.is_none() {
            self.outcome = Some(Ok(StopReason::Cancelled));
        }
    }

    /// The generation, once [`BatchJob::is_done`]; `session` is the one it ran on. A job
    /// finished early is cancelled.
    pub fn finish(mut self, session: &Session) -> Result<Generation, ModelError> {
        let reason = match self.outcome.take() {
            Some(outcome) => outcome?,
            None => StopReason::Cancelled,
        };
        let mut generation = self.decoding.finish(reason, &mut *self.on_text);
        session.attach_tool_calls(self.tool_format, &mut generation)?;
        Ok(generation)
    }
}

impl Session {
    /// Prepares [`Session::chat_with_tools`] for [`step_batch`] without computing anything
    /// but the prompt's tokens: context policy, the shared prefix kept, the constraint
    /// compiled. `model` must be this session's model (it lends the job its tokenizer).
    pub fn start_chat<'m>(
        &mut self,
        model: &'m Model,
        messages: &[ChatMessage],
        tools: &ChatTools,
        options: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool + 'm,
    ) -> Result<BatchJob<'m>, ModelError> {
        let chat = self.prepare_chat(messages, tools, options)?;
        let options = chat.options.as_ref().unwrap_or(options);
        self.start(
            model,
            chat.prompt,
            options,
            chat.tool_format,
            Box::new(on_text),
        )
    }

    /// Prepares [`Session::complete`] for [`step_batch`]; see [`Session::start_chat`].
    pub fn start_completion<'m>(
        &mut self,
        model: &'m Model,
        prompt: &str,
        options: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool + 'm,
    ) -> Result<BatchJob<'m>, ModelError> {
        let ids = self.model.tokenizer().encode_prompt(prompt)?;
        let fitted = self.fit_text(ids, options)?;
        self.start(model, fitted, options, None, Box::new(on_text))
    }

    fn start<'m>(
        &mut self,
        model: &'m Model,
        prompt: FittedPrompt,
        options: &GenerateOptions,
        tool_format: Option<ToolCallFormat>,
        on_text: Box<dyn FnMut(&str) -> bool + 'm>,
    ) -> Result<BatchJob<'m>, ModelError> {
        assert!(
            std::ptr::eq(model, &*self.model),
            "a batch job must borrow its own session's model"
        );
        let started = Instant::now();
        let guard = OutputGuard::new(model, options.constraint.as_ref())?;
        let reused = self.keep_shared_prefix(&prompt.tokens)?;
        let stats = GenerationStats {
            prompt_tokens: prompt.tokens.len(),
            reused_tokens: reused,
            dropped: prompt.dropped,
            ..Default::default()
        };
        let decoding = Decoding::new(model, &prompt.tokens, options, guard, stats, started);
        let mut pending = prompt.tokens;
        pending.drain(..reused);
        Ok(BatchJob {
            model,
            pending,
            next_token: None,
            decoding,
            tool_format,
            on_text,
            outcome: None,
        })
    }
}

/// Advances every job that is not done by one forward pass over all of them: each decoding
/// job runs its last token and samples the next; prompts still being read take up to
/// `prompt_tokens` tokens between them, in order (at least one prompt moves each step).
/// Text goes to each job's `on_text` as it is produced. An error of the forward pass itself
/// is returned, and every job in the pass ends with [`ModelError::BatchFailed`]; a job's
/// own error (its constraint engine, its tokenizer) ends that job only.
pub fn step_batch(
    jobs: &mut [(&mut Session, &mut BatchJob<'_>)],
    prompt_tokens: usize,
) -> Result<(), ModelError> {
    let Some(model) = jobs.first().map(|(_, job)| job.model) else {
        return Ok(());
    };
    // What each job runs this step: (index, how many tokens, whether they finish its prompt).
    let mut plan = Vec::with_capacity(jobs.len());
    let mut budget = prompt_tokens.max(1);
    for (i, (_, job)) in jobs.iter().enumerate() {
        if job.is_done() {
            continue;
        }
        if job.next_token.is_some() {
            plan.push((i, 1, true));
        } else if !job.pending.is_empty() && budget > 0 {
            let take = job.pending.len().min(budget);
            budget -= take;
            plan.push((i, take, take == job.pending.len()));
        }
    }
    if plan.is_empty() {
        return Ok(());
    }
    let logits = {
        let mut planned = plan.iter().peekable();
        let mut inputs = Vec::with_capacity(plan.len());
        for (i, (session, job)) in jobs.iter_mut().enumerate() {
            let Some(&(_, take, last)) = planned.next_if(|p| p.0 == i) else {
                continue;
            };
            let tokens: &[u32] = match &job.next_token {
                Some(token) => std::slice::from_ref(token),
                None => &job.pending[..take],
            };
            inputs.push(BatchInput {
                tokens,
                cache: &mut session.cache,
                logits: last,
            });
        }
        match model.forward_batch(&mut inputs) {
            Ok(logits) => logits,
            Err(error) => {
                let message = error.to_string();
                for &(i, _, _) in &plan {
                    jobs[i].1.outcome = Some(Err(ModelError::BatchFailed(message.clone())));
                }
                return Err(error);
            }
        }
    };
    for (&(i, take, _), logits) in plan.iter().zip(logits) {
        let (session, job) = &mut jobs[i];
        match job.next_token.take() {
            Some(token) => session.history.push(token),
            None => {
                session.history.extend(job.pending.drain(..take));
                if logits.is_some() {
                    job.decoding.prompt_done();
                }
            }
        }
        let Some(mut logits) = logits else { continue };
        let full = session.cache.len() >= session.cache.capacity();
        match job
            .decoding
            .next(&mut logits, &session.history, full, &mut *job.on_text)
        {
            Ok(Next::Run(token)) => job.next_token = Some(token),
            Ok(Next::Stop(reason)) => job.outcome = Some(Ok(reason)),
            Err(error) => job.outcome = Some(Err(error)),
        }
    }
    Ok(())
}
