//! Singleflight: when many ask for the same work at once (one blob, one
//! layer of one snapshotter), one of them — the leader — does it and the
//! others wait for its outcome instead of repeating it.
//!
//! Within a process, [`Flights`] is a sharded map of lock-free hash tables
//! (papaya) from [`Key`] to a call in progress: joining a flight is one
//! lock-free insert-or-get, with no global mutex on the path. Each call
//! has its own small mutex for its state and a broadcast channel that is
//! replaced on every change, so waiters are woken by the leader's
//! completion (or their own [`Cancel`]) and never poll.
//!
//! - The leader's success is every waiter's success.
//! - When the leader fails, is cancelled or panics, one waiter takes over
//!   and does the work itself; the others keep waiting for it. A waiter
//!   may instead adopt the leader's error when the caller's `adopt` test
//!   says that error is its own too (the same blob would fail the same
//!   way): 20 requests for a corrupt blob fail once, not 20 times in turn.
//! - A waiter's own cancellation frees only that waiter.
//!
//! Across processes sharing a root, the leader also holds a [`crate::store::lock::FileLock`]
//! named after the key while it works; a process that finds it held waits
//! for the kernel to hand it over — when the holder finishes or dies —
//! and then reads the outcome from disk (the committed snapshot or the
//! published blob is there, or it takes over).

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_channel::{Receiver, Sender};

use crate::cancel::Cancel;
use crate::oci::digest::Digest;

/// What a flight is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// Getting a blob into the content store.
    Blob(Digest),
    /// Applying and committing the snapshot of a chain ID.
    Snapshot(Digest),
    /// Resolving a reference (the digest of what identifies the request:
    /// reference, platform, registry settings); in-process only.
    Resolve(Digest),
}

impl Key {
    fn digest(&self) -> &Digest {
        match self {
            Key::Blob(d) | Key::Snapshot(d) | Key::Resolve(d) => d,
        }
    }

    /// The name of the key's lock file under the root's `locks/`.
    pub fn lock_name(&self) -> String {
        match self {
            Key::Blob(d) => format!("blob-{}", d.hex()),
            Key::Snapshot(d) => format!("snapshot-{}", d.hex()),
            Key::Resolve(d) => format!("resolve-{}", d.hex()),
        }
    }
}

/// How a caller got its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// It did the work: nobody else was.
    Led,
    /// Another caller did the work and this one used the outcome.
    Waited,
    /// The leader failed and this waiter did the work instead.
    TookOver,
}

/// Why a flight gave no value.
#[derive(Debug)]
#[non_exhaustive]
pub enum FlightError<E> {
    /// The caller's own token was cancelled while it waited.
    Cancelled,
    /// The work failed: this caller's own attempt, or a leader's failure
    /// that `adopt` accepted.
    Failed(E),
}

enum State<T, E> {
    Running,
    Done(T),
    /// The leader failed; the first waiter to look takes over (or adopts).
    Failed(Option<E>),
    /// Out of the map: arrivals that still hold it start again.
    Gone,
}

struct Slot<T, E> {
    state: State<T, E>,
    waiters: usize,
    // Dropping the sender wakes every waiter holding a receiver clone.
    changed: (Sender<()>, Receiver<()>),
}

impl<T, E> Slot<T, E> {
    fn set(&mut self, s: State<T, E>) {
        self.state = s;
        self.changed = crossbeam_channel::bounded(0);
    }
}

struct Call<T, E> {
    slot: Mutex<Slot<T, E>>,
}

impl<T, E> Call<T, E> {
    fn new() -> Arc<Self> {
        Arc::new(Call {
            slot: Mutex::new(Slot {
                state: State::Running,
                waiters: 0,
                changed: crossbeam_channel::bounded(0),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Slot<T, E>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

const SHARDS: usize = 16;

type Shard<T, E> = papaya::HashMap<Key, Arc<Call<T, E>>>;

/// The flights of one process (one per [`crate::root::Root`]).
pub struct Flights<T, E> {
    shards: Box<[Shard<T, E>]>,
}

impl<T, E> fmt::Debug for Flights<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flights").finish_non_exhaustive()
    }
}

impl<T: Clone, E: Clone> Default for Flights<T, E> {
    fn default() -> Self {
        Self::new()
    }
}

/// Marks the call failed if the leader unwinds without finishing.
struct LeadGuard<'a, T: Clone, E: Clone> {
    flights: &'a Flights<T, E>,
    key: Key,
    call: Arc<Call<T, E>>,
    armed: bool,
}

impl<T: Clone, E: Clone> Drop for LeadGuard<'_, T, E> {
    fn drop(&mut self) {
        if self.armed {
            self.flights.fail(&self.key, &self.call, None);
        }
    }
}

impl<T: Clone, E: Clone> Flights<T, E> {
    /// No flights yet.
    pub fn new() -> Self {
        Flights {
            shards: (0..SHARDS).map(|_| papaya::HashMap::new()).collect(),
        }
    }

    fn shard(&self, key: &Key) -> &Shard<T, E> {
        &self.shards[key.digest().0[0] as usize % SHARDS]
    }

    /// Number of flights in progress (for tests and diagnostics).
    pub fn in_flight(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// Callers waiting on the flight of `key` (tests use it to know that
    /// every caller has joined before the leader finishes).
    #[cfg(test)]
    fn waiting(&self, key: &Key) -> usize {
        let map = self.shard(key).pin();
        map.get(key).map_or(0, |c| c.lock().waiters)
    }

    /// Runs `work` as the leader of `key`, or waits for the leader's
    /// outcome. `adopt` says whether a failed leader's error is this
    /// caller's too; if not, the caller takes over and runs its own `work`.
    pub fn run(
        &self,
        key: Key,
        cancel: &Cancel,
        adopt: impl Fn(&E) -> bool,
        work: impl FnOnce() -> Result<T, E>,
    ) -> Result<(T, Role), FlightError<E>> {
        loop {
            if cancel.is_cancelled() {
                return Err(FlightError::Cancelled);
            }
            let map = self.shard(&key).pin();
            let call = match map.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let mine = Call::new();
                    match map.try_insert(key, mine.clone()) {
                        Ok(_) => {
                            drop(map);
                            return self.lead(key, mine, Role::Led, work);
                        }
                        Err(occupied) => occupied.current.clone(),
                    }
                }
            };
            drop(map);
            let mut g = call.lock();
            if matches!(g.state, State::Gone) {
                continue;
            }
            g.waiters += 1;
            loop {
                match &g.state {
                    State::Done(v) => {
                        let v = v.clone();
                        g.waiters -= 1;
                        return Ok((v, Role::Waited));
                    }
                    State::Gone => {
                        g.waiters -= 1;
                        break;
                    }
                    State::Failed(err) => {
                        if let Some(e) = err.as_ref().filter(|e| adopt(e)) {
                            let e = e.clone();
                            self.leave(&key, &call, &mut g);
                            return Err(FlightError::Failed(e));
                        }
                        if cancel.is_cancelled() {
                            self.leave(&key, &call, &mut g);
                            return Err(FlightError::Cancelled);
                        }
                        g.waiters -= 1;
                        g.set(State::Running);
                        drop(g);
                        return self.lead(key, call, Role::TookOver, work);
                    }
                    State::Running => {
                        if cancel.is_cancelled() {
                            g.waiters -= 1;
                            return Err(FlightError::Cancelled);
                        }
                        let rx = g.changed.1.clone();
                        drop(g);
                        crossbeam_channel::select! {
                            recv(rx) -> _ => {},
                            recv(cancel.signal()) -> _ => {},
                        }
                        g = call.lock();
                    }
                }
            }
        }
    }

    /// A waiter leaves a failed call; the last one out removes it.
    fn leave(&self, key: &Key, call: &Arc<Call<T, E>>, g: &mut MutexGuard<'_, Slot<T, E>>) {
        g.waiters -= 1;
        if g.waiters == 0 && matches!(g.state, State::Failed(_)) {
            g.set(State::Gone);
            self.remove(key, call);
        }
    }

    fn remove(&self, key: &Key, call: &Arc<Call<T, E>>) {
        let _ = self
            .shard(key)
            .pin()
            .remove_if(key, |_, v| Arc::ptr_eq(v, call));
    }

    fn lead(
        &self,
        key: Key,
        call: Arc<Call<T, E>>,
        role: Role,
        work: impl FnOnce() -> Result<T, E>,
    ) -> Result<(T, Role), FlightError<E>> {
        let mut guard = LeadGuard {
            flights: self,
            key,
            call: call.clone(),
            armed: true,
        };
        let r = work();
        guard.armed = false;
        match r {
            Ok(v) => {
                let mut g = call.lock();
                g.set(State::Done(v.clone()));
                self.remove(&key, &call);
                Ok((v, role))
            }
            Err(e) => {
                self.fail(&key, &call, Some(e.clone()));
                Err(FlightError::Failed(e))
            }
        }
    }

    fn fail(&self, key: &Key, call: &Arc<Call<T, E>>, e: Option<E>) {
        let mut g = call.lock();
        if g.waiters == 0 {
            g.set(State::Gone);
            self.remove(key, call);
        } else {
            g.set(State::Failed(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;
    use std::time::Duration;

    fn key(n: u8) -> Key {
        Key::Snapshot(Digest([n; 32]))
    }

    /// Blocks the leader until `n` other callers wait on its flight, so
    /// that what a test asserts does not depend on thread timing.
    fn until_waiting<T: Clone, E: Clone>(f: &Flights<T, E>, k: Key, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while f.waiting(&k) < n {
            assert!(std::time::Instant::now() < deadline, "callers never joined");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn many_callers_one_run() {
        let f: Flights<u32, String> = Flights::new();
        let runs = AtomicUsize::new(0);
        let barrier = Barrier::new(20);
        let roles: Vec<Role> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..20)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let (v, role) = f
                            .run(
                                key(1),
                                &Cancel::new(),
                                |_| true,
                                || {
                                    runs.fetch_add(1, Ordering::SeqCst);
                                    until_waiting(&f, key(1), 19);
                                    Ok(7)
                                },
                            )
                            .unwrap();
                        assert_eq!(v, 7);
                        role
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(roles.iter().filter(|r| **r == Role::Led).count(), 1);
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn failed_leader_is_taken_over_once() {
        let f: Flights<u32, String> = Flights::new();
        let runs = AtomicUsize::new(0);
        let barrier = Barrier::new(8);
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        f.run(
                            key(2),
                            &Cancel::new(),
                            |_| false,
                            || {
                                let n = runs.fetch_add(1, Ordering::SeqCst);
                                // Every other caller waits on the first
                                // leader, then on the one taking over.
                                until_waiting(&f, key(2), 7 - n);
                                if n == 0 {
                                    Err("first leader fails".to_string())
                                } else {
                                    Ok(9)
                                }
                            },
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // The first leader fails alone; exactly one waiter redoes the work.
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        let ok = results.iter().filter(|r| matches!(r, Ok((9, _)))).count();
        assert_eq!(ok, 7);
        assert!(results.iter().any(|r| matches!(r, Ok((9, Role::TookOver)))));
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn adopted_error_is_shared() {
        let f: Flights<u32, String> = Flights::new();
        let runs = AtomicUsize::new(0);
        let barrier = Barrier::new(6);
        let errs = std::thread::scope(|s| {
            let hs: Vec<_> = (0..6)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        f.run(
                            key(3),
                            &Cancel::new(),
                            |_| true,
                            || {
                                runs.fetch_add(1, Ordering::SeqCst);
                                until_waiting(&f, key(3), 5);
                                Err::<u32, _>("corrupt".to_string())
                            },
                        )
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .filter(|r| matches!(r, Err(FlightError::Failed(e)) if e == "corrupt"))
                .count()
        });
        // One failure, adopted by every waiter: nobody runs it again.
        assert_eq!(errs, 6);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn cancelled_waiter_frees_only_itself() {
        let f: Flights<u32, String> = Flights::new();
        let started = Barrier::new(2);
        std::thread::scope(|s| {
            let leader = s.spawn(|| {
                f.run(
                    key(4),
                    &Cancel::new(),
                    |_| true,
                    || {
                        started.wait();
                        std::thread::sleep(Duration::from_millis(300));
                        Ok(1)
                    },
                )
            });
            started.wait();
            let c = Cancel::new();
            let c2 = c.clone();
            let fr = &f;
            let waiter = s.spawn(move || fr.run(key(4), &c2, |_| true, || Ok(2)));
            let other = s.spawn(|| f.run(key(4), &Cancel::new(), |_| true, || Ok(3)));
            std::thread::sleep(Duration::from_millis(50));
            c.cancel();
            assert!(matches!(
                waiter.join().unwrap(),
                Err(FlightError::Cancelled)
            ));
            assert!(matches!(leader.join().unwrap(), Ok((1, Role::Led))));
            assert!(matches!(other.join().unwrap(), Ok((1, Role::Waited))));
        });
    }

    #[test]
    fn panicking_leader_is_taken_over() {
        let f: Flights<u32, String> = Flights::new();
        let started = Barrier::new(2);
        std::thread::scope(|s| {
            let leader = s.spawn(|| {
                f.run(
                    key(5),
                    &Cancel::new(),
                    |_| true,
                    || {
                        started.wait();
                        std::thread::sleep(Duration::from_millis(100));
                        panic!("leader dies")
                    },
                )
            });
            started.wait();
            let waiter = s.spawn(|| f.run(key(5), &Cancel::new(), |_| true, || Ok(5)));
            assert!(leader.join().is_err());
            assert!(matches!(waiter.join().unwrap(), Ok((5, Role::TookOver))));
        });
        assert_eq!(f.in_flight(), 0);
    }
}
