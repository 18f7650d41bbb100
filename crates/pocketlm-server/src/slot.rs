//! Slot threads (`--no-batching`): each owns a [`Session`] (its own KV cache, with prefix
//! reuse) and runs the jobs the scheduler gives it, one whole generation at a time, on a
//! plain OS thread. The model's products inside run on rayon's global pool, shared by all
//! slots, so concurrent requests compete for it instead of sharing passes over the weights
//! as the batching engine ([`crate::engine`]) makes them.

use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use pocketlm_runtime::Session;

use crate::engine;
use crate::metrics::Metrics;
use crate::scheduler::{Job, JobEvent, Prompt, Reply, Scheduler};

/// Starts slot `index`'s thread, which runs jobs from `inbox` until every sender is gone.
pub fn spawn(
    index: usize,
    session: Session,
    inbox: mpsc::Receiver<(usize, Job)>,
    scheduler: Arc<Scheduler>,
    metrics: Arc<Metrics>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("pocketlm-slot-{index}"))
        .spawn(move || {
            let mut session = session;
            while let Ok((_, job)) = inbox.recv() {
                let mut next = Some(job);
                while let Some(job) = next {
                    let reply = run_job(&mut session, job, &scheduler, &metrics);
                    next = scheduler.finish(index, session.history(), reply);
                }
            }
        })
}

/// Runs `job`; returns its result, sent when the slot is released (`None` for a job no
/// longer wanted).
fn run_job(
    session: &mut Session,
    job: Job,
    scheduler: &Scheduler,
    metrics: &Metrics,
) -> Option<Reply> {
    if !engine::still_wanted(&job, scheduler) {
        return None;
    }
    let started = Instant::now();
    let mut on_text = engine::text_sender(job.events.clone(), metrics, scheduler);
    let result = match &job.prompt {
        Prompt::Chat { messages, tools } => {
            session.chat_with_tools(messages, tools, &job.options, &mut on_text)
        }
        Prompt::Text(text) => session.complete(text, &job.options, &mut on_text),
    };
    let event = match result {
        Ok(generation) => {
            engine::record(metrics, &generation, started - job.received_at);
            JobEvent::Finished(generation)
        }
        // The cache may hold a partial prompt; the history says exactly what it holds, so
        // the next job's prefix reuse stays correct.
        Err(error) => JobEvent::Failed(error),
    };
    Some(Reply {
        events: job.events,
        event,
    })
}
