//! A decode team: persistent helper threads that spin briefly between jobs, then park, for the
//! one-token products of decoding.
//!
//! A decode step makes one parallel product per matrix (~150 per token on a 30-block model),
//! each a few microseconds of work per thread at 8–16 threads. Through rayon each product
//! wakes sleeping workers and splits work by stealing; here the same helpers are still
//! spinning from the previous product, and every worker (the caller included) claims tasks
//! from one shared counter until none are left. A fixed split would make every product wait
//! for a helper the OS has descheduled (a loaded phone, a board running other services, an
//! oversubscribed machine: 2.6x slower decode measured under load); claimed tasks leave a
//! late helper nothing to do, and the caller waits only for tasks already running. Results
//! are the same as rayon's: each task computes the same values whichever thread runs it.
//!
//! A team is used by the thread that [`Team::enter`]s it (the CLI's and the bindings' decode
//! thread); [`run_tasks`] on any other thread, or while the team is busy, falls back to rayon.

use std::cell::{Cell, UnsafeCell};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long a helper spins for the next job before it parks: long enough to bridge the
/// sequential work between two products of a token (norms, attention of a few heads),
/// short enough that an idle process stops burning cores within a blink.
const SPIN: Duration = Duration::from_micros(300);

/// A job as the helpers see it: the task function, with its borrow's lifetime erased (see
/// the SAFETY note in [`Team::run`]), and the number of tasks.
type Job = (*const (dyn Fn(usize) + Sync + 'static), usize);

struct Shared {
    /// Workers including the caller.
    workers: usize,
    /// Bumped once per job; helpers run a job when they see a new value.
    generation: AtomicU64,
    /// The current job; written by the caller before `generation` is bumped (release) and
    /// read by helpers after they observe the bump (acquire) and join it.
    job: UnsafeCell<Option<Job>>,
    /// The next task of the current job to claim.
    next_task: AtomicUsize,
    /// Helpers that joined the current job and have not left it.
    in_flight: AtomicUsize,
    /// The last generation the caller closed: a helper that sees its job closed when it
    /// joins leaves without touching it.
    closed: AtomicU64,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    /// Parked helpers, and the condition they wait on.
    parked: Mutex<usize>,
    wake: Condvar,
}

// SAFETY: `job` is only written by the caller while no helper can read it (before the
// generation bump, and after closing the job and seeing no helper in it), and only read by a
// helper that joined the job before it was closed; every other field is atomic or behind a
// mutex.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw job pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

/// A team of `workers - 1` helper threads plus the thread that runs jobs.
pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
    /// Held while a job runs: a second caller (another thread, or a task calling back into
    /// the team) falls back to rayon instead of waiting.
    busy: Mutex<()>,
}

thread_local! {
    /// The team the current thread entered, if any.
    static CURRENT: Cell<Option<*const Team>> = const { Cell::new(None) };
}

impl Team {
    /// A team of `workers` (at least 1; 1 means no helpers: every job runs on the caller).
    pub fn new(workers: usize) -> Team {
        Team::on_cores(workers, Vec::new())
    }

    /// A team whose helpers may run only on `cores` (all cores when empty): the performance
    /// cores of a big.LITTLE CPU, or a `--cpu-mask`. Each helper gets the whole set, not one
    /// core, since the calling thread is already pinned to one of them and the scheduler
    /// then spreads the helpers over the others. Where the system refuses the set (or it is
    /// not Linux/Android), helpers run where the scheduler puts them.
    pub fn on_cores(workers: usize, cores: Vec<usize>) -> Team {
        let workers = workers.max(1);
        let cores = Arc::new(cores);
        let shared = Arc::new(Shared {
            workers,
            generation: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            next_task: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            closed: AtomicU64::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            parked: Mutex::new(0),
            wake: Condvar::new(),
        });
        let helpers = (1..workers)
            .map(|index| {
                let shared = Arc::clone(&shared);
                let cores = Arc::clone(&cores);
                std::thread::Builder::new()
                    .name(format!("pocketlm-decode-{index}"))
                    .spawn(move || {
                        if !cores.is_empty() && !restrict_current_thread(&cores) {
                            log::debug!("decode helper {index}: could not restrict to {cores:?}");
                        }
                        helper(&shared)
                    })
                    .expect("spawning a decode helper thread")
            })
            .collect();
        Team {
            shared,
            helpers,
            busy: Mutex::new(()),
        }
    }

    pub fn workers(&self) -> usize {
        self.shared.workers
    }

    /// Runs `f` with this team as the current thread's team ([`run_tasks`] uses it).
    pub fn enter<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<*const Team>);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(Some(self as *const Team))));
        f()
    }

    /// Runs `f(i)` for every `i < tasks`, each task once, on whichever worker claims it first;
    /// returns when all are done. `None` when the team is busy (the caller should run the
    /// tasks another way).
    fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) -> Option<()> {
        let _busy = self.busy.try_lock().ok()?;
        let s = &*self.shared;
        if s.workers == 1 || tasks <= 1 {
            (0..tasks).for_each(f);
            return Some(());
        }
        // SAFETY: the erased borrow `f` is only used by helpers that joined this job before
        // it was closed below, and this function waits until every one of them has left (also
        // when a task panics), so `f` outlives every use.
        let erased = unsafe {
            std::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                *const (dyn Fn(usize) + Sync + 'static),
            >(f as *const _)
        };
        // SAFETY: no helper reads `job` now: the previous job was closed with none in it.
        unsafe { *s.job.get() = Some((erased, tasks)) };
        s.next_task.store(0, Ordering::Relaxed);
        let generation = s.generation.fetch_add(1, Ordering::Release) + 1;
        if *s.parked.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| claim_tasks(s, tasks, f)));
        // Every task is claimed. Close the job, then wait for the helpers still running a
        // task: a helper that joins after the close sees it and leaves (both sides SeqCst).
        s.closed.store(generation, Ordering::SeqCst);
        let mut waits = 0u32;
        while s.in_flight.load(Ordering::SeqCst) > 0 {
            waits = waits.wrapping_add(1);
            if waits < 4096 {
                std::hint::spin_loop();
            } else {
                // The helper is descheduled mid-task: let it have this core.
                std::thread::yield_now();
            }
        }
        // SAFETY: the job is closed and no helper is in it; none reads `job` until the next
        // bump.
        unsafe { *s.job.get() = None };
        if let Err(payload) = mine {
            resume_unwind(payload);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a decode helper thread panicked in a parallel product");
        }
        Some(())
    }
}

/// Runs tasks of the current job until none are left to claim.
fn claim_tasks(s: &Shared, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    loop {
        let task = s.next_task.fetch_add(1, Ordering::Relaxed);
        if task >= tasks {
            return;
        }
        f(task);
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _parked = self.shared.parked.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for helper in self.helpers.drain(..) {
            let _ = helper.join();
        }
    }
}

/// Restricts the calling thread to `cores`; false when the system refuses (or cannot).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn restrict_current_thread(cores: &[usize]) -> bool {
    // SAFETY: cpu_set_t is plain data, zeroed then filled with CPU_SET for indices below
    // CPU_SETSIZE; sched_setaffinity(0, ...) reads it for the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        let limit = libc::CPU_SETSIZE as usize;
        for &core in cores.iter().filter(|&&c| c < limit) {
            libc::CPU_SET(core, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Restricts the calling thread to `cores`; not supported here.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn restrict_current_thread(_cores: &[usize]) -> bool {
    false
}

fn helper(s: &Shared) {
    let mut seen = 0u64;
    loop {
        // Wait for a new job: spin, then park.
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let generation = s.generation.load(Ordering::Acquire);
            if generation != seen {
                seen = generation;
                break;
            }
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && started.elapsed() > SPIN {
                let mut parked = s.parked.lock().unwrap_or_else(|e| e.into_inner());
                *parked += 1;
                // Checked under the lock the caller takes after bumping: no lost wake-up.
                while s.generation.load(Ordering::Acquire) == seen
                    && !s.shutdown.load(Ordering::Acquire)
                {
                    parked = s.wake.wait(parked).unwrap_or_else(|e| e.into_inner());
                }
                *parked -= 1;
            } else if spins.is_multiple_of(1024) {
                // On a loaded machine the caller (or another program) may want this core.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        // Join the job, unless the caller already closed it (it then needs nothing more from
        // this helper, and may be writing the next job).
        s.in_flight.fetch_add(1, Ordering::SeqCst);
        if s.closed.load(Ordering::SeqCst) >= seen {
            s.in_flight.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        // SAFETY: the caller wrote `job` before the bump this thread observed (acquire), and
        // keeps it, and the function it points to, alive until this thread leaves the job.
        if let Some((job, tasks)) = unsafe { *s.job.get() } {
            // SAFETY: as above.
            let f = unsafe { &*job };
            if catch_unwind(AssertUnwindSafe(|| claim_tasks(s, tasks, f))).is_err() {
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        s.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `f(i)` for every `i < tasks` in parallel: on the current thread's team when it
/// entered one and the team is free, else on the rayon pool.
pub fn run_tasks(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    if let Some(team) = current_team()
        && team.run(tasks, f).is_some()
    {
        return;
    }
    (0..tasks).into_par_iter().for_each(f);
}

/// The team the current thread entered, if any.
fn current_team<'a>() -> Option<&'a Team> {
    // SAFETY: `enter` set this pointer for the duration of its closure, during which the team
    // it borrows is alive; it is restored on exit, and the reference is only used within
    // the caller's frame, inside that closure.
    CURRENT.with(Cell::get).map(|team| unsafe { &*team })
}

/// Runs `f` as `team`'s entering thread when there is a team, else plainly.
pub fn on_team<R>(team: Option<&Team>, f: impl FnOnce() -> R) -> R {
    match team {
        Some(team) => team.enter(f),
        None => f(),
    }
}

/// A raw pointer that may cross threads: [`for_each_chunk_mut`] hands each task a disjoint
/// piece of one slice through it.
struct SendPtr<T>(*mut T);
// SAFETY: only used to rebuild disjoint sub-slices of a `&mut [T]` with `T: Send`.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// `f(i, chunk)` for every `chunk`-long piece of `data` (the last may be shorter), in
/// parallel as [`run_tasks`] runs them.
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: &(dyn Fn(usize, &mut [T]) + Sync),
) {
    let chunk = chunk.max(1);
    let len = data.len();
    let base = SendPtr(data.as_mut_ptr());
    run_tasks(len.div_ceil(chunk), &|i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        let base = &base;
        // SAFETY: task i covers start..end, disjoint from every other task's range and
        // inside `data`, which stays mutably borrowed until every task has run (run_tasks
        // returns after all of them, and runs each index once).
        let piece = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
        f(i, piece);
    });
}

/// The worker count [`run_tasks`] would split work over on this thread.
pub fn current_workers() -> usize {
    current_team().map_or_else(rayon::current_num_threads, Team::workers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once_on_a_team_and_without_one() {
        let team = Team::new(4);
        for tasks in [0usize, 1, 3, 4, 5, 17, 64] {
            let counts: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
            let count = |i: usize| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            };
            team.enter(|| run_tasks(tasks, &count));
            run_tasks(tasks, &count);
            assert!(
                counts.iter().all(|c| c.load(Ordering::Relaxed) == 2),
                "{tasks}"
            );
        }
    }

    #[test]
    fn chunks_cover_the_slice_once_with_a_ragged_tail() {
        let team = Team::new(3);
        for (len, chunk) in [(0usize, 4usize), (10, 4), (12, 4), (5, 16), (7, 1)] {
            let mut data = vec![0u32; len];
            team.enter(|| {
                for_each_chunk_mut(&mut data, chunk, &|i, piece| {
                    for (j, v) in piece.iter_mut().enumerate() {
                        *v += (i * chunk + j) as u32 + 1;
                    }
                })
            });
            let want: Vec<u32> = (1..=len as u32).collect();
            assert_eq!(data, want, "len {len} chunk {chunk}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn helpers_on_cores_run_only_there() {
        let cores = vec![0usize];
        let team = Team::on_cores(3, cores);
        let seen = Mutex::new(Vec::new());
        team.enter(|| {
            // Slow tasks, so the helpers claim some while the caller runs its first.
            run_tasks(8, &|_| {
                std::thread::sleep(Duration::from_millis(10));
                let on_helper = std::thread::current()
                    .name()
                    .is_some_and(|n| n.starts_with("pocketlm-decode-"));
                if on_helper {
                    // SAFETY: sched_getcpu has no preconditions.
                    let cpu = unsafe { libc::sched_getcpu() };
                    seen.lock().unwrap().push(cpu);
                }
            })
        });
        let seen = seen.into_inner().unwrap();
        assert!(!seen.is_empty(), "no task ran on a helper");
        assert!(seen.iter().all(|&c| c == 0), "helpers ran on {seen:?}");
    }

    #[test]
    fn helpers_park_and_wake_again() {
        let team = Team::new(3);
        let total = AtomicUsize::new(0);
        for round in 0..3 {
            team.enter(|| {
                run_tasks(9, &|i| {
                    total.fetch_add(i, Ordering::Relaxed);
                })
            });
            if round == 1 {
                // Long enough for every helper to park.
                std::thread::sleep(SPIN * 20);
            }
        }
        assert_eq!(total.load(Ordering::Relaxed), 3 * 36);
    }

    #[test]
    fn nested_calls_fall_back_instead_of_deadlocking() {
        let team = Team::new(2);
        let inner = AtomicUsize::new(0);
        team.enter(|| {
            run_tasks(4, &|_| {
                // On the caller this thread's team is busy; on a helper there is no team.
                run_tasks(3, &|_| {
                    inner.fetch_add(1, Ordering::Relaxed);
                });
            })
        });
        assert_eq!(inner.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_team_survives() {
        let team = Team::new(3);
        for bad in [0usize, 1] {
            // Task 0 runs on the caller, task 1 on a helper.
            let result = catch_unwind(AssertUnwindSafe(|| {
                team.enter(|| {
                    run_tasks(6, &|i| {
                        if i == bad {
                            panic!("task {i}");
                        }
                    })
                })
            }));
            assert!(result.is_err(), "task {bad}");
        }
        let ran = AtomicUsize::new(0);
        team.enter(|| {
            run_tasks(6, &|_| {
                ran.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(ran.load(Ordering::Relaxed), 6);
    }
}
