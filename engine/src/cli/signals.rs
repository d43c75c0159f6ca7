//! SIGINT and SIGTERM during `pull` and `unpack`: the first trips the
//! operation's [`Cancel`], so it stops at the next tar entry, wait or read,
//! discards its unfinished snapshots and ingest files, and commits
//! nothing half-done; the command then exits 130 (SIGINT) or 143
//! (SIGTERM) with one line, `unlade: interrupted (SIGINT): nothing
//! half-done was committed`. A second signal while that shutdown runs
//! exits at once with the same code (what it leaves is private: an
//! unlocked active snapshot, which the next open of the root removes).
//!
//! The signals are received with signal-hook's iterator on a thread of
//! their own (no code of ours runs in a signal handler), and only by the
//! commands that take a [`Cancel`]; the others keep the default
//! disposition and die by the signal, which is safe for them (each of
//! their changes is one rename, link or unlink).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use unlade::Cancel;

/// The signal watch of one operation: hand [`Interrupts::cancel`] to it.
pub struct Interrupts {
    cancel: Cancel,
    got: Arc<AtomicI32>,
}

/// Starts watching for SIGINT and SIGTERM.
pub fn watch() -> std::io::Result<Interrupts> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let cancel = Cancel::new();
    let got = Arc::new(AtomicI32::new(0));
    let (c, g) = (cancel.clone(), got.clone());
    std::thread::Builder::new()
        .name("unlade-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if g.swap(sig, Ordering::SeqCst) != 0 {
                    eprintln!("unlade: interrupted again ({}): exiting at once", name(sig));
                    std::process::exit(exit_code(sig).into());
                }
                c.cancel();
            }
        })?;
    Ok(Interrupts { cancel, got })
}

impl Interrupts {
    /// The token the signals trip.
    pub fn cancel(&self) -> &Cancel {
        &self.cancel
    }

    /// The error to report for the operation's error `e`: [`Interrupted`]
    /// if a signal stopped it (whatever it failed with on the way out),
    /// else `e`.
    pub fn explain(&self, e: impl Into<Box<dyn std::error::Error>>) -> Box<dyn std::error::Error> {
        match self.got.load(Ordering::SeqCst) {
            0 => e.into(),
            sig => Box::new(Interrupted(sig)),
        }
    }
}

/// An operation stopped by a signal; exits with [`Interrupted::exit_code`].
#[derive(Debug)]
pub struct Interrupted(i32);

impl Interrupted {
    /// 128 + the signal number, as a shell reports a death by it.
    pub fn exit_code(&self) -> u8 {
        exit_code(self.0)
    }
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted ({}): nothing half-done was committed",
            name(self.0)
        )
    }
}

impl std::error::Error for Interrupted {}

fn name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

fn exit_code(sig: i32) -> u8 {
    u8::try_from(128 + sig).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_line() {
        assert_eq!(Interrupted(SIGINT).exit_code(), 130);
        assert_eq!(Interrupted(SIGTERM).exit_code(), 143);
        assert_eq!(
            Interrupted(SIGTERM).to_string(),
            "interrupted (SIGTERM): nothing half-done was committed"
        );
    }
}
