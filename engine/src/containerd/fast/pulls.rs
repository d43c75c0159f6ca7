//! The fast path's pulls, run apart from the store's calls.
//!
//! A pull may take minutes, and its registry is named by whoever wrote
//! the pod spec: a registry that accepts connections and never answers
//! would otherwise hold a thread per Prepare until the calls that
//! containerd needs at once (Stat, List, Remove) found none left. So:
//!
//! - each pull runs on a thread of its own ([`crate::pipeline::task`]),
//!   never on the store's threads, and at most
//!   [`PullLimits::max_pulls`] run at once, at most
//!   [`PullLimits::per_registry`] of them from one registry host, so
//!   that one registry cannot take every slot; the others wait without a
//!   thread;
//! - Prepares asking for the same chain of the same image share one pull
//!   (twenty pods of one image make one pull, as unlade's own flights
//!   would, but with one deadline and one slot);
//! - a pull ends with an error when its deadline
//!   ([`PullLimits::deadline`], counted from the first Prepare, the wait
//!   for a slot included) passes, when the server stops, or when no
//!   Prepare waits for it any more (containerd gave up: its client went
//!   away). What stalls inside the pull (a registry that stops answering
//!   or trickles) is the minimum-progress rule's
//!   ([`crate::source::Stall`]), which fails it; no registry request of
//!   the pull outlives its deadline, and a document request (a manifest,
//!   a config, a token) not the stall window either.
//!
//! A pull that ends early is cancelled; its thread stops at its next
//! read, within a read timeout (a blocked socket read cannot be
//! interrupted). Its slots wait that long for it; a thread that still
//! has not stopped then (a registry sending a blob's headers a byte at a
//! time) gives its slots back and counts as lingering, and at most
//! [`PullLimits::max_pulls`] threads linger: past that, a new pull waits
//! for them. So the threads stay bounded, and no registry holds the slots
//! past a deadline. Nothing half-done is committed: the pipeline commits
//! whole layers or nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify, Semaphore};

use crate::containerd::fast::adopt::{self, PullStats};
use crate::containerd::fast::Ask;
use crate::containerd::store::{CtrError, CtrStore};
use crate::pipeline::pull::PullOptions;

/// How many fast-path pulls run, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct PullLimits {
    /// Pulls running at once (more wait, without a thread).
    pub max_pulls: usize,
    /// Pulls running at once from one registry host.
    pub per_registry: usize,
    /// The longest a pull may take, however it progresses.
    pub deadline: Duration,
    /// The registries' read timeout (the stall window): how long an
    /// ended pull's slots wait for its thread.
    pub read_timeout: Duration,
}

impl Default for PullLimits {
    fn default() -> Self {
        PullLimits {
            max_pulls: 4,
            per_registry: 2,
            deadline: Duration::from_secs(30 * 60),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a fast-path pull ended without the layer.
#[derive(Debug, Clone)]
pub enum PullFailure {
    /// The pull failed; the error says why.
    Failed(Arc<CtrError>),
    /// It ran past [`PullLimits::deadline`].
    Deadline(Duration),
    /// The server is stopping.
    Shutdown,
    /// Nobody waits for it any more.
    Abandoned,
}

impl std::fmt::Display for PullFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PullFailure::Failed(e) => write!(f, "{}", crate::report::error_chain(&**e)),
            PullFailure::Deadline(d) => write!(f, "the pull took longer than {} s", d.as_secs()),
            PullFailure::Shutdown => write!(f, "unlade's snapshotter is stopping"),
            PullFailure::Abandoned => write!(f, "no Prepare waits for it"),
        }
    }
}

type Outcome = Option<Result<PullStats, PullFailure>>;

/// One pull in flight and who waits for it.
struct Job {
    done: watch::Receiver<Outcome>,
    /// Prepares waiting; changed under the jobs map's lock.
    waiters: Mutex<usize>,
    abandoned: Notify,
}

/// The fast path's pulls of one server.
pub(crate) struct Pulls {
    store: Arc<CtrStore>,
    opts: PullOptions,
    limits: PullLimits,
    total: Arc<Semaphore>,
    /// Threads of ended pulls still running past their wait.
    lingering: Arc<Semaphore>,
    registries: Mutex<HashMap<String, Arc<Semaphore>>>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    stop: watch::Sender<bool>,
}

/// Leaves a job's waiters when a Prepare stops waiting (answered, or its
/// future dropped because containerd went away); the last one out of an
/// unfinished job abandons it.
struct Waiting<'a> {
    pulls: &'a Pulls,
    key: String,
    job: Arc<Job>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut jobs = self.pulls.lock_jobs();
        let mut n = self.job.waiters.lock().unwrap_or_else(|p| p.into_inner());
        *n -= 1;
        if *n == 0 {
            if jobs
                .get(&self.key)
                .is_some_and(|j| Arc::ptr_eq(j, &self.job))
            {
                jobs.remove(&self.key);
            }
            if self.job.done.borrow().is_none() {
                self.job.abandoned.notify_one();
            }
        }
    }
}

impl Pulls {
    pub(crate) fn new(store: Arc<CtrStore>, opts: PullOptions, limits: PullLimits) -> Arc<Pulls> {
        Arc::new(Pulls {
            store,
            opts,
            limits,
            total: Arc::new(Semaphore::new(limits.max_pulls.max(1))),
            lingering: Arc::new(Semaphore::new(limits.max_pulls.max(1))),
            registries: Mutex::new(HashMap::new()),
            jobs: Mutex::new(HashMap::new()),
            stop: watch::Sender::new(false),
        })
    }

    fn lock_jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends every pull (the server is stopping): their Prepares get
    /// [`PullFailure::Shutdown`] at once.
    pub(crate) fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    fn registry(&self, host: &str) -> Arc<Semaphore> {
        let mut r = self.registries.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= 256 {
            // Hosts named once and idle since.
            let all = self.limits.per_registry.max(1);
            r.retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() < all);
        }
        r.entry(host.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.limits.per_registry.max(1))))
            .clone()
    }

    /// Pulls what `ask` needs (see [`adopt::pull`]), sharing the pull
    /// with other Prepares asking the same, within the limits. What the
    /// pull did goes to the Prepare that started it.
    pub(crate) async fn pull(
        self: &Arc<Self>,
        ask: &Ask,
    ) -> Result<Option<PullStats>, (PullFailure, bool)> {
        let key = format!("{}\n{}", ask.reference, ask.chain);
        let mut started = false;
        let job = {
            let mut jobs = self.lock_jobs();
            let job = match jobs.get(&key) {
                Some(j) => j.clone(),
                None => {
                    started = true;
                    let (tx, rx) = watch::channel(None);
                    let j = Arc::new(Job {
                        done: rx,
                        waiters: Mutex::new(0),
                        abandoned: Notify::new(),
                    });
                    jobs.insert(key.clone(), j.clone());
                    tokio::spawn(self.clone().drive(j.clone(), tx, ask.clone()));
                    j
                }
            };
            *job.waiters.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            job
        };
        let waiting = Waiting {
            pulls: self,
            key,
            job: job.clone(),
        };
        let mut done = job.done.clone();
        let outcome = match done.wait_for(Option::is_some).await {
            Ok(o) => o.clone().unwrap_or(Err(PullFailure::Abandoned)),
            Err(_) => Err(PullFailure::Abandoned),
        };
        drop(waiting);
        outcome
            .map(|s| started.then_some(s))
            .map_err(|f| (f, started))
    }

    /// Runs one job: its slots, its thread, its deadline.
    async fn drive(self: Arc<Self>, job: Arc<Job>, tx: watch::Sender<Outcome>, ask: Ask) {
        let mut stop = self.stop.subscribe();
        let deadline = tokio::time::Instant::now() + self.limits.deadline;
        let registry = self.registry(&ask.reference.registry);
        let (total, lingering) = (self.total.clone(), self.lingering.clone());
        let slots = tokio::select! {
            s = async {
                // While as many threads of ended pulls linger as pulls
                // may run, new pulls wait for one to stop.
                drop(lingering.acquire().await);
                let r = registry.acquire_owned().await;
                let t = total.acquire_owned().await;
                r.ok().zip(t.ok())
            } => s,
            _ = tokio::time::sleep_until(deadline) => {
                tx.send_replace(Some(Err(PullFailure::Deadline(self.limits.deadline))));
                return;
            }
            _ = job.abandoned.notified() => {
                tx.send_replace(Some(Err(PullFailure::Abandoned)));
                return;
            }
            _ = stop.wait_for(|s| *s) => {
                tx.send_replace(Some(Err(PullFailure::Shutdown)));
                return;
            }
        };
        let Some(slots) = slots else {
            tx.send_replace(Some(Err(PullFailure::Shutdown)));
            return;
        };
        let (store, opts) = (self.store.clone(), self.opts.clone());
        let a = ask.clone();
        let until = deadline.into_std();
        let mut task = crate::pipeline::task::spawn(move |cancel| {
            adopt::pull(&store, &opts, &a, Some(until), cancel)
        });
        let ended = tokio::select! {
            r = &mut task => {
                tx.send_replace(Some(r.map_err(|e| PullFailure::Failed(Arc::new(e)))));
                drop(slots);
                return;
            }
            _ = tokio::time::sleep_until(deadline) => PullFailure::Deadline(self.limits.deadline),
            _ = job.abandoned.notified() => PullFailure::Abandoned,
            _ = stop.wait_for(|s| *s) => PullFailure::Shutdown,
        };
        tracing::warn!(image = %ask.reference, why = %ended, "pull for containerd stopped");
        task.cancel();
        tx.send_replace(Some(Err(ended)));
        if tokio::time::timeout(self.limits.read_timeout, &mut task)
            .await
            .is_ok()
        {
            return;
        }
        // Still blocked in a read: the slots go back; the thread counts as
        // lingering until it stops.
        let linger = self.lingering.clone().acquire_owned().await;
        drop(slots);
        let _ = task.await;
        drop(linger);
    }
}
