//! The worker pool: N threads, each pinned to one CPU of the process's
//! affinity mask and each owning its executor ([`Exec`]), fed by bounded
//! channels; and the [`Lane`] through which one apply submits jobs and
//! reaps their completions.
//!
//! One pool serves every layer a root applies at once, so the threads
//! writing files stay one per CPU however many layers run in parallel
//! (each apply still has its own parser, and decoder and hasher where the
//! layer needs them). A lane routes a job to the worker its key (the
//! parent directory) hashes to, gathers jobs per worker into batches and
//! sends a batch when it is large enough or when the applier is about to
//! wait for something. What is in flight is bounded three ways: each
//! worker's queue holds [`QUEUE_BATCHES`] batches (a full one blocks the
//! sender), a batch holds at most [`BATCH_JOBS`] jobs, and the bytes that
//! jobs hold copies of are capped at [`MAX_OWNED_BYTES`] per lane.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::syscalls::{self, Syscalls};
use super::{BackendKind, BackendOptions, Done, Exec, Job, OpError};

/// Most jobs in one batch.
pub const BATCH_JOBS: usize = 32;
/// A batch is sent once its jobs write this many bytes of file data.
pub const BATCH_BYTES: usize = 2 << 20;
/// Batches queued per worker before a sender waits.
pub const QUEUE_BATCHES: usize = 4;
/// Most bytes of copied file data (streaming layers) one lane keeps in
/// flight; past it the applier waits for completions.
pub const MAX_OWNED_BYTES: usize = 32 << 20;
/// Most worker threads a pool starts, whatever it is asked for.
pub const MAX_THREADS: usize = 256;

/// A batch on its way to a worker, with where to send its completions.
struct Batch {
    jobs: Vec<Job>,
    owned: usize,
    reply: Sender<Reply>,
}

/// A batch's completions, on their way back to its lane.
struct Reply {
    done: Vec<Done>,
    owned: usize,
}

/// Worker threads that carry out jobs. See the module docs.
pub struct Pool {
    workers: Vec<Sender<Batch>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    backend: BackendKind,
    pinned: bool,
    lanes: AtomicU64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.workers.len())
            .field("backend", &self.backend)
            .field("pinned", &self.pinned)
            .finish()
    }
}

/// The CPUs this process may run on, in order (its affinity mask); empty
/// where the mask cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&i| set.is_set(i))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The default number of workers: the CPUs of the affinity mask (at least
/// one).
pub fn default_threads() -> usize {
    allowed_cpus().len().max(1)
}

fn pin_to(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    // Best effort: a mask the kernel refuses (a CPU gone offline) leaves
    // the thread where the scheduler puts it.
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

impl Pool {
    /// Starts the workers `opts` ask for, for writing to a file system
    /// `auto` knows nothing of (it takes plain syscalls there): see
    /// [`Pool::new_for`].
    pub fn new(opts: BackendOptions) -> io::Result<Arc<Pool>> {
        Pool::start_for(opts, None)
    }

    /// Starts the workers `opts` ask for, to write below `target` (or its
    /// nearest existing ancestor). `auto` takes io_uring where it measured
    /// faster on the target's file system and is available, and plain
    /// syscalls otherwise, saying why in one line on stderr when io_uring
    /// was wanted but is unavailable; `uring` fails where the kernel
    /// refuses it.
    pub fn new_for(opts: BackendOptions, target: &std::path::Path) -> io::Result<Arc<Pool>> {
        let fs = match opts.kind {
            BackendKind::Auto => super::fs_type(target),
            _ => None,
        };
        Pool::start_for(opts, fs)
    }

    fn start_for(opts: BackendOptions, fs_type: Option<i64>) -> io::Result<Arc<Pool>> {
        let threads = opts
            .threads
            .unwrap_or_else(default_threads)
            .clamp(1, MAX_THREADS);
        let backend = match opts.kind {
            BackendKind::Auto => super::auto_choice(fs_type),
            k => k,
        };
        match Pool::start(backend, threads) {
            Err(e) if opts.kind == BackendKind::Auto && backend != BackendKind::Syscalls => {
                eprintln!("unlade: io_uring unavailable ({e}); using the syscalls backend");
                Pool::start(BackendKind::Syscalls, threads)
            }
            r => r,
        }
    }

    fn start(backend: BackendKind, threads: usize) -> io::Result<Arc<Pool>> {
        let cpus = allowed_cpus();
        // Pinned only where there is a CPU for each worker: more workers
        // than CPUs share them as the scheduler sees fit.
        let pinned = !cpus.is_empty() && threads <= cpus.len();
        let mut workers = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<io::Result<()>>(threads);
        for i in 0..threads {
            let (tx, rx) = crossbeam_channel::bounded::<Batch>(QUEUE_BATCHES);
            let ready = ready_tx.clone();
            let cpu = pinned.then(|| cpus.get(i).copied()).flatten();
            let h = std::thread::Builder::new()
                .name(format!("unlade-w{i}"))
                .spawn(move || {
                    if let Some(c) = cpu {
                        pin_to(c);
                    }
                    let exec = match super::make_exec(backend) {
                        Ok(x) => {
                            let _ = ready.send(Ok(()));
                            x
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    drop(ready);
                    work(rx, exec);
                });
            match h {
                Ok(h) => {
                    workers.push(tx);
                    handles.push(h);
                }
                Err(e) => {
                    drop(workers);
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        drop(ready_tx);
        let pool = Arc::new(Pool {
            workers,
            handles: Mutex::new(handles),
            backend,
            pinned,
            lanes: AtomicU64::new(0),
        });
        for _ in 0..threads {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::Error::other("a worker thread stopped while starting")),
            }
        }
        Ok(pool)
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// The executor the workers run (never `Auto`).
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// Whether each worker is pinned to a CPU of its own.
    pub fn pinned(&self) -> bool {
        self.pinned
    }

    /// A new lane for one apply.
    pub fn lane(self: &Arc<Self>) -> Lane {
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
        let n = self.workers.len();
        // Each lane hashes with its own salt: two layers' directories of
        // the same name (`usr/bin`) land on different workers.
        let k = self.lanes.fetch_add(1, Ordering::Relaxed);
        Lane {
            pool: self.clone(),
            salt: k.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            reply_tx,
            reply_rx,
            outbox: (0..n).map(|_| Outbox::default()).collect(),
            batches_in_flight: 0,
            owned: 0,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.workers.clear();
        let handles = std::mem::take(self.handles.get_mut().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }
}

/// A worker's loop: run each batch, send its completions back. A panic in
/// the executor fails the batch's jobs instead of leaving their lane
/// waiting for a reply that would never come.
fn work(rx: Receiver<Batch>, mut exec: Box<dyn Exec>) {
    let mut done = Vec::new();
    while let Ok(b) = rx.recv() {
        let ids: Vec<u64> = b.jobs.iter().map(|j| j.id).collect();
        let r = catch_unwind(AssertUnwindSafe(|| exec.run(b.jobs, &mut done)));
        if r.is_err() {
            let got: std::collections::HashSet<u64> = done.iter().map(|d| d.id).collect();
            for id in ids.into_iter().filter(|id| !got.contains(id)) {
                done.push(Done {
                    id,
                    result: Err(OpError::new("backend", io::Error::other("worker panicked"))),
                });
            }
            exec = Box::new(Syscalls);
        }
        let _ = b.reply.send(Reply {
            done: std::mem::take(&mut done),
            owned: b.owned,
        });
    }
}

#[derive(Default)]
struct Outbox {
    jobs: Vec<Job>,
    data: usize,
    owned: usize,
}

/// One apply's way into a [`Pool`]: submit jobs, reap completions.
///
/// Dropping a lane waits for every job it sent: nothing keeps writing into
/// a target after its apply has returned (a failed apply's target is
/// removed right after).
pub struct Lane {
    pool: Arc<Pool>,
    salt: u64,
    reply_tx: Sender<Reply>,
    reply_rx: Receiver<Reply>,
    outbox: Vec<Outbox>,
    batches_in_flight: usize,
    /// Copied bytes held by jobs in outboxes and in flight.
    owned: usize,
}

/// The error of a lane whose worker is gone.
fn stopped() -> io::Error {
    io::Error::other("a backend worker thread stopped")
}

impl Lane {
    /// The pool this lane submits to.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The worker for jobs keyed `key` (a parent directory's path).
    pub fn worker_for(&self, key: &[u8]) -> usize {
        // FNV-1a over the salt and the key: cheap, and spreads directory
        // names that differ in one byte.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ self.salt;
        for &b in key {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % self.outbox.len() as u64) as usize
    }

    /// Queues `job` for worker `w`; sends the worker's batch once it is
    /// full. Completions reaped while waiting for room are pushed to
    /// `out`.
    pub fn submit(&mut self, w: usize, job: Job, out: &mut Vec<Done>) -> io::Result<()> {
        let ob = &mut self.outbox[w];
        ob.data += job.data_bytes();
        let owned = job.owned_bytes();
        ob.owned += owned;
        self.owned += owned;
        ob.jobs.push(job);
        if ob.jobs.len() >= BATCH_JOBS || ob.data >= BATCH_BYTES {
            self.cut(w)?;
        }
        while self.owned > MAX_OWNED_BYTES && self.batches_in_flight > 0 {
            self.reap(true, out)?;
        }
        if self.owned > MAX_OWNED_BYTES {
            // Everything held is in outboxes: send it all.
            self.cut_all()?;
        }
        Ok(())
    }

    /// Sends worker `w`'s queued jobs now, as one batch: jobs submitted
    /// to `w` later run after all of them (a barrier between dependent
    /// jobs of one worker).
    pub fn cut(&mut self, w: usize) -> io::Result<()> {
        let ob = std::mem::take(&mut self.outbox[w]);
        if ob.jobs.is_empty() {
            return Ok(());
        }
        let b = Batch {
            jobs: ob.jobs,
            owned: ob.owned,
            reply: self.reply_tx.clone(),
        };
        self.pool.workers[w].send(b).map_err(|_| stopped())?;
        self.batches_in_flight += 1;
        Ok(())
    }

    /// Sends every worker's queued jobs.
    pub fn cut_all(&mut self) -> io::Result<()> {
        for w in 0..self.outbox.len() {
            self.cut(w)?;
        }
        Ok(())
    }

    /// Whether worker `w` has queued jobs not sent yet.
    pub fn queued(&self, w: usize) -> bool {
        !self.outbox[w].jobs.is_empty()
    }

    /// Moves completions that have arrived to `out`; with `block`, waits
    /// for at least one batch if any is in flight. Returns whether batches
    /// remain in flight.
    pub fn reap(&mut self, block: bool, out: &mut Vec<Done>) -> io::Result<bool> {
        if self.batches_in_flight == 0 {
            return Ok(false);
        }
        let first = if block {
            Some(self.reply_rx.recv().map_err(|_| stopped())?)
        } else {
            self.reply_rx.try_recv().ok()
        };
        let mut next = first;
        while let Some(r) = next {
            self.batches_in_flight -= 1;
            self.owned -= r.owned;
            out.extend(r.done);
            next = self.reply_rx.try_recv().ok();
        }
        Ok(self.batches_in_flight > 0)
    }

    /// Whether nothing is queued or in flight.
    pub fn idle(&self) -> bool {
        self.batches_in_flight == 0 && self.outbox.iter().all(|o| o.jobs.is_empty())
    }

    /// Runs `job` on the calling thread, now, with plain syscalls: for the
    /// few jobs an applier needs done before it can go on (a directory it
    /// is about to open).
    pub fn run_here(&mut self, job: Job) -> Done {
        Done {
            id: job.id,
            result: syscalls::exec(job),
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let _ = self.cut_all();
        let mut sink = Vec::new();
        while self.batches_in_flight > 0 {
            sink.clear();
            if self.reap(true, &mut sink).is_err() {
                break;
            }
        }
    }
}
