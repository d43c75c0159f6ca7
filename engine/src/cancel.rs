//! Cancellation: a token a caller (a runtime's request handler, a signal
//! handler, a test) trips to make an operation stop soon.
//!
//! Long loops poll [`Cancel::is_cancelled`] (one atomic load per tar entry);
//! blocked waits — for a flight's leader, for another process's file lock —
//! select on [`Cancel::signal`], a channel that disconnects when the token is
//! cancelled, so a waiter wakes at once instead of sleeping in a back-off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};

/// A cheap, cloneable cancellation token. Clones share one state: cancel
/// any of them and every operation holding one stops.
#[derive(Clone, Debug)]
pub struct Cancel(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    flag: AtomicBool,
    // Never sends: dropping it disconnects `rx`, which wakes every select.
    tx: Mutex<Option<Sender<()>>>,
    rx: Receiver<()>,
}

impl Default for Cancel {
    fn default() -> Self {
        Self::new()
    }
}

impl Cancel {
    /// A token nobody has cancelled yet.
    pub fn new() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(0);
        Cancel(Arc::new(Inner {
            flag: AtomicBool::new(false),
            tx: Mutex::new(Some(tx)),
            rx,
        }))
    }

    /// Asks every operation holding this token to stop. Idempotent.
    pub fn cancel(&self) {
        self.0.flag.store(true, Ordering::SeqCst);
        let tx = match self.0.tx.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        drop(tx);
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.flag.load(Ordering::SeqCst)
    }

    /// A channel that never carries a message and disconnects on cancel:
    /// put it in a `select!` beside what you wait for.
    pub fn signal(&self) -> &Receiver<()> {
        &self.0.rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_wakes_a_select() {
        let c = Cancel::new();
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            let (_tx, rx) = crossbeam_channel::bounded::<()>(0);
            crossbeam_channel::select! {
                recv(rx) -> _ => false,
                recv(c2.signal()) -> _ => true,
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!c.is_cancelled());
        c.cancel();
        assert!(t.join().unwrap());
        assert!(c.is_cancelled());
    }
}
