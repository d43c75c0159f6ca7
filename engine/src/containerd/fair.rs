//! The threads that run the store's blocking file-system work for the
//! gRPC calls, shared fairly between clients.
//!
//! tokio's blocking pool is one first-in, first-out queue: a client that
//! keeps hundreds of calls in flight (a flood, or a burst of Removes from
//! containerd's garbage collection) puts every other client's Stat behind
//! all of them. Here each client (a peer process, told apart by its pid
//! from the socket's credentials) has its own queue, and the threads take
//! one call from each client in turn, so another client's call waits for
//! at most one call per client ahead of it, not for a whole flood. A
//! client's queue is bounded: past it, calls are refused at once
//! (`ResourceExhausted`) instead of holding their requests in memory.
//! Calls whose client went away before a thread took them (the handler's
//! future was dropped) are skipped. And no client runs calls on more than
//! half the threads at once: however slow its calls (a Usage of a tree of
//! millions of files, Removes waiting on the store's lock), the other half
//! is left for the others.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// Why a call did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The client has this many calls queued already.
    Busy(usize),
    /// No thread could be started, or the call panicked.
    Lost,
}

struct State {
    /// Each client's calls waiting for a thread.
    queues: HashMap<u64, VecDeque<Job>>,
    /// Clients with queued calls, in the order they are served.
    ring: VecDeque<u64>,
    /// Calls running, by client.
    running: HashMap<u64, usize>,
    queued: usize,
    threads: usize,
    idle: usize,
}

struct Inner {
    st: Mutex<State>,
    cv: Condvar,
    max_threads: usize,
    per_client: usize,
    /// The most calls of one client running at once.
    running_per_client: usize,
}

/// A pool of at most `max_threads` threads, started as calls need them.
#[derive(Clone)]
pub(crate) struct FairPool(Arc<Inner>);

impl FairPool {
    /// A pool of up to `max_threads` threads; each client may have up to
    /// `per_client` calls waiting.
    pub(crate) fn new(max_threads: usize, per_client: usize) -> FairPool {
        FairPool(Arc::new(Inner {
            st: Mutex::new(State {
                queues: HashMap::new(),
                ring: VecDeque::new(),
                running: HashMap::new(),
                queued: 0,
                threads: 0,
                idle: 0,
            }),
            cv: Condvar::new(),
            max_threads: max_threads.max(1),
            per_client: per_client.max(1),
            running_per_client: (max_threads / 2).max(1),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on one of the pool's threads as a call of `client`.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        client: u64,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Refused> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            // The caller is gone: nobody would read the answer.
            if !tx.is_closed() {
                let _ = tx.send(f());
            }
        });
        self.submit(client, job)?;
        rx.await.map_err(|_| Refused::Lost)
    }

    fn submit(&self, client: u64, job: Job) -> Result<(), Refused> {
        let mut st = self.lock();
        let q = st.queues.entry(client).or_default();
        if q.len() >= self.0.per_client {
            return Err(Refused::Busy(q.len()));
        }
        let first = q.is_empty();
        q.push_back(job);
        st.queued += 1;
        if first {
            st.ring.push_back(client);
        }
        if st.idle < st.queued && st.threads < self.0.max_threads {
            let pool = self.clone();
            let started = std::thread::Builder::new()
                .name("unlade-store".into())
                .spawn(move || pool.work());
            match started {
                Ok(_) => st.threads += 1,
                // Fewer threads are slower, not wrong; none at all is.
                Err(_) if st.threads == 0 => {
                    let emptied = st.queues.get_mut(&client).is_some_and(|q| {
                        q.pop_back();
                        q.is_empty()
                    });
                    st.queued -= 1;
                    if emptied {
                        st.queues.remove(&client);
                        st.ring.retain(|c| *c != client);
                    }
                    return Err(Refused::Lost);
                }
                Err(_) => {}
            }
        } else {
            self.0.cv.notify_one();
        }
        Ok(())
    }

    /// The next client in turn that may run one more call: taken off the
    /// front of the ring (clients at their limit go to the back).
    fn next_client(&self, st: &mut State) -> Option<u64> {
        for _ in 0..st.ring.len() {
            let c = st.ring.pop_front()?;
            if st.running.get(&c).copied().unwrap_or(0) < self.0.running_per_client {
                return Some(c);
            }
            st.ring.push_back(c);
        }
        None
    }

    fn work(&self) {
        let mut st = self.lock();
        loop {
            let Some(client) = self.next_client(&mut st) else {
                st.idle += 1;
                st = self.0.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                st.idle -= 1;
                continue;
            };
            let job = match st.queues.get_mut(&client) {
                Some(q) => {
                    let job = q.pop_front();
                    if q.is_empty() {
                        st.queues.remove(&client);
                    } else {
                        st.ring.push_back(client);
                    }
                    job
                }
                None => None,
            };
            let Some(job) = job else { continue };
            st.queued -= 1;
            *st.running.entry(client).or_default() += 1;
            drop(st);
            // A panicking call drops its sender: its caller gets `Lost`,
            // the thread goes on.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            st = self.lock();
            if let Some(n) = st.running.get_mut(&client) {
                *n -= 1;
                if *n == 0 {
                    st.running.remove(&client);
                }
            }
            // A call of a client that was at its limit may run now.
            self.0.cv.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// One client with 200 slow calls queued does not hold another
    /// client's call behind all of them: it runs after about one call per
    /// thread, not after the flood.
    #[test]
    fn a_flooding_client_does_not_starve_another() {
        let pool = FairPool::new(2, 1000);
        let rt = rt();
        rt.block_on(async {
            let mut flood = Vec::new();
            for _ in 0..200 {
                let p = pool.clone();
                flood.push(tokio::spawn(async move {
                    p.run(1, || std::thread::sleep(Duration::from_millis(20)))
                        .await
                }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let t0 = Instant::now();
            pool.run(2, || ()).await.unwrap();
            let waited = t0.elapsed();
            // The flood alone would take 200 × 20 ms / 2 = 2 s.
            assert!(waited < Duration::from_millis(500), "{waited:?}");
            for f in flood {
                f.await.unwrap().unwrap();
            }
        });
    }

    /// A client's queue is bounded; a panicking call fails only itself;
    /// a call whose caller went away before a thread took it is skipped.
    #[test]
    fn bounded_queues_panics_and_abandoned_calls() {
        use std::sync::mpsc::channel;
        let pool = FairPool::new(1, 3);
        let rt = rt();
        rt.block_on(async {
            // The one thread, held until `release` sends.
            let (started_tx, started) = channel::<()>();
            let (release, held) = channel::<()>();
            let held = Mutex::new(held);
            pool.submit(
                7,
                Box::new(move || {
                    started_tx.send(()).unwrap();
                    let _ = held.lock().unwrap().recv();
                }),
            )
            .unwrap();
            started.recv().unwrap();
            // Three queued behind it: the fourth is refused.
            let (done_tx, done) = channel::<()>();
            for _ in 0..3 {
                let d = done_tx.clone();
                pool.submit(7, Box::new(move || d.send(()).unwrap()))
                    .unwrap();
            }
            assert_eq!(pool.run(7, || ()).await, Err(Refused::Busy(3)));
            // Abandoned while queued: submitted, then its caller gone.
            let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let r2 = ran.clone();
            let gone = tokio::time::timeout(
                Duration::from_millis(10),
                pool.run(2, move || {
                    r2.store(true, std::sync::atomic::Ordering::SeqCst)
                }),
            )
            .await;
            assert!(gone.is_err());
            release.send(()).unwrap();
            for _ in 0..3 {
                done.recv().unwrap();
            }
            assert_eq!(pool.run(7, || panic!("boom")).await, Err(Refused::Lost));
            assert_eq!(pool.run(7, || 5).await, Ok(5));
            pool.run(3, || ()).await.unwrap();
            assert!(!ran.load(std::sync::atomic::Ordering::SeqCst));
        });
    }

    /// A client whose calls are slow runs on at most half the threads:
    /// another client's call finds one free at once.
    #[test]
    fn a_client_runs_on_at_most_half_the_threads() {
        use std::sync::mpsc::channel;
        let pool = FairPool::new(4, 100);
        let rt = rt();
        rt.block_on(async {
            let (release, held) = channel::<()>();
            let held = Arc::new(Mutex::new(held));
            for _ in 0..10 {
                let h = held.clone();
                pool.submit(
                    1,
                    Box::new(move || {
                        let _ = h.lock().unwrap().recv_timeout(Duration::from_secs(30));
                    }),
                )
                .unwrap();
            }
            let t0 = Instant::now();
            tokio::time::timeout(Duration::from_secs(10), pool.run(2, || ()))
                .await
                .expect("a thread left for client 2")
                .unwrap();
            assert!(t0.elapsed() < Duration::from_secs(5));
            for _ in 0..10 {
                let _ = release.send(());
            }
        });
    }
}
