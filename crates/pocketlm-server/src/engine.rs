//! Continuous batching: one engine thread owns every slot's [`Session`] and advances all
//! running requests together, one forward pass per step
//! ([`pocketlm_runtime::step_batch`]): the next token of every decoding request and chunks
//! of prompts still being read. A request joins at the next step after its slot is given
//! it and leaves when it stops, so short replies do not wait for long ones, and a long
//! prompt is read a chunk per step while the others keep producing tokens.

use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pocketlm_kernels::pool::on_team;
use pocketlm_runtime::{BatchJob, Generation, Model, ModelError, Session, StopReason};

use crate::EngineThreads;
use crate::metrics::Metrics;
use crate::scheduler::{Job, JobEvent, Prompt, Reply, Scheduler};

/// A request the engine is running.
struct Running<'m> {
    slot: usize,
    job: BatchJob<'m>,
    events: tokio::sync::mpsc::UnboundedSender<JobEvent>,
    /// When the request arrived and when it was admitted (its queue time is the difference).
    received_at: Instant,
    admitted_at: Instant,
}

/// Starts the engine thread; it runs until every sender of `inbox` is gone and nothing runs.
pub fn spawn(
    model: Arc<Model>,
    sessions: Vec<Session>,
    inbox: mpsc::Receiver<(usize, Job)>,
    scheduler: Arc<Scheduler>,
    metrics: Arc<Metrics>,
    step_prompt_tokens: usize,
    threads: EngineThreads,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pocketlm-engine".to_string())
        .spawn(move || {
            let engine = Engine {
                model: &model,
                sessions,
                scheduler: &scheduler,
                metrics: &metrics,
                step_prompt_tokens,
            };
            let EngineThreads { pool, team } = threads;
            let run = move || on_team(team.as_deref(), || engine.run(&inbox));
            match pool {
                // The loop then occupies one of the pool's threads, which takes part in
                // every product it starts.
                Some(pool) => pool.install(run),
                None => run(),
            }
        })
}

struct Engine<'m> {
    model: &'m Model,
    sessions: Vec<Session>,
    scheduler: &'m Scheduler,
    metrics: &'m Metrics,
    step_prompt_tokens: usize,
}

impl<'m> Engine<'m> {
    fn run(mut self, inbox: &mpsc::Receiver<(usize, Job)>) {
        let mut running: Vec<Running<'m>> = Vec::new();
        loop {
            // Idle: wait for work. Busy: take what arrived and go on stepping.
            if running.is_empty() {
                match inbox.recv() {
                    Ok((slot, job)) => self.admit(slot, job, &mut running),
                    Err(_) => return,
                }
            }
            while let Ok((slot, job)) = inbox.try_recv() {
                self.admit(slot, job, &mut running);
            }
            if running.is_empty() {
                continue;
            }
            let shutting_down = self.scheduler.is_shutting_down();
            for request in &mut running {
                // A client gone while its prompt is read has no token to refuse: cancel here.
                if shutting_down || request.events.is_closed() {
                    request.job.cancel();
                }
            }
            if let Err(error) = self.step(&mut running) {
                // Every request in the pass has failed with it (step_batch marks them).
                log::error!("batched forward pass failed: {error}");
            }
            let mut index = 0;
            while index < running.len() {
                if running[index].job.is_done() {
                    let request = running.swap_remove(index);
                    let slot = request.slot;
                    let reply = self.conclude(request);
                    let history = self.sessions[slot].history();
                    if let Some(next) = self.scheduler.finish(slot, history, Some(reply)) {
                        self.admit(slot, next, &mut running);
                    }
                } else {
                    index += 1;
                }
            }
        }
    }

    /// One forward pass over every running request, oldest first (prompt chunks go to the
    /// earliest admitted requests first).
    fn step(&mut self, running: &mut [Running<'m>]) -> Result<(), ModelError> {
        running.sort_by_key(|r| r.admitted_at);
        let mut sessions: Vec<Option<&mut Session>> = self.sessions.iter_mut().map(Some).collect();
        let mut pairs: Vec<(&mut Session, &mut BatchJob<'m>)> = running
            .iter_mut()
            .filter_map(|r| Some((sessions[r.slot].take()?, &mut r.job)))
            .collect();
        pocketlm_runtime::step_batch(&mut pairs, self.step_prompt_tokens)
    }

    /// Starts `job` on `slot`'s session; a job that cannot start (its prompt refused, its
    /// client gone) is answered, and the slot takes the next queued job instead.
    fn admit(&mut self, slot: usize, job: Job, running: &mut Vec<Running<'m>>) {
        let mut next = Some(job);
        while let Some(job) = next.take() {
            match self.start(slot, job) {
                Some(request) => {
                    running.push(request);
                    return;
                }
                None => {
                    next = self
                        .scheduler
                        .finish(slot, self.sessions[slot].history(), None)
                }
            }
        }
    }

    fn start(&mut self, slot: usize, job: Job) -> Option<Running<'m>> {
        if !still_wanted(&job, self.scheduler) {
            return None;
        }
        let on_text = text_sender(job.events.clone(), self.metrics, self.scheduler);
        let session = &mut self.sessions[slot];
        let started = match &job.prompt {
            Prompt::Chat { messages, tools } => {
                session.start_chat(self.model, messages, tools, &job.options, on_text)
            }
            Prompt::Text(text) => session.start_completion(self.model, text, &job.options, on_text),
        };
        match started {
            Ok(batch_job) => Some(Running {
                slot,
                job: batch_job,
                events: job.events,
                received_at: job.received_at,
                admitted_at: Instant::now(),
            }),
            Err(error) => {
                let _ = job.events.send(JobEvent::Failed(error));
                None
            }
        }
    }

    /// A stopped request's result (sent once its slot is released), its metrics recorded.
    fn conclude(&mut self, request: Running<'m>) -> Reply {
        let session = &self.sessions[request.slot];
        let reply = match request.job.finish(session) {
            Ok(generation) => {
                record(
                    self.metrics,
                    &generation,
                    request.admitted_at - request.received_at,
                );
                JobEvent::Finished(generation)
            }
            // The cache holds what the history says, so the slot's prefix reuse stays right.
            Err(error) => JobEvent::Failed(error),
        };
        Reply {
            events: request.events,
            event: reply,
        }
    }
}

/// Whether `job` should start: not when its client is already gone, nor while the server is
/// shutting down (the client is then told its request was dropped).
pub(crate) fn still_wanted(job: &Job, scheduler: &Scheduler) -> bool {
    if job.is_abandoned() {
        return false;
    }
    if scheduler.is_shutting_down() {
        let _ = job.events.send(JobEvent::Dropped);
        return false;
    }
    true
}

/// The `on_text` of a request: each piece goes to its handler, with the time since the last
/// piece as a per-token latency. `false` (stop at this token) once the client is gone or the
/// server is shutting down.
pub(crate) fn text_sender<'m>(
    events: tokio::sync::mpsc::UnboundedSender<JobEvent>,
    metrics: &'m Metrics,
    scheduler: &'m Scheduler,
) -> impl FnMut(&str) -> bool + 'm {
    let mut last_piece: Option<Instant> = None;
    move |piece: &str| {
        let now = Instant::now();
        if let Some(previous) = last_piece {
            metrics.observe_token_latency(now - previous);
        }
        last_piece = Some(now);
        events.send(JobEvent::Text(piece.to_string())).is_ok() && !scheduler.is_shutting_down()
    }
}

/// Time to first token (queue time included), token counts and cancellations.
pub fn record(metrics: &Metrics, generation: &Generation, queued: Duration) {
    let stats = &generation.stats;
    if stats.generated_tokens > 0 {
        metrics.observe_time_to_first_token(
            queued + Duration::from_secs_f64(stats.time_to_first_token_ms / 1e3),
        );
    }
    metrics.record_generation(
        stats.prompt_tokens,
        stats.reused_tokens,
        stats.generated_tokens,
    );
    if generation.stop_reason == StopReason::Cancelled {
        metrics.record_cancelled();
    }
}
