//! A counting semaphore for the pipeline's limits: apply permits
//! ([`crate::pipeline::unpack`]: at most `parallel_layers` applies at once,
//! whatever the number of unpacks) and download slots
//! ([`crate::pipeline::fetch`]: at most `max_downloads` at once, lowest
//! layer first).
//!
//! A freed permit goes to the waiter with the lowest priority number
//! (waiters of one number in no particular order), so that downloads of
//! the layers above do not hold up the commits in chain order. A waiter
//! leaves when its [`Cancel`] trips and [`Permits::wake_all`] is called.
//! A holder that waits for something that may itself need a permit gives
//! its own back meanwhile ([`Permits::pause`], [`Permits::resume`]).

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::cancel::Cancel;

/// At most `n` holders at once.
#[derive(Debug)]
pub struct Permits {
    state: Mutex<State>,
    cv: Condvar,
}

#[derive(Debug)]
struct State {
    /// Permits not held.
    free: usize,
    /// Waiters in [`Permits::acquire`], by priority: how many of each.
    waiting: BTreeMap<u64, usize>,
}

/// A held permit; dropping it gives it back.
#[derive(Debug)]
pub struct Permit<'a>(&'a Permits);

impl Permits {
    /// `n` permits (at least one).
    pub fn new(n: usize) -> Self {
        Permits {
            state: Mutex::new(State {
                free: n.max(1),
                waiting: BTreeMap::new(),
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a permit when one is free and no waiter with a lower `prio`
    /// wants it; `None` if `cancel` trips first.
    pub fn acquire(&self, prio: u64, cancel: &Cancel) -> Option<Permit<'_>> {
        let mut g = self.lock();
        *g.waiting.entry(prio).or_default() += 1;
        loop {
            let first = g.waiting.keys().next().copied();
            let cancelled = cancel.is_cancelled();
            if cancelled || (g.free > 0 && first == Some(prio)) {
                let e = g.waiting.entry(prio).or_default();
                *e -= 1;
                if *e == 0 {
                    g.waiting.remove(&prio);
                }
                if cancelled {
                    // The next waiter may be first now.
                    drop(g);
                    self.cv.notify_all();
                    return None;
                }
                g.free -= 1;
                return Some(Permit(self));
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Gives one held permit back for a while (a wait that holds none);
    /// [`Self::resume`] takes it again.
    pub fn pause(&self) {
        self.lock().free += 1;
        self.cv.notify_all();
    }

    /// Takes the paused permit again as soon as one is free, before any
    /// waiter and whatever the cancel state (the caller's [`Permit`] gives
    /// it back when dropped).
    pub fn resume(&self) {
        let mut g = self.lock();
        while g.free == 0 {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.free -= 1;
    }

    /// Whether a caller with a lower priority number than `prio` waits for
    /// a permit: a holder that can pause between two pieces of work (a
    /// connection between two chunks) gives its permit up to it.
    pub fn wanted_below(&self, prio: u64) -> bool {
        self.lock().waiting.keys().next().is_some_and(|&p| p < prio)
    }

    /// Wakes every waiter, so that cancelled ones leave.
    pub fn wake_all(&self) {
        let _g = self.lock();
        self.cv.notify_all();
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.lock().free += 1;
        self.0.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn permits_go_to_the_lowest_waiter() {
        let permits = Arc::new(Permits::new(1));
        let c = Cancel::new();
        let first = permits.acquire(5, &c).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let hs: Vec<_> = [9u64, 3, 7]
            .into_iter()
            .map(|p| {
                let (permits, order, c) = (permits.clone(), order.clone(), c.clone());
                std::thread::spawn(move || {
                    let _s = permits.acquire(p, &c).unwrap();
                    order.lock().unwrap().push(p);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        drop(first);
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![3, 7, 9]);
    }

    /// A holder between two pieces of work hears of a lower waiter (and
    /// only of a lower one): a connection of a higher layer gives way.
    #[test]
    fn a_holder_hears_of_a_lower_waiter() {
        let permits = Arc::new(Permits::new(1));
        let c = Cancel::new();
        let held = permits.acquire(5, &c).unwrap();
        assert!(!permits.wanted_below(5));
        let higher = {
            let (permits, c) = (permits.clone(), c.clone());
            std::thread::spawn(move || drop(permits.acquire(9, &c)))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!permits.wanted_below(5), "a higher waiter does not count");
        let lower = {
            let (permits, c) = (permits.clone(), c.clone());
            std::thread::spawn(move || permits.acquire(2, &c).map(|_| ()))
        };
        let t0 = std::time::Instant::now();
        while !permits.wanted_below(5) {
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(held);
        assert!(lower.join().unwrap().is_some());
        higher.join().unwrap();
    }

    #[test]
    fn a_paused_permit_serves_a_waiter_and_comes_back() {
        let permits = Arc::new(Permits::new(1));
        let held = permits.acquire(0, &Cancel::new()).unwrap();
        permits.pause();
        // The one permit is free while paused: another takes it and gives
        // it back, then the holder resumes.
        let other = {
            let permits = permits.clone();
            std::thread::spawn(move || drop(permits.acquire(0, &Cancel::new()).unwrap()))
        };
        other.join().unwrap();
        permits.resume();
        assert_eq!(permits.lock().free, 0);
        drop(held);
        assert_eq!(permits.lock().free, 1);
    }

    #[test]
    fn cancelled_waiters_leave() {
        let permits = Arc::new(Permits::new(1));
        let _held = permits.acquire(0, &Cancel::new()).unwrap();
        let c = Cancel::new();
        let waiter = {
            let (permits, c) = (permits.clone(), c.clone());
            std::thread::spawn(move || permits.acquire(1, &c).is_none())
        };
        std::thread::sleep(Duration::from_millis(20));
        c.cancel();
        permits.wake_all();
        assert!(waiter.join().unwrap());
        assert!(permits.lock().waiting.is_empty());
    }
}
