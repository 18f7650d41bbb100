//! Admission and slot choice: which slot runs a request, the bounded queue in front of the
//! slots, and what each slot's cache holds. No inference happens here; slots run their jobs
//! on threads of their own ([`crate::slot`]).
//!
//! A request goes to the free slot whose cached tokens share the longest prefix with its
//! prompt when that prefix covers more than half the prompt (llama-server's slot
//! similarity), else to the least recently used free slot, so an unrelated request does not
//! evict a conversation that is likely to continue. With every slot busy it waits in a FIFO
//! queue of bounded length; beyond that it is refused (503 with `Retry-After`).
//!
//! Behind it, either one engine thread runs every slot's job in batched forward passes
//! ([`crate::engine`], the default), or each slot has a thread of its own ([`crate::slot`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, mpsc};
use std::time::Instant;

use pocketlm_runtime::tokenizer::ChatMessage;
use pocketlm_runtime::{ChatTools, GenerateOptions, Generation, ModelError};
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::SchedulerGauges;

/// A cached prefix must cover more than this share of a prompt for its slot to be chosen
/// over the least recently used one.
pub const SLOT_SIMILARITY: f64 = 0.5;

/// What a request asks the model to continue.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Rendered with the model's chat template, offering `tools` when it has definitions
    /// ([`pocketlm_runtime::Session::chat_with_tools`]).
    Chat {
        messages: Vec<ChatMessage>,
        tools: ChatTools,
    },
    /// Raw text ([`pocketlm_runtime::Session::complete`]).
    Text(String),
}

/// One admitted request.
#[derive(Debug)]
pub struct Job {
    pub prompt: Prompt,
    /// The prompt's tokens as the session will see them (for slot choice and metrics).
    pub prompt_tokens: Vec<u32>,
    pub options: GenerateOptions,
    pub events: UnboundedSender<JobEvent>,
    pub received_at: Instant,
}

impl Job {
    /// The client went away (its handler dropped the receiving end).
    pub fn is_abandoned(&self) -> bool {
        self.events.is_closed()
    }
}

/// A finished job's last event, which [`Scheduler::finish`] sends once the slot is free.
pub struct Reply {
    pub events: UnboundedSender<JobEvent>,
    pub event: JobEvent,
}

/// What a slot reports back to the request's handler.
#[derive(Debug)]
pub enum JobEvent {
    Text(String),
    Finished(Generation),
    Failed(ModelError),
    /// Taken out of the queue without running (the server is shutting down).
    Dropped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("every slot is busy and the queue is full")]
    QueueFull,
    #[error("the server is shutting down")]
    ShuttingDown,
}

#[derive(Debug, Default)]
struct SlotState {
    busy: bool,
    /// Tokens the slot's KV cache holds (as of its last job), for slot choice.
    cached_tokens: Vec<u32>,
    /// Positions the running job's prompt occupies (0 when idle), for the KV gauge.
    running_prompt_tokens: usize,
    /// Scheduler tick of its last job; 0 for never used.
    last_used: u64,
}

#[derive(Debug)]
struct Table {
    slots: Vec<SlotState>,
    queue: VecDeque<Job>,
    tick: u64,
}

/// Admission, queue and slot bookkeeping shared by the handlers and the slot threads.
pub struct Scheduler {
    table: Mutex<Table>,
    /// Where each slot's jobs go (the engine's inbox for every slot, or each slot thread's
    /// own), tagged with the slot; emptied by [`Scheduler::close`], which ends the threads.
    inboxes: Mutex<Vec<mpsc::Sender<(usize, Job)>>>,
    max_queue: usize,
    shutting_down: AtomicBool,
    kv_bytes_per_position: u64,
    kv_positions_per_slot: usize,
}

impl Scheduler {
    pub fn new(
        inboxes: Vec<mpsc::Sender<(usize, Job)>>,
        max_queue: usize,
        kv_bytes_per_position: u64,
        kv_positions_per_slot: usize,
    ) -> Scheduler {
        Scheduler {
            table: Mutex::new(Table {
                slots: inboxes.iter().map(|_| SlotState::default()).collect(),
                queue: VecDeque::new(),
                tick: 0,
            }),
            inboxes: Mutex::new(inboxes),
            max_queue,
            shutting_down: AtomicBool::new(false),
            kv_bytes_per_position,
            kv_positions_per_slot,
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A slot thread that panicked holding the lock left consistent bookkeeping (every
        // update is a plain field write), so the table stays usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `job` to a free slot, or queues it.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if self.is_shutting_down() {
            return Err(SubmitError::ShuttingDown);
        }
        let mut table = self.table();
        let Some(slot) = choose_slot(&table.slots, &job.prompt_tokens) else {
            table.queue.retain(|queued| !queued.is_abandoned());
            if table.queue.len() >= self.max_queue {
                return Err(SubmitError::QueueFull);
            }
            table.queue.push_back(job);
            return Ok(());
        };
        table.tick += 1;
        let tick = table.tick;
        let state = &mut table.slots[slot];
        state.busy = true;
        state.last_used = tick;
        state.running_prompt_tokens = job.prompt_tokens.len();
        drop(table);
        let inbox = self
            .inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(slot)
            .cloned();
        let sent = match inbox {
            Some(inbox) => inbox
                .send((slot, job))
                .map_err(|mpsc::SendError((_, job))| job),
            None => Err(job),
        };
        if let Err(job) = sent {
            // The slot threads are stopping (only at shutdown).
            let _ = job.events.send(JobEvent::Dropped);
            self.table().slots[slot].busy = false;
        }
        Ok(())
    }

    /// Called when a slot's job is done, with what its cache now holds: the next queued job
    /// for it, or `None` (the slot is free). The job's `reply` is sent only after the slot is
    /// released, so a client that sends its next request at once finds the slot free.
    pub fn finish(&self, slot: usize, cached_tokens: &[u32], reply: Option<Reply>) -> Option<Job> {
        let next = self.release(slot, cached_tokens);
        if let Some(Reply { events, event }) = reply {
            let _ = events.send(event);
        }
        next
    }

    fn release(&self, slot: usize, cached_tokens: &[u32]) -> Option<Job> {
        let mut table = self.table();
        table.tick += 1;
        let tick = table.tick;
        let next = loop {
            match table.queue.pop_front() {
                Some(job) if job.is_abandoned() => continue,
                Some(job) if self.is_shutting_down() => {
                    let _ = job.events.send(JobEvent::Dropped);
                }
                other => break other,
            }
        };
        let state = &mut table.slots[slot];
        state.cached_tokens.clear();
        state.cached_tokens.extend_from_slice(cached_tokens);
        state.last_used = tick;
        state.busy = next.is_some();
        state.running_prompt_tokens = next.as_ref().map_or(0, |job| job.prompt_tokens.len());
        next
    }

    /// Stops admitting requests; queued ones are dropped, running ones are cancelled by
    /// their slot at the next token ([`Scheduler::is_shutting_down`]).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let queued: Vec<Job> = self.table().queue.drain(..).collect();
        for job in queued {
            let _ = job.events.send(JobEvent::Dropped);
        }
    }

    /// Ends the slot threads once they finish what they run (after [`Scheduler::begin_shutdown`]).
    pub fn close(&self) {
        self.inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    pub fn gauges(&self) -> SchedulerGauges {
        let table = self.table();
        let used_positions: usize = table
            .slots
            .iter()
            .map(|s| s.cached_tokens.len().max(s.running_prompt_tokens))
            .sum();
        SchedulerGauges {
            slots: table.slots.len(),
            busy_slots: table.slots.iter().filter(|s| s.busy).count(),
            queue_depth: table.queue.len(),
            kv_cache_allocated_bytes: self.kv_bytes_per_position
                * (self.kv_positions_per_slot * table.slots.len()) as u64,
            kv_cache_used_bytes: self.kv_bytes_per_position * used_positions as u64,
        }
    }
}

/// The free slot for a prompt: the longest shared cached prefix if it covers more than
/// [`SLOT_SIMILARITY`] of the prompt, else the least recently used; `None` if all are busy.
fn choose_slot(slots: &[SlotState], prompt: &[u32]) -> Option<usize> {
    let free = || slots.iter().enumerate().filter(|(_, s)| !s.busy);
    let (best, shared) = free()
        .map(|(i, s)| (i, common_prefix_len(&s.cached_tokens, prompt)))
        .max_by_key(|&(i, shared)| (shared, std::cmp::Reverse(slots[i].last_used)))?;
    if shared as f64 > SLOT_SIMILARITY * prompt.len() as f64 {
        return Some(best);
    }
    free().min_by_key(|(_, s)| s.last_used).map(|(i, _)| i)
}

fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(busy: bool, cached: &[u32], last_used: u64) -> SlotState {
        SlotState {
            busy,
            cached_tokens: cached.to_vec(),
            running_prompt_tokens: 0,
            last_used,
        }
    }

    #[test]
    fn longest_shared_prefix_wins_when_it_covers_most_of_the_prompt() {
        let slots = [
            slot(false, &[1, 2, 9], 5),
            slot(false, &[1, 2, 3, 4, 7], 9),
            slot(true, &[1, 2, 3, 4, 5], 1),
        ];
        assert_eq!(choose_slot(&slots, &[1, 2, 3, 4, 5, 6]), Some(1));
    }

    #[test]
    fn an_unrelated_prompt_takes_the_least_recently_used_slot() {
        let slots = [
            slot(false, &[1, 2, 3, 4], 7),
            slot(false, &[8, 8], 3),
            slot(false, &[], 4),
        ];
        // Shares 1 of 4 tokens with slot 0: not enough to evict its conversation.
        assert_eq!(choose_slot(&slots, &[1, 5, 6, 7]), Some(1));
    }

    #[test]
    fn no_free_slot() {
        let slots = [slot(true, &[], 0), slot(true, &[1], 2)];
        assert_eq!(choose_slot(&slots, &[1]), None);
    }

    #[test]
    fn a_full_queue_refuses_and_a_freed_slot_takes_the_oldest_job() {
        let (inbox, received) = mpsc::channel();
        let scheduler = Scheduler::new(vec![inbox], 1, 8, 16);
        let (events, _keep) = tokio::sync::mpsc::unbounded_channel();
        let job = |tokens: Vec<u32>| Job {
            prompt: Prompt::Text(String::new()),
            prompt_tokens: tokens,
            options: GenerateOptions::default(),
            events: events.clone(),
            received_at: Instant::now(),
        };
        scheduler.submit(job(vec![1])).unwrap();
        scheduler.submit(job(vec![2])).unwrap();
        assert_eq!(scheduler.submit(job(vec![3])), Err(SubmitError::QueueFull));
        assert_eq!(received.try_recv().unwrap().1.prompt_tokens, vec![1]);
        assert_eq!(scheduler.gauges().queue_depth, 1);
        let next = scheduler.finish(0, &[1, 5], None).unwrap();
        assert_eq!(next.prompt_tokens, vec![2]);
        assert!(scheduler.finish(0, &[2, 6], None).is_none());
        let gauges = scheduler.gauges();
        assert_eq!((gauges.busy_slots, gauges.queue_depth), (0, 0));
        assert_eq!(gauges.kv_cache_used_bytes, 16);
        assert_eq!(gauges.kv_cache_allocated_bytes, 128);
    }
}
