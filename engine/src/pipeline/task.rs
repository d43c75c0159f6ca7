//! [`Task`]: a blocking root operation running on its own thread, which a
//! caller can `.await` (it is a `Future`, with no runtime dependency),
//! [`Task::wait`] for, or cancel — explicitly or by dropping it, the way an
//! async request handler drops work its client abandoned.
//!
//! The engine's operations block (they are file-system work on several
//! threads); this is the bridge for async runtimes that must not block
//! their executor threads.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use crate::cancel::Cancel;

struct Shared<T> {
    slot: Mutex<(Option<T>, Option<Waker>)>,
    cv: Condvar,
}

/// A running operation. Dropping it before it finished cancels it.
pub struct Task<T> {
    shared: Arc<Shared<T>>,
    cancel: Cancel,
    finished: bool,
}

/// Runs `f` on a new thread with a fresh [`Cancel`] token.
pub fn spawn<T: Send + 'static>(f: impl FnOnce(&Cancel) -> T + Send + 'static) -> Task<T> {
    let cancel = Cancel::new();
    let shared = Arc::new(Shared {
        slot: Mutex::new((None, None)),
        cv: Condvar::new(),
    });
    let (s, c) = (shared.clone(), cancel.clone());
    // Kept outside the thread's closure so that a thread the system
    // refuses (a memory or task limit) runs the work here instead of
    // panicking: the caller blocks, but gets its result.
    let work = Arc::new(Mutex::new(Some(f)));
    let w = work.clone();
    let run = move || {
        let f = w.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(f) = f {
            let v = f(&c);
            let mut g = s.slot.lock().unwrap_or_else(|p| p.into_inner());
            g.0 = Some(v);
            if let Some(w) = g.1.take() {
                w.wake();
            }
            s.cv.notify_all();
        }
    };
    if let Err(refused) = std::thread::Builder::new()
        .name("unlade-task".into())
        .spawn(run)
    {
        drop(refused);
        let f = work.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(f) = f {
            let v = f(&cancel);
            shared.slot.lock().unwrap_or_else(|p| p.into_inner()).0 = Some(v);
        }
    }
    Task {
        shared,
        cancel,
        finished: false,
    }
}

impl<T> Task<T> {
    /// Asks the operation to stop; it then finishes with a "cancelled"
    /// error soon.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Blocks until the operation finishes.
    pub fn wait(mut self) -> T {
        let mut g = self.shared.slot.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(v) = g.0.take() {
                drop(g);
                self.finished = true;
                return v;
            }
            g = self.shared.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl<T> Future for Task<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let shared = self.shared.clone();
        let mut g = shared.slot.lock().unwrap_or_else(|p| p.into_inner());
        match g.0.take() {
            Some(v) => {
                drop(g);
                self.finished = true;
                Poll::Ready(v)
            }
            None => {
                g.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        if !self.finished {
            self.cancel.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::Wake;

    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn polls_wakes_and_cancels_on_drop() {
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let mut t = spawn(move |_| {
            let _ = rx.recv();
            5
        });
        assert!(Pin::new(&mut t).poll(&mut cx).is_pending());
        tx.send(()).unwrap();
        while !flag.0.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        assert_eq!(Pin::new(&mut t).poll(&mut cx), Poll::Ready(5));

        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let t = spawn(move |c: &Cancel| {
            let c = c.clone();
            crossbeam_channel::select! { recv(c.signal()) -> _ => {} }
            seen_tx.send(c.is_cancelled()).unwrap();
        });
        drop(t);
        assert!(seen_rx.recv().unwrap());
    }
}
